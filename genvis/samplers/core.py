"""The sampler entry points: look a solver up, check its options, resolve the grid, run it.

`plan_sampling(...)` checks everything that does not depend on the batch once and returns a
`SamplingPlan`; `plan.run(model_fn, noise, ...)` runs it on one batch. `sample(...)` does both.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from genvis.diffusion.predictions import Denoiser
from genvis.diffusion.schedules import Schedule, make_schedule
from genvis.registry import SAMPLERS
from genvis.samplers.common import check_option_types, sampler_options
from genvis.samplers.grids import make_grid
from genvis.samplers.guidance import CFG, ClassifierFreeGuidance


def get_sampler(name: str) -> Callable:
    """A registered sampler, or `diffusers:<SchedulerClass>` (any diffusers scheduler, adapted)."""
    if name.startswith("diffusers:"):
        from genvis.samplers.diffusers_adapter import diffusers_sampler

        return diffusers_sampler(name.split(":", 1)[1])
    try:
        return SAMPLERS.get(name)
    except KeyError as err:
        raise ValueError(err.args[0] + ", or diffusers:<SchedulerClass>") from None


def check_options(name: str, fn: Callable, options: dict) -> None:
    valid = sampler_options(fn)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"sampler {name!r}: unknown option(s) {', '.join(unknown)}; it takes: {', '.join(valid) or 'no options'}")
    check_option_types(f"sampler {name!r}", valid, options)
    meta = getattr(fn, "sampler_meta", {})
    for key, allowed in meta.get("choices", {}).items():
        if key in options and options[key] not in allowed:
            raise ValueError(f"sampler {name!r}: option {key}={options[key]!r}; expected one of: {', '.join(map(str, allowed))}")
    for key, low in meta.get("minimum", {}).items():
        if key in options and options[key] < low:
            raise ValueError(f"sampler {name!r}: option {key}={options[key]!r}; expected >= {low}")
    for key in meta.get("positive", ()):
        if key in options and not options[key] > 0:
            raise ValueError(f"sampler {name!r}: option {key}={options[key]!r}; expected > 0")


def resolve_grid(grid, schedule: Schedule, sampler_fn: Callable, steps: int, grid_options: Optional[dict] = None) -> torch.Tensor:
    """The timestep grid for `steps` model evaluations of `sampler_fn` (named grids) or an explicit one."""
    meta = sampler_fn.sampler_meta
    if isinstance(grid, str) and grid == "default" and schedule.discrete and meta.get("discrete_grid"):
        grid = meta["discrete_grid"]
    return make_grid(grid, schedule, meta["intervals"](steps), **(grid_options or {}))


@dataclass
class SamplingPlan:
    """A solver with its checked options, its grid, and the guidance to wrap the model with."""

    fn: Callable
    options: dict
    grid: torch.Tensor
    schedule: Schedule
    prediction: str
    learn_sigma: bool = False
    cfg: Optional[CFG] = None
    null_label: Optional[int] = None

    def run(self, model_fn: Callable, noise: torch.Tensor, *, cond: Optional[dict] = None, generator=None,
            callback: Optional[Callable] = None, progress: bool = False) -> torch.Tensor:
        """The data end x0 from standard normal `noise` [B, ...]; model_fn(x, t, **cond)."""
        if self.cfg is not None and self.cfg.scale != 1.0:
            if cond is None or "y" not in cond:
                raise ValueError("classifier-free guidance needs cond={'y': labels}")
            model_fn = ClassifierFreeGuidance(model_fn, self.cfg, self.null_label, pred_channels=noise.shape[1],
                                              schedule=self.schedule)
        denoiser = Denoiser(model_fn, self.schedule, self.prediction, learn_sigma=self.learn_sigma)
        x = noise * self.schedule.prior_std(float(self.grid[0]))
        return self.fn(denoiser, x, self.grid, cond=cond, generator=generator, callback=callback, progress=progress,
                       **self.options)


def plan_sampling(*, sampler: str, steps: int, schedule, prediction: str, grid="default", cfg=None,
                  learn_sigma: bool = False, null_label: Optional[int] = None, grid_options: Optional[dict] = None,
                  **options) -> SamplingPlan:
    """Check the sampler, its options, the steps, the grid and the guidance; see `sample`."""
    if not isinstance(schedule, Schedule):
        schedule = make_schedule(schedule)
    fn = get_sampler(sampler)
    check_options(sampler, fn, options)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    timesteps = resolve_grid(grid, schedule, fn, steps, grid_options)
    if isinstance(cfg, (int, float)):
        cfg = CFG(cfg)
    if cfg is not None and cfg.scale != 1.0 and null_label is None:
        raise ValueError("classifier-free guidance needs null_label")
    return SamplingPlan(fn, options, timesteps, schedule, prediction, learn_sigma, cfg, null_label)


def sample(
    model_fn: Callable,
    noise: torch.Tensor,
    *,
    sampler: str,
    steps: int,
    schedule,
    prediction: str,
    grid="default",
    cfg=None,
    generator=None,
    learn_sigma: bool = False,
    cond: Optional[dict] = None,
    null_label: Optional[int] = None,
    grid_options: Optional[dict] = None,
    callback: Optional[Callable] = None,
    progress: bool = False,
    **options,
) -> torch.Tensor:
    """Run `sampler` from standard normal `noise`; returns the data end x0.

    model_fn(x, t, **cond) gets t in the schedule's own units (0..999 for "linear", [0, 1] with
    t = 1 noise for "flow", sigma for "edm") and returns the native prediction `prediction`
    (eps, x0, v, velocity or score; with learn_sigma, twice the channels).
    schedule: a Schedule or a name ("linear", "cosine", "vp-linear", "flow", "edm", ...).
    steps: model evaluations per sample (per guided pair); see each sampler's `steps_doc`.
    grid: a grid name (options in grid_options, e.g. {"rho": 7}), a .json file, "t1,t2,..." or a
        descending list of times. cfg: None, a scale, or a CFG (interval, scale schedule, channels);
        guidance needs cond["y"] and null_label. **options: the sampler's own options.
    """
    plan = plan_sampling(sampler=sampler, steps=steps, schedule=schedule, prediction=prediction, grid=grid, cfg=cfg,
                         learn_sigma=learn_sigma, null_label=null_label, grid_options=grid_options, **options)
    return plan.run(model_fn, noise, cond=cond, generator=generator, callback=callback, progress=progress)
