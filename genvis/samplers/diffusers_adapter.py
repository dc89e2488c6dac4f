"""Run any diffusers scheduler on a genvis model: `sampler="diffusers:<SchedulerClass>"`.

The scheduler is built from the genvis schedule, so it sees exactly the noise levels the model
was trained on:

    discrete VP (DiT "linear", ...)  trained_betas = schedule.betas, num_train_timesteps = len(betas);
                                     diffusers timestep t is genvis time t (fractional for Karras-type
                                     sigmas, which genvis interpolates in log(alpha_bar))
    rectified flow                   FlowMatch* classes with the schedule's shift, or use_flow_sigmas = True with
                                     prediction_type "flow_prediction" where the class has it;
                                     genvis time = timestep / num_train_timesteps = sigma
    anything else                    ValueError

clip_sample is off by default (genvis never clips: latents are not confined to [-1, 1]);
`scheduler_kwargs` overrides it and sets any other constructor option.

The scheduler makes its own timesteps: only the length of the genvis grid is used,
num_inference_steps = len(grid) - 1. Each step feeds the genvis prediction converted to the
scheduler's prediction_type, with x_t = alpha x0 + sigma eps at the genvis time:

    epsilon          eps
    v_prediction     alpha eps - sigma x0
    sample           x0
    flow_prediction  eps - x0   (dx_t/dt for x_t = (1 - t) x0 + t eps)

The model sees the scheduler's timestep, as in a diffusers pipeline, so diffusers' own rounding is
kept: DPMSolverMultistep casts its timesteps to integers (with use_karras_sigmas or use_flow_sigmas
the model is evaluated at the rounded time while the step uses the unrounded sigma), and
Euler-type classes interpolate sigma linearly between training steps where genvis interpolates
log(alpha_bar). A list of per-sample generators cannot be honoured (the scheduler draws the
batch's noise at once): the first is used, with a warning.
"""
from __future__ import annotations

import inspect
import warnings
from typing import Callable

import torch
from tqdm.auto import tqdm

from genvis.diffusion.predictions import Denoiser, per_sample, target
from genvis.diffusion.schedules import DiscreteVPSchedule

# diffusers prediction_type -> genvis prediction type of the same quantity
PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0", "flow_prediction": "velocity"}


def available_schedulers() -> list:
    """Names of the scheduler classes diffusers exports (Flax ones excluded)."""
    import diffusers

    return sorted(n for n in dir(diffusers) if n.endswith("Scheduler") and not n.startswith("Flax"))


def scheduler_class(class_name: str) -> type:
    """diffusers.<class_name>, checked to be a SchedulerMixin subclass."""
    import diffusers
    from diffusers import SchedulerMixin

    cls = getattr(diffusers, class_name, None)
    backends = getattr(cls, "_backends", None)  # diffusers' placeholder for a class whose packages are missing
    if backends is not None and not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise ValueError(f"diffusers scheduler {class_name!r} needs the package(s) {', '.join(backends)}; install them")
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)) or cls is SchedulerMixin:
        what = "unknown diffusers scheduler" if cls is None else "not a diffusers scheduler (SchedulerMixin) class:"
        raise ValueError(f"{what} {class_name!r}; expected one of: {', '.join(available_schedulers())}")
    return cls


def _init_params(cls: type) -> dict:
    return {k: p for k, p in inspect.signature(cls.__init__).parameters.items() if k != "self"}


def build_scheduler(cls: type, schedule, scheduler_kwargs: dict = None):
    """An instance of `cls` whose noise levels are those of the genvis `schedule`."""
    params = _init_params(cls)
    user = dict(scheduler_kwargs or {})
    unknown = sorted(set(user) - set(params))
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown scheduler option(s) {', '.join(unknown)}; it takes: {', '.join(params)}")
    name = cls.__name__
    if isinstance(schedule, DiscreteVPSchedule):
        if "trained_betas" not in params:
            raise ValueError(f"{name} takes no trained_betas, so it cannot run the discrete schedule {schedule.name!r}")
        fixed = {"trained_betas": schedule.betas.tolist(), "num_train_timesteps": schedule.num_timesteps}
        defaults = {"clip_sample": False} if "clip_sample" in params else {}
    elif schedule.is_flow:
        fixed = {}
        if name.startswith("FlowMatch"):
            defaults = {"shift": schedule.shift}
        elif "use_flow_sigmas" in params and "prediction_type" in params:
            defaults = {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "flow_shift": schedule.shift}
        else:
            raise ValueError(f"{name} has no flow-matching mode (use a FlowMatch* scheduler or one with use_flow_sigmas) "
                             f"for the schedule {schedule.name!r}")
    else:
        raise ValueError(f"diffusers schedulers run on discrete VP schedules (trained_betas) and on 'flow'; "
                         f"{schedule.name!r} is neither")
    clash = sorted(set(user) & set(fixed))
    if clash:
        raise ValueError(f"{name}: {', '.join(clash)} come from the genvis schedule {schedule.name!r} and cannot be set")
    scheduler = cls(**{**defaults, **user, **fixed})
    if isinstance(schedule, DiscreteVPSchedule):
        _check_alphas_cumprod(scheduler, schedule)
    return scheduler


def _check_alphas_cumprod(scheduler, schedule: DiscreteVPSchedule) -> None:
    """The scheduler's alpha_bar must be the schedule's (not, e.g., rescaled to zero terminal SNR,
    or a class whose trained_betas mean something else)."""
    abar = getattr(scheduler, "alphas_cumprod", None)
    ok = abar is not None and len(abar) == schedule.num_timesteps and torch.allclose(
        torch.as_tensor(abar, dtype=torch.float64), schedule.alphas_cumprod, rtol=1e-4, atol=1e-7)
    if not ok:
        raise ValueError(f"{type(scheduler).__name__} with these options does not use the alpha_bar of the schedule "
                         f"{schedule.name!r}, so its noise levels would not be the model's")


def _prediction_type(scheduler, schedule) -> str:
    kind = scheduler.config.get("prediction_type", "flow_prediction" if schedule.is_flow else "epsilon")
    if kind not in PREDICTION_TYPES:
        raise ValueError(f"{type(scheduler).__name__}: prediction_type {kind!r} is not supported; "
                         f"expected one of: {', '.join(PREDICTION_TYPES)}")
    if (kind == "flow_prediction") != bool(schedule.is_flow):
        raise ValueError(f"prediction_type {kind!r} does not fit the schedule {schedule.name!r}")
    return kind


def _genvis_times(scheduler, schedule) -> list:
    """The scheduler's timesteps in genvis units, checked to lie inside the schedule."""
    ts = scheduler.timesteps.double()
    if schedule.is_flow:
        ts = ts / scheduler.config.num_train_timesteps
    times = ts.tolist()
    if min(times) < schedule.data_end or max(times) > schedule.noise_end + 1e-6:
        raise ValueError(f"{type(scheduler).__name__}: timesteps {min(times):g}..{max(times):g} lie outside the schedule "
                         f"{schedule.name!r} ({schedule.data_end:g}..{schedule.noise_end:g}); its options give timesteps "
                         "in other units")
    return times


def _step_generator(step: Callable, generator):
    """{"generator": g} when the step draws noise with one; a list of per-sample generators gives its first."""
    if generator is None or "generator" not in inspect.signature(step).parameters:
        return {}
    if not isinstance(generator, torch.Generator):
        warnings.warn("diffusers schedulers draw the whole batch's noise from one generator: using the first of the "
                      "per-sample generators, so a sample's noise depends on its batch")
        generator = generator[0]
    return {"generator": generator}


def run_scheduler(scheduler, denoiser: Denoiser, x, *, cond=None, generator=None, callback=None, progress=False,
                  step_kwargs=None):
    """The diffusers sampling loop with the genvis denoiser as the model; returns the final prev_sample.

    x is unit-normal noise; it is scaled by init_noise_sigma (1 where the scheduler has none), and
    the model input is scale_model_input(x, t) where the scheduler has that method. The callback's
    "x" is the scheduler's own state (x_t / alpha for the sigma-parameterised Euler-type classes).
    """
    cond = cond or {}
    schedule = denoiser.schedule
    kind = PREDICTION_TYPES[_prediction_type(scheduler, schedule)]
    times = _genvis_times(scheduler, schedule)
    scale = getattr(scheduler, "scale_model_input", lambda sample, t: sample)
    extra = {**(step_kwargs or {}), **_step_generator(scheduler.step, generator)}
    x = x * getattr(scheduler, "init_noise_sigma", 1.0)
    pairs = list(enumerate(zip(scheduler.timesteps, times)))
    for i, (t, t_genvis) in tqdm(pairs, desc=type(scheduler).__name__, leave=False) if progress else pairs:
        model_input = scale(x, t)
        pred = denoiser.predict(model_input, t_genvis, **cond)
        t64 = torch.tensor(t_genvis, dtype=torch.float64)
        alpha, sigma = (per_sample(v, x) for v in schedule.alpha_sigma(t64))
        dalpha = dsigma = None
        if kind == "velocity":
            dalpha, dsigma = (per_sample(v, x) for v in schedule.alpha_sigma_derivatives(t64))
        out = target(kind, pred.x0, pred.eps, alpha, sigma, dalpha, dsigma)
        x = scheduler.step(out, t, x, **extra).prev_sample
        if callback is not None:
            callback({"i": i, "t": t_genvis, "x": x, "denoised": pred.x0})
    return x.float()


def _intervals_for(cls: type) -> Callable[[int], int]:
    """steps (model evaluations) -> num_inference_steps: the second-order k-diffusion-style classes
    (class attribute order = 2: Heun, KDPM2, ...) take 2 n - 1 evaluations for n steps."""
    if getattr(cls, "order", 1) == 2:
        return lambda steps: max(1, (steps + 1) // 2)
    return lambda steps: steps


def diffusers_sampler(class_name: str) -> Callable:
    """A genvis sampler function that runs diffusers.<class_name> (see the module docstring).

    Options: scheduler_kwargs (dict for the scheduler's constructor, e.g. {"algorithm_type":
    "dpmsolver++", "solver_order": 3, "timestep_spacing": "trailing", "use_karras_sigmas": True})
    and step_kwargs (dict for each scheduler.step call, e.g. {"eta": 1.0} for DDIM).
    """
    cls = scheduler_class(class_name)
    order = getattr(cls, "order", 1)
    stochastic = "generator" in inspect.signature(cls.step).parameters

    @torch.no_grad()
    def sample_diffusers(denoiser: Denoiser, x, grid, *, cond=None, generator=None, callback=None, progress=False,
                         scheduler_kwargs=None, step_kwargs=None):
        """x = prior_std(grid[0]) * noise as sample() builds it; the noise is recovered and the scheduler
        runs its own len(grid) - 1 steps from its own first timestep."""
        schedule = denoiser.schedule
        scheduler = build_scheduler(cls, schedule, scheduler_kwargs)
        scheduler.set_timesteps(len(grid) - 1)
        noise = x / schedule.prior_std(float(grid[0]))
        return run_scheduler(scheduler, denoiser, noise, cond=cond, generator=generator, callback=callback,
                             progress=progress, step_kwargs=step_kwargs)

    evals = "2 n - 1 model evaluations" if order == 2 else "n model evaluations (PNDM's warm-up takes more)"
    sample_diffusers.sampler_meta = {
        "name": f"diffusers:{class_name}",
        "steps_doc": (f"model evaluations per sample; the grid's times are ignored, only its length counts: "
                      f"num_inference_steps n = len(grid) - 1, the scheduler's own timesteps, {evals}"),
        "intervals": _intervals_for(cls),
        "stochastic": stochastic,
        "steps_per_interval": False,  # the scheduler makes its own timesteps
        "summary": f"diffusers {class_name}, built from the genvis schedule"
                   + (" (may draw noise, depending on its options)" if stochastic else ""),
    }
    return sample_diffusers
