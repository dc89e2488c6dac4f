"""The tokenizer contract: images in [-1, 1] NCHW <-> what a generator models.

A tokenizer declares what it produces (`kind`: continuous latents, or discrete ids in later
families) and owns the normalisation that makes its latents suitable for a generator: `encode`
returns normalised latents and `decode` undoes the normalisation, so generators never see raw
VAE outputs. It is saved as a folder (config.json + safetensors) with `save_pretrained` and read
back with `genvis.load_tokenizer`.
"""
from __future__ import annotations

import json
from pathlib import Path
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn as nn

from genvis.errors import ConfigError
from genvis.registry import TOKENIZERS


@dataclass
class TokenizerConfig:
    """The run config's `tokenizer:` section. A generator run names a trained tokenizer with `path` (or
    nothing, for pixels); a tokenizer training run names an architecture with `arch`, whose registry
    entry's schema (a subclass of this one) adds its own keys."""

    arch: Optional[str] = None  # an architecture to build and train (TOKENIZERS: kl, ...); null = load `path`
    path: Optional[str] = None  # a genvis tokenizer folder or a diffusers AutoencoderKL folder; null = pixels
    embed: bool = True  # a generator run copies it into the exported model/tokenizer/ (else records its path)

    def validate(self) -> None:
        if self.arch is not None and self.path is not None:
            raise ConfigError("key 'tokenizer.path': give tokenizer.arch (an architecture to train) or tokenizer.path "
                              "(a trained tokenizer to load), not both")


class Tokenizer(nn.Module):
    """encode(images) -> latents (normalised); decode(latents) -> images in [-1, 1].

    Attributes:
        kind: "continuous" (latents) or "discrete" (ids).
        latent_channels: channels of the latents, or None when it follows the images (pixels).
    """

    kind = "continuous"
    latent_channels: Optional[int] = None

    def encode(self, images: torch.Tensor, *, sample: bool = False, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """images [B, C, H, W] in [-1, 1] -> latents. Deterministic (the posterior mode) unless
        sample=True, which draws from the posterior with `generator`."""
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents -> images [B, C, H, W] in [-1, 1] (not clamped)."""
        raise NotImplementedError

    def latent_shape(self, image_shape: Tuple[int, int, int]) -> Tuple[int, int, int]:
        """(C, H, W) of the latents of one image of shape `image_shape` (C, H, W)."""
        raise NotImplementedError

    def save_pretrained(self, folder) -> None:
        raise NotImplementedError

    @classmethod
    def from_pretrained(cls, folder, device="cpu") -> "Tokenizer":
        raise NotImplementedError

    @classmethod
    def from_section(cls, section: "TokenizerConfig", image_shape: Tuple[int, int, int]) -> "Tokenizer":
        """A new tokenizer of the architecture `section` describes, for images of `image_shape` (C, H, W)."""
        raise NotImplementedError


class ModelTokenizer(Tokenizer):
    """A tokenizer that is also a diffusers ModelMixin + ConfigMixin (listed after this class in its bases): its
    folder is diffusers' (config.json + safetensors)."""

    @classmethod
    def from_pretrained(cls, folder, device="cpu"):
        # ModelMixin's, which comes after the Tokenizer contract in the subclasses' method order
        model = super(Tokenizer, cls).from_pretrained(str(Path(folder)), local_files_only=True)
        return model.to(device).eval()

    def save_pretrained(self, folder, **kwargs) -> None:
        from diffusers import ModelMixin

        ModelMixin.save_pretrained(self, str(folder), safe_serialization=True, **kwargs)


@TOKENIZERS.register("pixels", schema=TokenizerConfig, class_name="PixelTokenizer")
class PixelTokenizer(Tokenizer):
    """Identity: lets any generator run in pixel space. Its folder holds only config.json."""

    def encode(self, images, *, sample=False, generator=None):
        return images

    def decode(self, latents):
        return latents

    def latent_shape(self, image_shape):
        return tuple(image_shape)

    def save_pretrained(self, folder) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps({"_class_name": "PixelTokenizer"}, indent=2))

    @classmethod
    def from_pretrained(cls, folder=None, device="cpu") -> "PixelTokenizer":
        return cls()

    @classmethod
    def from_section(cls, section=None, image_shape=None) -> "PixelTokenizer":
        return cls()
