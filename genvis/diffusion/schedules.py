"""Noise schedules: x_t = alpha_t * x0 + sigma_t * eps, each in its own time units.

- DiscreteVPSchedule: DDPM/DiT. Model time is the integer step 0..T-1 (T-1 = most noise).
  The clean-data end is t = -1 (alpha = 1, sigma = 0), so every timestep grid can end exactly
  at the data. Between integer steps, log(alpha_bar) is interpolated linearly, so fractional
  times are well defined.
- FlowSchedule: rectified flow, x_t = (1 - t) x0 + t eps, t in [0, 1], t = 1 noise (the
  diffusers / SD3 direction). SiT and LightningDiT count time the other way (t = 1 data);
  `sit_time` converts, and nothing else in genvis does.
"""
from __future__ import annotations

from typing import Tuple

import torch


def linear_betas(num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """DiT / DDPM linear betas, float64 [T]."""
    return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)


def sit_time(t: torch.Tensor) -> torch.Tensor:
    """genvis flow time (t=1 noise) <-> SiT / LightningDiT time (t=1 data); the map is its own inverse."""
    return 1.0 - t


class Schedule:
    """alpha_t, sigma_t as functions of the schedule's own time; `data_end` / `noise_end` bound it."""

    name: str
    data_end: float
    noise_end: float
    is_flow: bool = False

    def alpha_sigma(self, t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def alpha_sigma_derivatives(self, t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """d alpha/dt, d sigma/dt (needed for velocity prediction)."""
        raise NotImplementedError

    def to_model_time(self, t: torch.Tensor) -> torch.Tensor:
        """What the network's timestep embedder sees for schedule time t."""
        return t


class DiscreteVPSchedule(Schedule):
    name = "linear"

    def __init__(self, betas: torch.Tensor):
        betas = torch.as_tensor(betas, dtype=torch.float64)
        self.betas = betas
        self.num_timesteps = len(betas)
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        # log(alpha_bar) at t = -1, 0, ..., T-1: index i holds time i - 1.
        self._log_abar = torch.cat([torch.zeros(1, dtype=torch.float64), torch.log(self.alphas_cumprod)])
        self.data_end = -1.0
        self.noise_end = float(self.num_timesteps - 1)

    def log_alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float64)
        pos = (t + 1.0).clamp(0.0, float(self.num_timesteps))
        lo = pos.floor().long().clamp(max=self.num_timesteps - 1)
        frac = pos - lo
        table = self._log_abar.to(t.device)
        return table[lo] * (1 - frac) + table[lo + 1] * frac

    def alpha_sigma(self, t):
        abar = torch.exp(self.log_alpha_bar(t))
        return abar.sqrt(), (1.0 - abar).clamp(min=0).sqrt()

    def alpha_sigma_derivatives(self, t):
        raise NotImplementedError("velocity prediction is defined for continuous schedules (use schedule 'flow')")


class FlowSchedule(Schedule):
    name = "flow"
    is_flow = True
    data_end = 0.0
    noise_end = 1.0

    def alpha_sigma(self, t):
        t = torch.as_tensor(t, dtype=torch.float64)
        return 1.0 - t, t

    def alpha_sigma_derivatives(self, t):
        t = torch.as_tensor(t, dtype=torch.float64)
        return -torch.ones_like(t), torch.ones_like(t)


def make_schedule(name: str, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Schedule:
    if name == "linear":
        return DiscreteVPSchedule(linear_betas(num_timesteps, beta_start, beta_end))
    if name == "flow":
        return FlowSchedule()
    raise ValueError(f"unknown schedule {name!r}; expected one of: linear, flow")


def schedule_for_model(model) -> Schedule:
    """The schedule a genvis generator declares in its config."""
    c = model.config
    return make_schedule(c.schedule, c.num_train_timesteps, c.beta_start, c.beta_end)
