"""DDIM (Song et al. 2021, eq. 12) on any schedule and grid; eta = 0 is deterministic."""
from __future__ import annotations

import torch

from genvis.diffusion.predictions import Denoiser
from genvis.samplers.common import register_sampler, randn_like, steps_of


@register_sampler("ddim", summary="DDIM (Song et al. 2021); eta=0 deterministic, eta=1 DDPM-like noise",
                  minimum={"eta": 0.0})
@torch.no_grad()
def sample_ddim(denoiser: Denoiser, x, grid, *, cond=None, generator=None, callback=None, progress=False, eta=0.0):
    """x_s = alpha_s x0 + sqrt(sigma_s^2 - c^2) eps + c z, with
    c = eta * sigma_s * sqrt(1 - (alpha_t sigma_s)^2 / (alpha_s sigma_t)^2); the step onto the data end is x0.

    The previous step is the next grid point, not t - T // N (a diffusers bug on trailing grids).
    """
    if eta < 0:
        raise ValueError(f"ddim: eta must be >= 0, got {eta}")
    cond = cond or {}
    schedule = denoiser.schedule
    for i, t, s in steps_of(grid, progress, "ddim"):
        pred = denoiser.predict(x, t, **cond)
        a_t, s_t = schedule.alpha_sigma(torch.tensor(t))
        a_s, s_s = schedule.alpha_sigma(torch.tensor(s))
        c = eta * s_s * torch.sqrt((1 - (a_t * s_s) ** 2 / (a_s * s_t) ** 2).clamp(min=0))
        x = a_s * pred.x0 + torch.sqrt((s_s**2 - c**2).clamp(min=0)) * pred.eps
        if eta > 0 and c > 0:
            x = x + c * randn_like(x, generator)
        x = x.float()
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "denoised": pred.x0})
    return x
