"""Prediction-type conversions and training losses against hand-computed values."""
import math

import pytest
import torch

from genvis.diffusion.objectives import DiffusionObjective, objective_for
from genvis.diffusion.predictions import Denoiser, target, to_x0_eps
from genvis.diffusion.schedules import DiscreteVPSchedule, FlowSchedule, linear_betas, make_schedule, sit_time


def _draw(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g, dtype=torch.float64), torch.randn(n, 3, generator=g, dtype=torch.float64)


VP, FLOW = DiscreteVPSchedule(linear_betas()), FlowSchedule()
CASES = [(VP, 437.0, p) for p in ("eps", "x0", "v")] + [(FLOW, 0.37, p) for p in ("eps", "x0", "v", "velocity")]


@pytest.mark.parametrize("schedule,t,prediction", CASES)
def test_conversions_round_trip(schedule, t, prediction):
    x0, eps = _draw()
    alpha, sigma = schedule.alpha_sigma(torch.tensor(t))
    x_t = alpha * x0 + sigma * eps
    da = ds = None
    if prediction == "velocity":
        da, ds = schedule.alpha_sigma_derivatives(torch.tensor(t))
    out = target(prediction, x0, eps, alpha, sigma, da, ds)
    rx0, reps = to_x0_eps(out, x_t, alpha, sigma, prediction, da, ds)
    assert torch.allclose(rx0, x0, atol=1e-9) and torch.allclose(reps, eps, atol=1e-9)


def test_flow_velocity_and_sit_time():
    x0, eps = _draw()
    s = FlowSchedule()
    da, ds = s.alpha_sigma_derivatives(torch.tensor(0.3))
    a, sg = s.alpha_sigma(torch.tensor(0.3))
    assert torch.allclose(target("velocity", x0, eps, a, sg, da, ds), eps - x0)
    assert float(sit_time(torch.tensor(0.25))) == 0.75  # SiT: t = 1 data


def test_a_sit_network_sees_its_own_time_and_velocity():
    """schedule "sit": SiT's path x = s x0 + (1 - s) eps with s = 1 - t (s = 1 data) and its network's output
    d x / ds = x0 - eps, written from the SiT paper; the denoiser recovers x0 from it, and the training target
    is that same velocity at the same model time."""
    x0, eps = _draw()
    t = torch.full((64,), 0.3, dtype=torch.float64)
    s = 1.0 - t[:, None]
    x_t = s * x0 + (1 - s) * eps
    seen = []

    def sit_network(x, s_model):
        seen.append(s_model)
        return (x0 - eps).float()  # the exact SiT velocity

    schedule = make_schedule("sit")
    torch.testing.assert_close(FlowSchedule().alpha_sigma(t)[0][:, None] * x0 + t[:, None] * eps, x_t)
    denoiser = Denoiser(sit_network, schedule, "velocity")
    pred = denoiser.predict(x_t.float(), 0.3)
    assert torch.allclose(seen[0], torch.full((64,), 0.7))
    torch.testing.assert_close(pred.x0.double(), x0, atol=1e-5, rtol=0)
    torch.testing.assert_close(pred.eps.double(), eps, atol=1e-5, rtol=0)
    da, ds = schedule.velocity_derivatives(t)
    a, sg = schedule.alpha_sigma(t)
    torch.testing.assert_close(target("velocity", x0, eps, a[:, None], sg[:, None], da[:, None], ds[:, None]), x0 - eps)


def test_vp_alpha_sigma_follow_alpha_bar():
    s = DiscreteVPSchedule(linear_betas())
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    a, sg = s.alpha_sigma(torch.tensor([0.0, 500.0, 999.0]))
    assert torch.allclose(a**2, abar[[0, 500, 999]]) and torch.allclose(a**2 + sg**2, torch.ones(3, dtype=torch.float64))
    # fractional times interpolate log alpha_bar
    mid = s.alpha_sigma(torch.tensor(10.5))[0] ** 2
    assert torch.allclose(mid, torch.sqrt(abar[10] * abar[11]))


def test_vlb_term_is_zero_for_the_true_posterior_and_matches_hand_kl():
    schedule = DiscreteVPSchedule(linear_betas())
    obj = DiffusionObjective(schedule, "eps", learn_sigma=True)
    x0 = torch.rand(8, 1, 4, 4) * 2 - 1
    noise = torch.randn(8, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([1, 5, 50, 100, 300, 600, 900, 999])

    def exact(frac_value):
        def fn(x, tt, y=None):
            return torch.cat([noise, torch.full_like(noise, 2 * frac_value - 1)], dim=1)
        return fn

    # frac = 0: model variance = posterior variance, exact eps: KL = 0, and the MSE part is 0
    assert obj.loss(exact(0.0), x0, t, noise).abs().max() < 1e-5
    # frac = 1: variance beta_t; KL of two Gaussians with equal means, in bits
    betas = linear_betas()
    abar = torch.cumprod(1 - betas, 0)
    post = betas[t] * (1 - abar[t - 1]) / (1 - abar[t])
    kl = 0.5 * (-1 + torch.log(betas[t]) - torch.log(post) + post / betas[t]) / math.log(2)
    assert torch.allclose(obj.loss(exact(1.0), x0, t, noise).double(), kl, rtol=1e-4)


def test_flow_and_v_losses():
    x0, eps = (v.float().view(64, 3, 1, 1) for v in _draw())
    t = torch.full((64,), 0.25, dtype=torch.float64)
    obj = objective_for(FlowSchedule(), "flow", learn_sigma=True)  # learn_sigma is ignored off eps
    zero = lambda x, tt, **_: torch.zeros_like(x)
    assert torch.allclose(obj.loss(zero, x0, t, eps), ((eps - x0) ** 2).mean(dim=(1, 2, 3)), atol=1e-6)
    vp = DiscreteVPSchedule(linear_betas())
    obj = objective_for(vp, "v", learn_sigma=False)
    t = torch.full((64,), 250)
    a, s = (float(v) for v in vp.alpha_sigma(torch.tensor(250.0)))
    assert torch.allclose(obj.loss(zero, x0, t, eps), ((a * eps - s * x0) ** 2).mean(dim=(1, 2, 3)), atol=1e-6)


def test_cosine_score_and_gvp_losses_are_the_published_formulas():
    """LightningDiT: |u - v|^2 + (1 - cos(u, v)) over channels, averaged over positions; SiT's score loss
    (sigma s + eps)^2 and its GVP path x = cos(pi t / 2) x0 + sin(pi t / 2) eps with velocity d x / dt."""
    g = torch.Generator().manual_seed(5)
    x0, eps, out = (torch.randn(8, 4, 3, 3, generator=g) for _ in range(3))
    t = torch.full((8,), 0.4, dtype=torch.float64)
    model = lambda x, tt, **_: out  # noqa: E731
    goal = eps - x0
    cos = (out * goal).sum(1) / (out.norm(dim=1) * goal.norm(dim=1))
    expected = ((out - goal) ** 2).mean(dim=(1, 2, 3)) + 1.0 * (1 - cos).mean(dim=(1, 2))
    obj = objective_for(FlowSchedule(), "flow", learn_sigma=False, cosine_weight=1.0)
    torch.testing.assert_close(obj.loss(model, x0, t, eps), expected, atol=1e-5, rtol=1e-5)
    gvp = make_schedule("gvp")
    c, s = math.cos(math.pi / 2 * 0.4), math.sin(math.pi / 2 * 0.4)
    score = objective_for(gvp, "score", learn_sigma=False)
    torch.testing.assert_close(score.loss(model, x0, t, eps), ((s * out + eps) ** 2).mean(dim=(1, 2, 3)))
    velocity = objective_for(gvp, "flow", learn_sigma=False)
    u = -math.pi / 2 * s * x0 + math.pi / 2 * c * eps
    torch.testing.assert_close(velocity.loss(model, x0, t, eps), ((out - u) ** 2).mean(dim=(1, 2, 3)))
    with pytest.raises(ValueError, match="cosine"):
        objective_for(gvp, "score", learn_sigma=False, cosine_weight=1.0)


def test_logit_normal_times_and_denoiser_shapes():
    obj = objective_for(FlowSchedule(), "flow", learn_sigma=False, time_sampling="logit_normal")
    t = obj.sample_time(20000, torch.Generator().manual_seed(0))
    logit = torch.log(t / (1 - t))
    assert abs(logit.mean().item()) < 0.03 and abs(logit.std().item() - 1) < 0.03
    d = Denoiser(lambda x, tt: torch.zeros_like(x), FlowSchedule(), "velocity")
    x = torch.randn(4, 2)
    assert torch.allclose(d(x, 0.5), x)  # u = 0 -> x0 = x_t - t u = x_t


@pytest.mark.parametrize("schedule,t", [(VP, 437.0), (FLOW, 0.37)])
def test_score_prediction_against_the_gaussian_closed_form(schedule, t):
    """For data N(M, S^2) the marginal score at x_t is -(x - alpha M) / (alpha^2 S^2 + sigma^2) and
    E[x0 | x_t] = M + alpha S^2 (x - alpha M) / (alpha^2 S^2 + sigma^2): a score network's Denoiser must give
    that x0, and the training target -eps/sigma must have that conditional mean (independent of genvis's
    own conversion formulas)."""
    M, S = 0.7, 1.3
    alpha, sigma = (float(v) for v in schedule.alpha_sigma(torch.tensor(t, dtype=torch.float64)))
    var = alpha**2 * S**2 + sigma**2
    x = torch.linspace(-3, 3, 13).view(13, 1)

    def score_net(x_t, t_model):
        return -(x_t - alpha * M) / var

    x0 = Denoiser(score_net, schedule, "score")(x, t)
    assert torch.allclose(x0, M + alpha * S**2 * (x - alpha * M) / var, atol=1e-5)
    # E[-eps/sigma | x_t] by Monte Carlo over the posterior x0 | x_t ~ N(mean, S^2 sigma^2 / var)
    g = torch.Generator().manual_seed(0)
    x_t = torch.tensor(0.9, dtype=torch.float64)
    post_mean = M + alpha * S**2 * (x_t - alpha * M) / var
    x0s = post_mean + (S * sigma / math.sqrt(var)) * torch.randn(400_000, generator=g, dtype=torch.float64)
    eps = (x_t - alpha * x0s) / sigma
    mc = target("score", x0s, eps, alpha, sigma).mean()
    assert abs(float(mc) - float(-(x_t - alpha * M) / var)) < 5e-3
