"""The genvis CLI in a subprocess, for tests that train or run commands end to end (tests/ is on sys.path
through its conftest)."""
import os
import subprocess
import sys


def genvis(*argv, env=None):
    """Run `python -m genvis ARGV` with `env` added to the environment; returns (code, stdout, stderr)."""
    proc = subprocess.run([sys.executable, "-m", "genvis", *map(str, argv)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})
    return proc.returncode, proc.stdout, proc.stderr


def train(config, out, *extra):
    """`genvis train CONFIG output_dir=OUT EXTRA...`, asserting success; returns its stdout."""
    code, stdout, stderr = genvis("train", config, f"output_dir={out}", *extra)
    assert code == 0, stderr[-3000:]
    return stdout


def sample_images(run, num, folder):
    """`genvis sample RUN --num-samples NUM` with no other flag, asserting success; the uint8 [NUM, H, W, 3] images."""
    import numpy as np

    out = folder / "samples.npz"
    code, _, stderr = genvis("sample", run, "--num-samples", str(num), "--out", out)
    assert code == 0, stderr[-2000:]
    return np.load(out)["arr_0"]
