"""VAR (genvis.models.var): official FoundationVision/VAR state dicts import exactly and give the official logits.

The official layout (key names, shapes, the three saved buffers) is written here from the published code
(models/var.py, models/basic_var.py) and REFERENCE.md, not from genvis's module, and the reference forward below
is a plain functional transcription of the official VAR.forward (cond_drop_rate = 0, no progressive training):
a wrong key name, a swapped AdaLN chunk, a 1 + gamma residual, a missing clamp or a mask off by one scale all
change the logits it is compared with.
"""
import math

import pytest
import torch

from genvis.cli import main
from genvis.errors import GenvisError
from genvis.io import load_state_strict
from genvis.models import load_model
from genvis.models.var import (VAR, VAR_SCALES, block_causal_mask, convert_var_state_dict, infer_var_config,
                               var_config)
from genvis.tokenizers import load_tokenizer
from genvis.tokenizers.multiscale_vq import MultiScaleVQTokenizer

# depth 2, width 64, 2 heads, vocabulary 50, token width 8, 5 classes, scales (1, 2, 3): 14 tokens
TINY = dict(depth=2, C=64, H=2, V=50, Cvae=8, K=5, scales=(1, 2, 3))
TINY_TOKENIZER = dict(in_channels=1, ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=8, norm_groups=8)


# ----------------------------------------------------------------------------- the official layout

def official_shapes(depth, C, H, V, Cvae, K, scales, mlp_ratio=4.0):
    """(parameters, buffers): key -> shape of an official VAR state dict (VAR(..., attn_l2_norm=True,
    shared_aln=False)); the buffers are the ones nn.Module.state_dict() saves in the official model."""
    L, first_l, hidden = sum(p * p for p in scales), scales[0] ** 2, round(C * mlp_ratio)
    params = {
        "pos_start": (1, first_l, C), "pos_1LC": (1, L, C),
        "class_emb.weight": (K + 1, C), "lvl_embed.weight": (len(scales), C),
        "word_embed.weight": (C, Cvae), "word_embed.bias": (C,),
        "head_nm.ada_lin.1.weight": (2 * C, C), "head_nm.ada_lin.1.bias": (2 * C,),
        "head.weight": (V, C), "head.bias": (V,),
    }
    buffers = {"lvl_1L": (1, L), "attn_bias_for_masking": (1, 1, L, L)}
    for i in range(depth):
        b = f"blocks.{i}."
        params.update({
            b + "attn.mat_qkv.weight": (3 * C, C), b + "attn.q_bias": (C,), b + "attn.v_bias": (C,),
            b + "attn.scale_mul_1H11": (1, H, 1, 1), b + "attn.proj.weight": (C, C), b + "attn.proj.bias": (C,),
            b + "ffn.fc1.weight": (hidden, C), b + "ffn.fc1.bias": (hidden,),
            b + "ffn.fc2.weight": (C, hidden), b + "ffn.fc2.bias": (C,),
            b + "ada_lin.1.weight": (6 * C, C), b + "ada_lin.1.bias": (6 * C,),
        })
        buffers[b + "attn.zero_k_bias"] = (C,)
    return params, buffers


def official_buffers(scales, depth, C):
    """The buffers exactly as the official constructor computes them (models/var.py, section 5)."""
    L = sum(p * p for p in scales)
    d = torch.cat([torch.full((pn * pn,), i) for i, pn in enumerate(scales)]).view(1, L, 1)
    dT = d.transpose(1, 2)
    out = {"lvl_1L": dT[:, 0].contiguous(),
           "attn_bias_for_masking": torch.where(d >= dT, 0.0, -torch.inf).reshape(1, 1, L, L).contiguous()}
    for i in range(depth):
        out[f"blocks.{i}.attn.zero_k_bias"] = torch.zeros(C)
    return out


def official_state(seed=0, depth=2, C=64, H=2, V=50, Cvae=8, K=5, scales=(1, 2, 3)):
    """A random official-layout state dict with every tensor non-trivial (gammas of order 1, not VAR's 1e-5),
    one head's scale_mul above ln 100 (so the clamp matters), and the official buffers."""
    g = torch.Generator().manual_seed(seed)
    params, _ = official_shapes(depth, C, H, V, Cvae, K, scales)
    sd = {}
    for key, shape in params.items():
        if key.endswith("scale_mul_1H11"):
            value = math.log(4.0) + 0.5 * torch.randn(shape, generator=g)
            value.view(-1)[0] = 5.0  # exp(5) = 148 > 100: clamped to ln 100
        elif key.endswith(".weight") and len(shape) == 2 and "emb" not in key:
            value = torch.randn(shape, generator=g) / math.sqrt(shape[1])  # linear layers: O(1) outputs
        else:
            value = 0.5 * torch.randn(shape, generator=g)  # embeddings, positions, biases
        sd[key] = value
    sd.update(official_buffers(scales, depth, C))
    return sd


def reference_logits(sd, labels, x_wo_first_l, heads, eps=1e-6):
    """The official VAR.forward (cond_drop_rate 0, prog_si -1, no fused kernels) as plain tensor algebra:
    logits [B, L, V]."""
    C = sd["pos_1LC"].shape[-1]
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    first_l = sd["pos_start"].shape[1]
    B, L = labels.shape[0], sd["pos_1LC"].shape[1]

    def ln(x):  # LayerNorm without affine: (x - mean) / sqrt(var + eps), biased variance
        mean = x.mean(-1, keepdim=True)
        var = (x - mean).pow(2).mean(-1, keepdim=True)
        return (x - mean) / torch.sqrt(var + eps)

    def linear(x, name):
        return x @ sd[name + ".weight"].T + sd[name + ".bias"]

    def gelu_tanh(x):
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))

    cond = sd["class_emb.weight"][labels]  # [B, C]
    silu_cond = cond * torch.sigmoid(cond)
    sos = cond[:, None, :].expand(B, first_l, C) + sd["pos_start"]
    x = torch.cat([sos, linear(x_wo_first_l, "word_embed")], dim=1)
    x = x + sd["lvl_embed.weight"][sd["lvl_1L"][0]][None] + sd["pos_1LC"]
    bias = sd["attn_bias_for_masking"]  # [1, 1, L, L], 0 / -inf
    for i in range(depth):
        b = f"blocks.{i}."
        ada = linear(silu_cond, b + "ada_lin.1").view(B, 1, 6, C)
        gamma1, gamma2, scale1, scale2, shift1, shift2 = (ada[:, :, j] for j in range(6))
        h = ln(x) * (scale1 + 1) + shift1
        qkv_bias = torch.cat([sd[b + "attn.q_bias"], sd[b + "attn.zero_k_bias"], sd[b + "attn.v_bias"]])
        qkv = (h @ sd[b + "attn.mat_qkv.weight"].T + qkv_bias).view(B, L, 3, heads, C // heads)
        q, k, v = (qkv[:, :, j].transpose(1, 2) for j in range(3))  # [B, H, L, d]
        scale_mul = torch.exp(torch.clamp(sd[b + "attn.scale_mul_1H11"], max=math.log(100)))
        q = q / q.norm(dim=-1, keepdim=True) * scale_mul
        k = k / k.norm(dim=-1, keepdim=True)
        attn = torch.softmax(q @ k.transpose(-2, -1) * 1.0 + bias, dim=-1) @ v
        attn = attn.transpose(1, 2).reshape(B, L, C)
        x = x + linear(attn, b + "attn.proj") * gamma1
        h = ln(x) * (scale2 + 1) + shift2
        x = x + linear(gelu_tanh(linear(h, b + "ffn.fc1")), b + "ffn.fc2") * gamma2
    head = linear(silu_cond, "head_nm.ada_lin.1").view(B, 1, 2, C)
    scale, shift = head[:, :, 0], head[:, :, 1]
    return linear(ln(x) * (scale + 1) + shift, "head")


def import_state(sd, scales, where="ckpt"):
    config, state = convert_var_state_dict(sd, scales, where)
    model = VAR(**config)
    load_state_strict(model, state, where, f"VAR-d{config['depth']}")
    return model.eval()


def tf_input(seed, batch, scales, Cvae):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, sum(p * p for p in scales[1:]), Cvae, generator=g)


@pytest.fixture(scope="module")
def tiny():
    """(official state dict, imported genvis VAR) of the TINY sizes."""
    sd = official_state(seed=0, **TINY)
    return sd, import_state(sd, TINY["scales"])


# ----------------------------------------------------------------------------- logits

@pytest.mark.parametrize("scales", [(1, 2, 3), (2, 3)])  # (2, 3): a first scale of 4 tokens (pos_start [1, 4, C])
def test_imported_var_gives_the_official_logits(scales):
    sd = official_state(seed=1, **{**TINY, "scales": scales})
    model = import_state(sd, scales)
    config = model.config
    assert (config.vocab_size, config.token_dim, tuple(config.scales), config.num_classes, config.depth,
            config.embed_dim, config.num_heads, config.mlp_ratio, config.attn_l2_norm) == (50, 8, scales, 5, 2, 64, 2, 4.0, True)
    # genvis holds exactly the source tensors under the same names; the official buffers are not in its state dict
    own = model.state_dict()
    params, buffers = official_shapes(**{**TINY, "scales": scales})
    assert set(own) == set(params)
    for key in params:
        assert torch.equal(own[key], sd[key]), key
    labels = torch.tensor([0, 3, 5, 2])  # 5: the null class
    x = tf_input(2, 4, scales, 8)
    with torch.no_grad():
        got = model(labels, x)
    expected = reference_logits({k: v.double() if v.is_floating_point() else v for k, v in sd.items()},
                                labels, x.double(), heads=2)
    assert got.shape == (4, sum(p * p for p in scales), 50) and got.dtype == torch.float32
    assert expected.abs().max() > 1.0  # non-trivial logits
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    # the class matters (the AdaLN and start token are read), so a label mix-up would show
    with torch.no_grad():
        other = model(torch.tensor([1, 3, 5, 2]), x)
    assert (other[0] - got[0]).abs().max() > 1e-2
    torch.testing.assert_close(other[1:], got[1:], rtol=0, atol=1e-6)


def test_var_d16_official_keys_shapes_and_parameter_count():
    """VAR-d16 (width 1024, 16 heads, 4096 codes of 32 dims, 1000 classes, 680 tokens), built on the meta device."""
    params, buffers = official_shapes(depth=16, C=1024, H=16, V=4096, Cvae=32, K=1000, scales=VAR_SCALES)
    assert sum(p * p for p in VAR_SCALES) == 680 and params["pos_1LC"] == (1, 680, 1024)
    official_count = sum(math.prod(shape) for shape in params.values())
    # by hand: blocks 16 x 18,888,720 + embeddings 1,766,400 (word 33,792, class 1,025,024, pos_start 1,024,
    # pos_1LC 696,320, lvl 10,240) + head_nm 2,099,200 + head 4,198,400
    assert official_count == 310_283_520
    with torch.device("meta"):
        model = VAR(**var_config(16), vocab_size=4096, token_dim=32, scales=VAR_SCALES, num_classes=1000)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == params  # the official keys minus the buffers
    assert model.num_params() == official_count == sum(p.numel() for p in model.parameters())
    # the official buffers exist (non-persistent) with their shapes; mask_LL replaces attn_bias_for_masking
    own_buffers = dict(model.named_buffers())
    assert tuple(own_buffers["lvl_1L"].shape) == (1, 680)
    assert all(tuple(own_buffers[k].shape) == shape for k, shape in buffers.items() if k.endswith("zero_k_bias"))
    assert tuple(own_buffers["mask_LL"].shape) == (680, 680)
    meta = {k: torch.empty(shape, device="meta") for k, shape in {**params, **buffers}.items()}
    assert infer_var_config(meta, VAR_SCALES) == dict(
        vocab_size=4096, token_dim=32, scales=VAR_SCALES, num_classes=1000, depth=16, embed_dim=1024, num_heads=16,
        mlp_ratio=4.0, attn_l2_norm=True)


# ----------------------------------------------------------------------------- mask and KV cache

def test_block_causal_mask_table():
    # scales (1, 2, 3): token 0 is scale 0, tokens 1-4 scale 1, tokens 5-13 scale 2
    T, F_ = True, False
    row0 = [T] + [F_] * 13
    row1 = [T] * 5 + [F_] * 9
    row2 = [T] * 14
    expected = torch.tensor([row0] + [row1] * 4 + [row2] * 9)
    assert torch.equal(block_causal_mask((1, 2, 3)), expected)
    model = VAR(vocab_size=10, token_dim=4, scales=(1, 2, 3), num_classes=2, depth=1, embed_dim=16, num_heads=2)
    assert model.mask_LL.dtype == torch.bool and torch.equal(model.mask_LL, expected)
    # the official additive bias of the same scales is this mask as 0 / -inf
    official = official_buffers((1, 2, 3), 1, 16)["attn_bias_for_masking"][0, 0]
    assert torch.equal(official == 0, expected)


def test_logits_of_a_scale_do_not_see_later_inputs(tiny):
    _, model = tiny
    scales = TINY["scales"]
    labels = torch.tensor([1, 4])
    x = tf_input(3, 2, scales, 8)
    with torch.no_grad():
        base = model(labels, x)
    ranges, start = [], 0
    for p in scales:
        ranges.append((start, start + p * p))
        start += p * p
    first_l = scales[0] ** 2
    for k in range(1, len(scales)):
        begin, end = ranges[k]
        changed = x.clone()
        changed[:, begin - first_l:end - first_l] += torch.randn(2, end - begin, 8)
        with torch.no_grad():
            out = model(labels, changed)
        # positions of the earlier scales: unchanged; of scale k and after: changed
        torch.testing.assert_close(out[:, :begin], base[:, :begin], rtol=0, atol=1e-6)
        for j in range(k, len(scales)):
            b, e = ranges[j]
            assert (out[:, b:e] - base[:, b:e]).abs().max() > 1e-3, (k, j)
        # only the last token of scale k changed: every token of scale k sees it (the mask is per scale,
        # not per token), the earlier scales do not
        last = x.clone()
        last[:, end - 1 - first_l] += 1.0
        with torch.no_grad():
            out = model(labels, last)
        torch.testing.assert_close(out[:, :begin], base[:, :begin], rtol=0, atol=1e-6)
        assert ((out[:, begin:] - base[:, begin:]).abs().amax(dim=-1) > 1e-4).all(), k


def test_kv_cache_decoding_gives_the_teacher_forcing_logits(tiny):
    sd, model = tiny
    scales = TINY["scales"]
    labels = torch.tensor([0, 2, 5])
    x = tf_input(4, 3, scales, 8)
    with torch.no_grad():
        full = model(labels, x)
        cond = model.class_emb(labels)
        caches = model.new_caches()
        pieces = [model.run(model.start_tokens(cond), cond, caches=caches)]
        offset = 0
        for k, p in enumerate(scales[1:], start=1):
            pieces.append(model.run(model.embed_scale(k, x[:, offset:offset + p * p]), cond, caches=caches))
            offset += p * p
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)
    assert all(c.k.shape[-2] == c.v.shape[-2] == 14 for c in caches)
    expected = reference_logits({k: v.double() if v.is_floating_point() else v for k, v in sd.items()},
                                labels, x.double(), heads=2)
    torch.testing.assert_close(torch.cat(pieces, dim=1).double(), expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- importer: bad input

def one_line(fn, *needles):
    with pytest.raises(GenvisError) as err:
        fn()
    message = str(err.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, message
    return message


def test_importer_names_what_is_wrong(tiny):
    sd, _ = tiny
    scales = TINY["scales"]
    one_line(lambda: import_state({**sd, "blocks.0.attn.extra_bias": torch.zeros(64)}, scales, "var.pth"),
             "var.pth", "unexpected blocks.0.attn.extra_bias")
    missing = {k: v for k, v in sd.items() if k != "blocks.1.ffn.fc2.bias"}
    one_line(lambda: import_state(missing, scales), "missing blocks.1.ffn.fc2.bias")
    one_line(lambda: import_state({k: v for k, v in sd.items() if k != "head.weight"}, scales), "head.weight")
    one_line(lambda: import_state({**sd, "blocks.0.attn.q_bias": torch.zeros(65)}, scales),
             "blocks.0.attn.q_bias", "(65,)", "(64,)")
    # the saved buffers must be what VAR computes for these scales
    open_bias = {**sd, "attn_bias_for_masking": torch.zeros(1, 1, 14, 14)}
    one_line(lambda: import_state(open_bias, scales), "attn_bias_for_masking")
    one_line(lambda: import_state({**sd, "lvl_1L": torch.zeros(1, 14, dtype=torch.long)}, scales), "lvl_1L")
    one_line(lambda: import_state({**sd, "blocks.1.attn.zero_k_bias": torch.full((64,), 0.1)}, scales),
             "blocks.1.attn.zero_k_bias")
    # scales of another length: pos_1LC says so, in one line
    one_line(lambda: import_state(sd, (1, 2, 4)), "pos_1LC", "14", "21", "--scales")
    # without the buffers (a state dict re-saved without them) it still imports, to the same model
    bare = {k: v for k, v in sd.items() if k not in ("lvl_1L", "attn_bias_for_masking") and "zero_k_bias" not in k}
    assert set(import_state(bare, scales).state_dict()) == set(bare)


def tiny_tokenizer(vocab, scales=(1, 2, 3), seed=0):
    torch.manual_seed(seed)
    return MultiScaleVQTokenizer(**TINY_TOKENIZER, codebook_size=vocab, scales=scales).eval()


def one_error_line(capsys):
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    return lines[0]


def test_cli_import_var_end_to_end(tiny, tmp_path, capsys):
    from safetensors.torch import save_file

    sd, _ = tiny
    labels = torch.tensor([0, 4, 5])
    x = tf_input(5, 3, TINY["scales"], 8)
    expected = reference_logits({k: v.double() if v.is_floating_point() else v for k, v in sd.items()},
                                labels, x.double(), heads=2)

    # a plain .safetensors state dict; without --scales and a tokenizer, VAR's 680-token scales do not fit
    ckpt = tmp_path / "var_tiny.safetensors"
    save_file(sd, str(ckpt))
    out = tmp_path / "var"
    assert main(["import", "var", str(ckpt), str(out)]) == 2
    line = one_error_line(capsys)
    assert str(ckpt) in line and "pos_1LC" in line and "680" in line and "--scales" in line
    assert not out.exists()
    assert main(["import", "var", str(ckpt), str(out), "--scales", "1,2,3"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and "VAR-d2" in captured.out and "scales 1,2,3" in captured.out
    model = load_model(out)
    assert type(model) is VAR and not model.training
    with torch.no_grad():
        torch.testing.assert_close(model(labels, x).double(), expected, rtol=1e-5, atol=1e-5)

    # a training checkpoint {"model": DDP-prefixed state} saved with torch.save, scales from the tokenizer, embedded
    wrapped = tmp_path / "ckpt-last.pth"
    torch.save({"model": {"module." + k: v for k, v in sd.items()}, "epoch": 7, "args": {"depth": 2}}, wrapped)
    tok_dir = tmp_path / "tokenizer"
    tiny_tokenizer(50).save_pretrained(tok_dir)
    out2 = tmp_path / "var_with_tokenizer"
    assert main(["import", "var", str(wrapped), str(out2), "--tokenizer", str(tok_dir), "--embed-tokenizer"]) == 0
    assert "scales 1,2,3" in capsys.readouterr().out
    assert (out2 / "tokenizer" / "config.json").is_file()
    model2 = load_model(out2)
    with torch.no_grad():
        torch.testing.assert_close(model2(labels, x).double(), expected, rtol=1e-5, atol=1e-5)
    recorded = load_tokenizer(out2)
    assert isinstance(recorded, MultiScaleVQTokenizer) and recorded.vocab_size == 50 and recorded.scales == (1, 2, 3)

    # a tokenizer of another vocabulary: one line naming both sizes, nothing written
    bad_dir = tmp_path / "tokenizer32"
    tiny_tokenizer(32).save_pretrained(bad_dir)
    out3 = tmp_path / "var_bad"
    assert main(["import", "var", str(ckpt), str(out3), "--tokenizer", str(bad_dir)]) == 2
    line = one_error_line(capsys)
    assert "--tokenizer" in line and "vocabulary" in line and "50" in line and "32" in line
    assert not out3.exists()
    # a tokenizer of other scales (1, 2, 4): its scales are the default, and pos_1LC does not fit them
    other_dir = tmp_path / "tokenizer124"
    tiny_tokenizer(50, scales=(1, 2, 4)).save_pretrained(other_dir)
    assert main(["import", "var", str(ckpt), str(out3), "--tokenizer", str(other_dir)]) == 2
    assert "pos_1LC" in one_error_line(capsys)
    assert not out3.exists()
