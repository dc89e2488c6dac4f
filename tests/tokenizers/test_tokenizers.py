"""The tokenizer contract: diffusers AutoencoderKL folders load unchanged with diffusers' latent
normalisation (scale, shift + scale, per-channel mean/std), encode is the posterior mode unless asked to
sample, and generators record their tokenizer so that it loads from a model folder, run or checkpoint."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import cli_run
from genvis import load_tokenizer
from genvis.errors import GenvisError
from genvis.tokenizers import PixelTokenizer, record_tokenizer
from genvis.tokenizers.kl import KLTokenizer

ROOT = Path(__file__).resolve().parents[2]


def tiny_vae(seed=0, **config):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 8),
                        latent_channels=4, norm_num_groups=4, sample_size=16, **config)
    return vae.eval()


@pytest.fixture()
def images():
    return torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1


MEAN, STD = [0.5, -0.2, 0.1, 0.3], [2.0, 0.5, 1.5, 0.8]


@pytest.mark.parametrize("config,normalise", [
    # SD-VAE: z * 0.18215
    (dict(scaling_factor=0.18215), lambda z: z * 0.18215),
    # SD3 / FLUX: (z - shift) * scale
    (dict(scaling_factor=0.3611, shift_factor=0.1159), lambda z: (z - 0.1159) * 0.3611),
    # per-channel statistics (diffusers' SDXL-style latents_mean / latents_std): (z - mean) * scale / std
    (dict(scaling_factor=0.5, latents_mean=MEAN, latents_std=STD),
     lambda z: (z - torch.tensor(MEAN).view(1, 4, 1, 1)) * 0.5 / torch.tensor(STD).view(1, 4, 1, 1)),
])
def test_diffusers_vae_folder_loads_with_diffusers_normalisation(tmp_path, images, config, normalise):
    vae = tiny_vae(**config)
    vae.save_pretrained(str(tmp_path / "vae"))
    tok = load_tokenizer(tmp_path / "vae")
    assert isinstance(tok, KLTokenizer) and tok.latent_channels == 4 and tok.latent_shape((3, 16, 16)) == (4, 8, 8)
    with torch.no_grad():
        mode = vae.encode(images).latent_dist.mode()
        expected = normalise(mode)
        latents = tok.encode(images)
        assert torch.allclose(latents, expected, atol=1e-6)
        assert torch.equal(tok.encode(images), latents)  # deterministic: the posterior mode
        # decode undoes the normalisation, then the VAE decodes: the inverse written out by hand
        z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
        if "latents_mean" in config:
            raw = z * torch.tensor(STD).view(1, 4, 1, 1) / 0.5 + torch.tensor(MEAN).view(1, 4, 1, 1)
        else:
            raw = z / config["scaling_factor"] + config.get("shift_factor", 0.0)
        assert torch.allclose(tok.decode(z), vae.decode(raw).sample, atol=1e-5)
        assert torch.allclose(normalise(raw), z, atol=1e-5)


def test_encode_can_sample_the_posterior(tmp_path, images):
    vae = tiny_vae(scaling_factor=1.0)
    tok = KLTokenizer(vae)
    with torch.no_grad():
        post = vae.encode(images).latent_dist
        a = tok.encode(images, sample=True, generator=torch.Generator().manual_seed(3))
        b = tok.encode(images, sample=True, generator=torch.Generator().manual_seed(3))
        c = tok.encode(images, sample=True, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    standardised = (a - post.mode()) / post.std  # a posterior draw: mean + std * N(0, 1)
    assert abs(standardised.mean().item()) < 0.2 and abs(standardised.std().item() - 1) < 0.2


def test_genvis_kl_folder_is_a_diffusers_folder(tmp_path, images):
    from diffusers import AutoencoderKL

    tok = KLTokenizer(tiny_vae(scaling_factor=0.3, shift_factor=0.2))
    tok.save_pretrained(tmp_path / "tok")
    assert json.loads((tmp_path / "tok" / "config.json").read_text())["_class_name"] == "AutoencoderKL"
    again = AutoencoderKL.from_pretrained(str(tmp_path / "tok"))  # diffusers reads it as its own
    assert again.config.shift_factor == 0.2
    assert torch.equal(load_tokenizer(tmp_path / "tok").encode(images), tok.encode(images))


def test_pixel_tokenizer_is_the_identity_and_round_trips(tmp_path, images):
    tok = PixelTokenizer()
    assert tok.encode(images) is images and tok.decode(images) is images and tok.latent_shape((3, 16, 16)) == (3, 16, 16)
    tok.save_pretrained(tmp_path / "px")
    assert isinstance(load_tokenizer(tmp_path / "px"), PixelTokenizer)


def test_recorded_tokenizers_embedded_or_by_path(tmp_path, random_dit, images):
    vae_dir = tmp_path / "vae"
    tiny_vae(scaling_factor=0.18215).save_pretrained(str(vae_dir))
    vae = load_tokenizer(vae_dir)
    for name, embed in (("embedded", True), ("by_path", False)):
        folder = tmp_path / name
        random_dit(0).save_pretrained(str(folder))
        record_tokenizer(folder, vae, str(vae_dir), embed=embed)
        assert (folder / "tokenizer").is_dir() == embed and (folder / "tokenizer.json").is_file() == (not embed)
        assert torch.equal(load_tokenizer(folder).encode(images), vae.encode(images))
    # a model folder that records nothing, a recorded path that is gone, a folder that is nothing: one line each
    random_dit(0).save_pretrained(str(tmp_path / "bare"))
    with pytest.raises(GenvisError, match="records no tokenizer.*--tokenizer"):
        load_tokenizer(tmp_path / "bare")
    (tmp_path / "by_path" / "tokenizer.json").write_text(json.dumps({"path": str(tmp_path / "moved")}))
    with pytest.raises(GenvisError, match="is not there"):
        load_tokenizer(tmp_path / "by_path")
    with pytest.raises(GenvisError, match="no config.json"):
        load_tokenizer(tmp_path / "nothing")
    weights = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated
    with pytest.raises(GenvisError, match="cannot load the tokenizer"):
        load_tokenizer(vae_dir)
    weights.unlink()  # no weights at all
    with pytest.raises(GenvisError, match="cannot load the tokenizer") as err:
        load_tokenizer(vae_dir)
    assert "\n" not in str(err.value) and str(vae_dir) in str(err.value)


def test_latent_training_records_its_tokenizer_and_samples_through_it(tmp_path):
    """The diffusion task in a frozen VAE's latent space: 3x16x16 digits -> 4x8x8 latents; the exported model
    embeds the tokenizer, `genvis sample RUN` and a checkpoint decode to 16x16 images with no extra flag."""
    vae_dir = tmp_path / "vae"
    tiny_vae(scaling_factor=0.5).save_pretrained(str(vae_dir))
    run = tmp_path / "run"
    cli_run.train(str(ROOT / "configs" / "digits" / "dit.yaml"), run, f"tokenizer.path={vae_dir}", "data.channels=3",
                  "model.depth=1", "model.hidden_size=32", "model.num_heads=2", "model.patch_size=2", "train.steps=3",
                  "train.batch_size=8", "train.checkpoint_every=2", "train.mixed_precision=fp32", "sample.steps=2")
    config = json.loads((run / "model" / "config.json").read_text())
    assert (config["in_channels"], config["input_size"]) == (4, 8)
    assert json.loads((run / "model" / "tokenizer" / "config.json").read_text())["_class_name"] == "AutoencoderKL"
    # the frozen tokenizer is neither optimised nor checkpointed as trainable state
    ckpt = run / "checkpoints" / "step_0000002"
    assert not (ckpt / "model_1.safetensors").exists() and not (ckpt / "optimizer_1.bin").exists()
    assert sorted(p.name for p in (ckpt / "ema").iterdir()) == ["model"]
    for source in (run, run / "checkpoints" / "step_0000002"):
        out = tmp_path / f"{source.name}.npz"
        code, _, stderr = cli_run.genvis("sample", source, "--num-samples", "2", "--out", out, "--precision", "fp32")
        assert code == 0, stderr[-2000:]
        assert np.load(out)["arr_0"].shape == (2, 16, 16, 3)
