"""`genvis import vae`: LDM-layout KL autoencoders (VA-VAE, MAR kl16, kl-f8) become diffusers AutoencoderKL folders
that compute what the LDM layout computes, with LightningDiT's per-channel latent statistics stored in them.

The official key sets are taming's Encoder / Decoder as built in test_vq_import.py (from the published layouts, not
from genvis's modules) with LDM's Gaussian head: encoder.conv_out makes 2C moments, quant_conv maps them 2C -> 2C,
post_quant_conv C -> C and decoder.conv_in takes C. The reference forward is that file's functional taming forward.
"""
import math

import pytest
import torch

from genvis.cli import main
from genvis.config import load_config
from genvis.errors import GenvisError
from genvis.tokenizers import load_tokenizer
from genvis.tokenizers.kl import KLConfig, KLTokenizer
from genvis.tokenizers.kl_import import convert_ldm_vae
from genvis.io import load_state_strict
from test_vq_import import conv, images, meta_state, official_shapes, one_error_line, random_state, \
    reference_decode, reference_features

C = 4  # latent channels
TINY = dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1)


def ldm_kl_shapes(ch, ch_mult, num_res_blocks, latent=C, attn_levels=None, in_channels=3):
    """Key -> shape of an LDM AutoencoderKL (double_z, embed_dim = z_channels = latent)."""
    shapes = official_shapes("taming", ch, ch_mult, num_res_blocks, z=2 * latent, codebook=(1, 2 * latent),
                             in_channels=in_channels, attn_levels=attn_levels)
    del shapes["quantize.embedding.weight"]
    shapes.update(conv("post_quant_conv", latent, latent, 1))
    shapes.update(conv("decoder.conv_in", ch * ch_mult[-1], latent, 3))
    return shapes


def diffusers_vae(config, **normalisation):
    from diffusers import AutoencoderKL

    return AutoencoderKL(**config, **normalisation)


def reference_mean(sd, x):
    return reference_features(sd, "taming", len(TINY["ch_mult"]), x)[:, :C]


@pytest.mark.parametrize("attn_levels", [(2,), (1,)], ids=["coarsest-level-attention (VA-VAE)", "finer-level-attention"])
def test_converted_vae_computes_what_the_ldm_layout_computes(attn_levels):
    sd = random_state(ldm_kl_shapes(**TINY, attn_levels=attn_levels))
    config, state, dropped = convert_ldm_vae(sd)
    assert config["block_out_channels"] == (32, 64, 64) and config["layers_per_block"] == 1
    assert config["latent_channels"] == C and config["mid_block_add_attention"] and not dropped
    level = attn_levels[0]
    assert [t.startswith("Attn") for t in config["down_block_types"]] == [l == level for l in range(3)]
    assert [t.startswith("Attn") for t in config["up_block_types"]] == [l == level for l in (2, 1, 0)]
    vae = diffusers_vae(config).double().eval()
    load_state_strict(vae, {k: v.double() for k, v in state.items()}, "test", "vae")
    ref = {k: v.double() for k, v in sd.items()}
    x = images().double()
    with torch.no_grad():
        posterior = vae.encode(x).latent_dist
        torch.testing.assert_close(posterior.mean, reference_mean(ref, x), rtol=0, atol=1e-10)
        logvar = reference_features(ref, "taming", 3, x)[:, C:].clamp(-30, 20)
        torch.testing.assert_close(posterior.logvar, logvar, rtol=0, atol=1e-10)
        z = torch.randn(2, C, 4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        torch.testing.assert_close(vae.decode(z).sample, reference_decode(ref, "taming", 3, z), rtol=0, atol=1e-10)


def test_converted_keys_hold_the_source_tensors():
    sd = random_state(ldm_kl_shapes(**TINY, attn_levels=(2,)))
    _, state, _ = convert_ldm_vae(sd)
    assert torch.equal(state["encoder.down_blocks.1.resnets.0.conv_shortcut.weight"], sd["encoder.down.1.block.0.nin_shortcut.weight"])
    assert torch.equal(state["encoder.down_blocks.2.attentions.0.to_q.weight"], sd["encoder.down.2.attn.0.q.weight"][:, :, 0, 0])
    assert torch.equal(state["decoder.up_blocks.0.attentions.1.to_out.0.bias"], sd["decoder.up.2.attn.1.proj_out.bias"])
    assert torch.equal(state["decoder.up_blocks.2.resnets.1.norm2.weight"], sd["decoder.up.0.block.1.norm2.weight"])
    assert torch.equal(state["decoder.up_blocks.0.upsamplers.0.conv.weight"], sd["decoder.up.2.upsample.conv.weight"])
    assert torch.equal(state["encoder.mid_block.attentions.0.group_norm.weight"], sd["encoder.mid.attn_1.norm.weight"])
    assert torch.equal(state["decoder.mid_block.resnets.1.conv1.bias"], sd["decoder.mid.block_2.conv1.bias"])
    assert torch.equal(state["encoder.conv_norm_out.bias"], sd["encoder.norm_out.bias"])
    assert len(state) == len(sd)


def test_vavae_f16d32_official_keys_match_the_imagenet_preset():
    """VA-VAE f16d32 (vavae/configs/f16d32_vfdinov2.yaml): ch 128, ch_mult 1,1,2,2,4, 2 res blocks, attention at
    16x16 (level 4), 32 channels. The import of those keys and the preset configs/imagenet256/vavae-f16d32.yaml
    build the same network, tensor for tensor."""
    shapes = ldm_kl_shapes(128, (1, 1, 2, 2, 4), 2, latent=32, attn_levels=(4,))
    config, state, _ = convert_ldm_vae(meta_state(shapes))
    section = load_config("configs/imagenet256/vavae-f16d32.yaml").tokenizer
    with torch.device("meta"):
        preset = KLTokenizer.from_section(section, (3, 256, 256)).vae
        imported = diffusers_vae(config)
    for model in (preset, imported):
        assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {k: tuple(v.shape) for k, v in state.items()}
    assert sum(p.numel() for p in preset.parameters()) == sum(math.prod(s) for s in shapes.values())


def test_attention_levels_build_ldm_attention_blocks():
    section = KLConfig(block_out_channels=[32, 64], layers_per_block=1, latent_channels=C, attention_levels=[1])
    section.validate()
    tokenizer = KLTokenizer.from_section(section, (1, 8, 8))
    assert tokenizer.vae.config.down_block_types == ("DownEncoderBlock2D", "AttnDownEncoderBlock2D")
    assert tokenizer.vae.config.up_block_types == ("AttnUpDecoderBlock2D", "UpDecoderBlock2D")
    out = tokenizer(torch.zeros(2, 1, 8, 8), noise=torch.zeros(2, C, 4, 4))
    assert out["reconstruction"].shape == (2, 1, 8, 8)
    with pytest.raises(GenvisError, match="tokenizer.attention_levels.*level 3"):
        KLConfig(block_out_channels=[32, 64, 64], attention_levels=[3]).validate()


# ----------------------------------------------------------------------------- the command line

def test_cli_vavae_training_checkpoint_with_latent_stats(tmp_path, capsys):
    """A Lightning checkpoint of VA-VAE (its loss, DINOv2, projection and EMA entries dropped) and LightningDiT's
    latents_stats.pt: the tokenizer's encode is (mean - m) / s, its decode inverts that, as LightningDiT's
    img_latent_dataset.py and inference.py compute."""
    sd = random_state(ldm_kl_shapes(**TINY, attn_levels=(2,)))
    training_only = {"loss.discriminator.main.0.weight": torch.zeros(8, 3, 4, 4), "loss.logvar": torch.zeros(()),
                     "foundation_model.model.cls_token": torch.zeros(1, 1, 16), "linear_proj.weight": torch.zeros(16, C, 1, 1),
                     "model_ema.decay": torch.tensor(0.999)}
    torch.save({"state_dict": {**sd, **training_only}, "global_step": 5}, tmp_path / "vavae.ckpt")
    g = torch.Generator().manual_seed(7)
    m, s = torch.randn(1, C, 1, 1, generator=g), torch.rand(1, C, 1, 1, generator=g) + 0.5
    torch.save({"mean": m, "std": s}, tmp_path / "latents_stats.pt")
    out = tmp_path / "vavae"
    assert main(["import", "vae", str(tmp_path / "vavae.ckpt"), str(out), "--stats", str(tmp_path / "latents_stats.pt")]) == 0
    printed = capsys.readouterr().out
    assert "attention at levels [2] and the middle" in printed and "dropped 5 training-only keys" in printed
    tokenizer = load_tokenizer(out)
    assert isinstance(tokenizer, KLTokenizer) and tokenizer.latent_channels == C and tokenizer.downsample == 4
    x = images()
    ref = {k: v.double() for k, v in sd.items()}
    with torch.no_grad():
        expected = (reference_mean(ref, x.double()) - m.double()) / s.double()
        torch.testing.assert_close(tokenizer.encode(x).double(), expected, rtol=0, atol=1e-4)
        latents = torch.randn(2, C, 4, 4, generator=g)
        raw = latents.double() * s.double() + m.double()
        torch.testing.assert_close(tokenizer.decode(latents).double(), reference_decode(ref, "taming", 3, raw), rtol=0, atol=1e-4)
    # a LightningDiT-style model on its 4 x 4 latents samples 16 x 16 images through it
    from genvis.models.dit import DiT

    DiT(input_size=4, patch_size=1, in_channels=C, hidden_size=64, depth=1, num_heads=4, num_classes=10, learn_sigma=False,
        prediction_type="velocity", schedule="sit", norm="rmsnorm", ffn="swiglu", rope=True).save_pretrained(tmp_path / "ld")
    assert main(["sample", str(tmp_path / "ld"), "--tokenizer", str(out), "--out", str(tmp_path / "s.npz"),
                 "--num-samples", "2", "--sampler", "euler", "--steps", "2", "--precision", "fp32"]) == 0
    import numpy as np

    samples = np.load(tmp_path / "s.npz")["arr_0"]
    assert samples.shape == (2, 16, 16, 3) and samples.dtype == np.uint8


def test_cli_bad_inputs_are_one_line(tmp_path, capsys):
    sd = random_state(ldm_kl_shapes(**TINY, attn_levels=(2,)))
    out = tmp_path / "out"

    def run(state, *options):
        torch.save(state, tmp_path / "ckpt.pt")
        code = main(["import", "vae", str(tmp_path / "ckpt.pt"), str(out), *options])
        return code, one_error_line(capsys)

    code, line = run({**sd, "encoder.extra.weight": torch.zeros(3)})
    assert code == 2 and "unexpected encoder.extra.weight" in line
    code, line = run({k: v for k, v in sd.items() if k != "decoder.up.1.block.0.conv2.bias"})
    assert code == 2 and "missing decoder.up_blocks.1.resnets.0.conv2.bias" in line
    code, line = run({k: v for k, v in sd.items() if not k.startswith("post_quant_conv")})
    assert code == 2 and "missing key post_quant_conv.weight" in line
    code, line = run({k: v for k, v in sd.items() if not k.startswith("decoder.mid.attn_1")})
    assert code == 2 and "encoder has middle attention" in line
    torch.save({"mean": torch.zeros(1, 8, 1, 1), "std": torch.ones(1, 8, 1, 1)}, tmp_path / "stats.pt")
    code, line = run(sd, "--stats", str(tmp_path / "stats.pt"))
    assert code == 2 and "'mean' is [1, 8, 1, 1]" in line and f"{C} latent channels" in line
    torch.save({"mean": torch.zeros(1, C, 1, 1)}, tmp_path / "stats.pt")
    code, line = run(sd, "--stats", str(tmp_path / "stats.pt"))
    assert code == 2 and "'mean' and 'std'" in line
    code, line = run(sd, "--scaling-factor", "0")
    assert code == 2 and "--scaling-factor 0" in line
    assert not out.exists()
