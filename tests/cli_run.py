"""The genvis CLI end to end, for tests that train or run commands (tests/ is on sys.path through its conftest).

`genvis sample` runs in this process (the same `genvis.cli.main`, without a new interpreter's seconds of imports);
everything else, training in particular (Accelerate's process state, torchrun), in a subprocess."""
import contextlib
import io
import os
import subprocess
import sys

IN_PROCESS = ("sample",)  # commands that hold no process-wide state


def genvis(*argv, env=None):
    """Run `genvis ARGV` (with `env` added to the environment: always a subprocess); returns (code, stdout, stderr)."""
    argv = [str(a) for a in argv]
    if env is None and argv and argv[0] in IN_PROCESS:
        from genvis.cli import main

        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv)
        return code, out.getvalue(), err.getvalue()
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
