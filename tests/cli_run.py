"""The genvis CLI end to end, for tests that train or run commands (tests/ is on sys.path through its conftest).

`genvis sample` runs in this process (the same `genvis.cli.main`, without a new interpreter's seconds of imports);
everything else, training in particular (Accelerate's process state, compiled graphs), in a process of its own: a
child forked from a server that has imported torch, diffusers, Accelerate and genvis once (multiprocessing's
forkserver), which runs `genvis.cli.main` as `python -m genvis` does. A two-step training of a one-block DiT took
11.3 s as `python -m genvis train` and 1.1 s forked, on 2 cores: the rest was imports. Launchers (torchrun,
accelerate launch), the tests that kill a run and tests/test_config.py's CLI check start real interpreters."""
import atexit
import contextlib
import io
import multiprocessing
import os
import sys
import tempfile

IN_PROCESS = ("sample",)  # commands that hold no process-wide state
# What `genvis train / eval / tokenizer ...` import, imported once by the fork server. None of it runs a kernel: the
# server stays one thread, so no OpenMP pool is lost in a fork.
PRELOAD = ["torch", "accelerate", "diffusers", "omegaconf", "safetensors.torch", "einops", "torch.utils.tensorboard",
           "genvis.cli", "genvis.training.loop", "genvis.generate", "genvis.models.dit", "genvis.models.linear_dit",
           "genvis.models.var", "genvis.models.maskgit", "genvis.tokenizers.kl", "genvis.tokenizers.vq",
           "genvis.tokenizers.multiscale_vq", "genvis.tokenizers.titok"]
_context = None


def _forkserver():
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    return _context


def _cli_child(argv, environ, cwd, out, err, prelude):
    """In the forked child: the caller's environment and directory, stdout and stderr into files, the prelude, then
    what `python -m genvis ARGV` runs; exits with main's code (multiprocessing maps SystemExit as the interpreter
    does)."""
    os.environ.clear()
    os.environ.update(environ)
    os.chdir(cwd)
    sys.argv = ["genvis", *argv]
    if "OMP_NUM_THREADS" in environ:  # OpenMP read the server's value when torch loaded
        import torch

        torch.set_num_threads(int(environ["OMP_NUM_THREADS"]))
    for fd, path in ((1, out), (2, err)):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(f, fd)
        os.close(f)
    try:
        exec(prelude or "", {"__name__": "__prelude__"})
        from genvis.cli import main

        sys.exit(main(argv))
    finally:
        atexit._run_exitfuncs()  # an interpreter's exit runs them; a multiprocessing child leaves by os._exit
        sys.stdout.flush()
        sys.stderr.flush()


def genvis(*argv, env=None, prelude=None):
    """Run `genvis ARGV`; returns (code, stdout, stderr). With `env` (added to the environment) or `prelude` (Python
    source run first, e.g. a patch that makes the disk fill up), always out of this process."""
    argv = [str(a) for a in argv]
    if env is None and prelude is None and argv and argv[0] in IN_PROCESS:
        from genvis.cli import main

        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv)
        return code, out.getvalue(), err.getvalue()
    with tempfile.TemporaryDirectory() as folder:
        out, err = os.path.join(folder, "stdout"), os.path.join(folder, "stderr")
        for path in (out, err):
            open(path, "w").close()
        child = _forkserver().Process(target=_cli_child,
                                      args=(argv, {**os.environ, **(env or {})}, os.getcwd(), out, err, prelude))
        child.start()
        child.join()
        with open(out) as o, open(err) as e:
            return child.exitcode, o.read(), e.read()


def train(config, out, *extra, prelude=None):
    """`genvis train CONFIG output_dir=OUT EXTRA...`, asserting success; returns its stdout."""
    code, stdout, stderr = genvis("train", config, f"output_dir={out}", *extra, prelude=prelude)
    assert code == 0, stderr[-3000:]
    return stdout


def sample_images(run, num, folder):
    """`genvis sample RUN --num-samples NUM` with no other flag, asserting success; the uint8 [NUM, H, W, 3] images."""
    import numpy as np

    out = folder / "samples.npz"
    code, _, stderr = genvis("sample", run, "--num-samples", str(num), "--out", out)
    assert code == 0, stderr[-2000:]
    return np.load(out)["arr_0"]
