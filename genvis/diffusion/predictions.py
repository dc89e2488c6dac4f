"""The one place that converts between prediction types.

With x_t = alpha x0 + sigma eps:
    eps       the noise
    x0        the clean data
    v         alpha eps - sigma x0                  (Salimans & Ho 2022)
    velocity  dx_t/dt = alpha' x0 + sigma' eps      (flow matching; = eps - x0 for rectified flow)
    score     grad log p_t(x_t) = -eps / sigma      (score SDE)
`Denoiser` wraps a network of any prediction type into the data prediction the samplers use.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch

from genvis.diffusion.schedules import Schedule

PREDICTION_TYPES = ("eps", "x0", "v", "velocity", "score")


def _check(prediction: str) -> None:
    if prediction not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction type {prediction!r}; expected one of: {', '.join(PREDICTION_TYPES)}")


def to_x0_eps(output, x_t, alpha, sigma, prediction: str, dalpha=None, dsigma=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Network output of type `prediction` -> (x0, eps). alpha/sigma broadcast against x_t."""
    _check(prediction)
    if prediction == "eps":
        return (x_t - sigma * output) / alpha, output
    if prediction == "x0":
        return output, (x_t - alpha * output) / sigma
    if prediction == "score":
        eps = -sigma * output
        return (x_t - sigma * eps) / alpha, eps
    if prediction == "v":
        norm = alpha * alpha + sigma * sigma
        x0 = (alpha * x_t - sigma * output) / norm
        eps = (sigma * x_t + alpha * output) / norm
        return x0, eps
    # velocity: solve [x_t; u] = [[alpha, sigma], [alpha', sigma']] [x0; eps]
    det = alpha * dsigma - sigma * dalpha
    x0 = (dsigma * x_t - sigma * output) / det
    eps = (alpha * output - dalpha * x_t) / det
    return x0, eps


def target(prediction: str, x0, eps, alpha, sigma, dalpha=None, dsigma=None) -> torch.Tensor:
    """The regression target for a network of type `prediction`."""
    _check(prediction)
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0
    if prediction == "v":
        return alpha * eps - sigma * x0
    if prediction == "score":
        return -eps / sigma
    return dalpha * x0 + dsigma * eps


def per_sample(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A scalar or [B] schedule quantity (float64) as float32 [B, 1, ...] broadcasting against x."""
    v = torch.as_tensor(v, dtype=torch.float64)
    if v.ndim == 0:
        v = v.expand(x.shape[0])
    return v.to(device=x.device, dtype=torch.float32).view(-1, *([1] * (x.ndim - 1)))


@dataclass
class Prediction:
    x0: torch.Tensor
    eps: torch.Tensor
    variance: Optional[torch.Tensor] = None  # learned-range values in [-1, 1] (DiT's extra channels)


class Denoiser:
    """model_fn(x, t_model, **cond) -> raw output  ==>  denoiser(x, t, **cond) -> x0.

    `t` is in the schedule's time units (a float or a [B] tensor); `learn_sigma` models return
    2C channels and the second half is kept as `Prediction.variance` for DDPM ancestral sampling.
    """

    def __init__(self, model_fn: Callable, schedule: Schedule, prediction: str, learn_sigma: bool = False):
        _check(prediction)
        self.model_fn = model_fn
        self.schedule = schedule
        self.prediction = prediction
        self.learn_sigma = learn_sigma
        self._coefficients = {}

    def coefficients(self, t: float) -> tuple:
        """(alpha, sigma, dalpha, dsigma) at one time as Python floats, cached: samplers evaluate a
        handful of times, and scalar coefficients keep the per-step arithmetic to a few tensor ops."""
        if t not in self._coefficients:
            t64 = torch.tensor(t, dtype=torch.float64)
            alpha, sigma = (float(v) for v in self.schedule.alpha_sigma(t64))
            dalpha = dsigma = None
            if self.prediction == "velocity":
                dalpha, dsigma = (float(v) for v in self.schedule.velocity_derivatives(t64))
            self._coefficients[t] = (alpha, sigma, dalpha, dsigma)
        return self._coefficients[t]

    def predict(self, x: torch.Tensor, t, **cond) -> Prediction:
        t = torch.as_tensor(t, dtype=torch.float64)
        uniform = t.ndim == 0 or bool((t == t.flatten()[0]).all())
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        out = self.model_fn(x, self.schedule.to_model_time(t).to(device=x.device, dtype=torch.float32), **cond).float()
        variance = None
        if self.learn_sigma:
            out, variance = out.chunk(2, dim=1)
        if uniform:  # one time for the whole batch (every genvis sampler): scalar coefficients
            alpha, sigma, dalpha, dsigma = self.coefficients(float(t[0]))
            alpha_zero = alpha == 0
        else:
            alpha64, sigma64 = self.schedule.alpha_sigma(t)
            alpha_zero = bool((alpha64 == 0).any())
            alpha, sigma = per_sample(alpha64, x), per_sample(sigma64, x)
            dalpha = dsigma = None
            if self.prediction == "velocity":
                dalpha, dsigma = (per_sample(v, x) for v in self.schedule.velocity_derivatives(t))
        if self.prediction in ("eps", "score") and alpha_zero:
            raise ValueError(f"an {self.prediction!r} prediction cannot give x0 where alpha = 0 (t = {t.max().item():g}); "
                             "start the grid below the noise end or use a velocity, v or x0 model")
        x0, eps = to_x0_eps(out, x.float(), alpha, sigma, self.prediction, dalpha, dsigma)
        return Prediction(x0=x0, eps=eps, variance=variance)

    def __call__(self, x: torch.Tensor, t, **cond) -> torch.Tensor:
        return self.predict(x, t, **cond).x0
