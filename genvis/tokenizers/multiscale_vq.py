"""Multi-scale residual VQ (VAR, Tian et al. 2024): an image's features f [B, C, H, W] become one id map per
scale, coarse to fine, each quantising what the coarser ones left:

    rest = f;  f_hat = 0
    for k, p in enumerate(scales):                              # e.g. 1, 2, 3, 4, 5, 6, 8, 10, 13, 16
        ids_k = nearest(area_downsample(rest, p))               # the last scale at full size, no resampling
        h = phi_k(bicubic_upsample(embed(ids_k), H))            # phi(h) = (1 - r) h + r conv3x3(h), r = 0.5
        f_hat += h;  rest -= h

phi_k is one of `phi_count` convs shared by scale: index argmin |ticks - k / (S - 1)| with ticks
linspace(1/12, 11/12, 4) for 4 convs (else linspace(1/2n, 1 - 1/2n, n)), computed in float64 as VAR does.
Training loss: the mean over scales of beta ||sg(f_hat_k) - f||^2 + ||f_hat_k - sg(f)||^2, straight-through
f_hat to the decoder. Keys match VAR's VQ-VAE (quantize.embedding.weight, quantize.quant_resi.qresi_ls.{i},
quantize.ema_vocab_hit_SV), so `genvis import var-vae` loads vae_ch160v4096z32 as it is.

Against coarse-scale collapse (the failure reported by those who trained their own: the coarse scales end
up with a handful of codes): the per-scale usage is tracked (ema_vocab_hit_SV, an EMA of each scale's
assignment fractions) and logged, and codes are restarted per scale from that scale's own vectors
(`plan_restarts`). A scale's coverage is the number of codes it uses over the codes it can reach in the
usage window, min(K, p*p * global batch / (1 - usage_decay)). Dead codes (usage below restart_threshold / K)
go one by one to the scale of lowest coverage; then a scale still under `coverage_target` (default 0.5; the
digits preset 1.0) takes up to 1% of the codebook per step from the least-used codes it does not use. A shared
codebook otherwise drifts to the fine scales, which offer most of the vectors, and the 1x1 scale keeps the
few codes it started with.

`teacher_forcing_input(ids)` builds the VAR transformer's input from the ids (VAR's idxBl_to_var_input) and
`accumulate(k, f_hat, h)` is one step of decoding (VAR's get_next_autoregressive_input).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

from genvis.errors import ConfigError, GenvisError
from genvis.registry import TOKENIZERS
from genvis.tokenizers.base import TokenizerConfig
from genvis.tokenizers.vq import (
    LOCAL,
    Codebook,
    Collectives,
    ConvAutoencoder,
    assignment_fractions,
    check_ids,
    check_image_size,
    conv_kwargs,
    nearest_code,
    usage_and_perplexity,
    validate_conv_section,
    validate_quantizer_section,
)

VAR_SCALES = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


def phi_indices(num_scales: int, phi_count: int) -> List[int]:
    """Which shared phi conv each scale uses (VAR's PhiPartiallyShared, float64 ticks and ties as numpy gives)."""
    ticks = (np.linspace(1 / 3 / phi_count, 1 - 1 / 3 / phi_count, phi_count) if phi_count == 4
             else np.linspace(1 / 2 / phi_count, 1 - 1 / 2 / phi_count, phi_count))
    return [int(np.argmin(np.abs(ticks - k / (num_scales - 1)))) for k in range(num_scales)]


class Phi(nn.Conv2d):
    """phi(h) = (1 - r) h + r conv3x3(h)."""

    def __init__(self, channels: int, ratio: float):
        super().__init__(channels, channels, 3, padding=1)
        self.ratio = ratio

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h * (1 - self.ratio) + super().forward(h) * self.ratio


class MultiScaleQuantizer(Codebook):
    def __init__(self, size: int, dim: int, scales: Sequence[int], *, phi_ratio: float = 0.5, phi_count: int = 4,
                 beta: float = 0.25, l2_norm: bool = False, restart_threshold: float = 0.0, usage_decay: float = 0.99,
                 coverage_target: float = 0.5):
        super().__init__(size, dim, l2_norm=l2_norm, restart_threshold=restart_threshold, usage_decay=usage_decay)
        self.scales, self.beta, self.coverage_target = tuple(scales), beta, coverage_target
        self.quant_resi = nn.Module()
        self.quant_resi.qresi_ls = nn.ModuleList(
            [Phi(dim, phi_ratio) if abs(phi_ratio) > 1e-6 else nn.Identity() for _ in range(phi_count)])
        self.phi_of = phi_indices(len(self.scales), phi_count)
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(self.scales), size))  # per-scale usage (fractions)

    @torch.no_grad()
    def plan_restarts(self, batch: int) -> torch.Tensor:
        """Long [K]: the scale whose vectors restart each code this step, -1 for none (see the module
        docstring). `batch` is the global batch's number of images; everything read is global, so every
        process plans the same."""
        plan = torch.full((self.size,), -1, dtype=torch.long, device=self.usage.device)
        floor = self.restart_threshold / self.size
        used = self.ema_vocab_hit_SV >= floor  # [S, K]
        window = 1.0 / (1.0 - self.usage_decay)
        reach = [min(self.size, int(p * p * batch * window)) for p in self.scales]
        count = used.sum(1).tolist()  # codes each scale uses (or is given below)
        capacity = [p * p * batch for p in self.scales]  # one restart per vector of the scale
        for code in self.dead().nonzero().flatten().tolist():
            open_scales = [k for k in range(len(self.scales)) if capacity[k] > 0]
            if not open_scales:
                break
            k = min(open_scales, key=lambda s: count[s] / reach[s])  # the lowest coverage; ties: the coarser
            plan[code] = k
            count[k] += 1
            capacity[k] -= 1
        rate = max(1, self.size // 100)
        order = torch.argsort(self.usage, stable=True)  # least used first
        for k in range(len(self.scales)):
            need = min(rate, capacity[k], math.ceil(self.coverage_target * reach[k]) - count[k])
            if need <= 0:
                continue
            free = order[(plan[order] == -1) & ~used[k][order]][:need]
            plan[free] = k
        return plan

    def phi(self, k: int, h: torch.Tensor) -> torch.Tensor:
        return self.quant_resi.qresi_ls[self.phi_of[k]](h)

    def _flat(self, rest: torch.Tensor, k: int) -> torch.Tensor:
        """The vectors scale k quantises: the residual area-downsampled to p x p (the last scale as it is), [B*p*p, C]."""
        p = self.scales[k]
        z = rest if k == len(self.scales) - 1 else F.interpolate(rest, size=(p, p), mode="area")
        z = z.permute(0, 2, 3, 1).reshape(-1, rest.shape[1])
        return F.normalize(z, dim=-1) if self.l2_norm else z

    def upsampled(self, k: int, codes: torch.Tensor, size: int) -> torch.Tensor:
        """phi_k of the code map [B, C, p, p] bicubically upsampled to size x size (the last scale is not resampled)."""
        if k != len(self.scales) - 1:
            codes = F.interpolate(codes, size=(size, size), mode="bicubic")
        return self.phi(k, codes)

    def embed(self, ids: torch.Tensor, k: int) -> torch.Tensor:
        """ids [B, p*p] of scale k -> code map [B, C, p, p]."""
        p = self.scales[k]
        return self.lookup(ids).transpose(1, 2).reshape(ids.shape[0], self.dim, p, p)

    @torch.no_grad()
    def ids(self, f: torch.Tensor) -> List[torch.Tensor]:
        """f [B, C, H, W] -> one id tensor [B, p*p] per scale (row-major)."""
        f = f.float()
        rest, (b, _, size, _) = f.clone(), f.shape
        out = []
        for k, p in enumerate(self.scales):
            ids = nearest_code(self._flat(rest, k), self.vectors().float())
            rest -= self.upsampled(k, self.embed(ids.view(b, p * p), k), size)
            out.append(ids.view(b, p * p))
        return out

    def f_hat(self, ids: Sequence[torch.Tensor]) -> torch.Tensor:
        """The sum over scales of the upsampled, refined code maps [B, C, H, W]."""
        size = self.scales[-1]
        total = 0
        for k, scale_ids in enumerate(ids):
            total = total + self.upsampled(k, self.embed(scale_ids, k).float(), size)
        return total

    def accumulate(self, k: int, f_hat: torch.Tensor, codes: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """One decoding step: f_hat += phi_k(up(codes of scale k)); returns (f_hat, the next scale's input
        area-downsampled from it, or f_hat itself after the last scale)."""
        f_hat = f_hat + self.upsampled(k, codes, self.scales[-1])
        if k == len(self.scales) - 1:
            return f_hat, f_hat
        p = self.scales[k + 1]
        return f_hat, F.interpolate(f_hat, size=(p, p), mode="area")

    def teacher_forcing_input(self, ids: Sequence[torch.Tensor]) -> torch.Tensor:
        """VAR's training input [B, L - scales[0]**2, C]: for k >= 1, f_hat after scales 0..k-1 area-downsampled
        to scale k, flattened row-major, scales concatenated."""
        b, size = ids[0].shape[0], self.scales[-1]
        f_hat = torch.zeros(b, self.dim, size, size, device=ids[0].device)
        inputs = []
        for k in range(len(self.scales) - 1):
            f_hat, nxt = self.accumulate(k, f_hat, self.embed(ids[k], k).float())
            inputs.append(nxt.flatten(2).transpose(1, 2))
        return torch.cat(inputs, dim=1)

    def forward(self, f: torch.Tensor, keys: Optional[torch.Tensor] = None, sync: Collectives = LOCAL) -> Dict[str, torch.Tensor]:
        """Training pass: f [B, C, H, W]; keys [B, L] random numbers for restarts. Returns {"quantized"
        (straight-through f_hat), "ids" (list per scale), "loss", "log/..."}."""
        b, c, size, _ = f.shape
        num = len(self.scales)
        with torch.autocast(device_type=f.device.type, enabled=False):
            f = f.float()
            f_no_grad = f.detach()
            rest, f_hat = f_no_grad.clone(), torch.zeros_like(f_no_grad)
            loss, ids_out, fractions, restarted = 0.0, [], [], 0
            offsets = np.cumsum([0] + [p * p for p in self.scales])
            restarting = self.training and keys is not None and self.restart_threshold > 0
            if restarting:
                plan = self.plan_restarts(int(sync.gather(torch.tensor([b], device=f.device)).sum()))
            for k, p in enumerate(self.scales):
                z = self._flat(rest, k)
                if restarting:
                    scale_keys = keys[:, offsets[k]:offsets[k + 1]].reshape(-1)
                    restarted += self.restart(plan == k, z, scale_keys, sync)
                ids = nearest_code(z, self.vectors().float().detach())
                fractions.append(assignment_fractions(ids, self.size, sync))
                h = self.upsampled(k, self.embed(ids.view(b, p * p), k), size)
                f_hat = f_hat + h
                rest = rest - h.detach()
                loss = loss + self.beta * F.mse_loss(f_hat.detach(), f) + F.mse_loss(f_hat, f_no_grad)
                ids_out.append(ids.view(b, p * p))
            loss = loss / num
            stacked = torch.stack(fractions)
            if self.training:
                with torch.no_grad():
                    self.ema_vocab_hit_SV.lerp_(stacked, 1.0 - self.usage_decay)
                    self.usage.lerp_(stacked.mean(0), 1.0 - self.usage_decay)
            straight = f_hat.detach() - f_no_grad + f
        logs = {}
        for k, p in enumerate(self.scales):
            usage, perplexity = usage_and_perplexity(stacked[k])
            logs[f"log/usage_{p}"] = usage
            logs[f"log/perplexity_{p}"] = perplexity
        logs["log/usage"] = usage_and_perplexity(stacked.mean(0))[0]
        logs["log/restarted"] = torch.tensor(float(restarted), device=f.device)
        return {"quantized": straight, "ids": ids_out, "loss": loss, **logs}


@dataclass
class MultiScaleVQConfig(TokenizerConfig):
    """`tokenizer:` for `arch: msvq`: VAR's VQ-VAE (vae_ch160v4096z32: ch 160, ch_mult [1, 1, 2, 2, 4], z 32,
    4096 codes of dim z_channels, 3x3 quant convs, scales 1..16). The last scale must equal the feature
    map's side (image side / 2 ** (len(ch_mult) - 1))."""

    ch: int = 160
    ch_mult: List[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    num_res_blocks: int = 2
    z_channels: int = 32
    norm_groups: int = 32
    level_attention: bool = True
    mid_attention: bool = True
    dropout: float = 0.0
    quant_conv_kernel: int = 3
    codebook_size: int = 4096
    scales: List[int] = field(default_factory=lambda: list(VAR_SCALES))
    phi_ratio: float = 0.5
    phi_count: int = 4
    beta: float = 0.25
    l2_norm: bool = False
    restart_threshold: float = 0.0
    usage_decay: float = 0.99
    coverage_target: float = 0.5  # with restarts: a scale using fewer of the codes it can reach takes codes
    ema: bool = False  # accepted for a uniform quantizer schema; the multi-scale codebook learns by its loss
    ema_decay: float = 0.99
    entropy_weight: float = 0.0

    def validate(self) -> None:
        super().validate()
        validate_conv_section(self)
        validate_quantizer_section(self)
        if self.codebook_size < 1:
            raise ConfigError(f"key 'tokenizer.codebook_size': must be >= 1, got {self.codebook_size}")
        s = list(self.scales)
        if len(s) < 2 or any(p < 1 for p in s) or any(a >= b for a, b in zip(s, s[1:])):
            raise ConfigError(f"key 'tokenizer.scales': {s}: expected at least two increasing positive sides")
        if not 0 < self.coverage_target <= 1:
            raise ConfigError(f"key 'tokenizer.coverage_target': must be in (0, 1], got {self.coverage_target}")
        if self.phi_count < 1:
            raise ConfigError(f"key 'tokenizer.phi_count': must be >= 1, got {self.phi_count}")
        if self.ema or self.entropy_weight:
            raise ConfigError("key 'tokenizer.ema': the multi-scale quantizer trains its codebook by its loss "
                              "(ema and entropy_weight are for arch vq)")


@TOKENIZERS.register("msvq", schema=MultiScaleVQConfig, class_name="MultiScaleVQTokenizer")
class MultiScaleVQTokenizer(ConvAutoencoder, ModelMixin, ConfigMixin):
    """VAR's VQ-VAE: images [B, C, H, W] in [-1, 1] <-> ids, a list of [B, p*p] per scale (coarse to fine).
    `decode` also takes them concatenated, [B, L] with L = sum p*p (what `genvis tokenizer extract` writes)."""

    token_layout = "scales"

    @register_to_config
    def __init__(self, in_channels: int = 3, ch: int = 160, ch_mult: Tuple[int, ...] = (1, 1, 2, 2, 4), num_res_blocks: int = 2,
                 z_channels: int = 32, norm_groups: int = 32, level_attention: bool = True, mid_attention: bool = True,
                 dropout: float = 0.0, quant_conv_kernel: int = 3, codebook_size: int = 4096,
                 scales: Tuple[int, ...] = VAR_SCALES, phi_ratio: float = 0.5, phi_count: int = 4, beta: float = 0.25,
                 l2_norm: bool = False, restart_threshold: float = 0.0, usage_decay: float = 0.99,
                 coverage_target: float = 0.5):
        super().__init__()
        self._build_convs(in_channels, ch, list(ch_mult), num_res_blocks, z_channels, norm_groups, level_attention,
                          mid_attention, dropout, quant_conv_kernel, z_channels)
        self.quantize = MultiScaleQuantizer(codebook_size, z_channels, scales, phi_ratio=phi_ratio, phi_count=phi_count,
                                            beta=beta, l2_norm=l2_norm, restart_threshold=restart_threshold,
                                            usage_decay=usage_decay, coverage_target=coverage_target)

    @classmethod
    def from_section(cls, section: MultiScaleVQConfig, image_shape) -> "MultiScaleVQTokenizer":
        check_image_size(section, image_shape)
        side = image_shape[1] // 2 ** (len(section.ch_mult) - 1)
        if image_shape[1] != image_shape[2] or section.scales[-1] != side:
            raise ConfigError(f"key 'tokenizer.scales': the last scale {section.scales[-1]} must equal the feature map's "
                              f"side {side} ({image_shape[1]}x{image_shape[2]} images, downsampled by "
                              f"{2 ** (len(section.ch_mult) - 1)})")
        keys = ("codebook_size", "scales", "phi_ratio", "phi_count", "beta", "l2_norm", "restart_threshold", "usage_decay",
                "coverage_target")
        return cls(**conv_kwargs(section, image_shape[0]), **{k: getattr(section, k) for k in keys})

    @property
    def vocab_size(self) -> int:
        return self.config.codebook_size

    @property
    def scales(self) -> Tuple[int, ...]:
        return tuple(self.config.scales)

    @property
    def num_tokens(self) -> int:
        return sum(p * p for p in self.scales)

    def latent_shape(self, image_shape) -> Tuple[int]:
        """(L,): the ids of all scales of one image, concatenated."""
        return (self.num_tokens,)

    def draw_shape(self, image_shape) -> Dict[str, Tuple[int, ...]]:
        return {"keys": (self.num_tokens,)}

    def split(self, ids: Union[torch.Tensor, Sequence[torch.Tensor]]) -> List[torch.Tensor]:
        """ids as a list of [B, p*p] (or [B, p, p]) per scale, or [B, L] concatenated -> the list of [B, p*p],
        checked: one line for a wrong number of scales, a wrong size or ids outside the vocabulary."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 2 or ids.shape[1] != self.num_tokens:
                raise GenvisError(f"ids of shape {tuple(ids.shape)}: expected [B, {self.num_tokens}] (scales "
                                  f"{list(self.scales)} concatenated) or a list of {len(self.scales)} per-scale tensors")
            ids = list(ids.split([p * p for p in self.scales], dim=1))
        ids = list(ids)
        if len(ids) != len(self.scales):
            raise GenvisError(f"ids for {len(ids)} scales: this tokenizer has {len(self.scales)} ({list(self.scales)})")
        out = []
        for k, (scale_ids, p) in enumerate(zip(ids, self.scales)):
            if scale_ids.shape[0] != ids[0].shape[0]:
                raise GenvisError(f"ids of scale {k}: a batch of {scale_ids.shape[0]}, but scale 0 has {ids[0].shape[0]}")
            scale_ids = scale_ids.reshape(scale_ids.shape[0], -1)
            if scale_ids.shape[1] != p * p:
                raise GenvisError(f"ids of scale {k}: {scale_ids.shape[1]} per image, expected {p}x{p} = {p * p}")
            check_ids(scale_ids, self.vocab_size, what=f"ids of scale {k}")
            out.append(scale_ids.long())
        return out

    def forward(self, images: torch.Tensor, keys: Optional[torch.Tensor] = None, sync: Collectives = LOCAL) -> Dict[str, torch.Tensor]:
        """Training pass: {"reconstruction", "quantizer_loss", "ids", "log/..."}."""
        out = self.quantize(self.features(images), keys, sync)
        logs = {k: v for k, v in out.items() if k.startswith("log/")}
        return {"reconstruction": self.reconstruct(out["quantized"]), "quantizer_loss": out["loss"], "ids": out["ids"], **logs}

    @torch.no_grad()
    def encode(self, images, *, sample: bool = False, generator=None) -> List[torch.Tensor]:
        return self.quantize.ids(self.features(images))

    @torch.no_grad()
    def decode(self, ids) -> torch.Tensor:
        """ids (a list per scale, or [B, L]) -> images; a float [B, C, p, p] is taken as f_hat itself (what
        VAR's smoothed decoding accumulates from code mixtures rather than ids)."""
        if isinstance(ids, torch.Tensor) and ids.is_floating_point() and ids.dim() == 4:
            side = self.scales[-1]
            if tuple(ids.shape[1:]) != (self.quantize.dim, side, side):
                raise GenvisError(f"features of shape {tuple(ids.shape)}: expected [B, {self.quantize.dim}, {side}, {side}]")
            return self.reconstruct(ids)
        return self.reconstruct(self.quantize.f_hat(self.split(ids)))

    def teacher_forcing_input(self, ids) -> torch.Tensor:
        """VAR's teacher-forcing input [B, L - scales[0]**2, z_channels] from ids (see MultiScaleQuantizer)."""
        return self.quantize.teacher_forcing_input(self.split(ids))
