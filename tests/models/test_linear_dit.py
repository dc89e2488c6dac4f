"""Linear-attention DiT: the kernel against a naive O(N^2) evaluation of its formula, fp32 safety of the
normaliser, the block options, and weight inheritance from a DiT (exactly the shared tensors)."""
import pytest
import torch

from genvis.config import load_config
from genvis.errors import ConfigError, GenvisError
from genvis.models import inherit_weights, load_model
from genvis.models.dit import DiT
from genvis.models.linear_dit import LinearDiT, LinearDiTConfig, relu_linear_attention
from genvis.registry import MODELS

SMALL = dict(input_size=16, patch_size=4, in_channels=1, hidden_size=64, depth=2, num_classes=10)


def naive_relu_attention(q, k, v, eps=1e-15):
    """o_i = sum_j (relu(q_i) . relu(k_j)) v_j / (sum_j relu(q_i) . relu(k_j) + eps), the N x N kernel matrix
    written out, in float64."""
    q, k, v = q.double(), k.double(), v.double()
    scores = torch.relu(q) @ torch.relu(k).transpose(-1, -2)  # [B, H, N, N]
    return (scores @ v) / (scores.sum(-1, keepdim=True) + eps)


def randomize(model, seed=0, std=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def test_relu_linear_attention_equals_the_quadratic_formula():
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, 3, 77, 16, generator=g) for _ in range(2))
    v = torch.randn(2, 3, 77, 24, generator=g)
    expected = naive_relu_attention(q, k, v)
    out = relu_linear_attention(q, k, v)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 77, 24)
    assert (out.double() - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_bf16_autocast_keeps_bf16_resolution_and_large_activations_stay_finite():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 256, 32, generator=g) for _ in range(3))
    expected = naive_relu_attention(q, k, v)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = relu_linear_attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert out.dtype == torch.bfloat16
    # bf16 inputs carry 2^-8 relative error; the fp32 kernel adds nothing visible on top
    assert (out.double() - expected).abs().max() <= 2e-2 * expected.abs().max()

    big_q, big_k = q * 300, k * 300
    fp16_normaliser = (torch.relu(big_q.half()) @ torch.relu(big_k.half()).transpose(-1, -2)).sum(-1)
    assert not torch.isfinite(fp16_normaliser).all()  # what an fp16 kernel would divide by
    out = relu_linear_attention(big_q.half(), big_k.half(), v.half())
    assert torch.isfinite(out).all()
    expected = naive_relu_attention(big_q, big_k, v)
    assert (out.double() - expected).abs().max() <= 2e-2 * expected.abs().max()


@pytest.mark.parametrize("options", [dict(attention="relu", v_conv=5), dict(attention="relu", v_conv=0, ffn="mixffn",
                                     use_pos_embed=False, num_heads=2), dict(attention="gated", v_conv=0, num_heads=4)])
def test_every_block_option_trains_and_round_trips(options, tmp_path):
    torch.manual_seed(0)
    model = randomize(LinearDiT(**SMALL, learn_sigma=False, **options))
    x, t, y = torch.randn(3, 1, 16, 16), torch.rand(3), torch.tensor([0, 5, 10])
    out = model(x, t, y)
    assert out.shape == (3, 1, 16, 16) and torch.isfinite(out).all()
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)
    model.save_pretrained(str(tmp_path))
    loaded = load_model(tmp_path)
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert type(loaded) is LinearDiT and public(loaded.config) == public(model.config)
    assert torch.equal(loaded(x, t, y), model.eval()(x, t, y))


def test_flops_per_image_counts_the_kernels_against_torchs_counter():
    """The ReLU and gated models share the rest of the network, so the difference of their flops_per_image must be
    the difference torch's FlopCounterMode counts in a forward: their kernels' matmuls and the gate's linears.
    16 tokens here: the gated scan pads them to one 64-token chunk, and the count includes the padding."""
    from torch.utils.flop_counter import FlopCounterMode

    x, t, y = torch.randn(2, 1, 16, 16), torch.rand(2), torch.tensor([0, 5])
    counted, formula = {}, {}
    for attention in ("relu", "gated"):
        model = LinearDiT(**SMALL, learn_sigma=False, num_heads=4, v_conv=0, attention=attention)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x, t, y)
        counted[attention], formula[attention] = counter.get_total_flops() / 2, model.flops_per_image()
    assert counted["gated"] - counted["relu"] == formula["gated"] - formula["relu"]
    # By hand, per block (2 blocks), 16 tokens padded to 64, width D = 64, d_k = 16, gate rank 16:
    D, dk = 64, 16
    gated = 2 * 2 * 64 * D * (2 * 64 + 2 * dk) + 2 * 16 * D * D + 2 * 16 * 2 * D * 16
    relu = 2 * 16 * D * (2 * dk + 1)
    assert formula["gated"] - formula["relu"] == 2 * (gated - relu)


def test_position_embedding_and_mix_ffn_are_what_the_options_say():
    plain = LinearDiT(**SMALL, v_conv=0)
    sana = LinearDiT(**SMALL, v_conv=0, ffn="mixffn", use_pos_embed=False)
    assert plain.pos_embed is not None and sana.pos_embed is None
    names = set(dict(sana.named_parameters()))
    assert "blocks.0.mlp.depth_conv.weight" in names and "blocks.0.mlp.fc1.weight" not in names
    assert sana.blocks[0].mlp.depth_conv.weight.shape == (2 * 256, 1, 3, 3)  # depthwise over 2 x hidden channels
    lit = LinearDiT(**SMALL)  # LiT's conv on V starts at zero: the attention is the linear kernel alone
    assert lit.blocks[0].attn.v_conv.weight.shape == (64, 1, 5, 5) and not lit.blocks[0].attn.v_conv.weight.any()


def test_a_row_of_1d_tokens_convolves_along_the_row():
    """On a 1 x K grid (KL-TiTok's tokens, input_size [1, K], patch 1) Mix-FFN's 3x3 depthwise conv and LiT's
    5x5 conv on V see zero rows above and below: each is the 1D conv with its kernel's middle row."""
    import torch.nn.functional as F
    from genvis.models.linear_dit import LinearAttention, MixFFN

    torch.manual_seed(0)
    k, dim = 12, 16
    x = torch.randn(2, k, dim)
    ffn = randomize(MixFFN(dim, 24, (1, k)))
    h = F.silu(F.linear(x, ffn.inverted_conv.weight[:, :, 0, 0], ffn.inverted_conv.bias)).transpose(1, 2)
    h = F.conv1d(h, ffn.depth_conv.weight[:, :, 1], ffn.depth_conv.bias, padding=1, groups=48)
    h, gate = h.chunk(2, dim=1)
    expected = F.linear((h * F.silu(gate)).transpose(1, 2), ffn.point_conv.weight[:, :, 0, 0])
    torch.testing.assert_close(ffn(x), expected, atol=1e-5, rtol=1e-5)

    attn = randomize(LinearAttention(dim, 2, (1, k), v_conv=5), seed=1)
    q, kk, v = F.linear(x, attn.qkv.weight, attn.qkv.bias).chunk(3, dim=-1)
    heads = lambda t: t.reshape(2, k, 2, 8).transpose(1, 2)  # noqa: E731
    out = naive_relu_attention(heads(q), heads(kk), heads(v)).transpose(1, 2).reshape(2, k, dim).float()
    out = out + F.conv1d(v.transpose(1, 2), attn.v_conv.weight[:, :, 2], attn.v_conv.bias, padding=2,
                         groups=dim).transpose(1, 2)
    torch.testing.assert_close(attn(x), F.linear(out, attn.proj.weight, attn.proj.bias), atol=1e-5, rtol=1e-5)
    model = LinearDiT(**{**SMALL, "input_size": [1, k], "patch_size": 1}, ffn="mixffn", learn_sigma=False)
    assert model(torch.randn(3, 1, 1, k), torch.rand(3), torch.tensor([0, 5, 10])).shape == (3, 1, 1, k)


def test_inheritance_copies_exactly_the_shared_tensors_and_lists_the_new_ones(tmp_path, save_model):
    torch.manual_seed(0)
    dit = randomize(DiT(**SMALL, num_heads=4, learn_sigma=False), seed=3)
    save_model(dit, tmp_path / "dit")
    donor = dit.state_dict()

    lit = LinearDiT(**SMALL, num_heads=2, learn_sigma=False)  # other head count: qkv keeps its shape
    before = {k: v.clone() for k, v in lit.state_dict().items()}
    report = inherit_weights(lit, tmp_path / "dit")
    after = lit.state_dict()
    new = {f"blocks.{i}.attn.v_conv.{p}" for i in range(2) for p in ("weight", "bias")}
    assert set(report.new) == new and report.unused == ()
    assert set(report.copied) == set(donor) and len(report.copied) == len(after) - len(new)
    for key in after:
        assert torch.equal(after[key], donor[key] if key in donor else before[key]), key
    assert "blocks.1.attn.v_conv.weight" in report.summary()

    sana = LinearDiT(**SMALL, num_heads=2, v_conv=0, ffn="mixffn", use_pos_embed=False, learn_sigma=False)
    report = inherit_weights(sana, tmp_path / "dit")
    assert set(report.unused) == {"pos_embed"} | {f"blocks.{i}.mlp.{n}.{p}" for i in range(2) for n in ("fc1", "fc2")
                                                  for p in ("weight", "bias")}
    assert all(".mlp." in key for key in report.new)
    assert torch.equal(sana.blocks[1].attn.qkv.weight, dit.blocks[1].attn.qkv.weight)

    wide = LinearDiT(**{**SMALL, "hidden_size": 96}, num_heads=2, learn_sigma=False)
    with pytest.raises(GenvisError, match=r"tensor \S+ has shape .*inherit from a model of the same width") as err:
        inherit_weights(wide, tmp_path / "dit")
    assert "\n" not in str(err.value)


def test_inherited_gated_model_starts_from_the_dit_weights(tmp_path, save_model):
    dit = randomize(DiT(**SMALL, num_heads=4, learn_sigma=False), seed=4)
    save_model(dit, tmp_path / "dit")
    dig = LinearDiT(**SMALL, num_heads=4, attention="gated", v_conv=0, learn_sigma=False)
    report = inherit_weights(dig, tmp_path / "dit")
    assert report.unused == () and all(".attn." in key for key in report.new)
    assert {key.split(".attn.")[1] for key in report.new} >= {"gate.0.weight", "out_gate.weight", "out_norm.weight"}


def test_recipes_resolve_to_the_published_choices():
    lit, sana, dig = (LinearDiTConfig(size="S", recipe=r).resolved() for r in ("lit", "sana", "dig"))
    assert (lit["attention"], lit["num_heads"], lit["v_conv"], lit["ffn"], lit["use_pos_embed"]) == ("relu", 2, 5, "mlp", True)
    assert (sana["num_heads"], sana["v_conv"], sana["ffn"], sana["use_pos_embed"]) == (384 // 32, 0, "mixffn", False)
    assert (dig["attention"], dig["num_heads"], dig["v_conv"]) == ("gated", 6, 0)
    assert LinearDiTConfig(size="S", recipe="lit", num_heads=3, v_conv=0).resolved()["num_heads"] == 3
    assert MODELS.entry("linear_dit").meta["cls"] is LinearDiT


@pytest.mark.parametrize("override, message", [
    ("model.recipe=performer", "key 'model.recipe': 'performer' is not one of lit, sana, dig"),
    ("model.v_conv=4", "key 'model.v_conv': 4: expected 0 (none) or an odd kernel size"),
    ("model.num_heads=5", "key 'model.num_heads': width 192 is not divisible by 5 heads"),
    ("model.recipe=dig", None),
])
def test_config_errors_name_the_key(override, message):
    from pathlib import Path

    config = str(Path(__file__).resolve().parents[2] / "configs" / "digits" / "lit.yaml")
    if message is None:
        assert load_config(config, [override, "model.v_conv=0"]).model.resolved()["attention"] == "gated"
        return
    with pytest.raises(ConfigError) as err:
        load_config(config, [override])
    assert message in str(err.value) and "\n" not in str(err.value)
