"""Samplers against the exact probability-flow solution for Gaussian data.

For x0 ~ N(m, s^2) per dimension the exact denoiser is E[x0 | x_t] = m + alpha s^2 (x_t - alpha m) / (alpha^2 s^2 + sigma^2),
and the PF-ODE maps x_T to m + s (x_T - alpha_T m) / sqrt(alpha_T^2 s^2 + sigma_T^2).
"""
import math

import pytest
import torch

from genvis.diffusion.schedules import DiscreteVPSchedule, FlowSchedule, linear_betas, make_schedule
from genvis.samplers import get_sampler, make_grid, sample
from genvis.samplers.grids import space_timesteps

from gaussian_data import M, S, exact_model, exact_solution

@pytest.mark.parametrize("sampler", ["ddim", "euler"])
@pytest.mark.parametrize("schedule_name,prediction", [("linear", "eps"), ("linear", "v"), ("flow", "velocity"),
                                                    ("gvp", "velocity"), ("sit", "velocity")])
def test_ode_samplers_converge_first_order(sampler, schedule_name, prediction):
    schedule = make_schedule(schedule_name)
    x_T = torch.randn(4096, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    errors = []
    steps_list = [25, 50, 100]
    for steps in steps_list:
        grid = make_grid("linspace", schedule, steps)
        out = sample(exact_model(schedule, prediction), x_T.clone(), sampler=sampler, steps=steps, schedule=schedule,
                     prediction=prediction, grid=grid)
        ref = exact_solution(schedule, x_T.double(), float(grid[0])).float()
        errors.append((out - ref).abs().max().item())
    slopes = [math.log(errors[i] / errors[i + 1]) / math.log(2) for i in range(len(errors) - 1)]
    assert errors[-1] < 0.1, errors
    # first-order methods: error halves when the step count doubles
    assert all(0.7 < s < 1.4 for s in slopes), (errors, slopes)


def test_flow_euler_is_exact_for_point_mass_straight_paths():
    # With S -> 0 rectified-flow paths are straight lines: Euler is exact in one step.
    schedule = FlowSchedule()
    x_T = torch.randn(16, 1, generator=torch.Generator().manual_seed(1))

    # exact velocity for x0 = M: eps - x0 with eps = (x - (1 - t) M) / t
    out = sample(lambda x, t: (x - (1 - t.view(-1, 1)) * M) / t.view(-1, 1) - M, x_T, sampler="euler", steps=1,
                 schedule=schedule, prediction="velocity")
    assert torch.allclose(out, torch.full_like(out, M), atol=1e-6)


@pytest.mark.parametrize("learned", [False, True])
def test_ddpm_ancestral_matches_data_distribution(learned):
    """DDPM with the exact eps samples N(M, S^2): check the first two moments over 8k samples."""
    schedule = make_schedule("linear")
    base = exact_model(schedule, "eps")

    def fn(x, t):
        eps = base(x, t)
        if not learned:
            return eps
        return torch.cat([eps, torch.zeros_like(eps)], dim=1)  # frac = 0.5: geometric mean of the two variances

    # 1000 steps: with fewer, the fixed posterior variance under-disperses (a property of DDPM, not a bug)
    noise = torch.randn(8000, 1, generator=torch.Generator().manual_seed(2))
    out = sample(fn, noise, sampler="ddpm", steps=1000, schedule=schedule, prediction="eps", learn_sigma=learned,
                 generator=torch.Generator().manual_seed(3))
    assert abs(out.mean().item() - M) < 0.02
    assert abs(out.std().item() - S) < 0.02


def test_per_sample_generators_make_samples_batch_independent():
    schedule = make_schedule("linear")
    fn = exact_model(schedule, "eps")
    gens = lambda: [torch.Generator().manual_seed(100 + i) for i in range(6)]
    noise = torch.randn(6, 3, generator=torch.Generator().manual_seed(0))
    full = sample(fn, noise, sampler="ddpm", steps=20, schedule=schedule, prediction="eps", generator=gens())
    g = gens()
    part = sample(fn, noise[2:4], sampler="ddpm", steps=20, schedule=schedule, prediction="eps", generator=g[2:4])
    assert torch.equal(full[2:4], part)


def test_dit_respacing_and_grids():
    # the official 250-step DiT grid: 0, 4, 8, ..., 999 (improved-DDPM space_timesteps)
    steps = space_timesteps(1000, 250)
    assert len(steps) == 250 and steps[0] == 0 and steps[-1] == 999 and steps[1] == 4
    schedule = DiscreteVPSchedule(linear_betas())
    for name in ("default", "linspace"):
        for n in (1, 2, 10, 250, 1000):
            grid = make_grid(name, schedule, n)
            assert len(grid) == n + 1 and grid[-1] == -1 and len(set(grid.tolist())) == n + 1
    alpha, sigma = schedule.alpha_sigma(torch.tensor(-1.0))
    assert alpha == 1 and sigma == 0
    # integer times reproduce alpha_bar exactly
    acp = torch.cumprod(1 - linear_betas(), 0)
    a, _ = schedule.alpha_sigma(torch.arange(1000, dtype=torch.float64))
    assert torch.allclose(a**2, acp, rtol=1e-12)


def test_unknown_sampler_names_choices():
    with pytest.raises(ValueError, match="ddim"):
        get_sampler("dpm-nope")


@pytest.mark.parametrize("schedule_name", ["linear", "vp-linear", "cosine", "gvp", "edm"])
def test_every_prediction_type_gives_the_same_samples(schedule_name):
    """The exact network in each prediction type (eps, x0, v, velocity, score) is one denoiser."""
    schedule = make_schedule(schedule_name)
    x_T = torch.randn(256, 1, generator=torch.Generator().manual_seed(4))
    outs = {p: sample(exact_model(schedule, p), x_T, sampler="dpmpp-2m", steps=10, schedule=schedule, prediction=p,
                      grid="logsnr")
            for p in ("eps", "x0", "v", "velocity", "score")}
    for p, out in outs.items():
        assert torch.allclose(out, outs["x0"], atol=2e-4), (p, (out - outs["x0"]).abs().max())
    assert (outs["x0"] - exact_solution(schedule, x_T.double() * schedule.prior_std(schedule.noise_end))).abs().max() < 0.1
