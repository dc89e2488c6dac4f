"""KL-VAE tokenizer: a diffusers AutoencoderKL, with diffusers' latent normalisation.

A genvis KL tokenizer's folder *is* a diffusers AutoencoderKL folder, so any diffusers VAE
(SD-VAE, SDXL, SD3 / FLUX) loads unchanged, and genvis's are diffusers VAEs. The normalisation
lives in the AutoencoderKL config, as diffusers' pipelines read it:

    per-channel statistics (latents_mean and latents_std both set):   (z - mean) * scaling_factor / std
    otherwise:                                                         (z - shift_factor) * scaling_factor

(shift_factor None counts as 0; SD-VAE: scaling 0.18215; FLUX: shift 0.1159, scaling 0.3611.)
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

import torch

from genvis.registry import TOKENIZERS
from genvis.tokenizers.base import Tokenizer


@TOKENIZERS.register("kl", class_name="AutoencoderKL")
class KLTokenizer(Tokenizer):
    """Wraps `vae` (a diffusers AutoencoderKL); see the module docstring for the normalisation."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def latent_shape(self, image_shape) -> Tuple[int, int, int]:
        _, h, w = image_shape
        return (self.latent_channels, h // self.downsample, w // self.downsample)

    def _stats(self, z: torch.Tensor):
        """(shift, scale) such that normalised = (z - shift) * scale, broadcastable to z [B, C, H, W]."""
        c = self.vae.config
        if c.latents_mean is not None and c.latents_std is not None:
            mean = torch.tensor(c.latents_mean, dtype=z.dtype, device=z.device).view(1, -1, 1, 1)
            std = torch.tensor(c.latents_std, dtype=z.dtype, device=z.device).view(1, -1, 1, 1)
            return mean, c.scaling_factor / std
        return (c.shift_factor or 0.0), c.scaling_factor

    @torch.no_grad()
    def encode(self, images, *, sample: bool = False, generator: Optional[torch.Generator] = None):
        posterior = self.vae.encode(images).latent_dist
        z = posterior.sample(generator=generator) if sample else posterior.mode()
        shift, scale = self._stats(z)
        return (z - shift) * scale

    @torch.no_grad()
    def decode(self, latents):
        shift, scale = self._stats(latents)
        return self.vae.decode(latents / scale + shift).sample

    def save_pretrained(self, folder) -> None:
        self.vae.save_pretrained(str(folder), safe_serialization=True)

    @classmethod
    def from_pretrained(cls, folder, device="cpu") -> "KLTokenizer":
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(str(Path(folder)), local_files_only=True)
        return cls(vae.to(device).eval())
