"""DDPM ancestral sampling (Ho et al. 2020, Algorithm 2) on any grid, with DiT's learned variance."""
from __future__ import annotations

import torch

from genvis.diffusion.predictions import Denoiser, per_sample
from genvis.samplers.common import register_sampler, randn_like, steps_of


@register_sampler("ddpm", stochastic=True, summary="DDPM ancestral sampling (Ho et al. 2020), fixed or learned variance (DiT)",
                  choices={"variance": ("small", "large")})
@torch.no_grad()
def sample_ddpm(denoiser: Denoiser, x, grid, *, cond=None, generator=None, callback=None, progress=False, variance="small"):
    """Ancestral steps x_t -> x_s through q(x_s | x_t, x0_hat).

    Between grid points t > s (alpha_ts = alpha_t / alpha_s, sigma_ts^2 = sigma_t^2 - alpha_ts^2 sigma_s^2,
    i.e. the respaced beta) the posterior has mean (alpha_ts sigma_s^2 x_t + alpha_s sigma_ts^2 x0) / sigma_t^2
    and variance sigma_ts^2 sigma_s^2 / sigma_t^2. A model with learned variance interpolates the log
    variance between that posterior variance and sigma_ts^2 (improved DDPM); otherwise `variance`
    picks "small" (posterior) or "large" (sigma_ts^2). The step onto the data end adds no noise.
    """
    if variance not in ("small", "large"):
        raise ValueError(f"variance must be 'small' or 'large', got {variance!r}")
    cond = cond or {}
    schedule = denoiser.schedule
    for i, t, s in steps_of(grid, progress, "ddpm"):
        pred = denoiser.predict(x, t, **cond)
        a_t, s_t = schedule.alpha_sigma(torch.tensor(t))
        a_s, s_s = schedule.alpha_sigma(torch.tensor(s))
        a_ts = a_t / a_s
        var_ts = s_t**2 - a_ts**2 * s_s**2
        mean = (a_ts * s_s**2 / s_t**2) * x + (a_s * var_ts / s_t**2) * pred.x0
        if i < len(grid) - 2:
            post_var = var_ts * s_s**2 / s_t**2
            if pred.variance is not None:
                frac = (pred.variance + 1) / 2
                logvar = frac * torch.log(var_ts).float() + (1 - frac) * torch.log(post_var).float()
            else:
                logvar = per_sample(torch.log(post_var if variance == "small" else var_ts), x)
            x = mean + torch.exp(0.5 * logvar) * randn_like(x, generator)
        else:
            x = mean
        x = x.float()
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "denoised": pred.x0})
    return x
