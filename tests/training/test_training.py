"""Training loop: exact resume after SIGKILL, 1 vs 2 processes, non-finite loss handling, run layout."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cli_run import genvis

ROOT = Path(__file__).resolve().parents[2]
DIGITS = str(ROOT / "configs" / "digits" / "dit.yaml")
# A DiT small enough to train a handful of steps in seconds on 2 cores.
SMALL = [
    "data.resolution=8", "model.size=tiny", "model.depth=2", "model.hidden_size=64", "model.num_heads=4",
    "train.batch_size=16", "train.lr=1e-3", "train.warmup_steps=2", "train.log_every=1", "train.keep_checkpoints=0",
    "train.mixed_precision=fp32",
]


def run_train(out, *extra, check=True):
    """`genvis train` of the small DiT (as cli_run runs it); the finished command's code, stdout and stderr."""
    argv = ["train", DIGITS, f"output_dir={out}", *SMALL, *extra]
    code, stdout, stderr = genvis(*argv)
    if check and code != 0:
        raise AssertionError(stderr[-3000:])
    return subprocess.CompletedProcess(argv, code, stdout, stderr)


def weights(folder):
    files = list(Path(folder).glob("*.safetensors"))
    assert len(files) == 1, files
    return load_file(str(files[0]))


def test_run_layout_and_sample_grids(tmp_path):
    out = tmp_path / "run"
    run_train(out, "train.steps=4", "train.checkpoint_every=2", "train.sample_every=4", "sample.steps=3", "sample.num=10")
    assert (out / "config.yaml").is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000002", "step_0000004"]
    ckpt = out / "checkpoints" / "step_0000004"
    for name in ("model.safetensors", "optimizer.bin", "ema/model/config.json", "ema/model/diffusion_pytorch_model.safetensors",
                 "trainer_state.json"):
        assert (ckpt / name).is_file(), name
    assert json.loads((ckpt / "trainer_state.json").read_text()) == {"step": 4}
    from PIL import Image

    # 10 samples, one column per class: 10 tiles of 8 px with 2-px padding, one row
    assert Image.open(out / "samples" / "step_0000004.png").size == (10 * 10 + 2, 10 + 2)
    assert any((out / "logs").rglob("events.out.tfevents*"))
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["_class_name"] == "DiT" and config["in_channels"] == 1 and config["input_size"] == 8
    assert json.loads((out / "model" / "tokenizer" / "config.json").read_text())["_class_name"] == "PixelTokenizer"
    # the exported model is the EMA of the last checkpoint
    ema = weights(ckpt / "ema" / "model")
    exported = weights(out / "model")
    assert all(torch.equal(ema[k], exported[k]) for k in exported)


def test_resume_after_sigkill_is_bit_identical(tmp_path):
    # enough steps after the kill point that the kill always lands mid-run, however fast the machine
    args = ["train.steps=32", "train.checkpoint_every=4"]
    ref = tmp_path / "ref"
    run_train(ref, *args)

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "genvis", "train", DIGITS, f"output_dir={out}", *SMALL, *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (out / "checkpoints" / "step_0000004").exists():
        assert proc.poll() is None, "training ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before the kill landed"
    assert not (out / "model").exists()
    resumed = run_train(out, *args)  # the same command again resumes
    assert "resuming from" in resumed.stdout and "steps 0->" not in resumed.stdout

    a, b = weights(ref / "model"), weights(out / "model")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed run differs from the uninterrupted one"
    ma = load_file(str(ref / "checkpoints" / "step_0000032" / "model.safetensors"))
    mb = load_file(str(out / "checkpoints" / "step_0000032" / "model.safetensors"))
    assert all(torch.equal(ma[k], mb[k]) for k in ma)


def test_two_processes_match_one(tmp_path):
    args = ["train.steps=3", "train.checkpoint_every=0"]
    one = tmp_path / "one"
    run_train(one, *args)
    two = tmp_path / "two"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "-m", "genvis", "train", DIGITS, f"output_dir={two}", *SMALL, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "on 2 process(es)" in proc.stdout, proc.stdout
    a, b = weights(one / "model"), weights(two / "model")
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-5, worst
    # and the run really moved: the two runs agree on weights far from the initial ones
    init_run = tmp_path / "zero"
    run_train(init_run, "train.steps=1", "train.lr=0", "train.checkpoint_every=0")
    moved = max((a[k] - weights(init_run / "model")[k]).abs().max().item() for k in a)
    assert moved > 1e-3


def test_gradient_accumulation_matches_full_batch(tmp_path):
    """Also: train() called from inside torch.no_grad() (as a benchmark that samples afterwards may) still trains,
    in-process, and gives the weights the CLI gives."""
    from genvis.config import load_config
    from genvis.training.loop import train

    a_dir, b_dir = tmp_path / "full", tmp_path / "accum"
    with torch.no_grad():
        train(load_config(DIGITS, [f"output_dir={a_dir}", *SMALL, "train.steps=2", "train.checkpoint_every=0"]))
    run_train(b_dir, "train.steps=2", "train.checkpoint_every=0", "train.grad_accum=4")
    a, b = weights(a_dir / "model"), weights(b_dir / "model")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path):
    """A loss that turns NaN at step 3 (the task's loss patched, so the config is the same as the good run's)
    stops the run before anything is saved, naming the last good checkpoint, which is left untouched."""
    out = tmp_path / "nan"
    argv = ["train", DIGITS, f"output_dir={out}", *SMALL, "train.steps=4", "train.checkpoint_every=2"]
    script = tmp_path / "nan_at_step_3.py"
    script.write_text(
        "import sys\n"
        "import genvis.training.tasks.diffusion as d\n"
        "real = d.DiffusionTask.losses\n"
        "def losses(self, modules, batch, draws, step):\n"
        "    out = real(self, modules, batch, draws, step)\n"
        "    return {k: v * float('nan') for k, v in out.items()} if step >= 2 else out\n"
        "d.DiffusionTask.losses = losses\n"
        "from genvis.cli import main\n"
        f"sys.exit(main({argv!r}))\n"
    )
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "non-finite loss (nan) at step 3" in errors[0] and "step_0000002" in errors[0]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000002"]
    assert not (out / "model").exists()
    # the kept checkpoint is the good run's: the same command without the patch resumes from it
    good = load_file(str(out / "checkpoints" / "step_0000002" / "model.safetensors"))
    ref = tmp_path / "ref"
    run_train(ref, "train.steps=2", "train.checkpoint_every=2")
    assert all(torch.equal(good[k], v) for k, v in load_file(str(ref / "checkpoints" / "step_0000002" / "model.safetensors")).items())


@pytest.mark.parametrize("workers", [0, 1])
def test_corrupt_image_in_folder_dataset_stops_naming_the_file(tmp_path, workers):
    import numpy as np
    from PIL import Image

    root = tmp_path / "images"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(2):
            Image.fromarray((np.random.RandomState(i).rand(12, 12, 3) * 255).astype(np.uint8)).save(root / cls / f"{i}.png")
    bad = root / "b" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(64)))
    out = tmp_path / "run"
    proc = run_train(out, "data.name=folder", f"data.path={root}", "data.channels=3", "train.steps=2",
                     f"data.num_workers={workers}", check=False)
    lines = [line for line in proc.stderr.strip().splitlines() if "error" in line]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and str(bad) in lines[0]
    assert not (out / "model").exists() and not (out / "checkpoints").exists()
