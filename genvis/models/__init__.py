"""Generators. `load_model(path)` reads any genvis model folder or run directory."""
from __future__ import annotations

import json
from pathlib import Path

from genvis.errors import GenvisError
from genvis.models.dit import DiT

# diffusers' config.json records the class as `_class_name`.
MODEL_CLASSES = {"DiT": DiT}


def resolve_model_dir(path) -> Path:
    """A model folder (config.json + safetensors) or a run directory holding one in `model/`."""
    p = Path(path)
    if (p / "model" / "config.json").is_file():
        return p / "model"
    if (p / "config.json").is_file():
        return p
    if p.is_dir() and (p / "config.yaml").is_file():
        raise GenvisError(f"{p}: run directory has no exported model yet (model/config.json); train it to the end first")
    raise GenvisError(f"{p}: not a genvis model folder (config.json + safetensors) or run directory (model/)")


def read_model_config(path) -> dict:
    """The config.json of a model folder or run directory, without loading weights."""
    folder = resolve_model_dir(path)
    try:
        return json.loads((folder / "config.json").read_text())
    except json.JSONDecodeError as err:
        raise GenvisError(f"{folder / 'config.json'}: not valid JSON ({err})") from None


def load_model(path, device="cpu"):
    """Load a genvis generator from a model folder or a run directory, in eval mode."""
    folder = resolve_model_dir(path)
    config = read_model_config(folder)
    name = config.get("_class_name")
    if name not in MODEL_CLASSES:
        raise GenvisError(f"{folder / 'config.json'}: _class_name {name!r} is not a genvis model; expected one of: {', '.join(MODEL_CLASSES)}")
    if not any(folder.glob("*.safetensors")):
        raise GenvisError(f"{folder}: no .safetensors weights next to config.json")
    model = MODEL_CLASSES[name].from_pretrained(str(folder), use_safetensors=True, low_cpu_mem_usage=False)
    return model.to(device).eval()


__all__ = ["DiT", "load_model", "read_model_config", "resolve_model_dir"]
