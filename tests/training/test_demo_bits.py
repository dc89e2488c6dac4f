"""No behaviour change through the Spine II seams: the demo preset trained for 20 steps and 64 samples give
the same bits as the code before the refactor (digests in tests/golden/demo_bits.json, recorded then)."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = json.loads((ROOT / "tests" / "golden" / "demo_bits.json").read_text())


def tensors_sha256(path: Path) -> str:
    """sha256 over the sorted keys and the raw bytes of every tensor (independent of file layout)."""
    state = load_file(str(path))
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def has_amx() -> bool:
    """Whether the CPU has AMX tiles for bf16 (Linux /proc/cpuinfo; False where it cannot be read)."""
    try:
        return "amx_bf16" in Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False


def test_demo_preset_gives_the_recorded_bits(tmp_path):
    from genvis.precision import resolve_precision

    here = {"torch": torch.__version__, "precision": {"bf16": "bf16", "no": "fp32"}.get(resolve_precision("auto", torch.device("cpu"))),
            "amx": has_amx()}  # oneDNN's bf16 GEMMs round differently with and without AMX tiles
    if any(here[k] != GOLDEN[k] for k in here):
        pytest.skip(f"bits were recorded with {({k: GOLDEN[k] for k in here})}; this machine has {here}")
    env = {**os.environ, "OMP_NUM_THREADS": str(GOLDEN["threads"])}  # bf16 reductions depend on the thread count
    run = tmp_path / "run"
    for argv in (["train", str(ROOT / "configs" / "digits" / "dit.yaml"), "train.steps=20", f"output_dir={run}"],
                 ["sample", str(run), "--num-samples", "64", "--seed", "0", "--out", str(tmp_path / "s.npz")]):
        proc = subprocess.run([sys.executable, "-m", "genvis", *argv], capture_output=True, text=True, env=env)
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert tensors_sha256(run / "checkpoints" / "step_0000020" / "model.safetensors") == GOLDEN["checkpoint_model_sha256"]
    assert tensors_sha256(run / "model" / "diffusion_pytorch_model.safetensors") == GOLDEN["model_sha256"]
    with np.load(tmp_path / "s.npz") as f:
        assert f["arr_0"].shape == (64, 16, 16, 3)
        assert hashlib.sha256(f["arr_0"].tobytes()).hexdigest() == GOLDEN["samples_sha256"]
