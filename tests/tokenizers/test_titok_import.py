"""`genvis import titok`: official TiTok checkpoints (bytedance/1d-tokenizer) become genvis TiTok folders that give
the official ids and reconstructions.

The official key sets are built here from the published layout (modeling/titok.py, modules/blocks.py,
modules/maskgit_vqgan.py, REFERENCE.md), not from genvis's modules, and a plain functional forward written here
from the official formulas is the reference: nn.MultiheadAttention's packed q;k;v (F.multi_head_attention_forward
on [L, N, W]), LayerNorm eps 1e-5, exact GELU, the legacy encoder reshape, the l2-normalised argmin, the
MaskGIT-VQGAN resnet block whose nin_shortcut takes the block's output, and [0, 1] images.
"""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from cli_run import genvis
from genvis.cli import main
from genvis.errors import GenvisError
from genvis.tokenizers import load_tokenizer
from genvis.tokenizers.titok import TiTokTokenizer
from genvis.tokenizers.titok_import import convert_titok, load_titok, read_official_config
from genvis.tokenizers.vq_import import Converted, check_state

TINY = dict(enc=(64, 2), dec=(48, 2), image=32, patch=8, tokens=6, codebook=(32, 12))
HEADS = dict(encoder_heads=4, decoder_heads=4)
PIXEL_DECODER = dict(ch=128, ch_mult=(1, 1, 2, 2, 4), res_blocks=2, z=256, codes=1024)  # fixed in official TiTok


# ----------------------------------------------------------------------------- official key sets (shapes)

def _ln(prefix, w):
    return {f"{prefix}.weight": (w,), f"{prefix}.bias": (w,)}


def _vit(side, width, depth, tokens, grid):
    s = {f"{side}.class_embedding": (1, width), f"{side}.positional_embedding": (grid * grid + 1, width),
         f"{side}.latent_token_positional_embedding": (tokens, width), **_ln(f"{side}.ln_pre", width),
         **_ln(f"{side}.ln_post", width)}
    for i in range(depth):
        p = f"{side}.transformer.{i}"
        s.update({**_ln(f"{p}.ln_1", width), f"{p}.attn.in_proj_weight": (3 * width, width),
                  f"{p}.attn.in_proj_bias": (3 * width,), f"{p}.attn.out_proj.weight": (width, width),
                  f"{p}.attn.out_proj.bias": (width,), **_ln(f"{p}.ln_2", width),
                  f"{p}.mlp.c_fc.weight": (4 * width, width), f"{p}.mlp.c_fc.bias": (4 * width,),
                  f"{p}.mlp.c_proj.weight": (width, 4 * width), f"{p}.mlp.c_proj.bias": (width,)})
    return s


def _conv(prefix, cout, cin, k, bias=True):
    return {f"{prefix}.weight": (cout, cin, k, k), **({f"{prefix}.bias": (cout,)} if bias else {})}


def _pixel_decoder(ch, ch_mult, res_blocks, z, codes, **_):
    """MaskGIT-VQGAN's Decoder + its VectorQuantizer (bias-free resnet convs; nin_shortcut out -> out)."""
    widths = [ch * m for m in ch_mult]
    s = {"pixel_quantize.embedding.weight": (codes, z), **_conv("pixel_decoder.conv_in", widths[-1], z, 3)}

    def resnet(p, cin, cout):
        r = {**_ln(f"{p}.norm1", cin), **_conv(f"{p}.conv1", cout, cin, 3, False), **_ln(f"{p}.norm2", cout),
             **_conv(f"{p}.conv2", cout, cout, 3, False)}
        return {**r, **_conv(f"{p}.nin_shortcut", cout, cout, 1, False)} if cin != cout else r

    for j in range(res_blocks):
        s.update(resnet(f"pixel_decoder.mid.{j}", widths[-1], widths[-1]))
    for i in range(len(widths)):
        cin = widths[min(i + 1, len(widths) - 1)]
        for j in range(res_blocks):
            s.update(resnet(f"pixel_decoder.up.{i}.block.{j}", cin if j == 0 else widths[i], widths[i]))
        if i != 0:
            s.update(_conv(f"pixel_decoder.up.{i}.upsample_conv", widths[i], widths[i], 3))
    return {**s, **_ln("pixel_decoder.norm_out", widths[0]), **_conv("pixel_decoder.conv_out", 3, widths[0], 3)}


def official_shapes(path, enc, dec, image, patch, tokens, codebook, vae_channels=8, dec_patch=None):
    """Key -> shape of an official TiTok state dict. path: "pixels" (single-stage vq), "proxy" (the released
    two-stage vq: ffn to 1024 proxy logits + the MaskGIT-VQGAN pixel decoder), "stage1" (proxy without the pixel
    decoder) or "vae" (single-stage, encoder.conv_out makes 2 x vae_channels)."""
    (we, de), (wd, dd) = enc, dec
    dim = vae_channels if path == "vae" else codebook[1]
    dec_patch = dec_patch or (16 if path in ("proxy", "stage1") else patch)
    s = {"latent_tokens": (tokens, we), **_conv("encoder.patch_embed", we, 3, patch)}
    s.update(_vit("encoder", we, de, tokens, image // patch))
    s.update(_conv("encoder.conv_out", 2 * dim if path == "vae" else dim, we, 1))
    if path != "vae":
        s["quantize.embedding.weight"] = codebook
    s.update({"decoder.decoder_embed.weight": (wd, dim), "decoder.decoder_embed.bias": (wd,),
              "decoder.mask_token": (1, 1, wd)})
    s.update(_vit("decoder", wd, dd, tokens, image // dec_patch))
    if path in ("proxy", "stage1"):
        s.update({**_conv("decoder.ffn.0", 2 * wd, wd, 1), **_conv("decoder.ffn.2", PIXEL_DECODER["codes"], 2 * wd, 1)})
        if path == "proxy":
            s.update(_pixel_decoder(**PIXEL_DECODER))
    else:
        s.update({**_conv("decoder.ffn.0", dec_patch * dec_patch * 3, wd, 1), **_conv("decoder.conv_out", 3, 3, 3)})
    return s


EMBEDDINGS = ("class_embedding", "positional_embedding", "latent_token_positional_embedding", "latent_tokens", "mask_token")


def random_state(shapes, seed=0):
    """Seeded values of a useful scale: norms near 1, weights ~ 1/sqrt(fan-in), with a strong patch embedding,
    sharp attention and small position embeddings so that the ids depend on the image, and a pixel decoder whose
    output has the scale of images."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        x = torch.randn(shape, generator=g)
        module, leaf = (["", *key.split(".")])[-2:]
        if leaf.endswith("bias"):
            x = 0.1 * x
        elif module.startswith(("ln_", "norm")):
            x = 1 + 0.1 * x
        elif leaf in EMBEDDINGS:
            x = 0.2 * x
        elif module == "embedding":  # codebooks
            x = 0.5 * x
        else:
            gain = {"encoder.patch_embed.weight": 4.0, "pixel_decoder.conv_out.weight": 0.2}.get(key, 1.0)
            gain = 2.0 if leaf == "in_proj_weight" else gain
            x = gain * x / math.sqrt(math.prod(shape[1:]))
        state[key] = x
    return state


def tiny_state(path, seed=0, **overrides):
    return random_state(official_shapes(path, **{**TINY, **overrides}), seed)


# ----------------------------------------------------------------------------- an independent functional forward

def _layer_norm(sd, p, x):
    return F.layer_norm(x, x.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], eps=1e-5)


def _transformer(sd, side, x, heads):
    """x [L, N, W] (nn.MultiheadAttention's sequence-first layout) through every {side}.transformer block."""
    width, i = x.shape[-1], 0
    while f"{side}.transformer.{i}.ln_1.weight" in sd:
        p = f"{side}.transformer.{i}"
        h = _layer_norm(sd, p + ".ln_1", x)
        attn = F.multi_head_attention_forward(
            h, h, h, width, heads, sd[p + ".attn.in_proj_weight"], sd[p + ".attn.in_proj_bias"], None, None, False, 0.0,
            sd[p + ".attn.out_proj.weight"], sd[p + ".attn.out_proj.bias"], training=False, need_weights=False)[0]
        x = x + attn
        h = _layer_norm(sd, p + ".ln_2", x)
        h = F.linear(F.gelu(F.linear(h, sd[p + ".mlp.c_fc.weight"], sd[p + ".mlp.c_fc.bias"])),
                     sd[p + ".mlp.c_proj.weight"], sd[p + ".mlp.c_proj.bias"])
        x, i = x + h, i + 1
    return x


def reference_encoder(sd, x01, heads, legacy):
    """Official TiTokEncoder: [0, 1] images -> z [B, C, 1, K]."""
    b = x01.shape[0]
    w, p = sd["encoder.patch_embed.weight"].shape[0], sd["encoder.patch_embed.weight"].shape[-1]
    k = sd["latent_tokens"].shape[0]
    x = F.conv2d(x01, sd["encoder.patch_embed.weight"], sd["encoder.patch_embed.bias"], stride=p)
    grid2 = x.shape[2] * x.shape[3]
    x = x.reshape(b, w, grid2).permute(0, 2, 1)
    x = torch.cat([sd["encoder.class_embedding"].expand(b, 1, w), x], dim=1) + sd["encoder.positional_embedding"]
    latents = (sd["latent_tokens"] + sd["encoder.latent_token_positional_embedding"]).expand(b, k, w)
    x = _layer_norm(sd, "encoder.ln_pre", torch.cat([x, latents], dim=1))
    x = _transformer(sd, "encoder", x.permute(1, 0, 2), heads).permute(1, 0, 2)
    z = _layer_norm(sd, "encoder.ln_post", x[:, 1 + grid2:])  # [B, K, W]
    z = z.reshape(b, w, k, 1) if legacy else z.reshape(b, k, w, 1).permute(0, 2, 1, 3)  # legacy: no transpose
    z = F.conv2d(z, sd["encoder.conv_out.weight"], sd["encoder.conv_out.bias"])
    return z.reshape(b, -1, 1, k)


def reference_ids(z, codebook, l2_norm):
    """Official VectorQuantizer: argmin ||z||^2 + ||e||^2 - 2 z.e over (l2-normalised) rows -> [B, K]."""
    b, d, _, k = z.shape
    flat = z.permute(0, 2, 3, 1).reshape(-1, d)
    if l2_norm:
        flat, codebook = F.normalize(flat, dim=-1), F.normalize(codebook, dim=-1)
    dist = flat.square().sum(1, keepdim=True) + codebook.square().sum(1) - 2 * torch.einsum("bd,dn->bn", flat, codebook.T)
    return dist.argmin(dim=1).view(b, k)


def reference_lookup(ids, codebook, l2_norm):
    """Official decode_tokens' get_codebook_entry: ids [B, K] -> [B, D, 1, K]."""
    codes = codebook[ids]
    codes = F.normalize(codes, dim=-1) if l2_norm else codes
    return codes.unsqueeze(1).permute(0, 3, 1, 2)


def _resnet(sd, p, x):
    h = F.conv2d(F.silu(F.group_norm(x, 32, sd[p + ".norm1.weight"], sd[p + ".norm1.bias"], eps=1e-6)),
                 sd[p + ".conv1.weight"], padding=1)
    h = F.conv2d(F.silu(F.group_norm(h, 32, sd[p + ".norm2.weight"], sd[p + ".norm2.bias"], eps=1e-6)),
                 sd[p + ".conv2.weight"], padding=1)
    residual = F.conv2d(h, sd[p + ".nin_shortcut.weight"]) if p + ".nin_shortcut.weight" in sd else x  # of the OUTPUT
    return h + residual


def reference_pixel_decoder(sd, codes):
    h = F.conv2d(codes, sd["pixel_decoder.conv_in.weight"], sd["pixel_decoder.conv_in.bias"], padding=1)
    j = 0
    while f"pixel_decoder.mid.{j}.conv1.weight" in sd:
        h, j = _resnet(sd, f"pixel_decoder.mid.{j}", h), j + 1
    levels = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("pixel_decoder.up."))
    for i in reversed(range(levels)):
        j = 0
        while f"pixel_decoder.up.{i}.block.{j}.conv1.weight" in sd:
            h, j = _resnet(sd, f"pixel_decoder.up.{i}.block.{j}", h), j + 1
        if i != 0:
            h = F.conv2d(F.interpolate(h, scale_factor=2.0, mode="nearest"), sd[f"pixel_decoder.up.{i}.upsample_conv.weight"],
                         sd[f"pixel_decoder.up.{i}.upsample_conv.bias"], padding=1)
    h = F.silu(F.group_norm(h, 32, sd["pixel_decoder.norm_out.weight"], sd["pixel_decoder.norm_out.bias"], eps=1e-6))
    return F.conv2d(h, sd["pixel_decoder.conv_out.weight"], sd["pixel_decoder.conv_out.bias"], padding=1)


def reference_decoder(sd, z, heads):
    """Official TiTokDecoder (+ the two-stage softmax @ pixel codebook -> pixel decoder): z [B, C, 1, K] -> [0, 1]
    images."""
    b, c, _, k = z.shape
    w = sd["decoder.positional_embedding"].shape[1]
    grid = math.isqrt(sd["decoder.positional_embedding"].shape[0] - 1)
    x = F.linear(z.reshape(b, c, k).permute(0, 2, 1), sd["decoder.decoder_embed.weight"], sd["decoder.decoder_embed.bias"])
    masks = torch.cat([sd["decoder.class_embedding"].expand(b, 1, w), sd["decoder.mask_token"].expand(b, grid * grid, w)], dim=1)
    masks = masks + sd["decoder.positional_embedding"]
    x = x + sd["decoder.latent_token_positional_embedding"][:k]
    x = _layer_norm(sd, "decoder.ln_pre", torch.cat([masks, x], dim=1))
    x = _transformer(sd, "decoder", x.permute(1, 0, 2), heads).permute(1, 0, 2)
    x = _layer_norm(sd, "decoder.ln_post", x[:, 1:1 + grid * grid])
    x = x.permute(0, 2, 1).reshape(b, w, grid, grid)
    x = F.conv2d(x, sd["decoder.ffn.0.weight"], sd["decoder.ffn.0.bias"])
    if "decoder.ffn.2.weight" in sd:  # two-stage: proxy-code logits, softmax (not argmax) against the pixel codebook
        logits = F.conv2d(torch.tanh(x), sd["decoder.ffn.2.weight"], sd["decoder.ffn.2.bias"])
        codes = torch.einsum("nchw,cd->ndhw", logits.softmax(1), sd["pixel_quantize.embedding.weight"])
        return reference_pixel_decoder(sd, codes)
    p = math.isqrt(x.shape[1] // 3)
    x = x.reshape(b, p, p, 3, grid, grid).permute(0, 3, 4, 1, 5, 2).reshape(b, 3, grid * p, grid * p)  # (p1 p2 c) h w
    return F.conv2d(x, sd["decoder.conv_out.weight"], sd["decoder.conv_out.bias"], padding=1)


def double(sd):
    return {k: v.double() for k, v in sd.items()}


def images(n=2, side=32, seed=1):
    return torch.rand(n, 3, side, side, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def official_vq(sd, x, heads=4, legacy=False, l2_norm=True):
    """(ids [B, K], decode_tokens(ids) mapped to [-1, 1]) of the official model on genvis images x in [-1, 1]."""
    ref = double(sd)
    z = reference_encoder(ref, (x.double() + 1) / 2, heads, legacy)
    codebook = ref["quantize.embedding.weight"]
    ids = reference_ids(z, codebook, l2_norm)
    return ids, reference_decoder(ref, reference_lookup(ids, codebook, l2_norm), heads) * 2 - 1


def imported(sd, config=None, **options):
    kwargs, state = convert_titok(sd, config, **{**HEADS, **options})
    model = TiTokTokenizer(**kwargs).eval()
    load_titok(model, state)
    return model, kwargs


# ----------------------------------------------------------------------------- numerics per decoder path

def test_single_stage_vq_gives_the_official_ids_and_reconstructions():
    sd = tiny_state("pixels")
    model, kwargs = imported(sd)
    assert kwargs == dict(image_size=32, in_channels=3, patch_size=8, num_latent_tokens=6, encoder_width=64,
                          encoder_depth=2, encoder_heads=4, decoder_width=48, decoder_depth=2, decoder_heads=4,
                          decoder_patch_size=8, mlp_ratio=4.0, quantize_mode="vq", token_size=12, decoder_head="pixels",
                          legacy_latents=False, codebook_size=32, l2_norm=True)
    x = images()
    ids, expected = official_vq(sd, x)
    got = model.encode(x)
    assert got.shape == (2, 6) and got.dtype == torch.int64
    assert torch.equal(got, ids) and ids.unique().numel() > 3 and not torch.equal(ids[0], ids[1])
    torch.testing.assert_close(model.decode(ids).double(), expected, rtol=0, atol=1e-4)
    torch.testing.assert_close(model.decode(ids[:, None]).double(), expected, rtol=0, atol=1e-4)  # official [B, 1, K]
    assert torch.equal(model.quantize.usage, torch.full((32,), 1 / 32))  # genvis's statistic keeps its initial value


def test_two_stage_vq_gives_the_official_ids_and_reconstructions():
    """The released L-32 / B-64 / S-128 path: legacy latents, 1024 proxy logits per cell softmaxed against the pixel
    codebook, the official MaskGIT-VQGAN decoder (its fixed size: a 2x2 decoder grid makes 32x32 images)."""
    sd = tiny_state("proxy")
    model, kwargs = imported(sd)
    assert (kwargs["decoder_head"], kwargs["legacy_latents"], kwargs["decoder_patch_size"]) == ("proxy", True, 16)
    assert (kwargs["proxy_codebook_size"], kwargs["proxy_codebook_dim"], kwargs["image_size"]) == (1024, 256, 32)
    x = images()
    ids, expected = official_vq(sd, x, legacy=True)
    assert torch.equal(model.encode(x), ids) and ids.unique().numel() > 3 and not torch.equal(ids[0], ids[1])
    # the legacy reshape matters: the fixed reading gives other ids
    ref = double(sd)
    fixed = reference_encoder(ref, (x.double() + 1) / 2, 4, legacy=False)
    assert not torch.equal(ids, reference_ids(fixed, ref["quantize.embedding.weight"], True))
    out = model.decode(ids)
    assert out.shape == (2, 3, 32, 32)
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-4)


def test_vae_gives_the_official_posterior_mean_and_reconstructions():
    sd = tiny_state("vae")
    model, kwargs = imported(sd)
    assert (kwargs["quantize_mode"], kwargs["token_size"], kwargs["decoder_head"]) == ("vae", 8, "pixels")
    assert "codebook_size" not in kwargs and "l2_norm" not in kwargs and model.kind == "continuous"
    ref = double(sd)
    x = images()
    mean = reference_encoder(ref, (x.double() + 1) / 2, 4, legacy=False)[:, :8]  # chunk(2, dim=1): mean; logvar
    latents = model.encode(x)
    assert latents.shape == (2, 8, 1, 6)
    torch.testing.assert_close(latents.double(), mean, rtol=0, atol=1e-5)
    torch.testing.assert_close(model.decode(mean.float()).double(), reference_decoder(ref, mean, 4) * 2 - 1,
                               rtol=0, atol=1e-4)


# ----------------------------------------------------------------------------- the command line, a Hugging Face folder

def official_config(**vq_model):
    """The official OmegaConf config of the tiny pixels model, as TiTok's _save_pretrained writes it."""
    vq = dict(codebook_size=32, token_size=12, use_l2_norm=True, commitment_cost=0.25, vit_enc_patch_size=8,
              vit_dec_patch_size=8, num_latent_tokens=6, finetune_decoder=False, is_legacy=False)
    vq.update(vq_model)
    return {"experiment": {"tokenizer_checkpoint": "tokenizer.bin"}, "model": {"vq_model": {k: v for k, v in vq.items()
                                                                                             if v is not None}},
            "dataset": {"preprocessing": {"crop_size": 32}}}


def one_error_line(capsys):
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    return lines[0]


def test_cli_imports_a_hugging_face_folder(tmp_path):
    sd = tiny_state("pixels", seed=3, codebook=(32, 16))  # 16-dim codes: the config's use_l2_norm True must win
    folder = tmp_path / "tokenizer_titok_tiny"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(official_config(token_size=16), indent=4))
    save_file(sd, str(folder / "model.safetensors"))
    out = tmp_path / "titok"
    code, stdout, stderr = genvis("import", "titok", folder, out, "--encoder-heads", "4", "--decoder-heads", "4")
    assert code == 0, stderr[-3000:]
    line = stdout.strip()
    assert "\n" not in line and "6 tokens" in line and "codebook 32 x 16 l2-normalised" in line
    assert "single-stage ViT decoder -> pixels" in line and "M parameters" in line and str(out) in line
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())

    tokenizer = load_tokenizer(out)
    assert isinstance(tokenizer, TiTokTokenizer) and tokenizer.config.l2_norm is True
    assert tokenizer.num_tokens == 6 and tokenizer.vocab_size == 32 and tokenizer.kind == "discrete"
    x = images(seed=5)
    ids, expected = official_vq(sd, x)
    assert torch.equal(tokenizer.encode(x), ids)
    torch.testing.assert_close(tokenizer.decode(ids).double(), expected, rtol=0, atol=1e-4)
    state = tokenizer.state_dict()
    assert set(state) - set(sd) == {"quantize.usage"}
    assert all(torch.equal(state[k], v) for k, v in sd.items())


def test_cli_bad_input_is_one_line(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["import", "titok", str(tmp_path / "missing.bin"), str(out)]) == 2
    assert "missing.bin: not found" in one_error_line(capsys)
    ckpt = tmp_path / "stage1.bin"
    torch.save(tiny_state("stage1"), ckpt)
    assert main(["import", "titok", str(ckpt), str(out), "--encoder-heads", "4", "--decoder-heads", "4"]) == 2
    line = one_error_line(capsys)
    assert str(ckpt) in line and "no pixel decoder" in line
    torch.save(tiny_state("pixels"), ckpt)
    assert main(["import", "titok", str(ckpt), str(out)]) == 2  # a width outside the official table, no heads given
    assert "encoder width 64 is not an official TiTok size" in one_error_line(capsys)
    assert not out.exists()


# ----------------------------------------------------------------------------- refusals

@pytest.mark.parametrize("key,value,needle", [
    ("codebook_size", 64, "model.vq_model.codebook_size is 64 but the weights have 32"),
    ("token_size", 8, "model.vq_model.token_size is 8 but the weights have 12"),
    ("num_latent_tokens", 32, "model.vq_model.num_latent_tokens is 32 but the weights have 6"),
    ("vit_enc_patch_size", 16, "model.vq_model.vit_enc_patch_size is 16 but the weights have 8"),
    ("vit_dec_patch_size", 16, "model.vq_model.vit_dec_patch_size is 16 but the weights have 8"),
    ("quantize_mode", "vae", "model.vq_model.quantize_mode is 'vae' but the weights have 'vq'"),
    ("is_legacy", True, "model.vq_model.is_legacy is True but the weights have False"),
    ("is_legacy", None, "model.vq_model.is_legacy is True (unset: TiTok's default) but the weights have False"),
    ("finetune_decoder", True, "model.vq_model.finetune_decoder is True but the weights have False"),
    ("vit_enc_model_size", "large", "vit_enc_model_size is 'large' (width 1024, 24 blocks) but the weights have width 64"),
    ("crop_size", 256, "dataset.preprocessing.crop_size is 256 but the weights have 32"),
])
def test_config_and_weights_disagreeing_names_the_key(key, value, needle):
    config = official_config() if key == "crop_size" else official_config(**{key: value})
    if key == "crop_size":
        config["dataset"]["preprocessing"]["crop_size"] = value
    with pytest.raises(GenvisError, match="^checkpoint: .*" + needle.replace("(", r"\(").replace(")", r"\)")):
        convert_titok(tiny_state("pixels"), config, **HEADS)


def test_config_file_yaml_and_the_l2_rule(tmp_path):
    sd = tiny_state("pixels")
    assert convert_titok(sd, official_config(), **HEADS)[0]["l2_norm"] is True
    assert convert_titok(sd, official_config(use_l2_norm=False), **HEADS)[0]["l2_norm"] is False
    with pytest.raises(GenvisError, match=r"--no-l2-norm disagrees with config model.vq_model.use_l2_norm True"):
        convert_titok(sd, official_config(), l2_norm=False, **HEADS)
    # no config: the released models' rule (12-dim codes are l2-normalised, 64-dim vq8k codes are not), or the flag
    assert convert_titok(sd, **HEADS)[0]["l2_norm"] is True
    assert convert_titok(sd, l2_norm=False, **HEADS)[0]["l2_norm"] is False
    assert convert_titok(tiny_state("pixels", codebook=(32, 16)), **HEADS)[0]["l2_norm"] is False
    # an official YAML (interpolations resolved) reads like its JSON
    yaml_file = tmp_path / "titok_tiny.yaml"
    yaml_file.write_text("model:\n  vq_model:\n    codebook_size: 32\n    token_size: 12\n    use_l2_norm: False\n"
                         "    num_latent_tokens: 6\n    finetune_decoder: False\n    is_legacy: False\n"
                         "  generator:\n    image_seq_len: ${model.vq_model.num_latent_tokens}\n"
                         "dataset:\n  preprocessing:\n    crop_size: 32\n")
    config = read_official_config(yaml_file)
    assert config["model"]["generator"]["image_seq_len"] == 6
    assert convert_titok(sd, config, **HEADS)[0]["l2_norm"] is False
    (tmp_path / "other.yaml").write_text("model:\n  generator: {}\n")
    with pytest.raises(GenvisError, match=r"other.yaml: not an official TiTok config \(no model.vq_model section\)"):
        read_official_config(tmp_path / "other.yaml")


def test_stage1_checkpoint_is_refused():
    with pytest.raises(GenvisError, match=r"^checkpoint: a stage-1 TiTok checkpoint .* has no pixel decoder"):
        convert_titok(tiny_state("stage1"), **HEADS)


def test_unknown_and_missing_keys_are_named():
    sd = tiny_state("pixels")
    model = TiTokTokenizer(**convert_titok(sd, **HEADS)[0])
    extra = {**sd, "encoder.extra_embedding": torch.zeros(4)}
    with pytest.raises(GenvisError, match=r"keys do not match the titok layout .*unexpected encoder.extra_embedding"):
        load_titok(model, convert_titok(extra, **HEADS)[1])
    missing = {k: v for k, v in sd.items() if k != "decoder.ln_post.bias"}
    with pytest.raises(GenvisError, match=r"missing decoder.ln_post.bias"):
        load_titok(model, convert_titok(missing, **HEADS)[1])
    bad = {**sd, "encoder.transformer.1.mlp.c_fc.bias": torch.zeros(7)}
    with pytest.raises(GenvisError, match=r"encoder.transformer.1.mlp.c_fc.bias has shape \[7\]"):
        load_titok(model, convert_titok(bad, **HEADS)[1])


# ----------------------------------------------------------------------------- real sizes, on the meta device

def test_released_titok_l32_maps_onto_genvis():
    """TiTok-L-32 (configs/infer/TiTok/titok_l32.yaml): large / large, 16x16 patches, 32 tokens, 4096 x 12 l2 codes,
    two-stage decoder; heads from the official size table."""
    shapes = official_shapes("proxy", enc=(1024, 24), dec=(1024, 24), image=256, patch=16, tokens=32,
                             codebook=(4096, 12))
    config = {"model": {"vq_model": dict(codebook_size=4096, token_size=12, use_l2_norm=True, commitment_cost=0.25,
                                         vit_enc_model_size="large", vit_dec_model_size="large", vit_enc_patch_size=16,
                                         vit_dec_patch_size=16, num_latent_tokens=32, finetune_decoder=True)},
              "dataset": {"preprocessing": {"crop_size": 256}}}
    kwargs, state = convert_titok({k: torch.empty(s, device="meta") for k, s in shapes.items()}, config)
    assert (kwargs["encoder_heads"], kwargs["decoder_heads"], kwargs["encoder_depth"]) == (16, 16, 24)
    assert (kwargs["legacy_latents"], kwargs["decoder_head"], kwargs["l2_norm"]) == (True, "proxy", True)
    with torch.device("meta"):
        model = TiTokTokenizer(**kwargs)
    check_state(model.state_dict(), Converted("titok", state, kwargs))
    assert set(model.state_dict()) - set(state) == {"quantize.usage"}
    params = sum(math.prod(s) for s in shapes.values())
    assert params == sum(p.numel() for p in model.parameters()) == 641_054_735  # counted on the official TiTok(titok_l32)
