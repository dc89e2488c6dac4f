"""Euler's method on the probability-flow ODE.

Rectified flow: Euler in t on dx/dt = eps - x0 (the flow-matching sampler, as diffusers'
FlowMatchEulerDiscreteScheduler). VP schedules: Euler in sigma/alpha on the scaled state
x / alpha (Karras et al. 2022, Algorithm 1 with no churn), which coincides with DDIM (eta = 0).
"""
from __future__ import annotations

import torch

from genvis.diffusion.predictions import Denoiser
from genvis.samplers.common import GridTable, register_sampler, steps_of


@register_sampler("euler", summary="Euler on the probability-flow ODE (flow: in t; VP: in sigma/alpha)")
@torch.no_grad()
def sample_euler(denoiser: Denoiser, x, grid, *, cond=None, generator=None, callback=None, progress=False):
    cond = cond or {}
    tab = GridTable(denoiser.schedule, grid)
    for i, t, s in steps_of(grid, progress, "euler"):
        pred = denoiser.predict(x, t, **cond)
        if denoiser.schedule.is_flow:
            x = x + (s - t) * (pred.eps - pred.x0)
        else:
            a_t, s_t, a_s, s_s = tab.alpha[i], tab.sigma[i], tab.alpha[i + 1], tab.sigma[i + 1]
            x = a_s * (x / a_t + (s_s / a_s - s_t / a_t) * pred.eps)
        x = x.float()
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "denoised": pred.x0})
    return x
