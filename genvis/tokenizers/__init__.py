"""Visual tokenizers (a subpackage: a top-level `tokenizers` would shadow Hugging Face's)."""
from __future__ import annotations

from genvis.errors import GenvisError
from genvis.tokenizers.base import DiffusersVAETokenizer, PixelTokenizer, Tokenizer


def tokenizer_for_model(model, vae_path=None, device="cpu") -> Tokenizer:
    """The tokenizer a generator's config names; latent tokenizers are read from a local folder."""
    name = model.config.tokenizer
    if name == "pixels":
        return PixelTokenizer()
    if name == "sd-vae":
        if vae_path is None:
            raise GenvisError("this model generates SD-VAE latents; pass --vae DIR (a local diffusers AutoencoderKL folder, e.g. sd-vae-ft-ema)")
        return DiffusersVAETokenizer(vae_path, model.config.latent_scale, device=device)
    raise GenvisError(f"model config: unknown tokenizer {name!r}; expected pixels or sd-vae")


__all__ = ["Tokenizer", "PixelTokenizer", "DiffusersVAETokenizer", "tokenizer_for_model"]
