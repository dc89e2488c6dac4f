"""Adaptive Dormand-Prince 5(4) on the probability-flow ODE (Dormand & Prince 1980; scipy's RK45 control).

The ODE is integrated in the flow-equivalent variables, smooth and bounded for every schedule
(rectified flow included, where alpha = 0 at t = 1):

    tau = sigma / (alpha + sigma) in (0, 1],   xhat = x / (alpha + sigma) = (1 - tau) x0 + tau eps,
    d xhat / d tau = eps - x0,

and tau maps back to schedule time through lambda = log(alpha / sigma) = log((1 - tau) / tau), t = t_of_log_snr(lambda).
The solver runs from grid[0] to `t_end` (default: the schedule's t_min, e.g. step 0 of a discrete
schedule, the last time such a model was trained on; the grid's other points are ignored), then jumps
to the data end with the x0 prediction there, which the last stage already evaluated (FSAL). For a
reference solution of an analytic model pass a t_end close to the data end.

Step control as scipy: the error estimate e = h sum_i E_i k_i of the embedded 4th-order solution is measured
by the RMS over all elements of the batch of e / (atol + rtol max(|xhat|, |xhat_new|)); a step is accepted
when that norm is < 1 and the next step is h * min(10, 0.9 norm^(-1/5)) (at most h after a rejection);
a rejected step retries with h * max(0.2, 0.9 norm^(-1/5)). The first step is Hairer's estimate (one
extra evaluation). The state is kept in float64; the model sees float32.
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from genvis.diffusion.predictions import Denoiser
from genvis.samplers.common import register_sampler

# Dormand-Prince 5(4): nodes C, stage coefficients A, 5th-order weights B (= the 7th stage, FSAL),
# and E = B - B*, the weights of the error estimate.
C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0)
A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
)
B = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84)
E = (-71 / 57600, 0.0, 71 / 16695, -71 / 1920, 17253 / 339200, -22 / 525, 1 / 40)
SAFETY, MIN_FACTOR, MAX_FACTOR, ERROR_EXPONENT = 0.9, 0.2, 10.0, -1 / 5


def flow_time(schedule, t: float) -> float:
    """tau = sigma / (alpha + sigma) at schedule time t."""
    alpha, sigma = (float(v) for v in schedule.alpha_sigma(torch.tensor(t, dtype=torch.float64)))
    return sigma / (alpha + sigma)


def schedule_time(schedule, tau: float) -> float:
    """The schedule time with flow-equivalent time tau: t_of_log_snr(log((1 - tau) / tau))."""
    tau64 = torch.tensor(tau, dtype=torch.float64)
    return float(schedule.t_of_log_snr(torch.log1p(-tau64) - torch.log(tau64)))


def rms(v: torch.Tensor) -> float:
    """Root mean square over all elements (scipy's error norm)."""
    return float(v.pow(2).mean().sqrt())


@register_sampler("rk45", steps_doc="ignored (adaptive: accuracy is set by rtol/atol; the grid gives the start time only)",
                  intervals=lambda steps: 1, discrete_grid="trailing", positive=("rtol", "atol", "max_steps"),
                  steps_per_interval=False)
@torch.no_grad()
def sample_rk45(denoiser: Denoiser, x, grid, *, cond=None, generator=None, callback=None, progress=False,
                rtol=1e-5, atol=1e-5, max_steps=1000, t_end=None):
    """Adaptive Dormand-Prince 5(4) on the PF-ODE in flow-equivalent time; the callback reports "nfe"."""
    if rtol <= 0 or atol <= 0:
        raise ValueError(f"rtol and atol must be > 0, got rtol={rtol}, atol={atol}")
    cond = cond or {}
    schedule = denoiser.schedule
    nfe = 0

    t_start = float(grid[0])
    t_end = float(schedule.t_min if t_end is None else t_end)
    if not schedule.data_end < t_end < t_start:
        raise ValueError(f"rk45: t_end={t_end:g} must lie between the data end {schedule.data_end:g} and the start {t_start:g}")
    tau_start, tau_end = flow_time(schedule, t_start), flow_time(schedule, t_end)

    def time_of(tau_):
        """Schedule time at flow time tau_; the two ends are the grid's own times, not round trips."""
        return t_start if tau_ == tau_start else t_end if tau_ == tau_end else schedule_time(schedule, tau_)

    def x_of(tau_, xhat_):
        """x = (alpha + sigma) xhat, float32."""
        alpha, sigma = (float(v) for v in schedule.alpha_sigma(torch.tensor(time_of(tau_), dtype=torch.float64)))
        return (xhat_ * (alpha + sigma)).float()

    def slope(tau_, xhat_):
        """(d xhat / d tau, prediction) at flow time tau_."""
        nonlocal nfe
        nfe += 1
        pred_ = denoiser.predict(x_of(tau_, xhat_), time_of(tau_), **cond)
        return (pred_.eps - pred_.x0).double(), pred_

    def scale(*states):
        return atol + rtol * torch.stack([s.abs() for s in states]).amax(0)

    tau = tau_start
    alpha0, sigma0 = (float(v) for v in schedule.alpha_sigma(torch.tensor(t_start, dtype=torch.float64)))
    xhat = x.double() / (alpha0 + sigma0)
    k1, pred = slope(tau, xhat)

    # Hairer's initial step (Hairer, Norsett & Wanner, II.4), as scipy's select_initial_step
    span = tau - tau_end
    h = span
    if span > 0:
        sc = scale(xhat)
        d0, d1 = rms(xhat / sc), rms(k1 / sc)
        h0 = min(1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1, span)
        k_probe, _ = slope(tau - h0, xhat - h0 * k1)
        d2 = rms((k_probe - k1) / sc) / h0
        h1 = max(1e-6, h0 * 1e-3) if max(d1, d2) <= 1e-15 else (0.01 / max(d1, d2)) ** (1 / 5)
        h = min(100 * h0, h1, span)

    bar = tqdm(total=span, desc="rk45 (flow time)", leave=False) if progress else None
    i, attempts, rejected = 0, 0, False
    while tau > tau_end:
        if attempts >= max_steps:
            raise ValueError(f"rk45: no solution within max_steps={max_steps} steps at tau={tau:.3g}; "
                               "loosen rtol/atol or raise max_steps")
        attempts += 1
        h = min(h, tau - tau_end)
        tau_new = tau_end if h == tau - tau_end else tau - h
        ks = [k1]
        for c, a in zip(C[1:], A[1:]):
            k, _ = slope(tau - c * h, xhat - h * sum(ai * ki for ai, ki in zip(a, ks)))
            ks.append(k)
        xhat_new = xhat - h * sum(b * k for b, k in zip(B, ks))
        k7, pred_new = slope(tau_new, xhat_new)
        ks.append(k7)
        error = rms(h * sum(e * k for e, k in zip(E, ks)) / scale(xhat, xhat_new))
        if error < 1:
            factor = MAX_FACTOR if error == 0 else min(MAX_FACTOR, SAFETY * error**ERROR_EXPONENT)
            h *= min(1.0, factor) if rejected else factor
            rejected = False
            if callback is not None:
                callback({"i": i, "t": time_of(tau), "x": x_of(tau_new, xhat_new), "denoised": pred.x0, "nfe": nfe})
            if bar is not None:
                bar.update(tau - tau_new)
            tau, xhat, k1, pred = tau_new, xhat_new, k7, pred_new
            i += 1
        else:
            h *= max(MIN_FACTOR, SAFETY * error**ERROR_EXPONENT)
            rejected = True
    if bar is not None:
        bar.close()
    if callback is not None:
        callback({"i": i, "t": t_end, "x": pred.x0, "denoised": pred.x0, "nfe": nfe})
    return pred.x0
