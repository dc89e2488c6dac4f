"""VAR training on the tokens task, on the ids of a tiny digits multi-scale VQ tokenizer: the loss falls, the run
samples with no extra flags, resume is bit-exact (stochastic depth on), 2 processes match 1, ids encoded on the
fly train the same model as ids extracted once, and a tokenizer of another kind or vocabulary is refused."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cli_run import genvis, sample_images, train
from tiny_runs import ROOT

VAR_CONFIG = str(ROOT / "configs" / "digits" / "var.yaml")
# depth 2, width 64; fp32 so that the 1 vs 2 process and resume comparisons are about the loop, not rounding
SMALL = ["model.depth=2", "model.embed_dim=64", "model.num_heads=2", "train.batch_size=32", "train.log_every=1",
         "train.mixed_precision=fp32", "train.keep_checkpoints=0", "train.warmup_steps=2", "train.lr=2e-3",
         "sample.num=10"]


@pytest.fixture(scope="module")
def ids(tiny_msvq, tmp_path_factory):
    """The tiny tokenizer's ids of the 1,437 training digits (`genvis tokenizer extract`)."""
    run, _ = tiny_msvq
    out = tmp_path_factory.mktemp("ids") / "ids"
    code, _, stderr = genvis("tokenizer", "extract", run, "--data", str(ROOT / "configs" / "digits" / "msvq.yaml"),
                             "--out", out)
    assert code == 0, stderr[-2000:]
    return out


@pytest.fixture(scope="module")
def trained_var(ids, tmp_path_factory):
    out = tmp_path_factory.mktemp("var") / "run"
    stdout = train(VAR_CONFIG, out, f"data.path={ids}", *SMALL, "train.steps=40", "train.checkpoint_every=0")
    assert "VAR-d2" in stdout
    return out


def test_var_training_reduces_the_loss_and_samples_with_no_flags(trained_var, tiny_msvq, scalars, tmp_path):
    from genvis import load_tokenizer
    from genvis.generate import class_labels, generate
    from genvis.models import load_model
    from genvis.models.var import VAR

    loss = scalars(trained_var, "train/loss_model")
    assert len(loss) == 40 and np.mean(loss[-5:]) < 0.85 * np.mean(loss[:5]), (loss[:5], loss[-5:])
    assert loss[0] == pytest.approx(np.log(64), abs=0.15)  # near-uniform logits at VAR's initialisation
    model = load_model(trained_var)
    assert isinstance(model, VAR) and model.scales == (1, 2, 3, 4) and model.config.vocab_size == 64
    arr = sample_images(trained_var, 10, tmp_path)
    assert arr.shape == (10, 16, 16, 3)
    # the CLI's images are the recorded tokenizer's decoding of the VAR's ids for seeds (0, i)
    tokenizer = load_tokenizer(trained_var)
    assert tokenizer.source == str((trained_var / "model" / "tokenizer").resolve())  # embedded (tokenizer.embed)
    assert torch.equal(tokenizer.quantize.embedding.weight, load_tokenizer(tiny_msvq[0]).quantize.embedding.weight)
    images = generate(model, tokenizer, class_labels(10, 10), seed=0)
    expected = torch.clamp(127.5 * images + 128.0, 0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(arr[..., :1], expected)


def test_var_resume_is_bit_exact_with_stochastic_depth(ids, tmp_path):
    args = [f"data.path={ids}", *SMALL, "model.drop_path_rate=0.3", "train.checkpoint_every=3"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    train(VAR_CONFIG, full, *args, "train.steps=6")
    train(VAR_CONFIG, resumed, *args, "train.steps=3")
    train(VAR_CONFIG, resumed, *args, "train.steps=6")
    for name in ("model.safetensors", "ema/model/diffusion_pytorch_model.safetensors"):
        a = load_file(str(full / "checkpoints" / "step_0000006" / name))
        b = load_file(str(resumed / "checkpoints" / "step_0000006" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    # and stochastic depth acts: the same run without it ends elsewhere
    plain = tmp_path / "plain"
    train(VAR_CONFIG, plain, f"data.path={ids}", *SMALL, "model.drop_path_rate=0.0", "train.checkpoint_every=3", "train.steps=3")
    a = load_file(str(resumed / "checkpoints" / "step_0000003" / "model.safetensors"))
    b = load_file(str(plain / "checkpoints" / "step_0000003" / "model.safetensors"))
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_two_processes_match_one(ids, tmp_path):
    args = [f"data.path={ids}", *SMALL, "model.drop_path_rate=0.3", "train.steps=3", "train.checkpoint_every=0"]
    one, two = tmp_path / "one", tmp_path / "two"
    train(VAR_CONFIG, one, *args)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29551",
                           "-m", "genvis", "train", VAR_CONFIG, f"output_dir={two}", *args], capture_output=True, text=True,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "on 2 process(es)" in proc.stdout
    a = load_file(str(one / "model" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(two / "model" / "diffusion_pytorch_model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_ids_encoded_on_the_fly_train_the_same_model(ids, tiny_msvq, tmp_path):
    """data.name=digits with tokenizer.path encodes each batch with the frozen tokenizer (in float32): the same
    ids as the extracted ones, so the same weights."""
    run, _ = tiny_msvq
    args = [*SMALL, "train.steps=2", "train.checkpoint_every=0"]
    stored, fly = tmp_path / "stored", tmp_path / "fly"
    train(VAR_CONFIG, stored, f"data.path={ids}", *args)
    train(VAR_CONFIG, fly, "data.name=digits", "data.path=null", f"tokenizer.path={run / 'model'}", *args)
    a = load_file(str(stored / "model" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(fly / "model" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_var_refuses_a_tokenizer_that_is_not_multiscale(tmp_path):
    from genvis.tokenizers.vq import VQTokenizer

    folder = tmp_path / "vq"
    VQTokenizer(in_channels=1, ch=16, ch_mult=[1, 2, 2], num_res_blocks=1, z_channels=16, norm_groups=8,
                codebook_size=32, codebook_dim=8).save_pretrained(folder)
    code, _, stderr = genvis("train", VAR_CONFIG, f"output_dir={tmp_path / 'run'}", "data.name=digits", "data.path=null",
                             f"tokenizer.path={folder}", "train.steps=1")
    assert code != 0 and len(stderr.strip().splitlines()) == 1, stderr
    assert "VQTokenizer" in stderr and "multi-scale" in stderr
