"""`genvis import vq` / `genvis import var-vae`: official LlamaGen, taming and VAR VQ checkpoints become genvis
tokenizer folders holding exactly their tensors, and genvis computes what the official layout computes.

The official key sets are built here from the published layouts (LlamaGen vq_model.py, taming model.py, VAR
basic_vae.py / quant.py, REFERENCE.md), not from genvis's modules, and a plain functional forward written here
from those layouts (separate q, k, v; LlamaGen's decoder listed coarsest first) is the reference.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from genvis.cli import main
from genvis.errors import GenvisError
from genvis.tokenizers import load_tokenizer
from genvis.tokenizers.multiscale_vq import MultiScaleVQTokenizer
from genvis.tokenizers.vq import VQTokenizer
from genvis.tokenizers.vq_import import check_state, convert_var_vae, convert_vq, load_strict

TINY = dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z=16, codebook=(64, 16), in_channels=3)


# ----------------------------------------------------------------------------- official key sets (shapes)

def resnet(prefix, cin, cout):
    shapes = {f"{prefix}.norm1.weight": (cin,), f"{prefix}.norm1.bias": (cin,),
              f"{prefix}.conv1.weight": (cout, cin, 3, 3), f"{prefix}.conv1.bias": (cout,),
              f"{prefix}.norm2.weight": (cout,), f"{prefix}.norm2.bias": (cout,),
              f"{prefix}.conv2.weight": (cout, cout, 3, 3), f"{prefix}.conv2.bias": (cout,)}
    if cin != cout:
        shapes.update({f"{prefix}.nin_shortcut.weight": (cout, cin, 1, 1), f"{prefix}.nin_shortcut.bias": (cout,)})
    return shapes


def attention(prefix, c, fused=False):
    shapes = {f"{prefix}.norm.weight": (c,), f"{prefix}.norm.bias": (c,),
              f"{prefix}.proj_out.weight": (c, c, 1, 1), f"{prefix}.proj_out.bias": (c,)}
    for name, n in ((("qkv", 3),) if fused else (("q", 1), ("k", 1), ("v", 1))):
        shapes.update({f"{prefix}.{name}.weight": (n * c, c, 1, 1), f"{prefix}.{name}.bias": (n * c,)})
    return shapes


def conv(prefix, cout, cin, k):
    return {f"{prefix}.weight": (cout, cin, k, k), f"{prefix}.bias": (cout,)}


def official_shapes(layout, ch, ch_mult, num_res_blocks, z, codebook, in_channels=3, attn_levels=None,
                    quant_kernel=None, scales=10, phis=4):
    """Key -> shape of an official state dict. layout: "llamagen" (conv_blocks, mid.{0,1,2}, decoder listed
    coarsest first), "taming" (down/up, mid.block_1/attn_1/block_2, separate q/k/v) or "var" (taming's with a
    fused qkv, 3x3 quant convs, phi convs and ema_vocab_hit_SV). attn_levels: levels with attention (default:
    the coarsest)."""
    levels = len(ch_mult)
    attn_levels = {levels - 1} if attn_levels is None else set(attn_levels)
    fused = layout == "var"
    llamagen = layout == "llamagen"
    mid = ("mid.0", "mid.1", "mid.2") if llamagen else ("mid.block_1", "mid.attn_1", "mid.block_2")
    s = conv("encoder.conv_in", ch, in_channels, 3)
    block_in = ch
    for level, mult in enumerate(ch_mult):
        base = f"encoder.conv_blocks.{level}" if llamagen else f"encoder.down.{level}"
        for b in range(num_res_blocks):
            s.update(resnet(f"{base}.{'res' if llamagen else 'block'}.{b}", block_in, ch * mult))
            block_in = ch * mult
            if level in attn_levels:
                s.update(attention(f"{base}.attn.{b}", block_in, fused))
        if level != levels - 1:
            s.update(conv(f"{base}.downsample.conv", block_in, block_in, 3))
    for name in mid:
        s.update(attention(f"encoder.{name}", block_in, fused) if name in ("mid.1", "mid.attn_1")
                 else resnet(f"encoder.{name}", block_in, block_in))
    s.update({"encoder.norm_out.weight": (block_in,), "encoder.norm_out.bias": (block_in,)})
    s.update(conv("encoder.conv_out", z, block_in, 3))
    s.update(conv("decoder.conv_in", block_in, z, 3))
    for name in mid:
        s.update(attention(f"decoder.{name}", block_in, fused) if name in ("mid.1", "mid.attn_1")
                 else resnet(f"decoder.{name}", block_in, block_in))
    for level in reversed(range(levels)):
        base = f"decoder.conv_blocks.{levels - 1 - level}" if llamagen else f"decoder.up.{level}"
        for b in range(num_res_blocks + 1):
            s.update(resnet(f"{base}.{'res' if llamagen else 'block'}.{b}", block_in, ch * ch_mult[level]))
            block_in = ch * ch_mult[level]
            if level in attn_levels:
                s.update(attention(f"{base}.attn.{b}", block_in, fused))
        if level != 0:
            s.update(conv(f"{base}.upsample.conv", block_in, block_in, 3))
    s.update({"decoder.norm_out.weight": (block_in,), "decoder.norm_out.bias": (block_in,)})
    s.update(conv("decoder.conv_out", in_channels, block_in, 3))
    size, dim = codebook
    k = quant_kernel or (3 if layout == "var" else 1)
    s.update(conv("quant_conv", dim, z, k))
    s.update(conv("post_quant_conv", z, dim, k))
    s["quantize.embedding.weight"] = (size, dim)
    if llamagen:
        s["quantize.codebook_used"] = (65536,)
    if layout == "var":
        for i in range(phis):
            s.update(conv(f"quantize.quant_resi.qresi_ls.{i}", dim, dim, 3))
        s["quantize.ema_vocab_hit_SV"] = (scales, size)
    return s


def random_state(shapes, seed=0):
    """Weights scaled by 1/sqrt(fan_in), norms near 1, so activations stay O(1) through the stack."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        if key.endswith("codebook_used"):
            state[key] = torch.randint(0, shape[0], shape, generator=g).float()
        elif key.endswith("ema_vocab_hit_SV"):
            state[key] = torch.rand(shape, generator=g)
        elif key == "quantize.embedding.weight":
            state[key] = torch.randn(shape, generator=g) * 0.5
        elif len(shape) > 1:
            state[key] = torch.randn(shape, generator=g) / math.sqrt(math.prod(shape[1:]))
        elif ".norm" in key and key.endswith("weight"):
            state[key] = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            state[key] = 0.1 * torch.randn(shape, generator=g)
    return state


def tiny_state(layout, seed=0, **overrides):
    return random_state(official_shapes(layout, **{**TINY, **overrides}), seed)


# ----------------------------------------------------------------------------- an independent functional forward

def _conv(sd, p, x, stride=1, padding=None):
    w = sd[p + ".weight"]
    return F.conv2d(x, w, sd[p + ".bias"], stride, w.shape[-1] // 2 if padding is None else padding)


def _norm(sd, p, x):
    return F.group_norm(x, 32, sd[p + ".weight"], sd[p + ".bias"], eps=1e-6)


def _resnet(sd, p, x):
    h = _conv(sd, p + ".conv1", F.silu(_norm(sd, p + ".norm1", x)))
    h = _conv(sd, p + ".conv2", F.silu(_norm(sd, p + ".norm2", h)))
    return (_conv(sd, p + ".nin_shortcut", x) if p + ".nin_shortcut.weight" in sd else x) + h


def reference_attention(sd, p, x):
    """taming / LlamaGen AttnBlock: one head, w = softmax_j(q_i . k_j / sqrt(C)), out_i = sum_j w_ij v_j,
    x + proj_out(out), with separate 1x1 convs q, k, v."""
    b, c, h, w = x.shape
    hn = _norm(sd, p + ".norm", x)
    q, k, v = (_conv(sd, f"{p}.{n}", hn).reshape(b, c, h * w) for n in "qkv")
    weights = torch.softmax(torch.einsum("bci,bcj->bij", q, k) * c ** -0.5, dim=2)
    out = torch.einsum("bij,bcj->bci", weights, v).reshape(b, c, h, w)
    return x + _conv(sd, p + ".proj_out", out)


def _names(layout, side, level, levels):
    if layout == "llamagen":
        i = level if side == "encoder" else levels - 1 - level
        return f"{side}.conv_blocks.{i}", "res", ("mid.0", "mid.1", "mid.2")
    return f"{side}.{'down' if side == 'encoder' else 'up'}.{level}", "block", ("mid.block_1", "mid.attn_1", "mid.block_2")


def _stage(sd, base, kind, x):
    b = 0
    while f"{base}.{kind}.{b}.conv1.weight" in sd:
        x = _resnet(sd, f"{base}.{kind}.{b}", x)
        if f"{base}.attn.{b}.q.weight" in sd:
            x = reference_attention(sd, f"{base}.attn.{b}", x)
        b += 1
    return x


def _middle(sd, side, mid, x):
    x = _resnet(sd, f"{side}.{mid[0]}", x)
    x = reference_attention(sd, f"{side}.{mid[1]}", x)
    return _resnet(sd, f"{side}.{mid[2]}", x)


def reference_features(sd, layout, levels, x):
    """Encoder then quant_conv, in the official layout."""
    h = _conv(sd, "encoder.conv_in", x)
    for level in range(levels):
        base, kind, mid = _names(layout, "encoder", level, levels)
        h = _stage(sd, base, kind, h)
        if level != levels - 1:
            h = _conv(sd, base + ".downsample.conv", F.pad(h, (0, 1, 0, 1)), stride=2, padding=0)
    h = _middle(sd, "encoder", mid, h)
    return _conv(sd, "quant_conv", _conv(sd, "encoder.conv_out", F.silu(_norm(sd, "encoder.norm_out", h))))


def reference_decode(sd, layout, levels, codes):
    """post_quant_conv then the decoder, in the official layout (LlamaGen's conv_blocks coarsest first)."""
    h = _conv(sd, "decoder.conv_in", _conv(sd, "post_quant_conv", codes))
    h = _middle(sd, "decoder", _names(layout, "decoder", 0, levels)[2], h)
    for level in reversed(range(levels)):
        base, kind, _ = _names(layout, "decoder", level, levels)
        h = _stage(sd, base, kind, h)
        if level != 0:
            h = _conv(sd, base + ".upsample.conv", F.interpolate(h, scale_factor=2.0, mode="nearest"))
    return _conv(sd, "decoder.conv_out", F.silu(_norm(sd, "decoder.norm_out", h)))


def nearest(z, codebook, l2_norm):
    """ids [B, h, w]: argmin_k ||z - e_k|| (on unit vectors with l2_norm), in float64."""
    b, d, h, w = z.shape
    flat = z.permute(0, 2, 3, 1).reshape(-1, d)
    if l2_norm:
        flat, codebook = F.normalize(flat, dim=1), F.normalize(codebook, dim=1)
    return torch.cdist(flat, codebook).argmin(dim=1).view(b, h, w)


def images(n=2, side=16, seed=1):
    return torch.rand(n, 3, side, side, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def double(sd):
    return {k: v.double() for k, v in sd.items()}


# ----------------------------------------------------------------------------- conversion and numerics

@pytest.mark.parametrize("layout", ["llamagen", "taming"])
def test_converted_vq_computes_what_the_official_layout_computes(layout):
    sd = tiny_state(layout)
    converted = convert_vq(sd)
    assert converted.layout == layout
    cfg = converted.config
    assert cfg["ch"] == 32 and tuple(cfg["ch_mult"]) == (1, 2, 2) and cfg["num_res_blocks"] == 1
    assert (cfg["z_channels"], cfg["codebook_size"], cfg["codebook_dim"], cfg["quant_conv_kernel"]) == (16, 64, 16, 1)
    assert cfg["level_attention"] and cfg["mid_attention"] and cfg["l2_norm"] == (layout == "llamagen")
    model = VQTokenizer(**cfg).eval()
    load_strict(model, converted)
    ref = double(sd)

    # the fused-qkv attention block against the separate q, k, v formula
    x = torch.randn(2, 64, 4, 4, generator=torch.Generator().manual_seed(3))
    official = "encoder.mid.1" if layout == "llamagen" else "encoder.mid.attn_1"
    torch.testing.assert_close(model.encoder.mid.attn_1(x).double(), reference_attention(ref, official, x.double()),
                               rtol=0, atol=1e-5)

    # the whole encoder and the ids
    x = images()
    features = reference_features(ref, layout, 3, x.double())
    torch.testing.assert_close(model.features(x).double(), features, rtol=0, atol=1e-4)
    ids = model.encode(x)
    assert ids.shape == (2, 4, 4) and ids.dtype == torch.long
    assert torch.equal(ids, nearest(features, ref["quantize.embedding.weight"], cfg["l2_norm"]))

    # decode of random ids (LlamaGen decodes the l2-normalised code vectors)
    ids = torch.randint(0, 64, (2, 4, 4), generator=torch.Generator().manual_seed(4))
    out = model.decode(ids)
    assert out.shape == (2, 3, 16, 16)
    codebook = ref["quantize.embedding.weight"]
    codebook = F.normalize(codebook, dim=1) if layout == "llamagen" else codebook
    torch.testing.assert_close(out.double(), reference_decode(ref, layout, 3, codebook[ids].permute(0, 3, 1, 2)),
                               rtol=0, atol=1e-4)

    # genvis's training statistics keep their initial values; the LlamaGen buffer is dropped
    assert torch.equal(model.quantize.usage, torch.full((64,), 1 / 64))
    assert converted.dropped == (["quantize.codebook_used"] if layout == "llamagen" else [])


def test_converted_keys_hold_the_source_tensors():
    sd = tiny_state("llamagen")
    state = convert_vq(sd).state
    # the decoder list is reversed: conv_blocks.0 is the coarsest level (2 of 0..2), conv_blocks.2 the finest
    assert torch.equal(state["decoder.up.2.block.1.conv1.weight"], sd["decoder.conv_blocks.0.res.1.conv1.weight"])
    assert torch.equal(state["decoder.up.0.block.0.conv2.bias"], sd["decoder.conv_blocks.2.res.0.conv2.bias"])
    assert torch.equal(state["decoder.up.1.upsample.conv.weight"], sd["decoder.conv_blocks.1.upsample.conv.weight"])
    assert torch.equal(state["encoder.down.1.downsample.conv.weight"], sd["encoder.conv_blocks.1.downsample.conv.weight"])
    assert torch.equal(state["encoder.mid.block_2.norm1.weight"], sd["encoder.mid.2.norm1.weight"])
    qkv = state["decoder.up.2.attn.0.qkv.weight"]
    assert qkv.shape == (192, 64, 1, 1)
    for i, name in enumerate("qkv"):
        assert torch.equal(qkv[64 * i: 64 * (i + 1)], sd[f"decoder.conv_blocks.0.attn.0.{name}.weight"])
        assert torch.equal(state["encoder.mid.attn_1.qkv.bias"][64 * i: 64 * (i + 1)], sd[f"encoder.mid.1.{name}.bias"])


def test_taming_without_level_attention():
    # attn_resolutions that miss the coarsest level: mid attention only
    sd = tiny_state("taming", attn_levels=())
    cfg = convert_vq(sd).config
    assert cfg["level_attention"] is False and cfg["mid_attention"] is True
    load_strict(VQTokenizer(**cfg), convert_vq(sd))


def test_taming_attention_off_the_coarsest_level_is_refused():
    sd = tiny_state("taming", attn_levels=(1, 2))
    with pytest.raises(GenvisError, match=r"attention at level 1 \(encoder\.down\.1\.attn\.\*.*coarsest level \(2\)"):
        convert_vq(sd)


# ----------------------------------------------------------------------------- real sizes, on the meta device

def meta_state(shapes):
    return {k: torch.empty(shape, device="meta") for k, shape in shapes.items()}


def test_llamagen_vq16_official_keys_map_onto_genvis():
    """VQ-16: ch 128, ch_mult (1, 1, 2, 2, 4), 2 res blocks, z 256, codebook 16384 x 8 (REFERENCE.md, vq_model.py)."""
    shapes = official_shapes("llamagen", ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, z=256, codebook=(16384, 8))
    assert sum(1 for k in shapes if k.startswith("decoder.conv_blocks.0.attn.") and k.endswith(".q.weight")) == 3
    converted = convert_vq(meta_state(shapes))
    cfg = converted.config
    assert (cfg["ch"], tuple(cfg["ch_mult"]), cfg["num_res_blocks"], cfg["z_channels"]) == (128, (1, 1, 2, 2, 4), 2, 256)
    assert (cfg["codebook_size"], cfg["codebook_dim"], cfg["l2_norm"], cfg["quant_conv_kernel"]) == (16384, 8, True, 1)
    with torch.device("meta"):
        model = VQTokenizer(**cfg)
    check_state(model.state_dict(), converted)
    assert set(model.state_dict()) - set(converted.state) == {"quantize.usage"}
    params = sum(math.prod(s) for k, s in shapes.items() if k != "quantize.codebook_used")
    assert params == sum(p.numel() for p in model.parameters())
    assert params == 71_883_403  # counted on the official VQ_16() (LlamaGen's table: 72M)


def test_var_vae_official_keys_map_onto_genvis():
    """vae_ch160v4096z32: ch 160, ch_mult (1, 1, 2, 2, 4), z 32, 4096 codes, 3x3 quant convs, 4 phis, 10 scales."""
    shapes = official_shapes("var", ch=160, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, z=32, codebook=(4096, 32))
    converted = convert_var_vae(meta_state(shapes))
    cfg = converted.config
    assert (cfg["ch"], tuple(cfg["ch_mult"]), cfg["z_channels"], cfg["codebook_size"]) == (160, (1, 1, 2, 2, 4), 32, 4096)
    assert cfg["quant_conv_kernel"] == 3 and cfg["phi_count"] == 4 and cfg["scales"] == (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    with torch.device("meta"):
        model = MultiScaleVQTokenizer(**cfg)
    check_state(model.state_dict(), converted)
    assert set(model.state_dict()) - set(converted.state) == {"quantize.usage"}
    assert set(converted.state) == set(shapes)  # already genvis's layout: nothing renamed
    params = sum(math.prod(s) for k, s in shapes.items() if k != "quantize.ema_vocab_hit_SV")
    assert params == sum(p.numel() for p in model.parameters()) == 108_948_355  # counted on the official VQVAE


# ----------------------------------------------------------------------------- the command line

def one_error_line(capsys):
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    return lines[0]


def constant_like(sd, value):
    return {k: torch.full((1,), float(value)).expand(v.shape) for k, v in sd.items()}


def test_cli_llamagen_training_checkpoint_takes_ema(tmp_path, capsys):
    sd = tiny_state("llamagen")
    ckpt = tmp_path / "0250000.pt"
    torch.save({"model": constant_like(sd, -1.0), "ema": sd, "optimizer": {"state": {}, "param_groups": []},
                "discriminator": {"main.0.weight": torch.zeros(2)}, "steps": 250000}, ckpt)
    out = tmp_path / "vq16"
    assert main(["import", "vq", str(ckpt), str(out), "--codebook-size", "64", "--codebook-dim", "16",
                 "--image-channels", "3"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    line = captured.out.strip()
    assert "\n" not in line and "llamagen" in line and "64 x 16 l2-normalised" in line and "quantize.codebook_used" in line
    tokenizer = load_tokenizer(out)
    assert isinstance(tokenizer, VQTokenizer) and tokenizer.config.l2_norm is True
    got = tokenizer.state_dict()
    assert torch.equal(got["decoder.up.2.block.0.conv1.weight"], sd["decoder.conv_blocks.0.res.0.conv1.weight"])
    assert torch.equal(got["quantize.embedding.weight"], sd["quantize.embedding.weight"])
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


def test_cli_taming_lightning_checkpoint_drops_the_losses(tmp_path, capsys):
    sd = tiny_state("taming")
    losses = {"loss.logvar": torch.zeros(()), "loss.perceptual_loss.net.slice1.0.weight": torch.zeros(4, 3, 3, 3),
              "loss.discriminator.main.0.weight": torch.zeros(8, 3, 4, 4)}
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": {**sd, **losses}, "epoch": 3, "global_step": 100}, ckpt)
    out = tmp_path / "vqgan"
    assert main(["import", "vq", str(ckpt), str(out), "--layout", "taming"]) == 0
    line = capsys.readouterr().out.strip()
    assert "taming" in line and "dropped 3 loss.* keys" in line and "64 x 16" in line and "l2" not in line
    tokenizer = load_tokenizer(out)
    assert tokenizer.config.l2_norm is False
    x, ref = images(), double(sd)
    codebook = ref["quantize.embedding.weight"]
    ids = nearest(reference_features(ref, "taming", 3, x.double()), codebook, l2_norm=False)
    expected = reference_decode(ref, "taming", 3, codebook[ids].permute(0, 3, 1, 2))
    torch.testing.assert_close(tokenizer.decode(tokenizer.encode(x)).double(), expected, rtol=0, atol=1e-4)


def test_cli_var_vae(tmp_path, capsys):
    sd = tiny_state("var", z=16, codebook=(64, 16), scales=3)
    ckpt = tmp_path / "vae.pth"
    torch.save(sd, ckpt)
    out = tmp_path / "var"
    assert main(["import", "var-vae", str(ckpt), str(out)]) == 2
    line = one_error_line(capsys)
    assert str(ckpt) in line and "3 scales" in line and "--scales" in line
    assert not out.exists()
    assert main(["import", "var-vae", str(ckpt), str(out), "--scales", "1,2,4"]) == 0
    assert "scales 1,2,4" in capsys.readouterr().out
    tokenizer = load_tokenizer(out)
    assert isinstance(tokenizer, MultiScaleVQTokenizer) and tokenizer.scales == (1, 2, 4)
    got = tokenizer.state_dict()
    for key, value in sd.items():
        assert torch.equal(got[key], value), key
    assert torch.equal(got["quantize.usage"], torch.full((64,), 1 / 64))
    ids = tokenizer.encode(images())
    assert [tuple(i.shape) for i in ids] == [(2, 1), (2, 4), (2, 16)]
    assert tokenizer.decode(ids).shape == (2, 3, 16, 16)
    # ten rows of usage statistics: VAR's default scales
    sd10 = tiny_state("var", z=16, codebook=(64, 16))
    assert convert_var_vae(sd10).config["scales"] == (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    # other scales than the buffer's rows: the usage statistics keep their initial value (VAR's load_state_dict)
    converted = convert_var_vae(sd10, scales=(1, 2, 4))
    assert converted.dropped == ["quantize.ema_vocab_hit_SV"]
    model = MultiScaleVQTokenizer(**converted.config)
    load_strict(model, converted)
    assert torch.equal(model.quantize.ema_vocab_hit_SV, torch.zeros(3, 64))
    # a fully shared phi (share_quant_resi=1) becomes one entry of qresi_ls
    shared = {k.replace("qresi_ls.0.", "qresi."): v for k, v in sd.items() if ".qresi_ls." not in k or ".qresi_ls.0." in k}
    converted = convert_var_vae(shared, scales=(1, 2, 4))
    assert converted.config["phi_count"] == 1
    load_strict(MultiScaleVQTokenizer(**converted.config), converted)


def test_cli_bad_inputs_are_one_line(tmp_path, capsys):
    sd = tiny_state("llamagen")
    out = tmp_path / "out"

    def run(state, *options, name="ckpt.pt"):
        ckpt = tmp_path / name
        torch.save(state, ckpt)
        code = main(["import", "vq", str(ckpt), str(out), *options])
        return code, one_error_line(capsys)

    missing = {k: v for k, v in sd.items() if k != "decoder.conv_blocks.1.res.0.conv2.bias"}
    code, line = run(missing)
    assert code == 2 and "missing decoder.up.1.block.0.conv2.bias" in line

    code, line = run({**sd, "encoder.extra.weight": torch.zeros(3)})
    assert code == 2 and "unexpected encoder.extra.weight" in line

    code, line = run(sd, "--codebook-size", "1024")
    assert code == 2 and "--codebook-size 1024" in line and "[64, 16]" in line and "64 codes" in line
    code, line = run(sd, "--codebook-dim", "8")
    assert code == 2 and "--codebook-dim 8" in line and "16 dims" in line
    code, line = run(sd, "--image-channels", "1")
    assert code == 2 and "--image-channels 1" in line and "3 image channels" in line

    code, line = run({**sd, "decoder.conv_blocks.0.res.0.conv1.bias": torch.zeros(65)})
    assert code == 2 and "decoder.conv_blocks.0.res.0.conv1.bias" in line and "[65]" in line and "[64]" in line

    code, line = run(sd, "--layout", "taming")
    assert code == 2 and "--layout taming" in line and "llamagen" in line

    code, line = run(tiny_state("var"))
    assert code == 2 and "var-vae" in line

    code, line = run({"args": {"lr": 1.0}})
    assert code == 2 and "no tensors" in line

    garbage = tmp_path / "notes.pt"
    garbage.write_bytes(b"this is not a checkpoint")
    assert main(["import", "vq", str(garbage), str(out)]) == 2
    line = one_error_line(capsys)
    assert str(garbage) in line and "not a readable PyTorch checkpoint" in line

    torch.save(tiny_state("var"), tmp_path / "vae.pth")
    assert main(["import", "var-vae", str(tmp_path / "vae.pth"), str(out), "--scales", "4,2"]) == 2
    assert "increasing" in one_error_line(capsys)
    assert not out.exists()
