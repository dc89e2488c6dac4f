"""Schedules (against closed forms and finite differences) and timestep grids (against diffusers' spacings)."""
import json
import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler

from genvis.diffusion.schedules import (ContinuousVPSchedule, DiscreteVPSchedule, EDMSchedule, FlowSchedule, linear_betas,
                                        make_schedule, shift_for_resolution)
from genvis.samplers.grids import make_grid

ALL = ["linear", "scaled_linear", "squaredcos", "vp-linear", "cosine", "flow", "edm"]


@pytest.mark.parametrize("name", ALL)
def test_log_snr_inverse_and_derivatives(name):
    s = make_schedule(name)
    lo, hi = s.t_min, s.noise_end
    t = torch.linspace(lo + 0.013 * (hi - lo), hi - 0.011 * (hi - lo), 9, dtype=torch.float64)
    assert torch.allclose(s.t_of_log_snr(s.log_snr(t)), t, rtol=1e-9, atol=1e-9)
    # the derivatives against central differences (inside a linear piece for discrete schedules)
    if s.discrete:
        t = t.floor() + 0.5
    h = 1e-6 * (hi - lo)
    a1, s1 = s.alpha_sigma(t + h)
    a0, s0 = s.alpha_sigma(t - h)
    da, ds = s.alpha_sigma_derivatives(t)
    assert torch.allclose(da, (a1 - a0) / (2 * h), rtol=1e-5, atol=1e-9)
    assert torch.allclose(ds, (s1 - s0) / (2 * h), rtol=1e-5, atol=1e-9)
    alpha, sigma = s.alpha_sigma(torch.tensor(s.data_end, dtype=torch.float64))
    assert float(alpha) == 1.0 and float(sigma) == 0.0


def test_schedules_match_closed_forms():
    vp = ContinuousVPSchedule("linear")
    alpha, sigma = vp.alpha_sigma(torch.tensor(0.5, dtype=torch.float64))
    # score-SDE VP: log alpha = -(beta_max - beta_min) t^2 / 4 - beta_min t / 2
    assert math.isclose(float(alpha), math.exp(-19.9 * 0.25 / 4 - 0.1 * 0.5 / 2), rel_tol=1e-12)
    assert math.isclose(float(alpha**2 + sigma**2), 1.0, rel_tol=1e-12)
    cos = ContinuousVPSchedule("cosine")
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2)
    assert math.isclose(float(cos.alpha_sigma(torch.tensor(0.3, dtype=torch.float64))[0]), f(0.3) / f(0.0), rel_tol=1e-12)
    disc = DiscreteVPSchedule(linear_betas())
    abar = torch.cumprod(1 - linear_betas(), 0)
    a, _ = disc.alpha_sigma(torch.tensor([0.0, 499.0, 999.0], dtype=torch.float64))
    assert torch.allclose(a**2, abar[[0, 499, 999]], rtol=1e-12)
    # half-way between steps, log(alpha_bar) is the mean of its neighbours
    a_half, _ = disc.alpha_sigma(torch.tensor(10.5, dtype=torch.float64))
    assert math.isclose(2 * math.log(float(a_half)), 0.5 * (math.log(abar[10]) + math.log(abar[11])), rel_tol=1e-12)
    edm = EDMSchedule()
    assert edm.prior_std(80.0) == 80.0 and FlowSchedule().prior_std(1.0) == 1.0 and disc.prior_std(999.0) == pytest.approx(1.0)
    assert shift_for_resolution(1024, 256) == 2.0


@pytest.mark.parametrize("spacing", ["trailing", "linspace", "leading"])
@pytest.mark.parametrize("steps", [5, 10, 50])
def test_discrete_spacings_equal_diffusers(spacing, steps):
    ddim = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", timestep_spacing=spacing)
    ddim.set_timesteps(steps)
    grid = make_grid(spacing, make_schedule("linear"), steps)
    assert grid[:-1].tolist() == [float(t) for t in ddim.timesteps]
    assert grid[-1] == -1


@pytest.mark.parametrize("steps", [5, 10, 25])
def test_karras_sigmas_equal_diffusers_and_have_no_repeats(steps):
    sched = EulerDiscreteScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                                   use_karras_sigmas=True)
    sched.set_timesteps(steps)
    schedule = make_schedule("linear")
    grid = make_grid("karras", schedule, steps)
    ours = torch.exp(-schedule.log_snr(grid[:-1]))  # sigma / alpha at our (fractional) times
    # diffusers keeps alpha_bar in float32: agreement to float32 accuracy of the end points
    assert np.allclose(ours.numpy(), sched.sigmas[:-1].double().numpy(), rtol=1e-4)
    # and exactly Karras et al.'s formula on our float64 end points
    s_max, s_min = float(ours[0]), float(ours[-1])
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    expected = (s_max ** (1 / 7) + ramp * (s_min ** (1 / 7) - s_max ** (1 / 7))) ** 7
    assert torch.allclose(ours, expected, rtol=1e-10)
    # 1000 Karras steps: diffusers rounds them onto integer steps and repeats some; ours stay distinct
    long = make_grid("karras", schedule, 1000)
    assert len(set(long.tolist())) == 1001


def test_logsnr_and_shift_grids():
    for name in ("linear", "cosine", "edm"):
        s = make_schedule(name)
        lam = s.log_snr(make_grid("logsnr", s, 8)[:-1])
        d = lam[1:] - lam[:-1]
        assert torch.allclose(d, d.mean().expand_as(d), rtol=1e-9)
        assert math.isclose(float(lam[-1]), float(s.log_snr(torch.tensor(s.t_min, dtype=torch.float64))), rel_tol=1e-9)
    flow = make_schedule("flow")
    u = torch.linspace(1, 0, 6, dtype=torch.float64)
    assert torch.allclose(make_grid("shift", flow, 5, shift=3.0), 3 * u / (1 + 2 * u))
    assert torch.allclose(make_grid("default", FlowSchedule(shift=3.0), 5), 3 * u / (1 + 2 * u))
    assert torch.allclose(make_grid("default", flow, 5), u)  # the shift is applied once, by the grid only
    # flow: the noise end (alpha = 0, lambda = -inf) is kept, then log-SNR-uniform points
    g = make_grid("logsnr", flow, 5)
    assert g[0] == 1 and g[-1] == 0 and g[-2] == pytest.approx(flow.t_min)


def test_explicit_json_and_bad_grids(tmp_path):
    s = make_schedule("linear")
    assert make_grid([999, 500, 0], s, 3).tolist() == [999, 500, 0, -1]
    assert make_grid("999,500,100", s, 3).tolist() == [999, 500, 100, -1]
    path = tmp_path / "g.json"
    path.write_text(json.dumps({"timesteps": [999, 300, -1], "schedule": "linear"}))
    assert make_grid(str(path), s, 2).tolist() == [999, 300, -1]
    with pytest.raises(ValueError, match="strictly decrease"):
        make_grid([999, 500, 500], s, 3)
    with pytest.raises(ValueError, match=r"\[-1, 999\]"):
        make_grid([1500, 0], s, 2)
    with pytest.raises(ValueError, match="karras"):
        make_grid("karas", s, 5)
    with pytest.raises(ValueError, match="rho"):
        make_grid("karras", s, 5, sigma=2)
    with pytest.raises(ValueError, match="schedule is 'flow'"):
        make_grid(str(path), make_schedule("flow"), 2)
    with pytest.raises(ValueError, match="discrete schedules only"):
        make_grid("leading", make_schedule("flow"), 5)


def test_model_flow_shift_reaches_the_default_grid_once():
    from genvis.diffusion.schedules import schedule_for_model
    from genvis.models.dit import DiT

    model = DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=1, num_heads=2, num_classes=10,
                schedule="flow", prediction_type="velocity", learn_sigma=False, flow_shift=3.0)
    schedule = schedule_for_model(model)
    u = torch.linspace(1, 0, 5, dtype=torch.float64)
    assert torch.allclose(make_grid("default", schedule, 4), 3 * u / (1 + 2 * u))
    assert torch.equal(schedule.alpha_sigma(torch.tensor(0.25, dtype=torch.float64))[1], torch.tensor(0.25, dtype=torch.float64))


@pytest.mark.parametrize("name", ["linear", "vp-linear", "edm"])
def test_shift_grid_keeps_both_ends_on_every_schedule(name):
    s = make_schedule(name)
    grid = make_grid("shift", s, 8, shift=3.0)
    assert grid[0] == s.noise_end and float(grid[-2]) == pytest.approx(s.t_min, abs=1e-9) and grid[-1] == s.data_end
    # the warp is the flow shift on the normalised flow-equivalent time
    tau = torch.sigmoid(-s.log_snr(grid[:-1]))
    u = (tau - tau[-1]) / (tau[0] - tau[-1])
    v = torch.linspace(1, 0, 8, dtype=torch.float64)
    assert torch.allclose(u, 3 * v / (1 + 2 * v), atol=1e-9)


def test_one_step_default_grid_starts_at_the_noise_end():
    assert make_grid("default", make_schedule("linear"), 1).tolist() == [999.0, -1.0]


@pytest.mark.parametrize("rho", [3.0, 7.0, 12.0])
def test_karras_rho_follows_the_formula(rho):
    """sigma_i = (s_max^(1/rho) + i/(n-1) (s_min^(1/rho) - s_max^(1/rho)))^rho between the grid's end points,
    for any rho (not only diffusers' fixed 7)."""
    schedule = make_schedule("linear")
    grid = make_grid("karras", schedule, 6, rho=rho)
    sig = torch.exp(-schedule.log_snr(grid[:-1]))
    s_max, s_min = float(sig[0]), float(sig[-1])
    ramp = torch.linspace(0, 1, len(sig), dtype=torch.float64)
    expected = (s_max ** (1 / rho) + ramp * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
    assert torch.allclose(sig, expected, rtol=1e-10)
