"""Run-directory layout, step checkpoints, and what a rerun may change.

    output_dir/
      config.yaml                 the resolved config
      config_changes.jsonl        what reruns changed (train.steps upward, cadences, sample defaults)
      checkpoints/step_0000100/   Accelerate state (model.safetensors, optimizer.bin, random_states_*.pkl)
                                  + ema/<module>/ (each EMA module's save_pretrained folder)
                                  + trainer_state.json
      model/                      the task's export (a generator: EMA weights, config.json, its tokenizer)
      samples/step_0000100.png    periodic previews
      logs/                       TensorBoard

Checkpoints are written under a temporary name and renamed when complete, so a killed run never
leaves a half-written `step_*` directory; resume picks the newest complete one.
"""
from __future__ import annotations

import errno
import json
import re
import shutil
from pathlib import Path
from typing import Dict, Optional, Tuple

from genvis.errors import GenvisError, first_line
from genvis.io import finalize_dir, write_json_atomic, write_text_atomic
from genvis.shards import flatten

STEP_RE = re.compile(r"^step_(\d{7})$")
# Keys a rerun may change: they do not change what has been trained so far. The step size (lr, warm-up,
# clipping) is among them because lowering it is the remedy the non-finite guard suggests.
RESUMABLE_KEYS = ("output_dir", "train.steps", "train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
                  "train.sample_every", "data.num_workers", "train.lr", "train.warmup_steps", "train.grad_clip",
                  "train.lr_schedule", "train.lr_end_ratio", "train.compile")
RESUMABLE_SECTIONS = ("sample.",)


class TrainingError(GenvisError):
    pass


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def list_checkpoints(output_dir) -> list:
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = STEP_RE.match(d.name)
        if m and d.is_dir() and (d / "trainer_state.json").is_file():
            found.append((int(m.group(1)), d))
    return [d for _, d in sorted(found)]


def latest_checkpoint(output_dir) -> Optional[Path]:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def read_trainer_state(ckpt_dir: Path) -> dict:
    return json.loads((ckpt_dir / "trainer_state.json").read_text())


def prune_checkpoints(output_dir, keep: int) -> None:
    if keep <= 0:
        return
    for d in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(d, ignore_errors=True)


def clean_partial(output_dir) -> None:
    """Remove temporaries a killed run left behind (never a completed checkpoint)."""
    root = Path(output_dir) / "checkpoints"
    if root.is_dir():
        for d in root.glob("*.tmp"):
            shutil.rmtree(d, ignore_errors=True)


# --------------------------------------------------------------------------- reruns


def config_changes(stored: dict, new: dict) -> Tuple[Dict[str, tuple], Dict[str, tuple]]:
    """(allowed, refused) changes {key: (stored value, new value)} between a run's stored config and a rerun's."""
    old, cur = flatten(stored), flatten(new)
    allowed, refused = {}, {}
    for key in sorted(set(old) | set(cur)):
        a, b = old.get(key, "<absent>"), cur.get(key, "<absent>")
        if a == b:
            continue
        ok = key in RESUMABLE_KEYS or key.startswith(RESUMABLE_SECTIONS)
        if key == "train.steps" and isinstance(a, int) and isinstance(b, int) and b < a:
            ok = False  # fewer steps than the run was made for: not a resume
        (allowed if ok else refused)[key] = (a, b)
    return allowed, refused


def check_rerun(out: Path, new: dict) -> Dict[str, tuple]:
    """For a rerun on a run that has a checkpoint: the allowed changes, or one TrainingError listing the
    others (and config.yaml untouched). Changing the model, the data, the task or the optimiser would
    resume weights that the new config did not make. (A run without a checkpoint has trained nothing
    and may be rerun with any config.)"""
    from omegaconf import OmegaConf

    path = out / "config.yaml"
    try:
        stored = OmegaConf.to_container(OmegaConf.load(path))
    except Exception as err:
        raise TrainingError(f"{path}: cannot read the run's stored config ({first_line(err)})") from None
    allowed, refused = config_changes(stored, new)
    if refused:
        listed = ", ".join(f"{k} ({a!r} -> {b!r})" for k, (a, b) in refused.items())
        raise TrainingError(f"{out} was made with another config; these keys differ: {listed}. A rerun may change only "
                            f"train.steps (upward), train.lr/warmup_steps/lr_schedule/lr_end_ratio/grad_clip, the log/checkpoint/sample cadences "
                            f"and sample.*; use a new output_dir")
    return allowed


def record_config(out: Path, yaml_text: str, changes: Dict[str, tuple], step: int, fresh: bool) -> None:
    """Write config.yaml for a run starting from step 0; on a resume with allowed `changes` (check_rerun),
    append them to config_changes.jsonl and write the new config.yaml."""
    if fresh:
        write_text_atomic(out / "config.yaml", yaml_text)
    elif changes:
        history = out / "config_changes.jsonl"
        line = json.dumps({"step": step, "changes": {k: list(v) for k, v in changes.items()}})
        previous = history.read_text() if history.is_file() else ""
        write_text_atomic(history, previous + line + "\n")
        write_text_atomic(out / "config.yaml", yaml_text)


# --------------------------------------------------------------------------- writing checkpoints


def _disk_full(err: BaseException) -> bool:
    """Whether an error while writing is the disk running out of space (torch's zip writer reports it as
    'unexpected pos' or 'file write failed', safetensors as an IoError)."""
    seen = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(seen)
        if any(s in text for s in ("No space left on device", "unexpected pos", "file write failed", "Disk quota exceeded")):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def write_checkpoint(accelerator, emas: Dict[str, object], step: int, out: Path, keep: int) -> Path:
    """Accelerate state + EMA folders + trainer_state.json under step_XXXXXXX.tmp, renamed when complete.
    A failure (a full disk, say) removes the temporary folder and is one TrainingError naming the newest
    complete checkpoint, which is kept."""
    root = out / "checkpoints"
    final = root / step_dir_name(step)
    tmp = root / f"{step_dir_name(step)}.tmp"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp), safe_serialization=True)
        accelerator.wait_for_everyone()  # every process's files (its random states) are in tmp before the rename
        if accelerator.is_main_process:
            for name, ema in emas.items():
                ema.model.save_pretrained(str(tmp / "ema" / name))
            write_json_atomic(tmp / "trainer_state.json", {"step": step})
            finalize_dir(tmp, final)
            prune_checkpoints(out, keep)
    except Exception as err:
        if not accelerator.is_main_process:
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        kept = latest_checkpoint(out)
        kept_text = f"the newest complete checkpoint, {kept.name}, is kept" if kept else "no earlier checkpoint exists"
        if _disk_full(err):
            raise TrainingError(f"disk full while writing checkpoint {final}; it was discarded and {kept_text}. "
                                "Free space and rerun the same command to resume") from None
        raise TrainingError(f"could not write checkpoint {final} ({first_line(err)}); it was discarded and {kept_text}") from None
    accelerator.wait_for_everyone()
    return final


def load_ema_folders(ckpt: Path, emas: Dict[str, object]) -> None:
    """Restore each EMA module from the checkpoint's ema/<name>/ folder (its class's own from_pretrained)."""
    for name, ema in emas.items():
        folder = ckpt / "ema" / name
        if not (folder / "config.json").is_file():
            raise TrainingError(f"{folder}: the checkpoint has no EMA weights for module {name!r}")
        loaded = type(ema.model).from_pretrained(str(folder))
        ema.load_state_dict(loaded.state_dict())

