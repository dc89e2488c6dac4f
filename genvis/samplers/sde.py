"""Euler-Maruyama on the reverse-time SDEs of the SiT family (Ma et al. 2024, "SiT", sec. 3.3).

With x_t = alpha x0 + sigma eps, the probability-flow velocity u = alpha' x0 + sigma' eps and the score
-eps / sigma, every diffusion coefficient w(t) >= 0 gives an SDE with the marginals of the data process,

    dx = [u(x, t) - w(t) / 2 * score(x, t)] dt + sqrt(w(t)) dW,    t running from noise to data,

so w only decides how much noise is injected and removed along the way. Euler-Maruyama step t -> s
(h = t - s > 0, z ~ N(0, I) from the sampler's generator):

    x_s = x_t - h (alpha' x0 + (sigma' + w / (2 sigma)) eps) + sqrt(w h) z.

The diffusion forms follow SiT (transport/path.py, `compute_diffusion`; there w = 2 D). SiT's time s
runs 0 (noise) -> 1 (data); genvis uses n = normalized_time(t) = 1 - s and converts D, a rate per unit of
normalized time, into schedule time: w(t) = 2 D(n) / (noise_end - data_end). With norm = diffusion_norm:

    "sigma"                  D = norm * sigma_t                           (SiT's default)
    "SBDM"                   w = norm * 2 sigma^2 d log(sigma / alpha) / dt  (per unit of t: the
                             reversal of the forward noising SDE, g^2; for VP it is beta(t) and this
                             sampler is DDPM-like; infinite where alpha = 0, so on flow start the grid
                             below t = 1)
    "constant"               D = norm
    "linear"                 D = norm * n
    "decreasing"             D = (1 - norm cos(pi n))^2 / 4
    "increasing-decreasing"  D = norm * sin(pi n)^2

The last step, onto the data end, adds no noise: `last_step` "tweedie" returns the x0 prediction
(E[x0 | x_t], the genvis convention), "mean" the mean of the Euler-Maruyama step (SiT's "Mean").
The model's schedule derivatives are used as given (piecewise constant for discrete schedules).
"""
from __future__ import annotations

import math

import torch

from genvis.diffusion.predictions import Denoiser
from genvis.samplers.common import randn_like, register_sampler, steps_of

DIFFUSION_FORMS = ("sigma", "SBDM", "constant", "linear", "decreasing", "increasing-decreasing")
LAST_STEPS = ("tweedie", "mean")


def diffusion_coefficient(schedule, t: float, form: str = "sigma", norm: float = 1.0) -> float:
    """w(t): the squared diffusion of the reverse SDE per unit of schedule time (float64)."""
    t64 = torch.tensor(t, dtype=torch.float64)
    alpha, sigma = (float(v) for v in schedule.alpha_sigma(t64))
    if form == "SBDM":
        if alpha == 0:
            raise ValueError(f"diffusion 'SBDM' is infinite where alpha = 0 (t = {t:g}); start the grid below the "
                             "noise end or use another diffusion form")
        dalpha, dsigma = (float(v) for v in schedule.alpha_sigma_derivatives(t64))
        return norm * 2 * sigma**2 * (dsigma / sigma - dalpha / alpha)
    n = float(schedule.normalized_time(t64))
    if form == "sigma":
        rate = norm * sigma
    elif form == "constant":
        rate = norm
    elif form == "linear":
        rate = norm * n
    elif form == "decreasing":
        rate = 0.25 * (1 - norm * math.cos(math.pi * n)) ** 2
    elif form == "increasing-decreasing":
        rate = norm * math.sin(math.pi * n) ** 2
    else:
        raise ValueError(f"unknown diffusion form {form!r}; expected one of: {', '.join(DIFFUSION_FORMS)}")
    return 2 * rate / (schedule.noise_end - schedule.data_end)


@register_sampler("euler-maruyama", stochastic=True, minimum={"diffusion_norm": 0.0},
                  choices={"diffusion": DIFFUSION_FORMS, "last_step": LAST_STEPS})
@torch.no_grad()
def sample_euler_maruyama(denoiser: Denoiser, x, grid, *, cond=None, generator=None, callback=None, progress=False,
                          diffusion="sigma", diffusion_norm=1.0, last_step="tweedie"):
    """Euler-Maruyama on the SiT reverse SDE dx = [u - w/2 score] dt + sqrt(w) dW (diffusion forms as SiT)."""
    if diffusion not in DIFFUSION_FORMS:
        raise ValueError(f"unknown diffusion form {diffusion!r}; expected one of: {', '.join(DIFFUSION_FORMS)}")
    if last_step not in LAST_STEPS:
        raise ValueError(f"last_step must be one of: {', '.join(LAST_STEPS)}; got {last_step!r}")
    if diffusion_norm < 0:
        raise ValueError(f"diffusion_norm must be >= 0, got {diffusion_norm}")
    cond = cond or {}
    schedule = denoiser.schedule
    last = len(grid) - 2
    for i, t, s in steps_of(grid, progress, "euler-maruyama"):
        pred = denoiser.predict(x, t, **cond)
        if i == last and last_step == "tweedie":
            x = pred.x0
        else:
            t64 = torch.tensor(t, dtype=torch.float64)
            sigma = float(schedule.alpha_sigma(t64)[1])
            dalpha, dsigma = (float(v) for v in schedule.alpha_sigma_derivatives(t64))
            w, h = diffusion_coefficient(schedule, t, diffusion, diffusion_norm), t - s
            x = x - h * (dalpha * pred.x0 + (dsigma + 0.5 * w / sigma) * pred.eps)
            if i < last:
                x = x + math.sqrt(w * h) * randn_like(x, generator)
        x = x.float()
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "denoised": pred.x0})
    return x
