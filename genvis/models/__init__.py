"""Generators. `load_model(path)` reads any genvis model folder, run directory or checkpoint."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Tuple

import torch

from genvis.errors import GenvisError, first_line
from genvis.io import find_run_dir
from genvis.models.dit import DiT
from genvis.registry import MODELS


def resolve_model_dir(path) -> Path:
    """The model folder (config.json + safetensors) that `path` names: the folder itself, a run
    directory's `model/`, or a checkpoint's EMA weights (`checkpoints/step_*/ema/model/`)."""
    p = Path(path)
    if (p / "model" / "config.json").is_file():
        return p / "model"
    if (p / "config.json").is_file():
        return p
    ema = sorted(d for d in (p / "ema").glob("*") if (d / "config.json").is_file()) if (p / "ema").is_dir() else []
    if ema:
        named = [d for d in ema if d.name == "model"]
        return named[0] if named else ema[0]
    if find_run_dir(p) == p:
        raise GenvisError(f"{p}: run directory has no exported model yet (model/config.json); train it to the end, "
                          "or sample one of its checkpoints (checkpoints/step_*)")
    raise GenvisError(f"{p}: not a genvis model folder (config.json + safetensors), run directory or checkpoint")


def read_model_config(path) -> dict:
    """The config.json of a model folder, run directory or checkpoint, without loading weights."""
    folder = resolve_model_dir(path)
    try:
        return json.loads((folder / "config.json").read_text())
    except json.JSONDecodeError as err:
        raise GenvisError(f"{folder / 'config.json'}: not valid JSON ({err})") from None


def model_class(path):
    """The generator class a model folder's config.json names (diffusers records it as `_class_name`),
    looked up among the MODELS entries' classes."""
    folder = resolve_model_dir(path)
    name = read_model_config(folder).get("_class_name")
    MODELS.load_all()
    classes = {entry.meta["cls"].__name__: entry.meta["cls"] for entry in map(MODELS.entry, MODELS.names())}
    if name not in classes:
        raise GenvisError(f"{folder / 'config.json'}: _class_name {name!r} is not a genvis model; expected one of: {', '.join(classes)}")
    return classes[name]


def _check_weights(folder: Path) -> None:
    """One line naming the file when a weights file is missing, empty or truncated."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise GenvisError(f"{folder}: no .safetensors weights next to config.json")
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():  # reads each tensor's bytes: a truncated file fails here
                    f.get_slice(key)
        except Exception as err:
            raise GenvisError(f"{file}: not a readable safetensors file ({first_line(err)}); "
                              "it may be truncated: export or copy it again") from None


def load_model(path, device="cpu"):
    """Load a genvis generator from a model folder, run directory or checkpoint, in eval mode."""
    folder = resolve_model_dir(path)
    cls = model_class(folder)
    _check_weights(folder)
    try:
        model = cls.from_pretrained(str(folder), use_safetensors=True, low_cpu_mem_usage=False)
    except Exception as err:  # e.g. weights that do not fit config.json
        lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
        raise GenvisError(f"{folder}: cannot load the model ({lines[-1] if lines else type(err).__name__})") from None
    try:
        return model.to(device).eval()
    except (RuntimeError, AssertionError) as err:
        raise GenvisError(f"device {device!r}: {first_line(err)}") from None


@dataclass(frozen=True)
class Inherited:
    """What `inherit_weights` did: tensor names copied, new (kept at their initialisation) and unused."""

    source: str
    copied: Tuple[str, ...]
    new: Tuple[str, ...]
    unused: Tuple[str, ...]

    def summary(self) -> str:
        def names(keys):
            return ", ".join(keys) if keys else "none"

        return (f"init_from {self.source}: copied {len(self.copied)} tensors; new ({len(self.new)}): {names(self.new)}; "
                f"not used from the source ({len(self.unused)}): {names(self.unused)}")


def inherit_weights(model, source) -> Inherited:
    """Copy into `model` every tensor of the model at `source` (a genvis model folder, run or checkpoint, e.g.
    an imported official DiT) that `model` has under the same name: the state-dict load, strict where shared.

    A shared name with another shape is an error naming the tensor; tensors only `model` has stay as
    initialised ("new"), tensors only the source has are listed as unused (e.g. DiT's mlp under a Mix-FFN)."""
    donor = load_model(source).state_dict()
    own = model.state_dict()
    for key in own.keys() & donor.keys():
        if own[key].shape != donor[key].shape:
            raise GenvisError(f"{source}: tensor {key} has shape {tuple(donor[key].shape)}, the model being built has "
                              f"{tuple(own[key].shape)}; inherit from a model of the same width, patch size, channels "
                              "and classes")
    copied = [key for key in own if key in donor]
    with torch.no_grad():
        for key in copied:
            own[key].copy_(donor[key])
    return Inherited(str(source), tuple(copied), tuple(k for k in own if k not in donor),
                     tuple(k for k in donor if k not in own))


__all__ = ["DiT", "Inherited", "inherit_weights", "load_model", "model_class", "read_model_config", "resolve_model_dir"]
