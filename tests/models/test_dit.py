"""genvis DiT against an independent functional reference of the official model (facebookresearch/DiT).

The reference below is written from the published architecture (REFERENCE.md, "DiT and SiT") with
plain tensor ops on a state dict that uses the official key names, so a genvis DiT that loads the
same dict with strict=True must return the same numbers. Random (non-zero) weights everywhere:
with the official zero init of adaLN and the output layer every variant would return zeros.
"""
import math

import pytest
import torch

from genvis.errors import GenvisError
from genvis.models import load_model
from genvis.models.dit import DIT_SIZES, DiT, dit_config, parse_arch
from genvis.samplers.guidance import CFG, ClassifierFreeGuidance

TINY = dict(input_size=8, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10)


#################################################################################
#                     Official layout, written from REFERENCE.md                #
#################################################################################


def official_shapes(depth, hidden, patch, in_channels, input_size, num_classes, learn_sigma=True, mlp_ratio=4):
    """Key -> shape of an official DiT state dict (class dropout > 0: one extra null row)."""
    height, width = (input_size, input_size) if isinstance(input_size, int) else input_size
    n_patches = (height // patch) * (width // patch)
    out_channels = 2 * in_channels if learn_sigma else in_channels
    mlp_hidden = int(hidden * mlp_ratio)
    shapes = {
        "pos_embed": (1, n_patches, hidden),
        "x_embedder.proj.weight": (hidden, in_channels, patch, patch),
        "x_embedder.proj.bias": (hidden,),
        "t_embedder.mlp.0.weight": (hidden, 256),
        "t_embedder.mlp.0.bias": (hidden,),
        "t_embedder.mlp.2.weight": (hidden, hidden),
        "t_embedder.mlp.2.bias": (hidden,),
        "y_embedder.embedding_table.weight": (num_classes + 1, hidden),
        "final_layer.linear.weight": (patch * patch * out_channels, hidden),
        "final_layer.linear.bias": (patch * patch * out_channels,),
        "final_layer.adaLN_modulation.1.weight": (2 * hidden, hidden),
        "final_layer.adaLN_modulation.1.bias": (2 * hidden,),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        shapes.update({
            b + "attn.qkv.weight": (3 * hidden, hidden),
            b + "attn.qkv.bias": (3 * hidden,),
            b + "attn.proj.weight": (hidden, hidden),
            b + "attn.proj.bias": (hidden,),
            b + "mlp.fc1.weight": (mlp_hidden, hidden),
            b + "mlp.fc1.bias": (mlp_hidden,),
            b + "mlp.fc2.weight": (hidden, mlp_hidden),
            b + "mlp.fc2.bias": (hidden,),
            b + "adaLN_modulation.1.weight": (6 * hidden, hidden),
            b + "adaLN_modulation.1.bias": (6 * hidden,),
        })
    return shapes


def random_state_dict(shapes, seed=0):
    """Random weights scaled by 1/sqrt(fan_in) so activations stay O(1) through the network."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in shapes.items():
        if key == "pos_embed" or key.endswith("embedding_table.weight"):
            scale = 0.5
        elif len(shape) == 1:
            scale = 0.1
        else:
            scale = 1.0 / math.sqrt(math.prod(shape[1:]))
        sd[key] = torch.randn(shape, generator=g) * scale
    return sd


#################################################################################
#                 Independent functional reference forward                      #
#################################################################################


def _linear(x, sd, name):
    return x @ sd[name + ".weight"].T + sd[name + ".bias"]


def _layer_norm(x, eps=1e-6):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)  # biased, as nn.LayerNorm
    return (x - mean) / torch.sqrt(var + eps)


def _gelu_tanh(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


def reference_dit(sd, x, t, y, patch, num_heads, learn_sigma):
    """The official DiT forward written with explicit tensor ops, computed in float64.

    The sinusoid is computed in float32 as the official TimestepEmbedder does (its float32 rounding
    of t * freq is part of the official numbers), then everything runs in float64.
    """
    sd = {k: v.double() for k, v in sd.items()}
    n, in_c, height, width = x.shape
    hidden = sd["pos_embed"].shape[-1]
    out_c = 2 * in_c if learn_sigma else in_c

    # Patch embedding: stride-p conv, tokens in row-major order of the patch grid.
    h = torch.nn.functional.conv2d(x.double(), sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=patch)
    gh, gw = h.shape[-2:]
    h = h.reshape(n, hidden, gh * gw).transpose(1, 2) + sd["pos_embed"]

    # Timestep: 256-d sinusoid, cos half then sin half, max period 1e4 (float32 as in the official code).
    half = 128
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    t_freq = torch.cat([torch.cos(args), torch.sin(args)], dim=-1).double()
    t_emb = _linear(torch.nn.functional.silu(_linear(t_freq, sd, "t_embedder.mlp.0")), sd, "t_embedder.mlp.2")
    c = t_emb + sd["y_embedder.embedding_table.weight"][y]
    c_act = torch.nn.functional.silu(c)

    head_dim = hidden // num_heads
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(depth):
        b = f"blocks.{i}."
        mod = _linear(c_act, sd, b + "adaLN_modulation.1")
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            mod[:, j * hidden:(j + 1) * hidden] for j in range(6)
        )
        a = _modulate(_layer_norm(h), shift_msa, scale_msa)
        qkv = _linear(a, sd, b + "attn.qkv").reshape(n, -1, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # N, heads, T, head_dim
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(head_dim), dim=-1)
        attn = (weights @ v).transpose(1, 2).reshape(n, -1, hidden)
        h = h + gate_msa[:, None] * _linear(attn, sd, b + "attn.proj")
        m = _modulate(_layer_norm(h), shift_mlp, scale_mlp)
        m = _linear(_gelu_tanh(_linear(m, sd, b + "mlp.fc1")), sd, b + "mlp.fc2")
        h = h + gate_mlp[:, None] * m

    mod = _linear(c_act, sd, "final_layer.adaLN_modulation.1")
    shift, scale = mod[:, :hidden], mod[:, hidden:]
    out = _linear(_modulate(_layer_norm(h), shift, scale), sd, "final_layer.linear")  # N, T, p*p*C

    # Official unpatchify.
    out = out.reshape(n, gh, gw, patch, patch, out_c)
    out = torch.einsum("nhwpqc->nchpwq", out)
    return out.reshape(n, out_c, gh * patch, gw * patch)


def tiny_dit(patch=2, learn_sigma=True, seed=0, **kwargs):
    """A tiny genvis DiT loaded (strict) with random official-layout weights; returns (model, state dict)."""
    cfg = dict(TINY, patch_size=patch, learn_sigma=learn_sigma, **kwargs)
    model = DiT(**cfg).eval()
    sd = random_state_dict(official_shapes(
        cfg["depth"], cfg["hidden_size"], patch, cfg["in_channels"], cfg["input_size"], cfg["num_classes"], learn_sigma,
    ), seed=seed)
    model.load_state_dict(sd, strict=True)
    return model, sd


def inputs(batch=4, seed=1, integer_t=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, TINY["in_channels"], TINY["input_size"], TINY["input_size"], generator=g)
    if integer_t:
        t = torch.tensor([0, 17, 500, 999])[:batch]
    else:
        t = torch.tensor([0.0, 3.7, 500.25, 999.0])[:batch]
    y = torch.tensor([0, 3, 9, TINY["num_classes"]])[:batch]  # the last one is the null class
    return x, t, y


#################################################################################
#                                  Tests                                        #
#################################################################################


@pytest.mark.parametrize("integer_t", [False, True], ids=["float_t", "int_t"])
@pytest.mark.parametrize("patch", [2, 4])
@pytest.mark.parametrize("learn_sigma", [True, False], ids=["learn_sigma", "fixed_sigma"])
def test_forward_matches_functional_reference(learn_sigma, patch, integer_t):
    model, sd = tiny_dit(patch=patch, learn_sigma=learn_sigma)
    x, t, y = inputs(integer_t=integer_t)
    with torch.no_grad():
        out = model(x, t, y)
    ref = reference_dit(sd, x, t, y, patch, TINY["num_heads"], learn_sigma)
    out_c = 8 if learn_sigma else 4
    assert out.shape == (4, out_c, 8, 8) and out.dtype == torch.float32
    assert ref.abs().mean() > 0.1  # the weights are not degenerate: the comparison can fail
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_forward_matches_reference_at_small_activations():
    """Tokens with variance ~1e-6 entering the first LayerNorm: here its eps (1e-6) decides the output."""
    model, sd = tiny_dit()
    for key in ("pos_embed", "x_embedder.proj.weight", "x_embedder.proj.bias"):
        sd[key] = sd[key] * 1e-3
    model.load_state_dict(sd, strict=True)
    x, t, y = inputs()
    with torch.no_grad():
        out = model(x, t, y)
    ref = reference_dit(sd, x, t, y, 2, TINY["num_heads"], True)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_reference_is_sensitive_to_conditioning():
    """Guards the test above: labels, timesteps and patch order all move the output far beyond atol."""
    model, sd = tiny_dit()
    x, t, y = inputs()
    with torch.no_grad():
        base = model(x, t, y)
        other_label = model(x, t, (y + 1) % TINY["num_classes"])
        other_t = model(x, t + 1, y)
        flipped = model(x.flip(-1), t, y).flip(-1)
    for changed in (other_label, other_t, flipped):
        assert (changed - base).abs().max() > 1e-2


def test_state_dict_layout_dit_s2():
    model = DiT(**dit_config("S", 2, input_size=32, in_channels=4, num_classes=1000))
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = official_shapes(depth=12, hidden=384, patch=2, in_channels=4, input_size=32, num_classes=1000)
    assert got == expected
    # The headline shapes, spelled out.
    assert got["pos_embed"] == (1, 256, 384)
    assert got["x_embedder.proj.weight"] == (384, 4, 2, 2)
    assert got["y_embedder.embedding_table.weight"] == (1001, 384)
    assert got["blocks.0.attn.qkv.weight"] == (1152, 384)
    assert got["blocks.11.adaLN_modulation.1.weight"] == (2304, 384)
    assert got["final_layer.linear.weight"] == (32, 384)
    assert got["final_layer.adaLN_modulation.1.weight"] == (768, 384)
    assert not any("norm" in k for k in got)
    assert not model.pos_embed.requires_grad


@pytest.mark.parametrize("arch, millions", [("DiT-S/2", 32.96), ("DiT-B/2", 130.5), ("DiT-L/2", 458.1), ("DiT-XL/2", 675.1)])
def test_parameter_counts(arch, millions):
    size, patch = parse_arch(arch)
    with torch.device("meta"):  # shapes only, nothing allocated
        model = DiT(**dit_config(size, patch, input_size=32, in_channels=4, num_classes=1000))
    counted = sum(v.numel() for v in model.state_dict().values())
    assert abs(counted / 1e6 - millions) < 0.05
    assert model.num_params() == counted
    depth, hidden, heads = DIT_SIZES[size]
    assert (model.config.depth, model.config.hidden_size, model.config.num_heads) == (depth, hidden, heads)
    assert sum(math.prod(s) for s in official_shapes(depth, hidden, patch, 4, 32, 1000).values()) == counted


def test_parse_arch():
    assert parse_arch("DiT-XL/2") == ("XL", 2)
    assert parse_arch("DiT-S/8") == ("S", 8)
    assert DIT_SIZES["S"] == (12, 384, 6) and DIT_SIZES["B"] == (12, 768, 12)
    assert DIT_SIZES["L"] == (24, 1024, 16) and DIT_SIZES["XL"] == (28, 1152, 16)
    for bad in ("DiT-M/2", "DiT-XL/3", "XL/2", "SiT-XL/2"):
        with pytest.raises(ValueError, match=repr(bad).replace("/", ".")):
            parse_arch(bad)


def reference_sincos_2d(dim, grid, columns=None):
    """MAE/DiT layout, from the definition: token i*columns + j (row i, column j) of a grid x columns grid
    (columns=None: square) -> [sin(j w), cos(j w), sin(i w), cos(i w)] with w_k = 10000^(-k / (dim/4)), k < dim/4."""
    quarter, columns = dim // 4, columns or grid
    omega = 10000.0 ** (-torch.arange(quarter, dtype=torch.float64) / quarter)
    rows = torch.arange(grid, dtype=torch.float64).repeat_interleave(columns)  # i
    cols = torch.arange(columns, dtype=torch.float64).repeat(grid)  # j
    a, b = cols[:, None] * omega, rows[:, None] * omega
    return torch.cat([a.sin(), a.cos(), b.sin(), b.cos()], dim=1)


def test_initialisation():
    torch.manual_seed(0)
    model = DiT(**dict(TINY, num_classes=1000, input_size=16, patch_size=2))
    for i, block in enumerate(model.blocks):
        assert torch.count_nonzero(block.adaLN_modulation[1].weight) == 0, f"block {i}"
        assert torch.count_nonzero(block.adaLN_modulation[1].bias) == 0, f"block {i}"
    for p in (model.final_layer.adaLN_modulation[1].weight, model.final_layer.adaLN_modulation[1].bias,
              model.final_layer.linear.weight, model.final_layer.linear.bias):
        assert torch.count_nonzero(p) == 0

    expected = reference_sincos_2d(64, 8)
    assert model.pos_embed.shape == (1, 64, 64)
    torch.testing.assert_close(model.pos_embed[0].double(), expected, atol=1e-6, rtol=0)

    table = model.y_embedder.embedding_table.weight
    assert table.shape == (1001, 64)
    assert abs(table.std().item() - 0.02) < 0.001 and abs(table.mean().item()) < 0.001
    for lin in (model.t_embedder.mlp[0], model.t_embedder.mlp[2]):
        assert abs(lin.weight.std().item() - 0.02) < 0.002
    # Xavier-uniform linears with zero bias, e.g. the first qkv.
    qkv = model.blocks[0].attn.qkv
    bound = math.sqrt(6.0 / (64 + 192))
    assert qkv.weight.abs().max() <= bound and qkv.weight.abs().max() > 0.9 * bound
    assert torch.count_nonzero(qkv.bias) == 0
    # Patch embedding: xavier on the flattened kernel (fan_in 4*2*2, fan_out 64).
    w = model.x_embedder.proj.weight
    bound = math.sqrt(6.0 / (16 + 64))
    assert w.abs().max() <= bound and w.abs().max() > 0.8 * bound

    # Zero init means the freshly built model outputs exactly zero (adaLN-Zero).
    x, t, y = inputs()
    with torch.no_grad():
        assert torch.count_nonzero(DiT(**TINY)(x, t, y)) == 0


#################################################################################
#                         Classifier-free guidance                              #
#################################################################################


class CountingModel:
    def __init__(self, model):
        self.model = model
        self.batches = []

    def __call__(self, x, t, y):
        self.batches.append(x.shape[0])
        return self.model(x, t, y)


def official_forward_with_cfg(model, x, t, y, null, scale):
    """The official DiT forward_with_cfg: guidance on the first 3 channels only, the rest of each half unguided."""
    combined_y = torch.cat([y, torch.full_like(y, null)])
    out = model(torch.cat([x, x]), torch.cat([t, t]), combined_y)
    eps, rest = out[:, :3], out[:, 3:]
    cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
    half_eps = uncond_eps + scale * (cond_eps - uncond_eps)
    eps = torch.cat([half_eps, half_eps], dim=0)
    return torch.cat([eps, rest], dim=1)[: len(x)]  # the conditional half


def test_cfg_guides_all_prediction_channels_by_default():
    model, _ = tiny_dit(learn_sigma=True)
    x, t, y = inputs()
    y = y.clamp(max=TINY["num_classes"] - 1)
    counted = CountingModel(model)
    with torch.no_grad():
        out = ClassifierFreeGuidance(counted, cfg=4.0, null_label=10, pred_channels=4)(x, t, y)
        cond = model(x, t, y)
        uncond = model(x, t, torch.full_like(y, 10))
    assert counted.batches == [8]
    assert out.shape == (4, 8, 8, 8)
    expected = torch.cat([uncond[:, :4] + 4.0 * (cond[:, :4] - uncond[:, :4]), cond[:, 4:]], dim=1)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert (cond[:, :4] - uncond[:, :4]).abs().max() > 1e-2  # guidance actually moved something


def test_cfg_three_channels_matches_official_forward_with_cfg():
    model, _ = tiny_dit(learn_sigma=True, seed=3)
    x, t, y = inputs(seed=5)
    y = y.clamp(max=TINY["num_classes"] - 1)
    with torch.no_grad():
        out = ClassifierFreeGuidance(model, CFG(1.5, channels=3), null_label=10, pred_channels=4)(x, t, y)
        expected = official_forward_with_cfg(model, x, t, y, null=10, scale=1.5)
        cond = model(x, t, y)
        everything = ClassifierFreeGuidance(model, cfg=1.5, null_label=10, pred_channels=4)(x, t, y)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    # The 4th latent channel and the variance are the conditional output, unguided.
    torch.testing.assert_close(out[:, 3:], cond[:, 3:], atol=1e-5, rtol=1e-5)
    assert (out[:, 3] - everything[:, 3]).abs().max() > 1e-3


def test_cfg_scale_one_is_one_plain_call():
    model, _ = tiny_dit()
    x, t, y = inputs()
    counted = CountingModel(model)
    with torch.no_grad():
        out = ClassifierFreeGuidance(counted, cfg=1.0, null_label=10, pred_channels=4)(x, t, y)
        expected = model(x, t, y)
    assert counted.batches == [4]
    assert torch.equal(out, expected)


@pytest.mark.parametrize("size, patch", [((1, 12), 1), ((4, 8), 2)], ids=["1x12_tokens", "4x8_p2"])
def test_rectangular_inputs(size, patch, tmp_path):
    """input_size [H, W] (a 1 x K row of 1D tokens, e.g. KL-TiTok's): the sin-cos embedding of the (H/p) x (W/p)
    grid from the definition, the functional reference's forward on official-layout weights, and a round trip
    through save_pretrained that keeps the shape; a patch size that does not tile the input is one line."""
    from genvis.errors import ConfigError
    from genvis.models.dit import DiTConfig, dit_from_config

    cfg = dict(TINY, input_size=list(size), patch_size=patch, learn_sigma=False)
    model = DiT(**cfg).eval()
    rows, cols = size[0] // patch, size[1] // patch
    torch.testing.assert_close(model.pos_embed[0].double(), reference_sincos_2d(64, rows, cols), atol=1e-6, rtol=0)
    assert model.sample_shape == (4, *size)
    sd = random_state_dict(official_shapes(2, 64, patch, 4, size, 10, learn_sigma=False), seed=3)
    model.load_state_dict(sd, strict=True)
    g = torch.Generator().manual_seed(2)
    x, t, y = torch.randn(3, 4, *size, generator=g), torch.tensor([1.0, 250.5, 999.0]), torch.tensor([0, 7, 10])
    with torch.no_grad():
        out = model(x, t, y)
    ref = reference_dit(sd, x, t, y, patch, TINY["num_heads"], learn_sigma=False)
    assert out.shape == (3, 4, *size) and ref.abs().mean() > 0.1
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    model.save_pretrained(str(tmp_path / "rect"))
    loaded = load_model(tmp_path / "rect")
    assert loaded.sample_shape == (4, *size)
    with torch.no_grad():
        assert torch.equal(loaded(x, t, y), out)
    section = DiTConfig(size="tiny", patch_size=2)
    with pytest.raises(ConfigError, match=r"model.patch_size.*2 does not divide the input size 1x12.*patch_size 1"):
        dit_from_config(section, sample_shape=(4, 1, 12), num_classes=10)


#################################################################################
#                          save / load round trip                               #
#################################################################################


def test_save_pretrained_load_model_round_trip(tmp_path):
    model, _ = tiny_dit(learn_sigma=False, prediction_type="velocity", schedule="flow", seed=7)
    folder = tmp_path / "tiny"
    model.save_pretrained(str(folder), safe_serialization=True)
    loaded = load_model(folder)
    assert not loaded.training
    for key in ("prediction_type", "schedule", "learn_sigma", "input_size", "patch_size", "hidden_size", "depth",
                "num_heads", "num_classes", "in_channels"):
        assert loaded.config[key] == model.config[key], key
    assert loaded.config.prediction_type == "velocity" and loaded.config.schedule == "flow"
    assert loaded.config.learn_sigma is False
    x, t, y = inputs()
    t = t / 1000.0
    with torch.no_grad():
        assert torch.equal(loaded(x, t, y), model(x, t, y))
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_load_model_from_run_directory(tmp_path):
    model, _ = tiny_dit(seed=11)
    run = tmp_path / "run"
    model.save_pretrained(str(run / "model"), safe_serialization=True)
    (run / "config.yaml").write_text("model: {}\n")
    loaded = load_model(run)
    x, t, y = inputs()
    with torch.no_grad():
        assert torch.equal(loaded(x, t, y), model(x, t, y))
    assert loaded.config.learn_sigma is True and loaded.config.prediction_type == "eps"
    assert loaded.config.schedule == "linear"


def test_load_model_without_config_names_the_path(tmp_path):
    empty = tmp_path / "not_a_model"
    empty.mkdir()
    with pytest.raises(GenvisError, match="not_a_model"):
        load_model(empty)
    with pytest.raises(GenvisError, match="does_not_exist"):
        load_model(tmp_path / "does_not_exist")
    unfinished = tmp_path / "unfinished_run"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text("model: {}\n")
    with pytest.raises(GenvisError, match="unfinished_run.*model/config.json"):
        load_model(unfinished)
