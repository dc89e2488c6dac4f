"""VQ and multi-scale VQ tokenizer training on the digits (the tokenizer task: L1 + digits perceptual +
quantizer loss + PatchGAN), with dead-code restarts and the EMA codebook on: the loss falls, the run
exports a tokenizer that loads, resume is bit-exact (codebook statistics included), 1 vs 2 processes
restart the same codes, and the ids extracted for token generators decode to the tokenizer's
reconstructions."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cli_run import genvis, train
from tiny_runs import MSVQ, ROOT, TINY

VQ = str(ROOT / "configs" / "digits" / "vq.yaml")
VQ_ARGS = [*TINY, "tokenizer.ema=true", "train.checkpoint_every=20", "task.disc_start=20"]


@pytest.fixture(scope="module")
def trained_vq(tmp_path_factory):
    """The digits VQ preset at a tiny width with the EMA codebook, 40 steps, the discriminator from step 20."""
    out = tmp_path_factory.mktemp("vq") / "run"
    stdout = train(VQ, out, *VQ_ARGS, "train.steps=40")
    assert "4x4 ids of a 64-code vocabulary" in stdout
    return out


def test_vq_training_reduces_the_loss_restarts_dead_codes_and_exports(trained_vq, scalars):
    from genvis import load_tokenizer
    from genvis.tokenizers.vq import VQTokenizer

    rec = scalars(trained_vq, "train/reconstruction")
    assert len(rec) == 40 and np.mean(rec[-5:]) < 0.7 * np.mean(rec[:5]), (rec[:5], rec[-5:])
    restarted = scalars(trained_vq, "train/restarted")
    assert restarted[0] == 0 and sum(restarted) > 0  # nothing is dead before the usage EMA has decayed
    usage = scalars(trained_vq, "train/usage")
    assert all(0 < u <= 1 for u in usage)
    tokenizer = load_tokenizer(trained_vq / "model")
    assert isinstance(tokenizer, VQTokenizer) and tokenizer.config.ema and tokenizer.vocab_size == 64
    # the exported EMA copy carries the live EMA codebook (copied, not averaged): its rows are the statistics' ratio
    q = tokenizer.quantize
    n = q.ema_count.sum()
    expected = q.ema_sum / ((q.ema_count + 1e-5) / (n + 64 * 1e-5) * n)[:, None]
    assert torch.allclose(q.embedding.weight, expected, rtol=1e-5, atol=1e-6)


def test_vq_resume_is_bit_exact_with_codebook_statistics(trained_vq, tmp_path):
    resumed = tmp_path / "resumed"
    train(VQ, resumed, *VQ_ARGS, "train.steps=20")
    train(VQ, resumed, *VQ_ARGS, "train.steps=40")
    for name in ("model.safetensors", "model_1.safetensors", "ema/tokenizer/diffusion_pytorch_model.safetensors"):
        a = load_file(str(trained_vq / "checkpoints" / "step_0000040" / name))
        b = load_file(str(resumed / "checkpoints" / "step_0000040" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
        if name == "model.safetensors":
            assert {"quantize.usage", "quantize.ema_count", "quantize.ema_sum"} <= a.keys()


def test_vq_recon_and_extract_ids(trained_vq, tmp_path):
    from genvis.data.latents import LatentsDataset
    from genvis.tokenizers import load_tokenizer

    code, stdout, stderr = genvis("tokenizer", "recon", trained_vq, "--data", VQ, "--num-images", "64")
    assert code == 0, stderr[-2000:]
    report = json.loads(stdout)
    assert report["codebook_size"] == 64 and 0 < report["codebook_usage"] <= 1 and report["perplexity"] >= 1
    out = tmp_path / "ids"
    code, _, stderr = genvis("tokenizer", "extract", trained_vq, "--data", VQ, "--split", "test", "--out", out)
    assert code == 0, stderr[-2000:]
    data = LatentsDataset(out)
    assert data.latents.dtype == torch.int64 and data.latents.shape == (360, 4, 4)
    assert data.ids == {"vocab_size": 64, "layout": "grid", "scales": None}
    from genvis.data import DataConfig, build_dataset

    images = build_dataset(DataConfig(name="digits", resolution=16, channels=1), split="test").images[:32]
    tokenizer = load_tokenizer(trained_vq)
    assert torch.equal(data.latents[:32], tokenizer.encode(images))


def test_a_diffusion_model_refuses_a_discrete_tokenizer(trained_vq, tmp_path):
    code, _, stderr = genvis("train", ROOT / "configs" / "digits" / "dit.yaml", f"output_dir={tmp_path / 'dit'}",
                             f"tokenizer.path={trained_vq / 'model'}", "train.steps=1")
    assert code != 0 and len(stderr.strip().splitlines()) == 1
    assert "discrete tokenizer" in stderr and "tokenizer.path" in stderr


def test_two_processes_restart_the_same_codes_as_one(tmp_path, scalars):
    """Restart candidates are the globally smallest keys of the global batch (gathered), usage statistics are
    global: 2 processes restart the same codes with the same vectors as 1, up to the rounding of DDP's
    gradient reduction (without the gather, each process would restart from its own half of the batch)."""
    # threshold 0.9: the codes step 1 leaves unused (usage 0.5 / 64 after one update) restart at step 2, from
    # the exact step-1 statistics; after that an argmin may flip on the rounding of DDP's gradient reduction
    args = [*TINY, "tokenizer.restart_threshold=0.9", "train.steps=2", "train.checkpoint_every=0", "task.disc_start=0"]
    one, two = tmp_path / "one", tmp_path / "two"
    train(VQ, one, *args)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29543",
                           "-m", "genvis", "train", VQ, f"output_dir={two}", *args], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    restarted = scalars(one, "train/restarted")
    assert restarted == scalars(two, "train/restarted") and restarted[0] == 0 and restarted[1] > 0, restarted
    for tag in ("train/usage", "train/perplexity"):  # the global batch's, at step 1 on equal weights
        a, b = scalars(one, tag), scalars(two, tag)
        assert abs(a[0] - b[0]) <= 1e-6 * a[0], (tag, a, b)
    a = load_file(str(one / "checkpoints" / "step_0000002" / "model.safetensors"))
    b = load_file(str(two / "checkpoints" / "step_0000002" / "model.safetensors"))
    assert torch.equal(a["quantize.usage"] > 1.0 / 64 - 1e-9, b["quantize.usage"] > 1.0 / 64 - 1e-9)  # the same codes reset
    assert (a["quantize.embedding.weight"] - b["quantize.embedding.weight"]).abs().max() < 2e-3  # Adam on rounding


def test_multiscale_training_logs_every_scale_and_extracts_concatenated_ids(tiny_msvq, tmp_path, scalars):
    from genvis.data import DataConfig, build_dataset
    from genvis.data.latents import LatentsDataset
    from genvis.tokenizers import load_tokenizer
    from genvis.tokenizers.multiscale_vq import MultiScaleVQTokenizer

    run, stdout = tiny_msvq
    assert "30 ids of a 64-code vocabulary" in stdout
    rec = scalars(run, "train/reconstruction")
    assert np.mean(rec[-5:]) < 0.7 * np.mean(rec[:5]), (rec[:5], rec[-5:])
    for p in (1, 2, 3, 4):
        assert len(scalars(run, f"train/usage_{p}")) == 30
    tokenizer = load_tokenizer(run)
    assert isinstance(tokenizer, MultiScaleVQTokenizer) and tokenizer.scales == (1, 2, 3, 4)
    out = tmp_path / "ids"
    code, _, stderr = genvis("tokenizer", "extract", run, "--data", MSVQ, "--split", "test", "--out", out)
    assert code == 0, stderr[-2000:]
    data = LatentsDataset(out)
    assert data.latents.shape == (360, 30) and data.ids["scales"] == [1, 2, 3, 4]
    images = build_dataset(DataConfig(name="digits", resolution=16, channels=1), split="test").images[:16]
    per_scale = tokenizer.encode(images)
    assert torch.equal(data.latents[:16], torch.cat(per_scale, dim=1))
    assert torch.equal(tokenizer.decode(data.latents[:16]), tokenizer.decode(per_scale))
    code, stdout, stderr = genvis("tokenizer", "recon", run, "--data", MSVQ, "--num-images", "40")
    assert code == 0, stderr[-2000:]
    scales = json.loads(stdout)["scales"]
    assert [s["scale"] for s in scales] == [1, 2, 3, 4]
    assert [s["reachable"] for s in scales] == [40, 64, 64, 64]  # min(vocab, p*p*N)
