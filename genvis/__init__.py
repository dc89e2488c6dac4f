"""genvis: visual tokenizers, diffusion / flow generators, fast samplers, sharded FID."""

__version__ = "0.1.0"


def load_model(path, device="cpu"):
    """Load any genvis generator: a model folder (config.json + safetensors), a run directory (its
    `model/`) or a checkpoint (`RUN/checkpoints/step_*`, its EMA weights)."""
    from genvis.models import load_model as _load

    return _load(path, device=device)


def load_tokenizer(path, device="cpu"):
    """Load a tokenizer folder (genvis, or any diffusers AutoencoderKL folder), or the tokenizer that a
    model folder, run directory or checkpoint records."""
    from genvis.tokenizers import load_tokenizer as _load

    return _load(path, device=device)


__all__ = ["load_model", "load_tokenizer", "__version__"]
