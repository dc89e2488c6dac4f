"""DPM-Solver++ (Lu et al. 2022, arXiv:2211.01095): exponential integrators of the probability-flow
ODE in the data-prediction (x0) form, on any schedule, grid and prediction type.

With lambda = log(alpha / sigma) and D(x, lambda) the x0 prediction, the PF-ODE solution from t to s
(h = lambda_s - lambda_t > 0) is exactly

    x_s = (sigma_s / sigma_t) x_t + sigma_s * integral_{lambda_t}^{lambda_s} e^lambda D dlambda.

Expanding D = D_0 + v D' + v^2 D'' / 2 + ... in v = lambda - lambda_t integrates term by term to

    x_s = (sigma_s / sigma_t) x_t - alpha_s phi_1 D_0 + alpha_s phi_2 h D' - alpha_s phi_3 h^2 D'' + O(h^4),
    phi_1 = e^-h - 1,  phi_2 = phi_1 / h + 1,  phi_3 = phi_2 / h - 1/2,

and the multistep solvers estimate h D' and h^2 D'' from the previous predictions (r_0 = h_{i-1} / h):

    order 1 (= DDIM)   x_s = (sigma_s / sigma_t) x_t - alpha_s phi_1 D_0
    2M (midpoint)      x_s = (sigma_s / sigma_t) x_t - alpha_s phi_1 (D_0 + (D_0 - D_-1) / (2 r_0))
    3M                 the expansion above with h D' and h^2 D'' from D_0, D_-1, D_-2 (`_multistep_update`).

The 3M weight of h^2 D'' is phi_3. The reference DPM-Solver code, diffusers and k-diffusion apply phi_3 to
half of that estimate (their D2 = h^2 D'' / 2), which leaves a local error h^3 D'' / 12: their 3M
converges at order 2, this one at order 3 (tests/samplers/test_dpm_unipc.py).

Each model evaluation sits on a grid point; the step onto the data end (sigma = 0, h = +inf) is
x = D_0. The first grid point of a flow schedule has alpha = 0 (lambda = -inf): e^-h is then 0, and
a step whose history crosses it drops to a lower order.
"""
from __future__ import annotations

import functools
import math
from typing import List, Sequence

import torch

from genvis.diffusion.predictions import Denoiser
from genvis.samplers.common import GridTable, randn_like, register_sampler, steps_of

ORDERS = (1, 2, 3)
LOWER_ORDER_FINAL_BELOW = 15  # diffusers: lower_order_final only acts on grids with fewer steps


def check_order(order, valid: Sequence[int] = ORDERS) -> int:
    if order not in valid:
        raise ValueError(f"order must be one of {', '.join(map(str, valid))}, got {order!r}")
    return int(order)


def expm1_neg(h: float) -> float:
    """e^-h - 1, exact for small h; -1 for h = +inf."""
    return math.expm1(-h) if math.isfinite(h) else -1.0


MIN_STEP_RATIO = 0.2  # below it, extrapolating the history over the coming step is unstable


def finite_history(tab: GridTable, i: int, k: int) -> int:
    """The largest order <= k whose history lambda_{i-1}, ..., lambda_{i-k+1} is finite and whose past steps
    are not much shorter than the coming one (h_{i-j} / h_i >= MIN_STEP_RATIO): a multistep estimate of
    h D' or h^2 D'' amplifies the differences of its history by h / h_{i-j} and diverges on grids that end with
    one long log-SNR step (e.g. t = 50 -> 0 on a linspace grid), where diffusers' solvers do the same."""
    h = tab.lam[i + 1] - tab.lam[i]

    def ok(j: int) -> bool:
        h_past = tab.lam[i - j + 1] - tab.lam[i - j]
        return math.isfinite(tab.lam[i - j]) and (not math.isfinite(h) or h_past >= MIN_STEP_RATIO * h)

    while k > 1 and not all(ok(j) for j in range(1, k)):
        k -= 1
    return k


def multistep_order(tab: GridTable, i: int, order: int, lower_order_final: bool) -> int:
    """The order of step i (grid[i] -> grid[i+1]) for an `order`-step multistep method, as diffusers'
    DPMSolverMultistepScheduler: warm-up (order i + 1 at step i), and with `lower_order_final` on grids
    of fewer than 15 steps at most second order on the next-to-last step (the last step is always x0)."""
    n = len(tab) - 1
    k = min(order, i + 1)
    if lower_order_final and n < LOWER_ORDER_FINAL_BELOW and i == n - 2:
        k = min(k, 2)
    return finite_history(tab, i, k)


def _multistep_update(tab: GridTable, i: int, x: torch.Tensor, outs: List[torch.Tensor], generator=None,
                      sde: bool = False) -> torch.Tensor:
    """One DPM-Solver++ multistep step from grid[i] to grid[i+1] using the len(outs) latest x0 predictions
    (outs[-1] at grid[i]). ODE: see the module doc; in 3M, with r_0 = h_{i-1} / h, r_1 = h_{i-2} / h,
    E_0 = (D_0 - D_-1) / r_0 and E_1 = (D_-1 - D_-2) / r_1 (h D' at the two midpoints):
    h D' = E_0 + r_0 (E_0 - E_1) / (r_0 + r_1) and h^2 D'' = 2 (E_0 - E_1) / (r_0 + r_1).
    SDE-DPM-Solver++ (sde=True, orders 1 and 2; drop the E_0 term for order 1):

        x_s = (sigma_s / sigma_t) e^-h x_t + alpha_s (1 - e^-2h) (D_0 + E_0 / 2) + sigma_s sqrt(1 - e^-2h) z.
    """
    a_s, s_s = tab.alpha[i + 1], tab.sigma[i + 1]
    d0 = outs[-1]
    if s_s == 0:
        return d0
    s_t, k = tab.sigma[i], len(outs)
    h = tab.lam[i + 1] - tab.lam[i]
    if k >= 2:
        r0 = (tab.lam[i] - tab.lam[i - 1]) / h
        e0 = (d0 - outs[-2]) / r0
    if sde:
        e2 = -math.expm1(-2 * h) if math.isfinite(h) else 1.0  # 1 - e^-2h
        ratio = tab.alpha[i] * s_s / (s_t * a_s)  # e^-h, also where alpha_t = 0
        drift = d0 if k == 1 else d0 + 0.5 * e0
        return (s_s / s_t * ratio) * x + (a_s * e2) * drift + (s_s * math.sqrt(e2)) * randn_like(x, generator)
    phi = expm1_neg(h)
    if k == 1:
        return (s_s / s_t) * x - (a_s * phi) * d0
    if k == 2:
        return (s_s / s_t) * x - (a_s * phi) * (d0 + 0.5 * e0)
    r1 = (tab.lam[i - 1] - tab.lam[i - 2]) / h
    e1 = (outs[-2] - outs[-3]) / r1
    hd1 = e0 + (r0 / (r0 + r1)) * (e0 - e1)  # h D'
    h2d2 = (2.0 / (r0 + r1)) * (e0 - e1)  # h^2 D''
    phi2 = phi / h + 1.0
    return (s_s / s_t) * x - (a_s * phi) * d0 + (a_s * phi2) * hd1 - (a_s * (phi2 / h - 0.5)) * h2d2


def _run_multistep(denoiser: Denoiser, x, grid, cond, callback, progress, *, order, lower_order_final, sde, generator,
                   desc):
    cond = cond or {}
    tab = GridTable(denoiser.schedule, grid)
    outs: List[torch.Tensor] = []
    for i, t, _ in steps_of(grid, progress, desc):
        x0 = denoiser(x, t, **cond)
        outs = (outs + [x0])[-order:]
        k = multistep_order(tab, i, order, lower_order_final)
        x = _multistep_update(tab, i, x, outs[-k:], generator, sde).float()
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "denoised": x0})
    return x


@torch.no_grad()
def sample_dpmpp_multistep(denoiser: Denoiser, x, grid, *, cond=None, generator=None, callback=None, progress=False,
                           order=2, lower_order_final=True):
    """DPM-Solver++ multistep (orders 1-3; order 1 is DDIM), one model evaluation per grid point.

    Steps i < order - 1 warm up with order i + 1; `lower_order_final` lowers the next-to-last step to
    second order on grids of fewer than 15 steps (diffusers' DPMSolverMultistepScheduler); the step onto
    the data end is x0. The second-order step is the midpoint form (diffusers' solver_type="midpoint").
    """
    order = check_order(order)
    return _run_multistep(denoiser, x, grid, cond, callback, progress, order=order, lower_order_final=lower_order_final,
                          sde=False, generator=None, desc=f"dpmpp-{order}m")


register_sampler("dpmpp-2m", fn=functools.partial(sample_dpmpp_multistep, order=2), discrete_grid="logsnr", choices={"order": (1, 2, 3)},
                 summary="DPM-Solver++(2M): second-order multistep exponential integrator (order 1..3 via order=)")
register_sampler("dpmpp-3m", fn=functools.partial(sample_dpmpp_multistep, order=3), discrete_grid="logsnr", choices={"order": (1, 2, 3)},
                 summary="DPM-Solver++(3M): third-order multistep exponential integrator (full h^2 D'' term, see module doc)")


@register_sampler("dpmpp-2m-sde", stochastic=True, discrete_grid="logsnr")
@torch.no_grad()
def sample_dpmpp_2m_sde(denoiser: Denoiser, x, grid, *, cond=None, generator=None, callback=None, progress=False,
                        lower_order_final=True):
    """SDE-DPM-Solver++(2M): second-order multistep solver of the reverse SDE (diffusers' sde-dpmsolver++).

    Midpoint variant in x0 form; one noise draw per step before the data end.

    x_s = (sigma_s / sigma_t) e^-h x_t + alpha_s (1 - e^-2h) (D_0 + (D_0 - D_-1) / (2 r_0)) + sigma_s sqrt(1 - e^-2h) z
    with z ~ N(0, I) drawn through `generator`.
    """
    return _run_multistep(denoiser, x, grid, cond, callback, progress, order=2, lower_order_final=lower_order_final,
                          sde=True, generator=generator, desc="dpmpp-2m-sde")


def singlestep_orders(steps: int, order: int) -> List[int]:
    """The order of each step of DPM-Solver++ singlestep, as diffusers' DPMSolverSinglestepScheduler with a
    zero final sigma (which forces its lower_order_final): repeating groups (1, 2, ..., order), a shorter
    group at the end, and a first-order (x0) final step.

    order 3: [1,2,3]*(n/3 - 1) + [1,2,1] (n % 3 == 0), [1,2,3]*(n//3) + [1] (n % 3 == 1), [1,2,3]*(n//3) + [1,1];
    order 2: [1,2]*(n/2 - 1) + [1,1] (n even), [1,2]*(n//2) + [1] (n odd); order 1: all ones.
    """
    order = check_order(order)
    group = list(range(1, order + 1))
    full, rest = divmod(steps, order)
    if rest == 0:
        full, rest = full - 1, order  # the last group is cut short by the final first-order step
    return group * full + group[: rest - 1] + [1]


def _singlestep_update(tab: GridTable, i: int, x_start: torch.Tensor, outs: List[torch.Tensor]) -> torch.Tensor:
    """The order-k singlestep update from grid[j] (j = i - k + 1, state x_start) to grid[i+1], with the x0
    predictions outs at grid[j..i] as the intermediate points (k = len(outs)). With h = lambda_{i+1} - lambda_j,
    r = (lambda_i - lambda_j) / h and Dd = (D_i - D_j) / r:

        k = 2    x_s = (sigma_s / sigma_j) x_j - alpha_s phi (D_j + Dd / 2)
        k = 3    x_s = (sigma_s / sigma_j) x_j - alpha_s phi D_j + alpha_s (phi / h + 1) Dd

    (DPM-Solver++(3S) with the third stage at lambda_i; third order when r = 2/3, e.g. on a uniform-lambda grid.)
    """
    k = len(outs)
    if k == 1:
        return _multistep_update(tab, i, x_start, outs)
    j = i - k + 1
    a_s, s_s = tab.alpha[i + 1], tab.sigma[i + 1]
    h = tab.lam[i + 1] - tab.lam[j]
    phi = expm1_neg(h)
    dd = (outs[-1] - outs[0]) / ((tab.lam[i] - tab.lam[j]) / h)
    base = (s_s / tab.sigma[j]) * x_start - (a_s * phi) * outs[0]
    if k == 2:
        return base - (0.5 * a_s * phi) * dd
    return base + (a_s * (phi / h + 1.0)) * dd


@register_sampler("dpm-singlestep", discrete_grid="logsnr", choices={"order": (1, 2, 3)})
@torch.no_grad()
def sample_dpm_singlestep(denoiser: Denoiser, x, grid, *, cond=None, generator=None, callback=None, progress=False,
                          order=2):
    """DPM-Solver++ singlestep (orders 1-3), its intermediate evaluations on the grid points.

    A group of k steps starts from its first grid point and takes orders 1, ..., k (`singlestep_orders`),
    each step landing on the next grid point; midpoint form; the last step is x0. The default order 2
    is diffusers' DPMSolverSinglestepScheduler default (solver_order=2).
    """
    order = check_order(order)
    cond = cond or {}
    tab = GridTable(denoiser.schedule, grid)
    orders = singlestep_orders(len(grid) - 1, order)
    states: List[torch.Tensor] = []
    outs: List[torch.Tensor] = []
    for i, t, _ in steps_of(grid, progress, "dpm-singlestep"):
        x0 = denoiser(x, t, **cond)
        states, outs = (states + [x])[-order:], (outs + [x0])[-order:]
        k = orders[i]
        while k > 1 and not math.isfinite(tab.lam[i - k + 1]):  # a group starting where alpha = 0
            k -= 1
        x = _singlestep_update(tab, i, states[-k], outs[-k:]).float()
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "denoised": x0})
    return x
