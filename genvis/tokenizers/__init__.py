"""Visual tokenizers (a subpackage: a top-level `tokenizers` would shadow Hugging Face's).

    tokenizer = genvis.load_tokenizer(path)

`path` is a tokenizer folder (genvis or any diffusers AutoencoderKL folder), or a generator's
model folder, run directory or checkpoint, whose recorded tokenizer is loaded. A generator
records its tokenizer when it is exported (`record_tokenizer`): an embedded copy in
`model/tokenizer/`, or the tokenizer folder's path in `model/tokenizer.json`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from genvis.errors import GenvisError, first_line
from genvis.io import find_run_dir
from genvis.registry import TOKENIZERS
from genvis.tokenizers.base import PixelTokenizer, Tokenizer

RECORD_DIR = "tokenizer"  # an embedded copy inside a generator's model folder
RECORD_FILE = "tokenizer.json"  # or a reference to a tokenizer folder elsewhere


def _class_name(folder: Path) -> Optional[str]:
    try:
        return json.loads((folder / "config.json").read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None


def _load_folder(folder: Path, device) -> Tokenizer:
    name = _class_name(folder)
    entry = TOKENIZERS.find("class_name", name) if name else None
    if entry is None:
        known = ", ".join(sorted(str(TOKENIZERS.entry(n).meta["class_name"]) for n in TOKENIZERS.names()))
        raise GenvisError(f"{folder / 'config.json'}: _class_name {name!r} is not a tokenizer genvis loads; expected one of: {known}")
    try:
        tokenizer = entry.factory.from_pretrained(folder, device=device)
    except GenvisError:
        raise
    except Exception as err:  # diffusers' own errors: a missing or truncated weights file, a bad config
        raise GenvisError(f"{folder}: cannot load the tokenizer ({first_line(err)})") from None
    tokenizer.source = str(folder.resolve())  # the folder it came from, for what records it (latents, generators)
    return tokenizer


def load_tokenizer(path, device="cpu") -> Tokenizer:
    """A tokenizer folder, or the tokenizer a model folder / run directory / checkpoint records."""
    p = Path(path)
    run = find_run_dir(p)
    if run is not None:
        if (p / "model" / "config.json").is_file():
            return load_tokenizer(p / "model", device)
        if (p / "ema" / "tokenizer" / "config.json").is_file():  # a checkpoint of a tokenizer training run
            return _load_folder(p / "ema" / "tokenizer", device)
        from omegaconf import OmegaConf

        section = OmegaConf.load(run / "config.yaml").get("tokenizer") or {}
        if section.get("arch"):  # a tokenizer training run that has no exported tokenizer here
            raise GenvisError(f"{p}: this tokenizer run has no exported model/ yet; give one of its checkpoints "
                              "(checkpoints/step_*) or train it to the end")
        # a generator's checkpoint, or a generator run still training: the run config names the tokenizer
        return load_tokenizer(section["path"], device) if section.get("path") else PixelTokenizer()
    if not (p / "config.json").is_file():
        raise GenvisError(f"{p}: not a tokenizer folder, model folder or run directory (no config.json)")
    if (p / RECORD_DIR / "config.json").is_file():
        return _load_folder(p / RECORD_DIR, device)
    if (p / RECORD_FILE).is_file():
        source = json.loads((p / RECORD_FILE).read_text()).get("path")
        if not source or not Path(source).is_dir():
            raise GenvisError(f"{p / RECORD_FILE}: the recorded tokenizer {source!r} is not there; pass --tokenizer DIR")
        return _load_folder(Path(source), device)
    name = _class_name(p)
    if name is not None and TOKENIZERS.find("class_name", name) is not None:
        return _load_folder(p, device)
    raise GenvisError(f"{p}: records no tokenizer (e.g. an imported checkpoint); pass --tokenizer DIR "
                      "(a tokenizer folder, e.g. a local diffusers AutoencoderKL such as sd-vae-ft-ema)")


def build_tokenizer(source: Optional[str], device="cpu") -> Tokenizer:
    """The tokenizer a run config names: a folder path, or None for pixels."""
    return PixelTokenizer() if source is None else load_tokenizer(source, device)


def record_tokenizer(model_folder, tokenizer: Tokenizer, source: Optional[str] = None, embed: bool = True) -> None:
    """Record in a generator's model folder what decodes its output: an embedded copy of `tokenizer`
    (always for pixels), or the path of its `source` folder."""
    model_folder = Path(model_folder)
    if embed or source is None:
        tokenizer.save_pretrained(model_folder / RECORD_DIR)
    else:
        (model_folder / RECORD_FILE).write_text(json.dumps({"path": str(Path(source).resolve())}, indent=2))


__all__ = ["Tokenizer", "PixelTokenizer", "load_tokenizer", "build_tokenizer", "record_tokenizer"]
