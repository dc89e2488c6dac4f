"""`train.compile=true`: the trained modules run compiled (torch.compile, inductor, in place: the checkpoints keep
their keys). A compiled run follows the eager one within float32 tolerance, resumes bit-exactly, and 2 processes
match 1 as in eager training; the first step's time (the compilation) is reported apart from the steady state."""
import copy
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from cli_run import train
from genvis.models.maskgit import MaskGIT
from genvis.training.loop import compile_module

ROOT = Path(__file__).resolve().parents[2]
DIGITS = str(ROOT / "configs" / "digits" / "dit.yaml")
SMALL = ["data.resolution=8", "model.depth=2", "model.hidden_size=32", "model.num_heads=2", "model.patch_size=2",
         "train.batch_size=8", "train.lr=1e-3", "train.warmup_steps=0", "train.log_every=1", "train.keep_checkpoints=0",
         "train.mixed_precision=fp32", "sample.steps=2", "train.checkpoint_every=2"]


def weights(run, step=4, name="model.safetensors"):
    return load_file(str(run / "checkpoints" / f"step_{step:07d}" / name))


def test_compiled_training_matches_eager_resumes_exactly_and_two_processes_match_one(tmp_path, scalars):
    compiled, eager, resumed, two = (tmp_path / n for n in ("compiled", "eager", "resumed", "two"))
    stdout = train(DIGITS, compiled, *SMALL, "train.steps=4", "train.compile=true")
    assert "(compiling)" in stdout and "steady state:" in stdout
    train(DIGITS, eager, *SMALL, "train.steps=4")
    a, e = scalars(compiled, "train/loss_model"), scalars(eager, "train/loss_model")
    assert len(a) == 4 and all(abs(x - y) <= 1e-5 * max(1.0, abs(y)) for x, y in zip(a, e)), (a, e)
    wa, we = weights(compiled), weights(eager)
    assert wa.keys() == we.keys()  # compiled in place: no _orig_mod. prefixes
    assert max((wa[k] - we[k]).abs().max().item() for k in wa) < 1e-4
    assert len(scalars(compiled, "train/images_per_second")) == 3  # every logged step but the first

    train(DIGITS, resumed, *SMALL, "train.steps=2", "train.compile=true")
    train(DIGITS, resumed, *SMALL, "train.steps=4", "train.compile=true")
    for name in ("model.safetensors", "ema/model/diffusion_pytorch_model.safetensors"):
        x, y = weights(compiled, name=name), weights(resumed, name=name)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name

    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29561",
                           "-m", "genvis", "train", DIGITS, f"output_dir={two}", *SMALL, "train.steps=4", "train.compile=true"],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    b = scalars(two, "train/loss_model")
    assert abs(a[0] - b[0]) <= 1e-6 * max(1.0, abs(a[0])) and all(abs(x - y) <= 1e-3 for x, y in zip(a, b)), (a, b)
    wb = weights(two)
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-3


def test_compiled_dropout_draws_the_eager_masks():
    """On the CPU a module compiled for training keeps ATen's random draws (inductor's own CPU generator is slower and
    draws other masks): a MaskGIT in training mode, with dropout on its embeddings, attention probabilities and
    residual branches, gives the eager forward and gradients for the same seed."""
    torch.manual_seed(0)
    model = MaskGIT(vocab_size=16, num_tokens=12, token_shape=(12,), num_classes=10, hidden_size=32, depth=2,
                    num_heads=4, intermediate_size=48, dropout=0.3, attn_dropout=0.3).train()
    compiled = copy.deepcopy(model)
    compile_module(compiled, torch.device("cpu"))
    g = torch.Generator().manual_seed(1)
    ids, labels = torch.randint(0, 17, (4, 12), generator=g), torch.randint(0, 11, (4,), generator=g)
    outs = []
    for m in (model, compiled):
        torch.manual_seed(2)
        out = m(ids, labels)
        out.square().mean().backward()
        outs.append((out.detach(), m.model.encoder.layer[0].attention.self.query.weight.grad))
    (a, ga), (b, gb) = outs
    assert torch.allclose(a, b, atol=1e-5) and torch.allclose(ga, gb, atol=1e-6)
    torch.manual_seed(3)
    assert (compiled(ids, labels) - b).abs().max() > 0.1  # the dropout is live: another seed, other masks
