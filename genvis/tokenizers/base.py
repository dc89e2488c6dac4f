"""The Tokenizer contract: images in [-1, 1] NCHW <-> what a generator models.

A tokenizer declares what it produces (continuous latents here; discrete ids in later issues)
and owns the normalisation that makes them suitable for a generator.
"""
from __future__ import annotations

import torch


class Tokenizer:
    """encode(images) -> latents; decode(latents) -> images in [-1, 1]."""

    kind = "continuous"

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class PixelTokenizer(Tokenizer):
    """Identity: lets any generator run in pixel space."""

    def encode(self, images):
        return images

    def decode(self, latents):
        return latents


class DiffusersVAETokenizer(Tokenizer):
    """A diffusers AutoencoderKL read from a local folder (e.g. sd-vae-ft-ema), latents * scale."""

    def __init__(self, path: str, scale: float, device="cpu"):
        from diffusers import AutoencoderKL

        self.vae = AutoencoderKL.from_pretrained(path, local_files_only=True).to(device).eval()
        self.scale = scale

    @torch.no_grad()
    def encode(self, images):
        return self.vae.encode(images).latent_dist.sample() * self.scale

    @torch.no_grad()
    def decode(self, latents):
        return self.vae.decode(latents / self.scale).sample
