"""KL-VAE tokenizer training on the digits (reconstruction + digits perceptual + KL + PatchGAN with the
adaptive weight, two optimizers), its exported normalisation, resume and 1 vs 2 processes, and the latent
path after it: extract once, train a DiT on the latents, sample with no extra flag."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cli_run import genvis, train

ROOT = Path(__file__).resolve().parents[2]
VAE = str(ROOT / "configs" / "digits" / "vae.yaml")
DIT_VAE = str(ROOT / "configs" / "digits" / "dit_vae.yaml")
VAVAE = str(ROOT / "configs" / "digits" / "vavae.yaml")
TINY = ["tokenizer.block_out_channels=[16,32]", "tokenizer.norm_num_groups=8", "task.disc_channels=16", "train.batch_size=16",
        "train.log_every=1", "train.mixed_precision=fp32", "train.keep_checkpoints=0", "train.warmup_steps=0",
        "tokenizer.stats_images=400"]


@pytest.fixture(scope="module")
def trained_vae(tmp_path_factory):
    """The digits VA-VAE preset (the digits VAE preset plus VA-VAE's alignment) at a tiny width, 60 steps with the
    discriminator on from step 30."""
    out = tmp_path_factory.mktemp("vae") / "run"
    stdout = train(VAVAE, out, *TINY, "train.steps=60", "train.checkpoint_every=30", "task.disc_start=30")
    assert "perceptual: digits-classifier feature distance" in stdout  # the log says which perceptual term is used
    assert "VA-VAE alignment with the digits features" in stdout
    return out


def digits_images(split, channels=1):
    from genvis.data import DataConfig, build_dataset

    dataset = build_dataset(DataConfig(name="digits", resolution=16, channels=channels), split=split)
    return dataset.images


def test_training_reduces_the_loss_and_exports_a_normalised_diffusers_vae(trained_vae, scalars):
    from genvis import load_tokenizer
    from genvis.evaluation.recon import psnr
    from genvis.tokenizers.kl import KLConfig, KLTokenizer

    rec = scalars(trained_vae, "train/reconstruction")
    assert len(rec) == 60 and np.mean(rec[-5:]) < 0.6 * np.mean(rec[:5]), (rec[:5], rec[-5:])
    d_weight = scalars(trained_vae, "train/d_weight")
    assert all(w == 0 for w in d_weight[:30]) and all(w > 0 for w in d_weight[30:])  # the delayed start
    assert any(abs(v) > 0 for v in scalars(trained_vae, "train/loss_disc")[30:])
    # VA-VAE's term: logged with a positive adaptive weight, falling as the latents align with the features; its
    # projection is part of the run (resume), not of the exported tokenizer
    align, weight = scalars(trained_vae, "train/align"), scalars(trained_vae, "train/align_weight")
    assert len(align) == 60 and all(w > 0 for w in weight)
    assert np.mean(align[-5:]) < 0.9 * np.mean(align[:5]), (align[:5], align[-5:])
    saved = [key for f in (trained_vae / "checkpoints").glob("step_*/model*.safetensors") for key in load_file(str(f))]
    assert "proj.weight" in saved
    config = json.loads((trained_vae / "model" / "config.json").read_text())
    assert config["_class_name"] == "AutoencoderKL" and config["scaling_factor"] == 1.0
    assert len(config["latents_mean"]) == len(config["latents_std"]) == 4
    tok = load_tokenizer(trained_vae)
    assert isinstance(tok, KLTokenizer)
    held_out = digits_images("test")
    latents = tok.encode(held_out)  # normalised: mean 0 / std 1 per channel on images it never saw
    assert latents.shape == (360, 4, 8, 8)
    assert latents.mean(dim=(0, 2, 3)).abs().max() < 0.05 and (latents.std(dim=(0, 2, 3)) - 1).abs().max() < 0.05
    # and it reconstructs: better than the untrained network of the same config
    untrained = KLTokenizer.from_section(KLConfig(block_out_channels=[16, 32], layers_per_block=1, latent_channels=4,
                                                  norm_num_groups=8), (1, 16, 16))
    trained_psnr = psnr(held_out, tok.decode(latents).clamp(-1, 1)).mean()
    untrained_psnr = psnr(held_out, untrained.eval().decode(untrained.encode(held_out)).clamp(-1, 1)).mean()
    assert trained_psnr > untrained_psnr + 3, (trained_psnr, untrained_psnr)


def test_genvis_kl_tokenizer_equals_diffusers_to_the_bit(trained_vae):
    """encode (posterior mode) and decode equal diffusers' AutoencoderKL on the same folder with the
    normalisation written as diffusers' pipelines apply latents_mean / latents_std."""
    from diffusers import AutoencoderKL

    from genvis import load_tokenizer

    vae = AutoencoderKL.from_pretrained(str(trained_vae / "model")).eval()
    tok = load_tokenizer(trained_vae)
    images = digits_images("test")[:16]
    mean = torch.tensor(vae.config.latents_mean).view(1, 4, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, 4, 1, 1)
    with torch.no_grad():
        expected = (vae.encode(images).latent_dist.mode() - mean) * vae.config.scaling_factor / std
        assert torch.equal(tok.encode(images), expected)
        assert torch.equal(tok.decode(expected), vae.decode(expected * std / vae.config.scaling_factor + mean).sample)


def test_resume_is_bit_exact_with_both_optimizers(trained_vae, tmp_path):
    resumed = tmp_path / "resumed"
    train(VAVAE, resumed, *TINY, "train.steps=30", "train.checkpoint_every=30", "task.disc_start=30")
    train(VAVAE, resumed, *TINY, "train.steps=60", "train.checkpoint_every=30", "task.disc_start=30")
    step = trained_vae / "checkpoints" / "step_0000060"
    names = sorted(p.name for p in step.glob("model*.safetensors"))  # tokenizer, alignment projection, discriminator
    assert len(names) == 3
    for name in names + ["ema/tokenizer/diffusion_pytorch_model.safetensors"]:
        a = load_file(str(step / name))
        b = load_file(str(resumed / "checkpoints" / "step_0000060" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_two_processes_match_one(tmp_path, scalars):
    """The digits VA-VAE with the discriminator and LeCam on from step 0: every logged quantity is the global
    batch's, and the first step (before Adam's per-parameter normalisation amplifies reduction-order rounding)
    agrees to 1e-6: both adaptive weights (the discriminator's at the decoder's last layer, the alignment's at the
    encoder's) are computed from the averaged gradients, not per process."""
    args = [*TINY, "train.steps=3", "train.checkpoint_every=0", "task.disc_start=0", "task.lecam_weight=0.1"]
    one, two = tmp_path / "one", tmp_path / "two"
    train(VAVAE, one, *args)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541",
                           "-m", "genvis", "train", VAVAE, f"output_dir={two}", *args], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "on 2 process(es)" in proc.stdout
    tags = ("train/loss_tokenizer", "train/loss_disc", "train/grad_norm_tokenizer", "train/grad_norm_disc", "train/d_weight",
            "train/reconstruction", "train/kl", "train/g_loss", "train/d_loss", "train/align", "train/align_weight")
    for tag in tags:
        a, b = scalars(one, tag), scalars(two, tag)
        assert len(a) == len(b) == 3, tag
        assert abs(a[0] - b[0]) <= 1e-6 * max(1.0, abs(a[0])), (tag, a, b)
        assert all(abs(x - y) <= 2e-3 * max(1.0, abs(x)) for x, y in zip(a, b)), (tag, a, b)
    files = ("model.safetensors", "model_1.safetensors", "model_2.safetensors")  # tokenizer, projection, discriminator
    for name in files:  # within a few Adam steps of lr 1e-3
        a = load_file(str(one / "checkpoints" / "step_0000003" / name))
        b = load_file(str(two / "checkpoints" / "step_0000003" / name))
        assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) < 1e-3, name
    disc = load_file(str(one / "checkpoints" / "step_0000003" / files[2]))
    assert any(k.endswith("ema_real") and v.abs().item() > 0 for k, v in disc.items())  # LeCam's EMA moved


def test_missing_lpips_weights_are_one_line(tmp_path):
    code, _, stderr = genvis("train", VAE, f"output_dir={tmp_path / 'run'}", *TINY, "train.steps=1", "task.perceptual=lpips",
                             f"task.lpips_weights={tmp_path / 'vgg16.pth'}")
    lines = [line for line in stderr.splitlines() if "error" in line]
    assert code == 2 and len(lines) == 1 and "vgg16.pth" in lines[0], stderr[-2000:]


def test_stats_and_recon_commands(trained_vae, tmp_path):
    """`genvis tokenizer stats` rewrites a VAE's normalisation (mean 0 / std 1 on the data it measured, within
    0.05 on held-out images); `genvis tokenizer recon` prints PSNR / SSIM / rFD and writes the side-by-side."""
    from genvis import load_tokenizer

    folder = tmp_path / "vae"
    shutil.copytree(trained_vae / "model", folder)
    code, stdout, stderr = genvis("tokenizer", "stats", folder, "--data", VAE, "--normalisation", "scalar")
    assert code == 0, stderr[-2000:]
    stored = json.loads(stdout)
    config = json.loads((folder / "config.json").read_text())
    assert config["latents_mean"] is None and config["shift_factor"] == pytest.approx(stored["shift_factor"])
    latents = load_tokenizer(folder).encode(digits_images("test"))
    assert abs(latents.mean().item()) < 0.05 and abs(latents.std().item() - 1) < 0.05
    code, stdout, stderr = genvis("tokenizer", "recon", trained_vae, "--data", VAE, "--num-images", "64",
                                  "--out", tmp_path / "side.png")
    assert code == 0, stderr[-2000:]
    metrics = json.loads(stdout)
    assert metrics["num_images"] == 64 and metrics["split"] == "test" and metrics["features"] == "digits"
    assert 10 < metrics["psnr"] < 60 and 0 < metrics["ssim"] <= 1 and metrics["rfd"] > 0
    from PIL import Image

    assert Image.open(tmp_path / "side.png").size == (16 * 18 + 2, 2 * 18 + 2)


@pytest.fixture(scope="module")
def vae_latents(trained_vae, tmp_path_factory):
    """The trained VAE's latents of the digits, extracted once (`genvis tokenizer extract`)."""
    latents = tmp_path_factory.mktemp("latents") / "latents"
    code, _, stderr = genvis("tokenizer", "extract", trained_vae, "--data", VAE, "--out", latents)
    assert code == 0, stderr[-2000:]
    return latents


def test_latent_dit_from_extracted_latents_samples_with_no_flag(trained_vae, vae_latents, tmp_path):
    """extract -> data.name=latents -> a DiT in the VAE's latent space, which records the VAE: `genvis sample`
    decodes to 16x16 digits without a flag; when the recorded VAE is gone, one line says what to pass."""
    latents, run = vae_latents, tmp_path / "dit"
    small = ["model.depth=1", "model.hidden_size=32", "model.num_heads=2", "train.batch_size=16", "train.steps=3",
             "train.checkpoint_every=0", "train.mixed_precision=fp32", "sample.steps=2", "tokenizer.embed=false"]
    train(DIT_VAE, run, f"data.path={latents}", *small)
    assert json.loads((run / "model" / "config.json").read_text())["in_channels"] == 4
    recorded = json.loads((run / "model" / "tokenizer.json").read_text())["path"]
    assert Path(recorded) == (trained_vae / "model").resolve()
    code, _, stderr = genvis("sample", run, "--num-samples", "3", "--out", tmp_path / "s.npz", "--precision", "fp32")
    assert code == 0, stderr[-2000:]
    assert np.load(tmp_path / "s.npz")["arr_0"].shape == (3, 16, 16, 3)
    # latents of another shape under the same path, then a rerun of the same command: one line, nothing resumed
    moved = tmp_path / "moved_vae"
    shutil.move(str(trained_vae / "model"), moved)
    try:
        code, _, stderr = genvis("sample", run, "--num-samples", "3", "--out", tmp_path / "t.npz")
        lines = [line for line in stderr.splitlines() if "error" in line]
        assert code == 2 and len(lines) == 1 and "--tokenizer" in lines[0]
        code, _, _ = genvis("sample", run, "--num-samples", "3", "--out", tmp_path / "t.npz", "--tokenizer", moved)
        assert code == 0
    finally:
        shutil.move(str(moved), trained_vae / "model")


def test_latents_of_another_shape_do_not_resume(vae_latents, tmp_path):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), latent_channels=8,
                  norm_num_groups=4).save_pretrained(str(tmp_path / "vae8"))
    latents, run = tmp_path / "latents", tmp_path / "dit"
    shutil.copytree(vae_latents, latents)
    small = ["model.depth=1", "model.hidden_size=32", "model.num_heads=2", "train.batch_size=16", "train.checkpoint_every=1",
             "train.mixed_precision=fp32"]
    train(DIT_VAE, run, f"data.path={latents}", *small, "train.steps=1")
    shutil.rmtree(latents)
    assert genvis("tokenizer", "extract", tmp_path / "vae8", "--data", VAE, "--out", latents)[0] == 0
    code, _, stderr = genvis("train", DIT_VAE, f"output_dir={run}", f"data.path={latents}", *small, "train.steps=2")
    lines = [line for line in stderr.splitlines() if "error" in line]
    assert code == 2 and len(lines) == 1 and "does not fit" in lines[0], stderr[-2000:]
