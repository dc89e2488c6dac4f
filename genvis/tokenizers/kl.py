"""KL-VAE tokenizer: a diffusers AutoencoderKL, with diffusers' latent normalisation.

A genvis KL tokenizer's folder *is* a diffusers AutoencoderKL folder, so any diffusers VAE
(SD-VAE, SDXL, SD3 / FLUX) loads unchanged, and genvis's are diffusers VAEs. The normalisation
lives in the AutoencoderKL config, as diffusers' pipelines read it:

    per-channel statistics (latents_mean and latents_std both set):   (z - mean) * scaling_factor / std
    otherwise:                                                         (z - shift_factor) * scaling_factor

(shift_factor None counts as 0; SD-VAE: scaling 0.18215; FLUX: shift 0.1159, scaling 0.3611.)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

import torch

from genvis.errors import ConfigError
from genvis.registry import TOKENIZERS
from genvis.tokenizers.base import Tokenizer, TokenizerConfig
from genvis.tokenizers.losses import kl_loss

NORMALISATIONS = ("per_channel", "scalar")


@dataclass
class KLConfig(TokenizerConfig):
    """`tokenizer:` for `arch: kl`: a diffusers AutoencoderKL (DownEncoderBlock2D / UpDecoderBlock2D levels).

    The downsampling factor is 2 ** (len(block_out_channels) - 1) (SD-VAE: 4 levels, f8). Image channels
    come from the data. `attention_levels` (0 = the finest) get an attention block after each resnet in the
    encoder and the decoder (AttnDownEncoderBlock2D / AttnUpDecoderBlock2D): LDM's attn_resolutions counted in
    levels, e.g. VA-VAE's [16] at 256x256 with 5 levels is [4]. `normalisation` is how the measured latent statistics are stored: per_channel
    (latents_mean / latents_std, scaling_factor 1) or scalar (shift_factor / scaling_factor), both read by
    diffusers' pipelines as they are."""

    block_out_channels: List[int] = field(default_factory=lambda: [128, 256, 512, 512])
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    mid_block_attention: bool = True
    attention_levels: List[int] = field(default_factory=list)
    normalisation: str = "per_channel"  # per_channel | scalar
    stats_images: int = 10000  # training images the normalisation is measured on at export

    def validate(self) -> None:
        super().validate()
        if not self.block_out_channels or any(c < 1 for c in self.block_out_channels):
            raise ConfigError(f"key 'tokenizer.block_out_channels': {list(self.block_out_channels)}: expected positive widths")
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ConfigError(f"key 'tokenizer.norm_num_groups': {self.norm_num_groups} does not divide every width "
                              f"in tokenizer.block_out_channels {list(self.block_out_channels)}")
        wrong = [l for l in self.attention_levels if not 0 <= l < len(self.block_out_channels)]
        if wrong:
            raise ConfigError(f"key 'tokenizer.attention_levels': level {wrong[0]} does not exist; expected levels "
                              f"0 .. {len(self.block_out_channels) - 1} of tokenizer.block_out_channels")
        for key in ("layers_per_block", "latent_channels", "stats_images"):
            if getattr(self, key) < 1:
                raise ConfigError(f"key 'tokenizer.{key}': must be >= 1, got {getattr(self, key)}")
        if self.normalisation not in NORMALISATIONS:
            raise ConfigError(f"key 'tokenizer.normalisation': {self.normalisation!r} is not one of {', '.join(NORMALISATIONS)}")


def down_block_types(levels: int, attention_levels: Iterable[int]) -> Tuple[str, ...]:
    """diffusers' encoder block types, finest level first: with attention at `attention_levels` or without."""
    attention = set(attention_levels)
    return tuple("AttnDownEncoderBlock2D" if l in attention else "DownEncoderBlock2D" for l in range(levels))


def up_block_types(levels: int, attention_levels: Iterable[int]) -> Tuple[str, ...]:
    """diffusers' decoder block types, coarsest level first (diffusers' order)."""
    attention = set(attention_levels)
    return tuple("AttnUpDecoderBlock2D" if l in attention else "UpDecoderBlock2D" for l in reversed(range(levels)))


def channel_statistics(latents: Iterable[torch.Tensor], per_channel: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) in float64 of latents [B, C, ...] over everything but the channel dimension: [C] each, or
    with per_channel=False one scalar each over all channels."""
    total, total_sq, count = 0.0, 0.0, 0
    for z in latents:
        z = z.double().transpose(0, 1).flatten(1)  # [C, N]
        total, total_sq, count = total + z.sum(dim=1), total_sq + z.square().sum(dim=1), count + z.shape[1]
    if count == 0:
        raise ValueError("no images to measure the latent statistics on")
    if not per_channel:
        total, total_sq, count = total.sum(), total_sq.sum(), count * len(total)
    mean = total / count
    return mean, (total_sq / count - mean * mean).clamp_min(1e-12).sqrt()


@TOKENIZERS.register("kl", schema=KLConfig, class_name="AutoencoderKL")
class KLTokenizer(Tokenizer):
    """Wraps `vae` (a diffusers AutoencoderKL); see the module docstring for the normalisation."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    @classmethod
    def from_section(cls, section: KLConfig, image_shape: Tuple[int, int, int]) -> "KLTokenizer":
        """A new (randomly initialised) tokenizer for images of `image_shape` (C, H, W)."""
        from diffusers import AutoencoderKL

        channels, height, width = image_shape
        levels = len(section.block_out_channels)
        if height % 2 ** (levels - 1) or width % 2 ** (levels - 1):
            raise ConfigError(f"key 'tokenizer.block_out_channels': {levels} levels downsample by {2 ** (levels - 1)}, "
                              f"which does not divide the image size {height}x{width}")
        attention = section.attention_levels
        vae = AutoencoderKL(
            in_channels=channels, out_channels=channels, down_block_types=down_block_types(levels, attention),
            up_block_types=up_block_types(levels, attention), block_out_channels=tuple(section.block_out_channels),
            layers_per_block=section.layers_per_block, latent_channels=section.latent_channels,
            norm_num_groups=section.norm_num_groups, sample_size=height, scaling_factor=1.0,
            mid_block_add_attention=section.mid_block_attention,
        )
        return cls(vae)

    def forward(self, images: torch.Tensor, noise: Optional[torch.Tensor] = None, sync=None) -> Dict[str, torch.Tensor]:
        """Training pass: images [B, C, H, W] -> {"reconstruction", "kl" (the batch's mean KL), "mean", "logvar",
        "latents" (what the decoder saw)} (raw latent space, before normalisation). With `noise` [B, c, h, w] the
        decoder sees the posterior sample mean + std * noise (LDM trains on posterior samples); without it, the
        mean. `sync` is unused (no statistics of the global batch)."""
        posterior = self.vae.encode(images).latent_dist
        z = posterior.mean if noise is None else posterior.mean + posterior.std * noise
        return {"reconstruction": self.vae.decode(z).sample, "kl": kl_loss(posterior.mean, posterior.logvar).mean(),
                "mean": posterior.mean, "logvar": posterior.logvar, "latents": z}

    def draw_shape(self, image_shape) -> Dict[str, Tuple[int, ...]]:
        """Per image, the random numbers one training step takes: the posterior noise."""
        return {"noise": self.latent_shape(image_shape)}

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's last weight, where the adaptive GAN weight is measured (taming)."""
        return self.vae.decoder.conv_out.weight

    @property
    def encoder_last_layer(self) -> torch.Tensor:
        """The encoder's last weight, where VA-VAE measures the adaptive alignment weight."""
        return self.vae.encoder.conv_out.weight

    @torch.no_grad()
    def measure_normalisation(self, batches: Iterable[torch.Tensor], normalisation: str = "per_channel") -> dict:
        """Measure the raw latents' statistics (posterior mode, float64) over `batches` of images and store
        them in the VAE config so that encode() gives mean 0 / std 1: per_channel -> latents_mean /
        latents_std with scaling_factor 1; scalar -> shift_factor / scaling_factor. Returns what was stored."""
        if normalisation not in NORMALISATIONS:
            raise ValueError(f"normalisation {normalisation!r}: expected one of {', '.join(NORMALISATIONS)}")
        mean, std = channel_statistics((self.vae.encode(images).latent_dist.mode() for images in batches),
                                       per_channel=normalisation == "per_channel")
        if normalisation == "per_channel":
            stored = dict(latents_mean=mean.tolist(), latents_std=std.tolist(), scaling_factor=1.0, shift_factor=None)
        else:
            stored = dict(latents_mean=None, latents_std=None, scaling_factor=1.0 / float(std), shift_factor=float(mean))
        self.vae.register_to_config(**stored)
        return stored

    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def latent_shape(self, image_shape) -> Tuple[int, int, int]:
        _, h, w = image_shape
        return (self.latent_channels, h // self.downsample, w // self.downsample)

    def _channel_stats(self, z: torch.Tensor):
        """(latents_mean, latents_std) as [1, C, 1, 1] tensors like z, or None when the config has none."""
        c = self.vae.config
        if c.latents_mean is None or c.latents_std is None:
            return None
        shape = (1, -1, 1, 1)
        return (torch.tensor(c.latents_mean, dtype=z.dtype, device=z.device).view(shape),
                torch.tensor(c.latents_std, dtype=z.dtype, device=z.device).view(shape))

    def normalise(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latents -> what generators see, with the operations in diffusers' pipelines' order (so the
        numbers are the same to the bit): (z - mean) * scaling_factor / std, or (z - shift) * scaling_factor."""
        c, stats = self.vae.config, self._channel_stats(z)
        if stats is not None:
            return (z - stats[0]) * c.scaling_factor / stats[1]
        return (z - c.shift_factor) * c.scaling_factor if c.shift_factor is not None else z * c.scaling_factor

    def denormalise(self, latents: torch.Tensor) -> torch.Tensor:
        """The inverse, as diffusers decodes: latents * std / scaling_factor + mean, or latents / scaling_factor + shift."""
        c, stats = self.vae.config, self._channel_stats(latents)
        if stats is not None:
            return latents * stats[1] / c.scaling_factor + stats[0]
        z = latents / c.scaling_factor
        return z + c.shift_factor if c.shift_factor is not None else z

    @torch.no_grad()
    def encode(self, images, *, sample: bool = False, generator: Optional[torch.Generator] = None):
        posterior = self.vae.encode(images).latent_dist
        return self.normalise(posterior.sample(generator=generator) if sample else posterior.mode())

    @torch.no_grad()
    def decode(self, latents):
        return self.vae.decode(self.denormalise(latents)).sample

    def save_pretrained(self, folder) -> None:
        self.vae.save_pretrained(str(folder), safe_serialization=True)

    @classmethod
    def from_pretrained(cls, folder, device="cpu") -> "KLTokenizer":
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(str(Path(folder)), local_files_only=True)
        return cls(vae.to(device).eval())
