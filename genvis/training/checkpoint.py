"""Run-directory layout, step checkpoints and the exported model.

    output_dir/
      config.yaml                 resolved config
      checkpoints/step_0000100/   Accelerate state (model.safetensors, optimizer.bin, scheduler.bin,
                                  random_states_*.pkl) + ema.safetensors + trainer_state.json
      model/                      exported EMA weights: config.json + diffusion_pytorch_model.safetensors
      samples/step_0000100.png    periodic grids
      logs/                       TensorBoard

Checkpoints are written under a temporary name and renamed when complete, so a killed run never
leaves a half-written `step_*` directory; resume picks the newest complete one.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Optional

from genvis.io import finalize_dir

STEP_RE = re.compile(r"^step_(\d{7})$")


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


def export_model(model, export_dir: Path) -> None:
    """A genvis model folder (config.json + safetensors) via save_pretrained, replaced atomically."""
    export_dir = Path(export_dir)
    tmp = export_dir.with_name(f".{export_dir.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(str(tmp), safe_serialization=True)
    finalize_dir(tmp, export_dir)
