"""Training objectives: what to draw (t, noise) and what to regress.

- eps on the discrete VP schedule, optionally with learned variance (DiT / improved DDPM's hybrid
  loss: MSE on eps + the variational bound term with a stop-gradient on the mean).
- v on the discrete VP schedule.
- rectified flow: velocity prediction, uniform or logit-normal time sampling (SD3 / LightningDiT), optionally
  with LightningDiT's cosine loss on the velocity direction.
- SiT's interpolants (the flow line, GVP) with velocity, score or noise prediction.

All randomness (t, noise) is passed in by the caller, which draws it from a per-step seeded
generator: training is then bit-reproducible on resume and independent of the process count.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from genvis.diffusion.predictions import per_sample, target, to_x0_eps
from genvis.diffusion.schedules import DiscreteVPSchedule, Schedule


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_std_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x, means, log_scales) -> torch.Tensor:
    """Log-likelihood of data in [-1, 1] quantised to 256 bins (improved DDPM's decoder term)."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_std_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(
        x < -0.999,
        log_cdf_plus,
        torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12))),
    )


class VPPosterior:
    """q(x_{t-1} | x_t, x0) tables of a discrete VP schedule (float64, as the official code)."""

    def __init__(self, schedule: DiscreteVPSchedule):
        betas = schedule.betas
        acp = schedule.alphas_cumprod
        acp_prev = torch.cat([torch.ones(1, dtype=torch.float64), acp[:-1]])
        self.betas = betas
        self.variance = betas * (1.0 - acp_prev) / (1.0 - acp)
        self.log_variance_clipped = torch.log(torch.cat([self.variance[1:2], self.variance[1:]]))
        self.coef1 = betas * acp_prev.sqrt() / (1.0 - acp)
        self.coef2 = (1.0 - acp_prev) * (1.0 - betas).sqrt() / (1.0 - acp)

    def gather(self, table: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return table.to(x.device)[t.long()].float().view(-1, *([1] * (x.ndim - 1)))


# the training task's objective names -> the network's prediction type
PREDICTIONS = {"eps": "eps", "v": "v", "flow": "velocity", "score": "score"}


class DiffusionObjective:
    """Loss for a generator whose output type is `prediction` on `schedule`.

    Args:
        schedule: DiscreteVPSchedule (eps / v) or FlowSchedule (velocity).
        prediction: eps | v | x0 | velocity.
        learn_sigma: the network returns 2C channels; adds the VLB term (eps on discrete VP only).
        time_sampling: uniform | logit_normal (continuous schedules only).
        logit_mean, logit_std: parameters of the logit-normal time density.
        cosine_weight: velocity only: adds weight * (1 - cos(output, target)) over channels, averaged over positions
            (LightningDiT's cosine loss on the velocity direction; it uses 1).

    A score network's loss is SiT's: mean (sigma * output + eps)^2, the score error weighted by sigma^2 (finite
    where sigma -> 0).
    """

    def __init__(
        self,
        schedule: Schedule,
        prediction: str,
        learn_sigma: bool = False,
        time_sampling: str = "uniform",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        cosine_weight: float = 0.0,
    ):
        if cosine_weight and prediction != "velocity":
            raise ValueError("the cosine loss is defined on a velocity prediction")
        if learn_sigma and not (isinstance(schedule, DiscreteVPSchedule) and prediction == "eps"):
            raise ValueError("learned variance is defined for eps prediction on a discrete VP schedule")
        self.schedule = schedule
        self.prediction = prediction
        self.learn_sigma = learn_sigma
        self.time_sampling = time_sampling
        self.logit_mean = logit_mean
        self.logit_std = logit_std
        self.cosine_weight = cosine_weight
        self.posterior = VPPosterior(schedule) if learn_sigma else None

    def sample_time(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """[n] training times: integers 0..T-1 (discrete) or floats in (0, 1) (flow)."""
        if isinstance(self.schedule, DiscreteVPSchedule):
            return torch.randint(0, self.schedule.num_timesteps, (n,), generator=generator)
        if self.time_sampling == "logit_normal":
            return torch.sigmoid(self.logit_mean + self.logit_std * torch.randn(n, generator=generator, dtype=torch.float64))
        # avoid the exact ends, where eps (t=0) or x0 (t=1) is unidentifiable
        return torch.rand(n, generator=generator, dtype=torch.float64) * (1 - 2e-5) + 1e-5

    def loss(self, model_fn: Callable, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, **cond) -> torch.Tensor:
        """Per-sample loss [B]. model_fn(x_t, t_model, **cond) -> raw output."""
        alpha, sigma = (per_sample(v, x0) for v in self.schedule.alpha_sigma(t))
        x_t = alpha * x0 + sigma * noise
        t_model = self.schedule.to_model_time(torch.as_tensor(t, dtype=torch.float64)).to(x0.device, torch.float32)
        out = model_fn(x_t, t_model, **cond).float()
        dalpha = dsigma = None
        if self.prediction == "velocity":
            dalpha, dsigma = (per_sample(v, x0) for v in self.schedule.velocity_derivatives(t))
        if self.prediction == "score":
            return mean_flat((sigma * out + noise) ** 2)
        if not self.learn_sigma:
            goal = target(self.prediction, x0, noise, alpha, sigma, dalpha, dsigma)
            loss = mean_flat((out - goal) ** 2)
            if self.cosine_weight:
                loss = loss + self.cosine_weight * mean_flat(1 - F.cosine_similarity(out, goal, dim=1))
            return loss
        eps_out, var_values = out.chunk(2, dim=1)
        mse = mean_flat((eps_out - noise) ** 2)
        # VLB term with the mean frozen: it trains only the variance (improved DDPM, DiT).
        vb = self._vb_term(eps_out.detach(), var_values, x0, x_t, t, alpha, sigma)
        return mse + vb

    def _vb_term(self, eps, var_values, x0, x_t, t, alpha, sigma) -> torch.Tensor:
        post = self.posterior
        t = torch.as_tensor(t).long().to(x0.device)
        true_mean = post.gather(post.coef1, t, x0) * x0 + post.gather(post.coef2, t, x0) * x_t
        true_logvar = post.gather(post.log_variance_clipped, t, x0)
        pred_x0, _ = to_x0_eps(eps, x_t, alpha, sigma, "eps")
        model_mean = post.gather(post.coef1, t, x0) * pred_x0 + post.gather(post.coef2, t, x0) * x_t
        min_log = true_logvar
        max_log = post.gather(torch.log(post.betas), t, x0)
        frac = (var_values + 1) / 2
        model_logvar = frac * max_log + (1 - frac) * min_log
        kl = mean_flat(normal_kl(true_mean, true_logvar, model_mean, model_logvar)) / math.log(2.0)
        nll = -mean_flat(discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_logvar)) / math.log(2.0)
        return torch.where(t == 0, nll, kl)


def objective_for(schedule: Schedule, objective: str, learn_sigma: bool, **kwargs) -> DiffusionObjective:
    """Config name (eps | v | flow | score) -> objective with the model's prediction type."""
    prediction = PREDICTIONS[objective]
    return DiffusionObjective(schedule, prediction, learn_sigma=learn_sigma and objective == "eps", **kwargs)
