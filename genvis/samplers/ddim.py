"""DDIM (Song et al. 2021, eq. 12) on any schedule and grid; eta = 0 is deterministic."""
from __future__ import annotations

import math

import torch

from genvis.diffusion.predictions import Denoiser
from genvis.samplers.common import GridTable, randn_like, register_sampler, steps_of


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
    tab = GridTable(denoiser.schedule, grid)
    for i, t, _ in steps_of(grid, progress, "ddim"):
        pred = denoiser.predict(x, t, **cond)
        a_t, s_t, a_s, s_s = tab.alpha[i], tab.sigma[i], tab.alpha[i + 1], tab.sigma[i + 1]
        c = eta * s_s * math.sqrt(max(0.0, 1 - (a_t * s_s) ** 2 / (a_s * s_t) ** 2))
        x = a_s * pred.x0 + math.sqrt(max(0.0, s_s**2 - c**2)) * pred.eps
        if eta > 0 and c > 0:
            x = x + c * randn_like(x, generator)
        x = x.float()
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "denoised": pred.x0})
    return x
