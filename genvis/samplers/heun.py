"""Heun's second-order method on the probability-flow ODE (Karras et al. 2022, Algorithm 1, no churn).

VP and EDM schedules use the k-diffusion variables: state y = x / alpha, time r = sigma / alpha and
dy/dr = eps (diffusers' HeunDiscreteScheduler). Rectified flow integrates in t itself, dx/dt = eps - x0
(diffusers' FlowMatchHeunDiscreteScheduler), because r is unbounded where alpha = 0 (t = 1).

An interval r -> r' takes the Euler predictor y_e = y + (r' - r) d(y, r), evaluates the slope there and
restarts from y with the mean slope: y' = y + (r' - r) (d(y, r) + d(y_e, r')) / 2. The step onto the
data end (sigma = 0) is the Euler step alone, which is exactly the x0 prediction, so N grid intervals
cost 2N - 1 model evaluations.
"""
from __future__ import annotations

from typing import Tuple

import torch

from genvis.diffusion.predictions import Denoiser, Prediction
from genvis.samplers.common import register_sampler, steps_of


def ode_variables(schedule, t: float) -> Tuple[float, float]:
    """(c, r) at time t: the ODE state is x / c and its time is r (float64 Python floats)."""
    if schedule.is_flow:
        return 1.0, t
    alpha, sigma = (float(v) for v in schedule.alpha_sigma(torch.tensor(t, dtype=torch.float64)))
    return alpha, sigma / alpha


def ode_slope(schedule, pred: Prediction) -> torch.Tensor:
    """d(x / c) / dr for a prediction: eps - x0 for rectified flow, eps for sigma / alpha."""
    return pred.eps - pred.x0 if schedule.is_flow else pred.eps


@register_sampler(
    "heun",
    intervals=lambda steps: max(1, (steps + 1) // 2),
    discrete_grid="trailing",
    steps_doc=("model evaluations per sample; the grid gets (steps+1)//2 intervals "
               "(2 evaluations per interval, 1 on the last)"),
)
@torch.no_grad()
def sample_heun(denoiser: Denoiser, x, grid, *, cond=None, generator=None, callback=None, progress=False):
    """Heun's 2nd-order PF-ODE solver (Karras et al. 2022, Alg. 1, no churn); the last step is x = x0."""
    cond = cond or {}
    schedule = denoiser.schedule
    last = len(grid) - 2
    for i, t, s in steps_of(grid, progress, "heun"):
        pred = denoiser.predict(x, t, **cond)
        if i == last:
            x = pred.x0
        else:
            c_t, r_t = ode_variables(schedule, t)
            c_s, r_s = ode_variables(schedule, s)
            y, d1 = x / c_t, ode_slope(schedule, pred)
            x_euler = (c_s * (y + (r_s - r_t) * d1)).float()
            d2 = ode_slope(schedule, denoiser.predict(x_euler, s, **cond))
            x = (c_s * (y + (r_s - r_t) * 0.5 * (d1 + d2))).float()
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "denoised": pred.x0})
    return x
