"""UniPC (Zhao et al. 2023, arXiv:2302.04867): the multistep predictor UniP-p and corrector UniC-p in
the data-prediction (x0) form, B(h) variants bh1 (B = -h) and bh2 (B = e^-h - 1), as diffusers'
UniPCMultistepScheduler; any schedule, grid and prediction type.

Step t = grid[i] -> s = grid[i+1], h = lambda_s - lambda_t, with the x0 predictions D_i, D_{i-1}, ...
at lambda_i, lambda_{i-1}, ... and r_k = (lambda_{i-k} - lambda_i) / h:

    x_s = (sigma_s / sigma_t) x_t - alpha_s (e^-h - 1) D_i - alpha_s B(h) sum_k rho_k (D_{i-k} - D_i) / r_k

The weights rho solve sum_k rho_k r_k^(n-1) = b_n = n! (-h) phi_{n+1}(-h) / B(h), n = 1, 2, ...
(phi_1(z) = (e^z - 1) / z, phi_{n+1}(z) = (phi_n(z) - 1/n!) / z):
- UniP-p (predictor) uses D_{i-1}, ..., D_{i-p+1} and the first p - 1 conditions (p = 2: rho = 1/2);
- UniC-p (corrector) recomputes x_s once the model has been evaluated there: it adds the point r = 1
  (D at s) and uses the first p conditions (p = 1: rho = 1/2). UniPC-p is of order p + 1.

The corrected state is what the next predictor starts from, but the model output at the uncorrected
state is reused (no extra evaluation). The step onto the data end is x = D_i (h = +inf), so the model
call before it needs no corrector. A step from alpha = 0 (flow's noise end, lambda = -inf) is
predicted to first order and not corrected, and no later step uses it as history.
"""
from __future__ import annotations

import math
from typing import List

import torch

from genvis.diffusion.predictions import Denoiser
from genvis.samplers.common import GridTable, register_sampler, steps_of
from genvis.samplers.dpm_solver import check_order, expm1_neg, finite_history

VARIANTS = ("bh1", "bh2")


def unipc_weights(h: float, rks: List[float], variant: str):
    """(B(h), rho) for the points rks: rho solves sum_k rho_k r_k^(n-1) = b_n for n = 1..len(rks), except
    that a single point gets rho = 1/2 (UniP-2 and UniC-1, the paper's and diffusers' choice)."""
    hh = -h
    b_h = hh if variant == "bh1" else math.expm1(hh)
    if len(rks) == 1:
        return b_h, [0.5]
    g, factorial, b = math.expm1(hh) / hh - 1.0, 1.0, []  # g_n = (-h) phi_{n+1}(-h)
    for n in range(1, len(rks) + 1):
        b.append(g * factorial / b_h)
        factorial *= n + 1
        g = g / hh - 1.0 / factorial
    R = torch.tensor([[r ** (n - 1) for r in rks] for n in range(1, len(rks) + 1)], dtype=torch.float64)
    return b_h, torch.linalg.solve(R, torch.tensor(b, dtype=torch.float64)).tolist()


def _unipc_update(tab: GridTable, i: int, x: torch.Tensor, outs: List[torch.Tensor], variant: str,
                  d_next: torch.Tensor = None) -> torch.Tensor:
    """UniP (d_next None) or UniC (d_next = D at grid[i+1]) of order p = len(outs) from grid[i] to grid[i+1];
    outs[-1] is D_i, outs[-1-k] is D_{i-k}."""
    a_s, s_s = tab.alpha[i + 1], tab.sigma[i + 1]
    d0 = outs[-1]
    if s_s == 0:
        return d0
    h = tab.lam[i + 1] - tab.lam[i]
    x_s = (s_s / tab.sigma[i]) * x - (a_s * expm1_neg(h)) * d0
    rks = [(tab.lam[i - k] - tab.lam[i]) / h for k in range(1, len(outs))]
    diffs = [(outs[-1 - k] - d0) / r for k, r in enumerate(rks, start=1)]
    if d_next is not None:
        rks, diffs = rks + [1.0], diffs + [d_next - d0]
    if not diffs:
        return x_s
    b_h, rhos = unipc_weights(h, rks, variant)
    return x_s - (a_s * b_h) * sum(rho * d for rho, d in zip(rhos, diffs))


@register_sampler("unipc", discrete_grid="logsnr", choices={"variant": ("bh1", "bh2"), "order": (1, 2, 3)})
@torch.no_grad()
def sample_unipc(denoiser: Denoiser, x, grid, *, cond=None, generator=None, callback=None, progress=False,
                 variant="bh2", order=2, lower_order_final=True):
    """UniPC multistep: UniP-p predictor + UniC-p corrector, one model evaluation per grid point.

    variant: "bh1" (B(h) = -h, advised below 10 steps for unconditional sampling) or "bh2" (e^-h - 1).
    order p = 1..3 (accuracy p + 1); steps i < p - 1 warm up with order i + 1, and with
    `lower_order_final` step i uses at most order (steps - i), as diffusers (at any number of steps).
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    order = check_order(order)
    cond = cond or {}
    tab = GridTable(denoiser.schedule, grid)
    n = len(grid) - 1
    outs: List[torch.Tensor] = []
    last = None  # (x before the previous prediction, its order)
    for i, t, s in steps_of(grid, progress, "unipc"):
        x0 = denoiser(x, t, **cond)
        if last is not None and tab.sigma[i + 1] > 0 and math.isfinite(tab.lam[i - 1]):
            x_prev, k_prev = last
            x = _unipc_update(tab, i - 1, x_prev, outs[-k_prev:], variant, d_next=x0).float()
        outs = (outs + [x0])[-order:]
        k = min(order, i + 1, n - i) if lower_order_final else min(order, i + 1)
        k = finite_history(tab, i, k)
        last = (x, k)
        x = _unipc_update(tab, i, x, outs[-k:], variant).float()
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "denoised": x0})
    return x
