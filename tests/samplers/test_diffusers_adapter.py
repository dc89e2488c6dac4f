"""sampler="diffusers:<Class>" against the same scheduler run by hand, and against genvis's own
solvers where the algorithm is the same (same timesteps, same noise)."""
import pytest
import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                       FlowMatchEulerDiscreteScheduler, HeunDiscreteScheduler)

from genvis.diffusion.schedules import make_schedule
from genvis.samplers import get_sampler, sample

SHAPE = (3, 2, 4, 4)
LINEAR = make_schedule("linear")
BETAS = LINEAR.betas.tolist()


def eps_model(x, t):
    """An eps-'network' of (x, t), t in steps 0..999: the exact one for N(0.3, 0.5^2) data,
    sigma (x - alpha m) / (alpha^2 s^2 + sigma^2), plus a smooth perturbation (outputs stay O(1))."""
    alpha, sigma = (v.float().view(-1, 1, 1, 1) for v in LINEAR.alpha_sigma(t.double()))
    w = torch.linspace(-0.5, 0.5, SHAPE[1]).view(1, -1, 1, 1)
    return sigma * (x - 0.3 * alpha) / (0.25 * alpha**2 + sigma**2) + 0.05 * torch.tanh(x * (0.8 + w))


def velocity_model(x, t):
    """A smooth velocity-'network' for the flow schedule, t in [0, 1]."""
    return torch.tanh(0.7 * x) - 0.4 * x + 0.3 * t.float().view(-1, 1, 1, 1)


def noise(seed=0):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


def by_hand(sched, model, x, t_scale=1.0, generator=None):
    """The diffusers loop: model(scale_model_input(x, t), t) -> step."""
    x = x * getattr(sched, "init_noise_sigma", 1.0)
    for t in sched.timesteps:
        inp = sched.scale_model_input(x, t) if hasattr(sched, "scale_model_input") else x
        out = model(inp, (t.double() / t_scale).expand(len(x)))
        x = sched.step(out, t, x, **({"generator": generator} if generator is not None else {})).prev_sample
    return x


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ddim_adapter_equals_hand_run_and_genvis_ddim(spacing):
    steps = 10
    sched = DDIMScheduler(trained_betas=BETAS, clip_sample=False, timestep_spacing=spacing)
    sched.set_timesteps(steps)
    ref = by_hand(sched, eps_model, noise())

    seen = []
    ours = sample(eps_model, noise(), sampler="diffusers:DDIMScheduler", steps=steps, schedule="linear", prediction="eps",
                  scheduler_kwargs={"timestep_spacing": spacing}, callback=lambda d: seen.append(d["t"]))
    assert (ours - ref).abs().max() <= 1e-6
    assert seen == sched.timesteps.double().tolist()

    grid = torch.tensor(sched.timesteps.tolist() + [-1], dtype=torch.float64)
    genvis = sample(eps_model, noise(), sampler="ddim", steps=steps, schedule="linear", prediction="eps", grid=grid)
    # diffusers keeps alpha_bar in float32, genvis in float64
    assert (genvis - ref).abs().max() <= 5e-6


@pytest.mark.parametrize("kwargs", [{}, {"solver_order": 3, "timestep_spacing": "trailing", "use_karras_sigmas": True}])
def test_dpmsolver_adapter_equals_hand_run(kwargs):
    steps = 8
    sched = DPMSolverMultistepScheduler(trained_betas=BETAS, **kwargs)
    sched.set_timesteps(steps)
    ref = by_hand(sched, eps_model, noise(1))
    ours = sample(eps_model, noise(1), sampler="diffusers:DPMSolverMultistepScheduler", steps=steps, schedule="linear",
                  prediction="eps", scheduler_kwargs=kwargs)
    assert (ours - ref).abs().max() <= 1e-6


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_prediction_type_conversion_gives_the_same_solver(prediction_type):
    # the adapter converts genvis's prediction to the scheduler's type: the solver path must not change
    run = lambda kind: sample(eps_model, noise(2), sampler="diffusers:DPMSolverMultistepScheduler", steps=6,
                              schedule="linear", prediction="eps", scheduler_kwargs={"prediction_type": kind})
    eps_run = run("epsilon")
    seen = []
    step = DPMSolverMultistepScheduler.step

    def recording(self, model_output, timestep, sample, *args, **kwargs):
        seen.append((self.config.prediction_type, model_output.clone(), int(timestep), sample.clone()))
        return step(self, model_output, timestep, sample, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(DPMSolverMultistepScheduler, "step", recording)
        other = run(prediction_type)
    assert (eps_run - other).abs().max() <= 2e-6
    assert eps_run.abs().max() > 0.1  # a real output, not a degenerate one
    # what the scheduler received is the eps network's output converted by hand to its prediction type
    kind, output, t, x = seen[0]
    alpha, sigma = (float(v) for v in LINEAR.alpha_sigma(torch.tensor(float(t), dtype=torch.float64)))
    eps = eps_model(x, torch.full((len(x),), float(t), dtype=torch.float64))
    x0 = (x - sigma * eps) / alpha
    expected = alpha * eps - sigma * x0 if prediction_type == "v_prediction" else x0
    assert kind == prediction_type and (output - expected).abs().max() <= 1e-5 * max(1.0, expected.abs().max().item())


def test_euler_adapter_equals_hand_run_and_genvis_euler():
    steps = 10  # linspace(0, 999, 10) has integer timesteps, where diffusers' sigma is exact
    sched = EulerDiscreteScheduler(trained_betas=BETAS)
    sched.set_timesteps(steps)
    ref = by_hand(sched, eps_model, noise(3))
    ours = sample(eps_model, noise(3), sampler="diffusers:EulerDiscreteScheduler", steps=steps, schedule="linear",
                  prediction="eps")
    assert (ours - ref).abs().max() <= 1e-6

    # diffusers starts from sigma_max * z in x / alpha, i.e. x_t = z * sigma_max / sqrt(sigma_max^2 + 1)
    sigma_max = float(sched.sigmas[0])
    start = noise(3) * sigma_max / (sigma_max**2 + 1) ** 0.5
    grid = torch.tensor(sched.timesteps.tolist() + [-1], dtype=torch.float64)
    genvis = sample(eps_model, start, sampler="euler", steps=steps, schedule="linear", prediction="eps", grid=grid)
    assert (genvis - ref).abs().max() <= 5e-6


def test_flow_match_euler_adapter_equals_hand_run_and_genvis_euler():
    steps = 12
    sched = FlowMatchEulerDiscreteScheduler(shift=1.0)
    sched.set_timesteps(steps)
    ref = by_hand(sched, velocity_model, noise(4), t_scale=1000.0)
    ours = sample(velocity_model, noise(4), sampler="diffusers:FlowMatchEulerDiscreteScheduler", steps=steps,
                  schedule="flow", prediction="velocity")
    assert (ours - ref).abs().max() <= 1e-6

    grid = torch.tensor((sched.timesteps.double() / 1000).tolist() + [0.0], dtype=torch.float64)
    genvis = sample(velocity_model, noise(4), sampler="euler", steps=steps, schedule="flow", prediction="velocity",
                    grid=grid)
    assert (genvis - ref).abs().max() <= 1e-6


def test_flow_sigmas_mode_for_dpmsolver_equals_hand_run():
    sched = DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=1.0)
    sched.set_timesteps(8)
    ref = by_hand(sched, velocity_model, noise(5), t_scale=1000.0)
    ours = sample(velocity_model, noise(5), sampler="diffusers:DPMSolverMultistepScheduler", steps=8, schedule="flow",
                  prediction="velocity")
    assert (ours - ref).abs().max() <= 1e-6


def test_heun_counts_steps_as_model_evaluations():
    calls = []
    model = lambda x, t: calls.append(1) or eps_model(x, t)
    ours = sample(model, noise(6), sampler="diffusers:HeunDiscreteScheduler", steps=5, schedule="linear", prediction="eps")
    assert len(calls) == 5  # 3 Heun steps: 2 * 3 - 1 evaluations
    sched = HeunDiscreteScheduler(trained_betas=BETAS)
    sched.set_timesteps(3)
    assert (ours - by_hand(sched, eps_model, noise(6))).abs().max() <= 1e-6


def test_per_sample_generators_use_the_first_with_a_warning():
    sched = DDPMScheduler(trained_betas=BETAS, clip_sample=False)
    sched.set_timesteps(5)
    ref = by_hand(sched, eps_model, noise(7), generator=torch.Generator().manual_seed(9))
    gens = [torch.Generator().manual_seed(9)] + [torch.Generator().manual_seed(i) for i in range(SHAPE[0] - 1)]
    with pytest.warns(UserWarning, match="first"):
        ours = sample(eps_model, noise(7), sampler="diffusers:DDPMScheduler", steps=5, schedule="linear",
                      prediction="eps", generator=gens)
    assert (ours - ref).abs().max() <= 1e-6


def test_meta_and_errors():
    meta = get_sampler("diffusers:HeunDiscreteScheduler").sampler_meta
    assert meta["name"] == "diffusers:HeunDiscreteScheduler" and meta["intervals"](5) == 3
    assert "len(grid) - 1" in meta["steps_doc"] and meta["stochastic"] is False
    assert get_sampler("diffusers:DDIMScheduler").sampler_meta["intervals"](7) == 7
    with pytest.raises(ValueError, match="NoSuchScheduler.*DDIMScheduler"):
        get_sampler("diffusers:NoSuchScheduler")
    with pytest.raises(ValueError, match="not a diffusers scheduler.*ConfigMixin"):
        get_sampler("diffusers:ConfigMixin")
    with pytest.raises(ValueError, match="cosine"):
        sample(eps_model, noise(), sampler="diffusers:DDIMScheduler", steps=4, schedule="cosine", prediction="eps")
    with pytest.raises(ValueError, match="flow-matching"):
        sample(velocity_model, noise(), sampler="diffusers:DDIMScheduler", steps=4, schedule="flow", prediction="velocity")
    with pytest.raises(ValueError, match="trained_betas"):
        sample(eps_model, noise(), sampler="diffusers:DDIMScheduler", steps=4, schedule="linear", prediction="eps",
               scheduler_kwargs={"trained_betas": BETAS})
    with pytest.raises(ValueError, match="alpha_bar"):
        sample(eps_model, noise(), sampler="diffusers:DDIMScheduler", steps=4, schedule="linear", prediction="eps",
               scheduler_kwargs={"rescale_betas_zero_snr": True})
