"""Files: atomic writes (a temporary name in the same folder, renamed when complete), safe reading
of foreign checkpoints, and where a run directory is.

Every file genvis writes goes through `atomic_path` (or a helper built on it), so a killed process
never leaves a half-written file under the final name, and the file gets the mode a plain
`open(path, "w")` would give (0644 under umask 022), not mkstemp's 0600.
"""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Optional, Union

from genvis.errors import GenvisError, first_line

PathLike = Union[str, os.PathLike]


def _temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yields a temporary path beside `path`; on success it is renamed to `path` (replacing it), on any
    error it is removed. The parent folder is created if needed. The file is created with mode 0666 and
    the process umask applied by the kernel, as a plain write would (mkstemp would give 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(path)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: PathLike, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2))


def write_npz_atomic(path: PathLike, **arrays) -> None:
    """np.savez to a temporary file beside `path`, renamed when complete. Memory-mapped arrays are
    written chunk by chunk, so a large arr_0 never sits in memory."""
    import numpy as np

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


@contextlib.contextmanager
def scratch_file(folder: PathLike, suffix: str) -> Iterator[Path]:
    """A temporary file path in `folder` (e.g. for a memory-mapped .npy), removed on exit."""
    fd, tmp = tempfile.mkstemp(prefix=".scratch.", suffix=suffix, dir=folder)
    os.close(fd)
    try:
        yield Path(tmp)
    finally:
        Path(tmp).unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: PathLike) -> Iterator[Path]:
    """Yields an empty temporary folder beside `path` (mode 0777 less the umask, as a plain mkdir); on
    success it replaces `path` (an older folder of that name is removed only then), on any error it is
    removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(path)
    os.mkdir(tmp)
    try:
        yield tmp
        finalize_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def finalize_dir(tmp: PathLike, final: PathLike) -> None:
    """Move a completed temporary folder into place, replacing an older one of the same name."""
    final = Path(final)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def check_writable_target(path: PathLike, what: str = "output") -> Path:
    """Fail now, with one line, if `path` cannot be written later: a parent that is a file, a folder we
    may not write in, a read-only filesystem. Probes by creating (and removing) a temporary file in the
    nearest existing folder, which is what decides; creates nothing else."""
    path = Path(path)
    parent = path.parent
    while not parent.exists() and parent != parent.parent:  # the nearest existing ancestor decides
        parent = parent.parent
    if not parent.is_dir():
        raise GenvisError(f"{path}: cannot write the {what}: {parent} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".genvis-write-probe.", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise GenvisError(f"{path}: cannot write the {what} in {parent} ({err.strerror or err})") from None
    return path


def find_run_dir(path: PathLike) -> Optional[Path]:
    """The training run a path belongs to: the path itself when it holds config.yaml, or the run of a
    checkpoint folder `RUN/checkpoints/step_XXXXXXX`; None for a plain model folder."""
    p = Path(path)
    if (p / "config.yaml").is_file():
        return p
    if p.parent.name == "checkpoints" and (p.parent.parent / "config.yaml").is_file():
        return p.parent.parent
    return None


WRAPPER_ENTRIES = ("ema", "model", "state_dict")  # a training checkpoint's weights, tried in this order
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP, torch.compile


def unwrap_state_dict(checkpoint: dict) -> dict:
    """The tensors of a plain state dict, or of a training checkpoint's "ema" / "model" / "state_dict" entry
    (the first that is a dict, in that order: the EMA weights are preferred), with DDP "module." and
    torch.compile "_orig_mod." prefixes removed; entries that are not tensors are left out (the result may
    be empty)."""
    import torch

    for entry in WRAPPER_ENTRIES:
        if isinstance(checkpoint.get(entry), dict):
            checkpoint = checkpoint[entry]
            break
    state = {}
    for key, value in checkpoint.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            continue
        stripped = True
        while stripped:
            stripped = False
            for prefix in WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, stripped = key[len(prefix):], True
        state[key] = value
    return state


def load_checkpoint_file(path: PathLike) -> dict:
    """A tensor-only checkpoint: safetensors, or torch.load with weights_only=True (never arbitrary pickle)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise GenvisError(f"{path}: file not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as err:
            raise GenvisError(f"{path}: not a readable safetensors file ({err})") from None
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))  # torch bolds part of its message
        found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        first = f"unsupported global {found.group(1)}" if found else (text.strip().splitlines() or [type(err).__name__])[0]
        raise GenvisError(
            f"{path}: refused: the file holds objects that need pickle to load, and genvis only loads tensors "
            f"(weights_only=True). Re-save just the state dict (torch.save(ckpt['ema'], ...)). Detail: {first}"
        ) from None
    except Exception as err:
        raise GenvisError(f"{path}: not a readable PyTorch checkpoint ({type(err).__name__}: {first_line(err)})") from None


def load_state_strict(module, state: dict, where: str, what: str) -> None:
    """module.load_state_dict(state) with one line naming a shape mismatch, or the missing / unexpected keys (the
    first five of each); `what` names the architecture built (e.g. "DiT-XL/2")."""
    own = module.state_dict()
    for key in own.keys() & state.keys():
        if tuple(own[key].shape) != tuple(state[key].shape):
            raise GenvisError(f"{where}: tensor {key} has shape {tuple(state[key].shape)}, {what} expects "
                              f"{tuple(own[key].shape)}")
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    if missing or unexpected:
        parts = [f"{kind} {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
                 for kind, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
        raise GenvisError(f"{where}: keys do not match {what}: {'; '.join(parts)}")
    module.load_state_dict(state, strict=True)
