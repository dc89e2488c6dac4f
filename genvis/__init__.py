"""genvis: visual tokenizers, diffusion / flow / autoregressive generators, fast samplers, sharded FID."""

__version__ = "0.1.0"


def load_model(path, device="cpu"):
    """Load any genvis model folder (config.json + safetensors) or run directory (its `model/`)."""
    from genvis.models import load_model as _load

    return _load(path, device=device)


__all__ = ["load_model", "__version__"]
