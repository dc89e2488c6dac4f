"""Heun, Euler-Maruyama and adaptive RK45 against diffusers, SiT's SDE sampler and closed forms.

Gaussian data x0 ~ N(M, S^2) per dimension: the exact denoiser is
D(x_t) = E[x0 | x_t] = M + alpha S^2 (x_t - alpha M) / (alpha^2 S^2 + sigma^2), and the probability-flow ODE keeps
xi = (x_t - alpha M) / sqrt(alpha^2 S^2 + sigma^2) constant, so x_t = alpha M + sqrt(alpha^2 S^2 + sigma^2) xi.
ODE solvers end with the x0 jump from the last evaluation time t_1, a fixed first-order error; they are compared
at t_1 through the exact denoiser: D(x_solver(t_1)) against D(x_exact(t_1)).
"""
import math

import pytest
import torch
from diffusers import FlowMatchHeunDiscreteScheduler, HeunDiscreteScheduler

from genvis.diffusion.schedules import make_schedule
from genvis.samplers import make_grid, sample
from genvis.samplers.sde import DIFFUSION_FORMS

from gaussian_data import M, S, exact_denoiser, exact_model, exact_ode

SHAPE = (3, 2, 4, 4)
W = torch.linspace(-0.5, 0.5, SHAPE[1]).view(1, -1, 1, 1)


def counted(fn):
    """fn with a call counter in .calls."""

    def wrapper(x, t, **kw):
        wrapper.calls += 1
        return fn(x, t, **kw)

    wrapper.calls = 0
    return wrapper


# ----------------------------------------------------------------------------------------------- Heun


def vp_test_model(schedule):
    """A smooth, data-like eps 'network' for the diffusers comparison: the Gaussian eps plus a perturbation."""

    def fn(x, t):
        a, s = (v.float().view(-1, 1, 1, 1) for v in schedule.alpha_sigma(t.double()))
        return s * x / (S**2 * a**2 + s**2) + 0.1 * a * torch.tanh(x * (0.8 + W) + t.float().view(-1, 1, 1, 1) / 1000)

    return fn


@pytest.mark.parametrize("spacing,n", [("trailing", 10), ("linspace", 12), ("leading", 25)])
def test_heun_matches_diffusers_heun_discrete(spacing, n):
    schedule = make_schedule("linear")
    model = counted(vp_test_model(schedule))
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))

    sched = HeunDiscreteScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                                  timestep_spacing=spacing)
    sched.set_timesteps(n)
    # diffusers' init_noise_sigma is sigma_max for linspace/trailing; the VP prior of its x/alpha is sqrt(sigma^2 + 1)
    x = x_T * (sched.sigmas[0] ** 2 + 1) ** 0.5
    for t in sched.timesteps:
        x = sched.step(model(sched.scale_model_input(x, t), t.expand(len(x))), t, x).prev_sample
    diffusers_calls, model.calls = model.calls, 0

    # the same noise levels: diffusers' sigma = sigma / alpha, so lambda = -log(sigma) (this also covers its
    # fractional "linspace" times, where it interpolates sigma linearly in t and genvis log(alpha_bar))
    sigmas = torch.unique_consecutive(sched.sigmas)[:-1].double()
    grid = schedule.t_of_log_snr(-torch.log(sigmas))
    ours = sample(model, x_T.clone(), sampler="heun", steps=2 * n - 1, schedule=schedule, prediction="eps", grid=grid)
    assert model.calls == diffusers_calls == 2 * n - 1
    assert torch.allclose(ours, x, atol=1e-5), (ours - x).abs().max()


def test_heun_matches_diffusers_flow_match_heun():
    n = 10
    schedule = make_schedule("flow")
    exact = exact_model(schedule, "velocity")

    def velocity(x, t):  # t in [0, 1] (diffusers' sigma): the Gaussian velocity eps - x0 plus a perturbation
        return exact(x, t) + 0.1 * torch.tanh(x * (0.8 + W) + t.float().view(-1, 1, 1, 1))

    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    sched = FlowMatchHeunDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    sched.set_timesteps(n)
    x = x_T.clone()
    for t in sched.timesteps:
        x = sched.step(velocity(x, (t / 1000).expand(len(x))), t, x).prev_sample

    grid = torch.unique_consecutive(sched.sigmas)[:-1].double()  # 1.0, 0.889, ..., 0.001 (diffusers' flow time)
    ours = sample(velocity, x_T.clone(), sampler="heun", steps=2 * n - 1, schedule=schedule, prediction="velocity",
                  grid=grid)
    assert torch.allclose(ours, x, atol=1e-5), (ours - x).abs().max()


@pytest.mark.parametrize("steps,calls", [(1, 1), (2, 1), (7, 7), (8, 7)])
def test_heun_steps_are_model_evaluations(steps, calls):
    model = counted(exact_model(make_schedule("flow"), "velocity"))
    sample(model, torch.randn(2, 3), sampler="heun", steps=steps, schedule="flow", prediction="velocity")
    assert model.calls == calls


@pytest.mark.parametrize("schedule_name,prediction", [("linear", "eps"), ("flow", "velocity"), ("edm", "x0")])
def test_heun_converges_second_order(schedule_name, prediction):
    schedule = make_schedule(schedule_name)
    x_T = torch.randn(4096, 1, generator=torch.Generator().manual_seed(0))
    errors = []
    for intervals in (10, 20, 40):
        grid = make_grid("default", schedule, intervals)
        states = []
        sample(exact_model(schedule, prediction), x_T.clone(), sampler="heun", steps=2 * intervals - 1,
               schedule=schedule, prediction=prediction, grid=grid, callback=states.append)
        t1 = float(grid[-2])
        x_T_scaled = x_T.double() * schedule.prior_std(float(grid[0]))
        ref = exact_denoiser(schedule, exact_ode(schedule, x_T_scaled, float(grid[0]), t1), t1)
        errors.append((exact_denoiser(schedule, states[-2]["x"].double(), t1) - ref).abs().max().item())
    slopes = [math.log2(errors[i] / errors[i + 1]) for i in range(2)]
    assert errors[-1] < 0.03, errors
    assert all(1.7 < s < 2.6 for s in slopes), (errors, slopes)


# ----------------------------------------------------------------------------------------------- RK45


@pytest.mark.parametrize("schedule_name,prediction", [("linear", "eps"), ("flow", "velocity"), ("edm", "x0")])
def test_rk45_matches_closed_form_and_counts_evaluations(schedule_name, prediction):
    schedule = make_schedule(schedule_name)
    x_T = torch.randn(4096, 1, generator=torch.Generator().manual_seed(0))
    grid = make_grid("default", schedule, 10)
    t1 = float(grid[-2])
    t_T = float(grid[0])
    ref = exact_denoiser(schedule, exact_ode(schedule, x_T.double() * schedule.prior_std(t_T), t_T, t1), t1)
    nfe = {}
    for tol in (1e-9, 1e-4):
        model, reports = counted(exact_model(schedule, prediction)), []
        out = sample(model, x_T.clone(), sampler="rk45", steps=10, schedule=schedule, prediction=prediction, grid=grid,
                     rtol=tol, atol=tol, t_end=t1, callback=reports.append)
        assert reports[-1]["nfe"] == model.calls
        nfe[tol] = model.calls
        if tol == 1e-9:
            assert (out.double() - ref).abs().max().item() < 2e-6
        else:
            assert (out.double() - ref).abs().max().item() < 1e-3
    assert nfe[1e-4] < nfe[1e-9] / 2, nfe


def test_rk45_max_steps():
    schedule = make_schedule("flow")
    with pytest.raises(ValueError, match="max_steps"):
        sample(exact_model(schedule, "velocity"), torch.randn(8, 2), sampler="rk45", steps=10, schedule=schedule,
               prediction="velocity", rtol=1e-12, atol=1e-12, max_steps=3)


# ------------------------------------------------------------------------------------ Euler-Maruyama


def sde_grid(schedule_name, form, steps):
    """The default grid, except SBDM on flow: its diffusion is infinite at t = 1, so start one interval below."""
    if schedule_name == "flow" and form == "SBDM":
        return torch.linspace(1, 0, steps + 2, dtype=torch.float64)[1:]
    return "default"


@pytest.mark.parametrize("form", DIFFUSION_FORMS)
@pytest.mark.parametrize("schedule_name,prediction", [("flow", "velocity"), ("linear", "eps")])
def test_euler_maruyama_samples_gaussian_data(schedule_name, prediction, form):
    schedule = make_schedule(schedule_name)
    n = 2**16
    noise = torch.randn(n // 64, 64, generator=torch.Generator().manual_seed(0))
    out = sample(exact_model(schedule, prediction), noise, sampler="euler-maruyama", steps=200, schedule=schedule,
                 prediction=prediction, grid=sde_grid(schedule_name, form, 200), diffusion=form,
                 generator=torch.Generator().manual_seed(1))
    se_mean, se_std = S / math.sqrt(n), S / math.sqrt(2 * n)
    assert abs(out.mean().item() - M) < 4 * se_mean, (out.mean().item(), se_mean)
    assert abs(out.std().item() - S) < 4 * se_std, (out.std().item(), se_std)


def sit_euler_maruyama(velocity, x, s_grid, D, generator):
    """SiT's `Sampler.sample_sde` (Euler, last_step "Mean") for the Linear path and a velocity model, written in SiT's
    own variables: s = 1 - t runs from noise (0) to data (1), x_s = s x_data + (1 - s) noise, v = dx/ds, the score from
    the velocity (ICPlan.get_score_from_velocity) is (s v - x) / (1 - s), the drift v + D(s) score, the noise
    sqrt(2 D(s) ds) z; the last step is the drift step alone."""
    for k in range(len(s_grid) - 1):
        s, ds = s_grid[k], s_grid[k + 1] - s_grid[k]
        v = velocity(x, s)
        x_mean = x + (v + D(s) * (s * v - x) / (1 - s)) * ds
        if k < len(s_grid) - 2:
            x = x_mean + math.sqrt(2 * D(s) * ds) * torch.randn(x.shape, generator=generator)
        else:
            x = x_mean
    return x


SIT_FORMS = {  # SiT transport/path.py compute_diffusion, in SiT time s, with norm
    "sigma": lambda s, norm: norm * (1 - s),
    "SBDM": lambda s, norm: norm * ((1 - s) ** 2 / s + (1 - s)),
    "constant": lambda s, norm: norm,
    "linear": lambda s, norm: norm * (1 - s),
    "decreasing": lambda s, norm: 0.25 * (norm * math.cos(math.pi * s) + 1) ** 2,
    "increasing-decreasing": lambda s, norm: norm * math.sin(math.pi * s) ** 2,
}


@pytest.mark.parametrize("form", DIFFUSION_FORMS)
@pytest.mark.parametrize("norm", [1.0, 0.5])
def test_euler_maruyama_matches_sit_on_flow(form, norm):
    steps = 40
    schedule = make_schedule("flow")
    u = exact_model(schedule, "velocity")  # genvis velocity dx/dt = eps - x0, t = 1 - s
    grid = sde_grid("flow", form, steps)
    grid = make_grid("default", schedule, steps) if isinstance(grid, str) else grid
    noise = torch.randn(64, 8, generator=torch.Generator().manual_seed(4))
    ours = sample(u, noise.clone(), sampler="euler-maruyama", steps=steps, schedule=schedule, prediction="velocity",
                  grid=grid, generator=torch.Generator().manual_seed(5), diffusion=form, diffusion_norm=norm,
                  last_step="mean")
    x_start = noise.double() * schedule.prior_std(float(grid[0]))  # as sample() does; the reference runs in float64
    v_sit = lambda x, s: -u(x, torch.full((len(x),), 1 - s, dtype=torch.float64))  # dx/ds = -dx/dt
    ref = sit_euler_maruyama(v_sit, x_start, (1 - grid).tolist(), lambda s: SIT_FORMS[form](s, norm),
                             torch.Generator().manual_seed(5))
    # float32 rounding in genvis (eps / sigma near the data end) reaches ~7e-6 for the constant form
    assert torch.allclose(ours.double(), ref, atol=2e-5), (ours - ref).abs().max()


@pytest.mark.parametrize("form", ["decreasing", "constant"])
def test_euler_maruyama_weak_first_order(form):
    """The std bias of Euler-Maruyama shrinks ~4x from 25 to 100 steps (weak order 1); 2^18 samples, std SE 7e-4."""
    schedule = make_schedule("flow")
    noise = torch.randn(4096, 64, generator=torch.Generator().manual_seed(0))
    errors = []
    for steps in (25, 100):
        out = sample(exact_model(schedule, "velocity"), noise, sampler="euler-maruyama", steps=steps,
                     schedule=schedule, prediction="velocity", diffusion=form,
                     generator=torch.Generator().manual_seed(1))
        errors.append(abs(out.std().item() - S))
    se_std = S / math.sqrt(2 * noise.numel())
    assert errors[0] > 10 * se_std, errors  # a real discretisation bias at 25 steps
    assert 2.5 < errors[0] / errors[1] < 8, errors


def test_euler_maruyama_per_sample_generators_make_samples_batch_independent():
    schedule = make_schedule("flow")
    fn = exact_model(schedule, "velocity")
    gens = lambda: [torch.Generator().manual_seed(100 + i) for i in range(6)]
    noise = torch.randn(6, 3, generator=torch.Generator().manual_seed(0))
    full = sample(fn, noise, sampler="euler-maruyama", steps=20, schedule=schedule, prediction="velocity",
                  generator=gens())
    part = sample(fn, noise[2:4], sampler="euler-maruyama", steps=20, schedule=schedule, prediction="velocity",
                  generator=gens()[2:4])
    assert torch.equal(full[2:4], part)
    other = sample(fn, noise, sampler="euler-maruyama", steps=20, schedule=schedule, prediction="velocity",
                   generator=[torch.Generator().manual_seed(200 + i) for i in range(6)])
    assert not torch.allclose(full, other)


def test_euler_maruyama_rejects_bad_options():
    schedule = make_schedule("flow")
    fn = exact_model(schedule, "velocity")
    with pytest.raises(ValueError, match="SBDM"):  # infinite diffusion where alpha = 0
        sample(fn, torch.randn(2, 2), sampler="euler-maruyama", steps=5, schedule=schedule, prediction="velocity",
               diffusion="SBDM")
    with pytest.raises(ValueError, match="diffusion=.exploding.; expected one of: sigma, SBDM"):
        sample(fn, torch.randn(2, 2), sampler="euler-maruyama", steps=5, schedule=schedule, prediction="velocity",
               diffusion="exploding")
