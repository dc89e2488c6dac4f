"""Vector quantisation (van den Oord et al. 2017) and the VQ-VAE tokenizer (VQGAN / LlamaGen VQ-16).

    z [N, D] -> ids = argmin_k ||z||^2 + ||e_k||^2 - 2 z.e_k          (nearest code; on unit vectors with l2_norm)
    z_q = e[ids];  output z + sg(z_q - z)                              (straight-through estimator)
    loss = ||z_q - sg(z)||^2  +  beta ||sg(z_q) - z||^2  [+ entropy_weight * entropy]   (beta 0.25 on the encoder side)

Options against codebook collapse (each measured in the README's digits table):
- l2_norm: look up unit vectors in a low-dimensional space (LlamaGen: 16384 x 8), distance = 2 - 2 cos.
- ema: the codebook follows exponential moving averages of its assigned vectors (VQ-VAE-2) instead of the
  codebook loss: count_k <- d count_k + (1 - d) p_k, sum_k <- d sum_k + (1 - d) s_k, e_k = sum_k / count~_k,
  with p_k the fraction of the batch's vectors assigned to k, s_k their sum divided by the batch's size, and
  count~ the Laplace-smoothed count (eps 1e-5). Fractions, not counts, so 1 and N processes agree.
- restart_threshold: a code whose usage (an EMA of p_k) falls below restart_threshold / K is dead; each step,
  dead codes are replaced by encoder outputs chosen at random from the global batch (Jukebox / "random
  restart"), and their usage is reset to 1 / K.
- entropy_weight: LlamaGen's entropy term, mean per-vector entropy minus the entropy of the mean assignment,
  over softmax(-distance / 0.01).

Usage (the fraction of codes the global batch used) and perplexity (exp of the entropy of the batch's
assignment) are returned every step. Under several processes every statistic is the global batch's, and the
restart candidates are the globally smallest of per-token random keys drawn by the training task, so the
codebook is the same on every process and equals a one-process run's.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

from genvis.errors import ConfigError, GenvisError
from genvis.registry import TOKENIZERS
from genvis.tokenizers.base import ModelTokenizer, TokenizerConfig
from genvis.tokenizers.conv import ConvDecoder, ConvEncoder

EMA_EPS = 1e-5  # Laplace smoothing of the EMA counts


def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


@dataclass
class Collectives:
    """How a quantizer sees the global batch: `mean` averages a tensor over processes, `gather` concatenates
    tensors of equal shape along dim 0 in process order. Identities for one process."""

    mean: Callable[[torch.Tensor], torch.Tensor] = _identity
    gather: Callable[[torch.Tensor], torch.Tensor] = _identity


LOCAL = Collectives()


# ----------------------------------------------------------------------------- primitives

def squared_distances(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """[N, K] = ||z||^2 + ||e||^2 - 2 z.e, computed as VAR does (addmm into the sum of squares), fp32."""
    d = z.square().sum(dim=1, keepdim=True) + codebook.square().sum(dim=1)
    return d.addmm_(z, codebook.t(), alpha=-2, beta=1)


def nearest_code(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """ids [N] of the nearest rows of `codebook` [K, D] to the rows of z [N, D]."""
    return squared_distances(z, codebook).argmin(dim=1)


def assignment_fractions(ids: torch.Tensor, size: int, sync: Collectives = LOCAL) -> torch.Tensor:
    """[K] fraction of the global batch's vectors assigned to each code (sums to 1)."""
    counts = torch.bincount(ids.flatten(), minlength=size).float()
    return sync.mean(counts / max(ids.numel(), 1))


def usage_and_perplexity(fractions: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(fraction of codes used, exp(entropy)) of an assignment distribution [K]."""
    p = fractions[fractions > 0]
    return (fractions > 0).float().mean(), torch.exp(-(p * p.log()).sum())


def entropy_loss(distances: torch.Tensor, temperature: float = 0.01) -> torch.Tensor:
    """LlamaGen's: mean per-vector entropy of softmax(-d / T) minus the entropy of their mean (low when each
    vector picks one code confidently and the batch spreads over many)."""
    logits = -distances / temperature
    probs = logits.softmax(dim=-1)
    log_probs = F.log_softmax(logits + 1e-5, dim=-1)
    mean_probs = probs.mean(dim=0)
    return -(probs * log_probs).sum(dim=-1).mean() + (mean_probs * torch.log(mean_probs + 1e-5)).sum()


def pick_candidates(z: torch.Tensor, keys: torch.Tensor, count: int, sync: Collectives = LOCAL) -> torch.Tensor:
    """`count` rows of z [N, D], those whose random keys [N] are the smallest in the global batch (each process
    offers its own smallest, then all choose the same from what was gathered)."""
    local = torch.topk(keys, min(count, z.shape[0]), largest=False).indices
    all_keys, all_z = sync.gather(keys[local].contiguous()), sync.gather(z[local].contiguous())
    return all_z[torch.topk(all_keys, min(count, all_keys.numel()), largest=False).indices]


def check_ids(ids: torch.Tensor, vocab_size: int, what: str = "ids") -> None:
    """One line when `ids` are not integers in [0, vocab_size)."""
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise GenvisError(f"{what}: expected integer token ids, got dtype {ids.dtype}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise GenvisError(f"{what}: ids range over [{int(ids.min())}, {int(ids.max())}], outside the vocabulary "
                          f"[0, {vocab_size - 1}]")


class Codebook(nn.Module):
    """A codebook `embedding` [K, D] with the training-time statistics every quantizer here shares: the usage
    EMA that finds dead codes, their restart, and the optional EMA codebook update."""

    def __init__(self, size: int, dim: int, *, l2_norm: bool = False, ema: bool = False, ema_decay: float = 0.99,
                 restart_threshold: float = 0.0, usage_decay: float = 0.99, init_scale: Optional[float] = None):
        super().__init__()
        self.size, self.dim, self.l2_norm = size, dim, l2_norm
        self.ema, self.ema_decay = ema, ema_decay
        self.restart_threshold, self.usage_decay = restart_threshold, usage_decay
        self.embedding = nn.Embedding(size, dim)
        scale = 1.0 / size if init_scale is None else init_scale
        nn.init.uniform_(self.embedding.weight, -scale, scale)  # taming / LlamaGen: U(-1/K, 1/K)
        if l2_norm:
            self.embedding.weight.data = F.normalize(self.embedding.weight.data, dim=-1)
        self.register_buffer("usage", torch.full((size,), 1.0 / size))  # EMA of the assignment fractions
        if ema:
            self.embedding.weight.requires_grad_(False)
            self.register_buffer("ema_count", torch.full((size,), 1.0 / size))
            self.register_buffer("ema_sum", self.embedding.weight.data / size)

    def vectors(self) -> torch.Tensor:
        """The lookup table [K, D] (unit rows with l2_norm)."""
        w = self.embedding.weight
        return F.normalize(w, dim=-1) if self.l2_norm else w

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.vectors())

    def dead(self) -> torch.Tensor:
        """Bool [K]: the codes whose usage fell below restart_threshold / K (none when restarts are off)."""
        return self.usage < self.restart_threshold / self.size

    @torch.no_grad()
    def restart_dead(self, z: torch.Tensor, keys: Optional[torch.Tensor], sync: Collectives = LOCAL) -> int:
        """Replace the dead codes by rows of z [N, D] picked with `keys` [N]. Returns how many were restarted."""
        if self.restart_threshold <= 0 or keys is None:
            return 0
        return self.restart(self.dead(), z, keys, sync)

    @torch.no_grad()
    def restart(self, codes: torch.Tensor, z: torch.Tensor, keys: torch.Tensor, sync: Collectives = LOCAL) -> int:
        """Replace the codes of the bool mask `codes` [K] (lowest index first, at most one per vector of the
        global batch) by the rows of z [N, D] whose `keys` [N] are the globally smallest; their usage (and EMA
        statistics) restart at 1 / K. Returns how many were restarted."""
        index = codes.nonzero().flatten()
        if index.numel() == 0:
            return 0
        global_batch = int(sync.gather(torch.tensor([z.shape[0]], device=z.device)).sum())
        index = index[:global_batch]
        chosen = pick_candidates(z.float(), keys.to(z.device), index.numel(), sync)
        self.embedding.weight.data[index] = chosen.to(self.embedding.weight.dtype)
        self.usage[index] = 1.0 / self.size
        if self.ema:
            self.ema_count[index] = 1.0 / self.size
            self.ema_sum[index] = chosen / self.size
        return int(index.numel())

    @torch.no_grad()
    def update_statistics(self, z: torch.Tensor, ids: torch.Tensor, fractions: torch.Tensor, sync: Collectives = LOCAL) -> None:
        """After a training lookup: the usage EMA, and the EMA codebook when enabled."""
        self.usage.lerp_(fractions, 1.0 - self.usage_decay)
        if self.ema:
            sums = torch.zeros_like(self.ema_sum).index_add_(0, ids, z.float()) / max(ids.numel(), 1)
            self.ema_count.lerp_(fractions, 1.0 - self.ema_decay)
            self.ema_sum.lerp_(sync.mean(sums), 1.0 - self.ema_decay)
            n = self.ema_count.sum()
            smoothed = (self.ema_count + EMA_EPS) / (n + self.size * EMA_EPS) * n
            self.embedding.weight.data.copy_(self.ema_sum / smoothed[:, None])


class VectorQuantizer(Codebook):
    """Nearest-code quantisation of feature maps [B, D, h, w]; see the module docstring."""

    def __init__(self, size: int, dim: int, *, beta: float = 0.25, l2_norm: bool = False, ema: bool = False,
                 ema_decay: float = 0.99, restart_threshold: float = 0.0, usage_decay: float = 0.99,
                 entropy_weight: float = 0.0, entropy_temperature: float = 0.01):
        super().__init__(size, dim, l2_norm=l2_norm, ema=ema, ema_decay=ema_decay, restart_threshold=restart_threshold,
                         usage_decay=usage_decay)
        self.beta, self.entropy_weight, self.entropy_temperature = beta, entropy_weight, entropy_temperature

    def _flat(self, z: torch.Tensor) -> torch.Tensor:
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).float()
        return F.normalize(flat, dim=-1) if self.l2_norm else flat

    @torch.no_grad()
    def ids(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, D, h, w] -> ids [B, h, w]."""
        b, _, h, w = z.shape
        return nearest_code(self._flat(z), self.vectors().float()).view(b, h, w)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, h, w] -> code vectors [B, D, h, w]."""
        return self.lookup(ids).permute(0, 3, 1, 2)

    def forward(self, z: torch.Tensor, keys: Optional[torch.Tensor] = None, sync: Collectives = LOCAL) -> Dict[str, torch.Tensor]:
        """Training pass. z [B, D, h, w]; keys [B, h*w] random numbers for restarts (optional). Returns
        {"quantized" (straight-through, [B, D, h, w]), "ids" [B, h, w], "loss", and "log/..." statistics}."""
        b, d, h, w = z.shape
        with torch.autocast(device_type=z.device.type, enabled=False):
            flat = self._flat(z)
            restarted = self.restart_dead(flat.detach(), None if keys is None else keys.reshape(-1), sync) \
                if self.training else 0
            vectors = self.vectors().float()
            distances = squared_distances(flat.detach(), vectors.detach())
            ids = distances.argmin(dim=1)
            quantized = F.embedding(ids, vectors)
            fractions = assignment_fractions(ids, self.size, sync)
            commitment = F.mse_loss(flat, quantized.detach())
            loss = self.beta * commitment
            if not self.ema:
                loss = loss + F.mse_loss(quantized, flat.detach())
            if self.entropy_weight > 0:  # before the EMA update below changes the codes in place
                loss = loss + self.entropy_weight * entropy_loss(squared_distances(flat, vectors.clone()), self.entropy_temperature)
            if self.training:
                self.update_statistics(flat.detach(), ids, fractions, sync)
            straight = flat + (quantized - flat).detach()
        usage, perplexity = usage_and_perplexity(fractions)
        return {"quantized": straight.view(b, h, w, d).permute(0, 3, 1, 2), "ids": ids.view(b, h, w), "loss": loss,
                "log/usage": usage, "log/perplexity": perplexity, "log/commitment": commitment.detach(),
                "log/restarted": torch.tensor(float(restarted), device=z.device)}


# ----------------------------------------------------------------------------- the VQ-VAE tokenizer

@dataclass
class VQConfig(TokenizerConfig):
    """`tokenizer:` for `arch: vq`: the VQGAN conv encoder/decoder (genvis.tokenizers.conv) around a VectorQuantizer.

    Downsampling factor 2 ** (len(ch_mult) - 1) (LlamaGen VQ-16: ch 128, ch_mult [1, 1, 2, 2, 4], z 256,
    codebook 16384 x 8, l2_norm). Image channels come from the data."""

    ch: int = 128
    ch_mult: List[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    num_res_blocks: int = 2
    z_channels: int = 256
    norm_groups: int = 32
    level_attention: bool = True  # attention after each block of the coarsest level
    mid_attention: bool = True
    dropout: float = 0.0
    codebook_size: int = 16384
    codebook_dim: int = 8
    quant_conv_kernel: int = 1  # 1 (taming, LlamaGen) or 3 (VAR)
    beta: float = 0.25
    l2_norm: bool = True
    ema: bool = False
    ema_decay: float = 0.99
    restart_threshold: float = 0.0  # 0 = no dead-code restart; else usage below threshold / K restarts a code
    usage_decay: float = 0.99
    entropy_weight: float = 0.0

    def validate(self) -> None:
        super().validate()
        validate_conv_section(self)
        for key in ("codebook_size", "codebook_dim"):
            if getattr(self, key) < 1:
                raise ConfigError(f"key 'tokenizer.{key}': must be >= 1, got {getattr(self, key)}")
        validate_quantizer_section(self)


def validate_conv_section(s) -> None:
    """The conv encoder/decoder keys of a tokenizer section (VQ and multi-scale VQ)."""
    if s.ch < 1 or not s.ch_mult or any(m < 1 for m in s.ch_mult):
        raise ConfigError(f"key 'tokenizer.ch_mult': {list(s.ch_mult)} with ch {s.ch}: expected positive widths")
    if any((s.ch * m) % s.norm_groups for m in [1, *s.ch_mult]):
        raise ConfigError(f"key 'tokenizer.norm_groups': {s.norm_groups} does not divide every width of ch {s.ch} x "
                          f"ch_mult {list(s.ch_mult)}")
    for key in ("num_res_blocks", "z_channels"):
        if getattr(s, key) < 1:
            raise ConfigError(f"key 'tokenizer.{key}': must be >= 1, got {getattr(s, key)}")
    if s.quant_conv_kernel not in (1, 3):
        raise ConfigError(f"key 'tokenizer.quant_conv_kernel': {s.quant_conv_kernel}: expected 1 or 3")


def validate_quantizer_section(s) -> None:
    for key in ("beta", "restart_threshold", "entropy_weight"):
        if getattr(s, key) < 0:
            raise ConfigError(f"key 'tokenizer.{key}': must be >= 0, got {getattr(s, key)}")
    for key in ("ema_decay", "usage_decay"):
        if not 0 < getattr(s, key) < 1:
            raise ConfigError(f"key 'tokenizer.{key}': must be in (0, 1), got {getattr(s, key)}")


def conv_kwargs(section, in_channels: int) -> dict:
    """The conv encoder/decoder arguments of a VQ / multi-scale VQ config from a tokenizer section."""
    return dict(in_channels=in_channels, ch=section.ch, ch_mult=list(section.ch_mult), num_res_blocks=section.num_res_blocks,
                z_channels=section.z_channels, norm_groups=section.norm_groups, level_attention=section.level_attention,
                mid_attention=section.mid_attention, dropout=section.dropout, quant_conv_kernel=section.quant_conv_kernel)


def check_image_size(section, image_shape) -> None:
    f = 2 ** (len(section.ch_mult) - 1)
    if image_shape[1] % f or image_shape[2] % f:
        raise ConfigError(f"key 'tokenizer.ch_mult': {len(section.ch_mult)} levels downsample by {f}, which does not "
                          f"divide the image size {image_shape[1]}x{image_shape[2]}")


class ConvAutoencoder(ModelTokenizer):
    """What the VQ and multi-scale VQ tokenizers share: encoder -> quant_conv -> (quantizer) -> post_quant_conv -> decoder."""

    kind = "discrete"

    def _build_convs(self, in_channels, ch, ch_mult, num_res_blocks, z_channels, norm_groups, level_attention,
                     mid_attention, dropout, quant_conv_kernel, code_dim):
        common = dict(ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks, z_channels=z_channels, groups=norm_groups,
                      level_attention=level_attention, mid_attention=mid_attention, dropout=dropout)
        self.encoder = ConvEncoder(in_channels, **common)
        self.decoder = ConvDecoder(in_channels, **common)
        pad = quant_conv_kernel // 2
        self.quant_conv = nn.Conv2d(z_channels, code_dim, quant_conv_kernel, padding=pad)
        self.post_quant_conv = nn.Conv2d(code_dim, z_channels, quant_conv_kernel, padding=pad)

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.config.ch_mult) - 1)

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's last weight, where the adaptive GAN weight is measured (taming)."""
        return self.decoder.conv_out.weight

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(images))

    def reconstruct(self, quantized: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(quantized))



@TOKENIZERS.register("vq", schema=VQConfig, class_name="VQTokenizer")
class VQTokenizer(ConvAutoencoder, ModelMixin, ConfigMixin):
    """VQ-VAE: images [B, C, H, W] in [-1, 1] <-> ids [B, H / f, W / f] (a 2D grid, row-major when flattened)."""

    token_layout = "grid"

    @register_to_config
    def __init__(self, in_channels: int = 3, ch: int = 128, ch_mult: Tuple[int, ...] = (1, 1, 2, 2, 4), num_res_blocks: int = 2,
                 z_channels: int = 256, norm_groups: int = 32, level_attention: bool = True, mid_attention: bool = True,
                 dropout: float = 0.0, quant_conv_kernel: int = 1, codebook_size: int = 16384, codebook_dim: int = 8,
                 beta: float = 0.25, l2_norm: bool = True, ema: bool = False, ema_decay: float = 0.99,
                 restart_threshold: float = 0.0, usage_decay: float = 0.99, entropy_weight: float = 0.0):
        super().__init__()
        self._build_convs(in_channels, ch, list(ch_mult), num_res_blocks, z_channels, norm_groups, level_attention,
                          mid_attention, dropout, quant_conv_kernel, codebook_dim)
        self.quantize = VectorQuantizer(codebook_size, codebook_dim, beta=beta, l2_norm=l2_norm, ema=ema,
                                        ema_decay=ema_decay, restart_threshold=restart_threshold,
                                        usage_decay=usage_decay, entropy_weight=entropy_weight)

    @classmethod
    def from_section(cls, section: VQConfig, image_shape) -> "VQTokenizer":
        check_image_size(section, image_shape)
        keys = ("codebook_size", "codebook_dim", "beta", "l2_norm", "ema", "ema_decay", "restart_threshold",
                "usage_decay", "entropy_weight")
        return cls(**conv_kwargs(section, image_shape[0]), **{k: getattr(section, k) for k in keys})

    @property
    def vocab_size(self) -> int:
        return self.config.codebook_size

    def latent_shape(self, image_shape) -> Tuple[int, int]:
        """The id grid (h, w) of one image."""
        return (image_shape[1] // self.downsample, image_shape[2] // self.downsample)

    def draw_shape(self, image_shape) -> Dict[str, Tuple[int, ...]]:
        """Per image, the random numbers one training step takes: restart keys, one per grid position."""
        h, w = self.latent_shape(image_shape)
        return {"keys": (h * w,)}

    def forward(self, images: torch.Tensor, keys: Optional[torch.Tensor] = None, sync: Collectives = LOCAL) -> Dict[str, torch.Tensor]:
        """Training pass: {"reconstruction", "quantizer_loss", "ids", "log/..."}."""
        out = self.quantize(self.features(images), keys, sync)
        logs = {k: v for k, v in out.items() if k.startswith("log/")}
        return {"reconstruction": self.reconstruct(out["quantized"]), "quantizer_loss": out["loss"], "ids": out["ids"], **logs}

    @torch.no_grad()
    def encode(self, images, *, sample: bool = False, generator=None) -> torch.Tensor:
        return self.quantize.ids(self.features(images))

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.dim() != 3:
            raise GenvisError(f"ids of shape {tuple(ids.shape)}: a VQ tokenizer decodes a grid [B, h, w]")
        check_ids(ids, self.vocab_size)
        return self.reconstruct(self.quantize.embed(ids.long()))
