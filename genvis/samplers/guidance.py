"""Classifier-free guidance (Ho & Salimans 2022) as a wrapper around the model function.

Because guidance wraps the network rather than living inside a solver, every sampler gets it,
and the raw output channels stay visible: the official first-k-channel mode and DiT's learned
variance (taken unguided from the conditional half) both need that.

Options:
- interval (t_lo, t_hi): guide only where the normalised time u (0 at the data end, 1 at the
  noise end, `Schedule.normalized_time`) satisfies t_lo < u <= t_hi (Kynkaanniemi et al. 2024).
  Outside it the model is called once, on the conditional input only.
- schedule "constant": scale w at every step; "linear": the guidance strength w - 1 ramps
  linearly from 0 at the noise end (u = 1) to 2 (w - 1) at the data end (u = 0), so its mean
  over time equals the constant schedule's (the "linear" increasing schedule of Wang et al. 2024).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch

CFG_SCHEDULES = ("constant", "linear")


@dataclass
class CFG:
    """What to guide with: scale, optional interval, scale schedule, first-k-channel mode."""

    scale: float
    interval: Optional[Tuple[float, float]] = None
    schedule: str = "constant"
    channels: Optional[int] = None

    def __post_init__(self):
        self.scale = float(self.scale)
        if self.schedule not in CFG_SCHEDULES:
            raise ValueError(f"cfg schedule {self.schedule!r}: expected one of: {', '.join(CFG_SCHEDULES)}")
        if self.interval is not None:
            lo, hi = (float(v) for v in self.interval)
            if not 0.0 <= lo < hi <= 1.0:
                raise ValueError(f"cfg interval {self.interval}: expected 0 <= t_lo < t_hi <= 1 (normalised time, 1 = noise)")
            self.interval = (lo, hi)
        if self.channels is not None and self.channels < 1:
            raise ValueError(f"cfg channels must be >= 1, got {self.channels}")

    def scale_at(self, u: torch.Tensor) -> torch.Tensor:
        """Per-sample guidance scale at normalised time u [B] (1 where guidance is off)."""
        w = torch.full_like(u, self.scale)
        if self.schedule == "linear":
            w = 1.0 + (self.scale - 1.0) * 2.0 * (1.0 - u)
        if self.interval is not None:
            lo, hi = self.interval
            w = torch.where((u > lo) & (u <= hi), w, torch.ones_like(w))
        return w


def parse_interval(text: str) -> Tuple[float, float]:
    """'0.1,0.9' -> (0.1, 0.9)."""
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"cfg interval {text!r}: expected two numbers 'T_LO,T_HI', e.g. 0.1,0.9") from None
    return lo, hi


class ClassifierFreeGuidance:
    """model_fn(x, t, y) -> guided output, one batched call for the conditional and null halves.

    Args:
        model_fn: the network, returning [B, C_out, ...] raw outputs; t is in schedule units.
        cfg: a CFG (or a plain float scale). A scale of 1 everywhere calls the model once.
        null_label: the label index of the null class.
        pred_channels: channels holding the prediction (the rest, e.g. DiT's learned variance,
            is taken from the conditional half unguided).
        schedule: needed for an interval or a non-constant scale schedule (normalised time).
    """

    def __init__(self, model_fn: Callable, cfg, null_label: int, pred_channels: int, schedule=None):
        if not isinstance(cfg, CFG):
            cfg = CFG(float(cfg))
        if schedule is None and (cfg.interval is not None or cfg.schedule != "constant"):
            raise ValueError("a cfg interval or scale schedule needs the noise schedule")
        self.model_fn = model_fn
        self.cfg = cfg
        self.schedule = schedule
        self.null_label = null_label
        self.guided = pred_channels if cfg.channels is None else min(cfg.channels, pred_channels)
        # a constant scale everywhere is a Python float: no per-call tensor work or device sync
        self.constant = cfg.interval is None and cfg.schedule == "constant"

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.constant:
            w = self.cfg.scale
            unguided = w == 1.0
        else:
            u = self.schedule.normalized_time(self.schedule.from_model_time(t.double().cpu()))  # t: the network's time
            w = self.cfg.scale_at(u).to(x.device)
            unguided = bool((w == 1.0).all())
        if unguided:
            return self.model_fn(x, t, y)
        null = torch.full_like(y, self.null_label)
        out = self.model_fn(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))
        cond, uncond = out.chunk(2)
        k = self.guided
        if not self.constant:
            w = w.to(cond.dtype).view(-1, *([1] * (cond.ndim - 1)))
        guided = uncond[:, :k] + w * (cond[:, :k] - uncond[:, :k])
        return torch.cat([guided, cond[:, k:]], dim=1)
