"""TiTok tokenizer: the contract (ids [B, K] / continuous tokens [B, C, 1, K], [-1, 1] images), folders, the
training pass, the measured normalisation of continuous tokens, and one-line errors. The official-layout
equivalence is in test_titok_import.py."""
import pytest
import torch

from genvis.errors import ConfigError, GenvisError
from genvis.tokenizers import load_tokenizer
from genvis.tokenizers.titok import TiTokConfig, TiTokTokenizer

TINY = dict(image_size=16, in_channels=1, patch_size=4, decoder_patch_size=4, num_latent_tokens=6, encoder_width=32,
            encoder_depth=1, encoder_heads=2, decoder_width=32, decoder_depth=1, decoder_heads=2, codebook_size=16,
            token_size=4)


def images(n=3, seed=0):
    return torch.rand(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_vq_ids_decode_and_folder_round_trip(tmp_path):
    torch.manual_seed(0)
    tok = TiTokTokenizer(**TINY).eval()
    ids = tok.encode(images())
    assert ids.shape == (3, 6) and ids.dtype == torch.int64 and tok.kind == "discrete" and tok.num_tokens == 6
    # the ids are the nearest unit-norm codes of the encoder's unit-normalised outputs (TiTok's lookup)
    z = torch.nn.functional.normalize(tok.features(images()).squeeze(2).transpose(1, 2), dim=-1)  # [B, K, D]
    codes = torch.nn.functional.normalize(tok.quantize.embedding.weight, dim=-1)
    assert torch.equal(ids, torch.cdist(z, codes[None].expand(3, -1, -1)).argmin(-1))
    out = tok.decode(ids)
    assert out.shape == (3, 1, 16, 16)
    assert torch.equal(tok.decode(ids[:, None]), out)  # the official [B, 1, K] layout too
    # decode = the decoder on the unit codes, mapped from the official [0, 1] to [-1, 1]
    expected = tok.decoder(codes[ids].transpose(1, 2).unsqueeze(2)) * 2 - 1
    torch.testing.assert_close(out, expected)
    tok.save_pretrained(tmp_path / "tok")
    again = load_tokenizer(tmp_path / "tok")
    assert isinstance(again, TiTokTokenizer) and torch.equal(again.encode(images()), ids)
    torch.testing.assert_close(again.decode(ids), out)


def test_training_pass_reports_quantizer_terms_and_gradients_reach_the_encoder():
    torch.manual_seed(0)
    tok = TiTokTokenizer(**TINY, restart_threshold=0.5)
    out = tok(images(), keys=torch.rand(3, 6))
    assert out["reconstruction"].shape == (3, 1, 16, 16) and out["ids"].shape == (3, 6)
    for key in ("quantizer_loss", "log/usage", "log/perplexity", "log/commitment"):
        assert torch.isfinite(out[key])
    (out["reconstruction"].square().mean() + out["quantizer_loss"]).backward()
    assert tok.encoder.patch_embed.weight.grad.abs().sum() > 0 and tok.latent_tokens.grad.abs().sum() > 0
    assert tok.quantize.embedding.weight.grad.abs().sum() > 0  # the codebook term


def test_vae_tokens_kl_and_measured_normalisation(tmp_path):
    torch.manual_seed(0)
    tok = TiTokTokenizer(**{**TINY, "token_size": 3}, quantize_mode="vae").eval()
    assert tok.kind == "continuous" and tok.latent_shape((1, 16, 16)) == (3, 1, 6)
    x = images(8)
    raw = tok.encode(x)
    mean, logvar = tok.features(x).chunk(2, dim=1)
    torch.testing.assert_close(raw, mean)  # the posterior mean, before any normalisation is measured
    kl = tok(x)["kl"]
    expected = 0.5 * (mean.square() + logvar.clamp(-30, 20).exp() - 1 - logvar.clamp(-30, 20)).sum(dim=(1, 2, 3)).mean()
    torch.testing.assert_close(kl, expected)
    stored = tok.measure_normalisation([x[:5], x[5:]])
    z = tok.encode(x)
    torch.testing.assert_close(z.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.var(dim=(0, 2, 3), unbiased=False), torch.ones(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(stored["latents_mean"], raw.mean(dim=(0, 2, 3)).tolist())
    torch.testing.assert_close(tok.decode(z), tok.reconstruct(raw))  # decode undoes the normalisation
    tok.save_pretrained(tmp_path / "vae")
    torch.testing.assert_close(load_tokenizer(tmp_path / "vae").encode(x), z)


def test_legacy_latents_read_ln_post_without_transposing():
    torch.manual_seed(0)
    tok = TiTokTokenizer(**TINY, legacy_latents=True).eval()
    enc = tok.encoder
    x = (images() + 1) / 2
    h = enc.patch_embed(x).flatten(2).transpose(1, 2)
    h = torch.cat([enc.class_embedding.expand(3, -1, -1), h], 1) + enc.positional_embedding
    h = torch.cat([h, (tok.latent_tokens + enc.latent_token_positional_embedding).expand(3, -1, -1)], 1)
    h = enc.ln_pre(h)
    for block in enc.transformer:
        h = block(h)
    post = enc.ln_post(h[:, 17:])  # [B, K, W]
    expected = enc.conv_out(post.reshape(3, 32, 6, 1)).reshape(3, 4, 1, 6)  # the official is_legacy reshape
    torch.testing.assert_close(tok.features(images()), expected)


def test_bad_input_is_one_line():
    tok = TiTokTokenizer(**TINY)
    with pytest.raises(GenvisError, match=r"this TiTok decodes \[B, 6\]"):
        tok.decode(torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(GenvisError, match="outside the vocabulary"):
        tok.decode(torch.full((2, 6), 16))
    with pytest.raises(ConfigError, match="key 'tokenizer.encoder_size'"):
        TiTokConfig(arch="titok", encoder_size="huge").validate()
    with pytest.raises(ConfigError, match="key 'tokenizer.decoder_heads'"):
        TiTokConfig(arch="titok", decoder_width=30, decoder_heads=4).validate()
    with pytest.raises(ConfigError, match="key 'tokenizer.patch_size': 5 does not divide the image size 16"):
        TiTokTokenizer.from_section(TiTokConfig(arch="titok", patch_size=5), (1, 16, 16))
