"""Noise schedules: x_t = alpha_t * x0 + sigma_t * eps, each in its own time units.

Every schedule answers the same questions in float64: alpha and sigma at t, their derivatives,
the log signal-to-noise ratio lambda = log(alpha / sigma), and the inverse t(lambda). Samplers
and timestep grids are written against that interface only, so each works with every schedule.

- DiscreteVPSchedule: DDPM/DiT, any betas. Model time is the step 0..T-1 (T-1 = most noise).
  The clean-data end is t = -1 (alpha = 1, sigma = 0), so every grid ends exactly at the data.
  Between integer steps log(alpha_bar) is interpolated linearly: fractional times (Karras and
  logSNR grids) are well defined and never rounded onto each other.
- ContinuousVPSchedule: score-SDE VP, "vp-linear" (beta 0.1 .. 20) and "cosine" (Nichol &
  Dhariwal, s = 0.008), t in [0, 1] with t = 0 data. The cosine schedule ends at t = 0.9946
  (as DPM-Solver), where alpha is still positive.
- FlowSchedule: rectified flow, x_t = (1 - t) x0 + t eps, t in [0, 1], t = 1 noise (the
  diffusers / SD3 direction). `shift` is the resolution shift of the default timestep grid
  (applied once, by the grid; never to the schedule itself). SiT and LightningDiT count time the
  other way (t = 1 data): SiTFlowSchedule ("sit") is the flow schedule for such networks; `sit_time`
  converts, and nothing else in genvis does.
- GVPSchedule: SiT's generalised VP interpolant, alpha = cos(pi t / 2), sigma = sin(pi t / 2), t = 1 noise.
- EDMSchedule: Karras et al. 2022, x_t = x0 + t eps with t = sigma in [0, 80].
"""
from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn.functional as F


def linear_betas(num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """DiT / DDPM linear betas, float64 [T]."""
    return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)


def scaled_linear_betas(num_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """Stable Diffusion's betas: linear in sqrt(beta)."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2


def cosine_betas(num_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Improved DDPM's discrete cosine betas (diffusers "squaredcos_cap_v2")."""
    f = lambda u: math.cos((u + s) / (1 + s) * math.pi / 2) ** 2
    return torch.tensor([min(1 - f((i + 1) / num_timesteps) / f(i / num_timesteps), max_beta) for i in range(num_timesteps)],
                        dtype=torch.float64)


def sit_time(t: torch.Tensor) -> torch.Tensor:
    """genvis flow time (t=1 noise) <-> SiT / LightningDiT time (t=1 data); the map is its own inverse."""
    return 1.0 - t


def f64(t) -> torch.Tensor:
    """t as a float64 tensor (schedule quantities are computed in float64)."""
    return torch.as_tensor(t, dtype=torch.float64)


def flow_shift(t, shift: float):
    """Timestep shift t' = s t / (1 + (s - 1) t) (SD3 / LightningDiT); s > 1 spends more steps at high noise."""
    return shift * t / (1 + (shift - 1) * t)


def shift_for_resolution(num_tokens: int, base_tokens: int = 256, base_shift: float = 1.0) -> float:
    """SD3's resolution-dependent shift: s = base_shift * sqrt(num_tokens / base_tokens)
    (Esser et al. 2024, sec. 5.3.2); e.g. 1024 latent tokens against a 256-token base gives s = 2."""
    return base_shift * math.sqrt(num_tokens / base_tokens)


class Schedule:
    """alpha_t, sigma_t as functions of the schedule's own time; `data_end` / `noise_end` bound it.

    `t_min` is the smallest time a grid evaluates the model at when the data end itself has an
    infinite log-SNR (logSNR and Karras grids); `discrete` schedules were trained on integer steps.
    """

    name: str
    data_end: float
    noise_end: float
    t_min: float
    is_flow: bool = False
    discrete: bool = False

    def alpha_sigma(self, t) -> Tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def alpha_sigma_derivatives(self, t) -> Tuple[torch.Tensor, torch.Tensor]:
        """d alpha/dt, d sigma/dt (needed for velocity prediction)."""
        raise NotImplementedError

    def log_snr(self, t) -> torch.Tensor:
        """lambda = log(alpha / sigma): -inf where alpha = 0, +inf at the data end."""
        alpha, sigma = self.alpha_sigma(t)
        return torch.log(alpha) - torch.log(sigma)

    def t_of_log_snr(self, lam) -> torch.Tensor:
        """The inverse of log_snr."""
        raise NotImplementedError

    def prior_std(self, t: float) -> float:
        """Scale of the starting noise at time t: x_t = prior_std * N(0, I). sqrt(alpha^2 + sigma^2)
        is the std of x_t for unit-variance data; it is exactly 1 for VP and for flow at t = 1."""
        alpha, sigma = self.alpha_sigma(f64(t))
        return float(torch.sqrt(alpha**2 + sigma**2))

    def normalized_time(self, t) -> torch.Tensor:
        """0 at the data end, 1 at the noise end (the units of guidance intervals)."""
        return (f64(t) - self.data_end) / (self.noise_end - self.data_end)

    def to_model_time(self, t: torch.Tensor) -> torch.Tensor:
        """What the network's timestep embedder sees for schedule time t."""
        return t

    def from_model_time(self, t: torch.Tensor) -> torch.Tensor:
        """The schedule time of the network's time t (the inverse of to_model_time)."""
        return t

    def velocity_derivatives(self, t) -> Tuple[torch.Tensor, torch.Tensor]:
        """d alpha, d sigma with respect to the network's time: a velocity prediction is d x_t / d(model time)
        = d alpha x0 + d sigma eps. The schedule's own derivatives, unless the network counts time backwards."""
        return self.alpha_sigma_derivatives(t)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name})"


class DiscreteVPSchedule(Schedule):
    discrete = True

    def __init__(self, betas: torch.Tensor, name: str = "linear"):
        betas = f64(betas)
        if betas.ndim != 1 or len(betas) < 2 or not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("betas must be a 1-D sequence of values in (0, 1)")
        self.name = name
        self.betas = betas
        self.num_timesteps = len(betas)
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        # log(alpha_bar) at t = -1, 0, ..., T-1: index i holds time i - 1.
        self._log_abar = torch.cat([torch.zeros(1, dtype=torch.float64), torch.log(self.alphas_cumprod)])
        self.data_end = -1.0
        self.noise_end = float(self.num_timesteps - 1)
        self.t_min = 0.0

    def log_alpha_bar(self, t) -> torch.Tensor:
        t = f64(t)
        pos = (t + 1.0).clamp(0.0, float(self.num_timesteps))
        lo = pos.floor().long().clamp(max=self.num_timesteps - 1)
        frac = pos - lo
        table = self._log_abar.to(t.device)
        return table[lo] * (1 - frac) + table[lo + 1] * frac

    def alpha_sigma(self, t):
        log_abar = self.log_alpha_bar(t)
        return torch.exp(0.5 * log_abar), torch.sqrt(-torch.expm1(log_abar))

    def log_snr(self, t):
        log_abar = self.log_alpha_bar(t)
        return 0.5 * (log_abar - torch.log(-torch.expm1(log_abar)))

    def t_of_log_snr(self, lam):
        log_abar = -F.softplus(-2.0 * f64(lam))  # alpha_bar = sigmoid(2 lambda)
        table = -self._log_abar  # ascending in the index
        pos = torch.searchsorted(table, -log_abar).clamp(1, self.num_timesteps)
        lo, hi = table[pos - 1], table[pos]
        frac = ((-log_abar - lo) / (hi - lo)).clamp(0, 1)
        return (pos - 1).double() + frac - 1.0

    def alpha_sigma_derivatives(self, t):
        t = f64(t)
        pos = (t + 1.0).clamp(0.0, float(self.num_timesteps) - 1e-9)
        lo = pos.floor().long()
        slope = self._log_abar[lo + 1] - self._log_abar[lo]  # d log(alpha_bar) / dt on this piece
        alpha, sigma = self.alpha_sigma(t)
        dalpha = 0.5 * slope * alpha
        return dalpha, -alpha * dalpha / sigma


class ContinuousVPSchedule(Schedule):
    """Variance preserving in continuous time: sigma = sqrt(1 - alpha^2), t in [0, t_max]."""

    data_end = 0.0

    def __init__(self, kind: str = "linear", beta_min: float = 0.1, beta_max: float = 20.0, cosine_s: float = 0.008):
        if kind not in ("linear", "cosine"):
            raise ValueError(f"unknown continuous VP kind {kind!r}; expected linear or cosine")
        self.kind = kind
        self.name = "vp-linear" if kind == "linear" else "cosine"
        self.beta_min, self.beta_max, self.s = beta_min, beta_max, cosine_s
        self.noise_end = 1.0 if kind == "linear" else 0.9946
        self.t_min = 1e-3 if kind == "linear" else 1e-4
        self._log_alpha0 = math.log(math.cos(math.pi / 2 * cosine_s / (1 + cosine_s)))

    def log_alpha(self, t) -> torch.Tensor:
        t = f64(t)
        if self.kind == "linear":
            return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min
        return (torch.log(torch.cos(math.pi / 2 * (t + self.s) / (1 + self.s))) - self._log_alpha0).clamp(max=0.0)

    def alpha_sigma(self, t):
        log_alpha = self.log_alpha(t)
        return torch.exp(log_alpha), torch.sqrt(-torch.expm1(2 * log_alpha))

    def log_snr(self, t):
        log_alpha = self.log_alpha(t)
        return log_alpha - 0.5 * torch.log(-torch.expm1(2 * log_alpha))

    def t_of_log_snr(self, lam):
        log_alpha = -0.5 * F.softplus(-2.0 * f64(lam))
        if self.kind == "linear":
            b0, db = self.beta_min, self.beta_max - self.beta_min
            return (-b0 + torch.sqrt(b0**2 - 4 * db * log_alpha)) / db
        return 2 * (1 + self.s) / math.pi * torch.arccos(torch.exp(log_alpha + self._log_alpha0)) - self.s

    def alpha_sigma_derivatives(self, t):
        t = f64(t)
        alpha, sigma = self.alpha_sigma(t)
        if self.kind == "linear":
            dlog_alpha = -0.5 * t * (self.beta_max - self.beta_min) - 0.5 * self.beta_min
        else:
            u = math.pi / 2 * (t + self.s) / (1 + self.s)
            dlog_alpha = -math.pi / (2 * (1 + self.s)) * torch.tan(u)
        dalpha = alpha * dlog_alpha
        return dalpha, -alpha * dalpha / sigma


class FlowSchedule(Schedule):
    name = "flow"
    is_flow = True
    data_end = 0.0
    noise_end = 1.0
    t_min = 1e-3

    def __init__(self, shift: float = 1.0):
        if shift <= 0:
            raise ValueError(f"flow shift must be > 0, got {shift}")
        self.shift = float(shift)

    def alpha_sigma(self, t):
        t = f64(t)
        return 1.0 - t, t

    def t_of_log_snr(self, lam):
        return torch.sigmoid(-f64(lam))

    def alpha_sigma_derivatives(self, t):
        t = f64(t)
        return -torch.ones_like(t), torch.ones_like(t)


class GVPSchedule(Schedule):
    """SiT's generalised VP interpolant in genvis's time (t = 1 noise): alpha = cos(pi t / 2), sigma = sin(pi t / 2),
    so alpha^2 + sigma^2 = 1 along a quarter circle (SiT's GVP with s = 1 - t). Grids start at t = 0.999 (alpha
    0.0016, log-SNR -6.5), as the cosine schedule's do: the VP samplers step in sigma / alpha."""

    name = "gvp"
    data_end = 0.0
    noise_end = 0.999
    t_min = 1e-3

    def alpha_sigma(self, t):
        t = f64(t)
        return torch.cos(math.pi / 2 * t), torch.sin(math.pi / 2 * t)

    def t_of_log_snr(self, lam):
        return 2.0 / math.pi * torch.atan(torch.exp(-f64(lam)))

    def alpha_sigma_derivatives(self, t):
        alpha, sigma = self.alpha_sigma(t)
        return -math.pi / 2 * sigma, math.pi / 2 * alpha


class SiTFlowSchedule(FlowSchedule):
    """Rectified flow for networks that count time the other way (SiT, LightningDiT: s = 1 - t, s = 1 data) and
    predict d x / ds = x0 - eps. genvis's time stays t = 1 noise; only what the network sees and the sign of its
    velocity change (`sit_time`)."""

    name = "sit"

    def to_model_time(self, t):
        return sit_time(t)

    def from_model_time(self, t):
        return sit_time(t)

    def velocity_derivatives(self, t):
        dalpha, dsigma = self.alpha_sigma_derivatives(t)
        return -dalpha, -dsigma  # d/ds = -d/dt


class EDMSchedule(Schedule):
    """x_t = x0 + sigma eps with t = sigma (Karras et al. 2022); the model sees t = sigma."""

    name = "edm"
    data_end = 0.0

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0):
        self.t_min, self.noise_end = float(sigma_min), float(sigma_max)

    def alpha_sigma(self, t):
        t = f64(t)
        return torch.ones_like(t), t

    def t_of_log_snr(self, lam):
        return torch.exp(-f64(lam))

    def alpha_sigma_derivatives(self, t):
        t = f64(t)
        return torch.zeros_like(t), torch.ones_like(t)

    def prior_std(self, t: float) -> float:
        return float(t)  # the EDM sampler starts from sigma_max * N(0, I)


SCHEDULES = ("linear", "scaled_linear", "squaredcos", "vp-linear", "cosine", "flow", "gvp", "sit", "edm")


def make_schedule(name: str, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
                  shift: float = 1.0) -> Schedule:
    """A schedule by name: "linear" (DiT's 1000 linear betas), "scaled_linear" (SD), "squaredcos"
    (discrete cosine), "vp-linear" / "cosine" (continuous VP), "flow" (rectified flow), "gvp" (SiT's GVP
    interpolant), "sit" (rectified flow, the network in SiT's time and velocity sign), "edm"."""
    if name == "linear":
        return DiscreteVPSchedule(linear_betas(num_timesteps, beta_start, beta_end), "linear")
    if name == "scaled_linear":
        return DiscreteVPSchedule(scaled_linear_betas(num_timesteps), "scaled_linear")
    if name == "squaredcos":
        return DiscreteVPSchedule(cosine_betas(num_timesteps), "squaredcos")
    if name == "vp-linear":
        return ContinuousVPSchedule("linear")
    if name == "cosine":
        return ContinuousVPSchedule("cosine")
    if name == "flow":
        return FlowSchedule(shift)
    if name == "sit":
        return SiTFlowSchedule(shift)
    if name == "gvp":
        return GVPSchedule()
    if name == "edm":
        return EDMSchedule()
    raise ValueError(f"unknown schedule {name!r}; expected one of: {', '.join(SCHEDULES)}")


def schedule_for_model(model) -> Schedule:
    """The schedule a genvis generator declares in its config."""
    c = model.config
    return make_schedule(c.schedule, c.num_train_timesteps, c.beta_start, c.beta_end, shift=c.flow_shift)
