"""DiT's architecture options (LightningDiT's RMSNorm, SwiGLU, 2D RoPE, qk-norm, wo_shift) against written-out
formulas, and `genvis import lightningdit` / `genvis import sit` against an independent forward pass of the
official layout on synthetic weights."""
import math

import pytest
import torch
import torch.nn.functional as F

from genvis.cli import main
from genvis.models import load_model
from genvis.models.dit import DiT, convert_lightningdit_state_dict
from genvis.models.layers import RMSNorm, SwiGLU, apply_rope, rope_2d


def test_rope_rotates_each_channel_pair_by_its_row_or_column_angle():
    """head width 8 on a 2 x 3 grid: channels (0,1), (2,3) turn by row * 1 and row * 0.01, channels (4,5), (6,7) by
    column * 1 and column * 0.01 (theta^(-2i / 4), theta = 1e4); tokens listed row by row."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 8, generator=g, dtype=torch.float64)
    cos, sin = rope_2d(8, (2, 3))
    out = apply_rope(x, cos.double(), sin.double())
    expected = torch.empty_like(x)
    for token in range(6):
        row, col = divmod(token, 3)
        for pair, angle in enumerate((row * 1.0, row * 0.01, col * 1.0, col * 0.01)):
            a, b = x[:, token, 2 * pair], x[:, token, 2 * pair + 1]
            expected[:, token, 2 * pair] = a * math.cos(angle) - b * math.sin(angle)
            expected[:, token, 2 * pair + 1] = a * math.sin(angle) + b * math.cos(angle)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    assert torch.allclose(out.norm(dim=-1), x.norm(dim=-1))  # a rotation


def test_rope_scores_depend_only_on_the_offset():
    """<R(p) q, R(p') k> is a function of p - p': the same q, k at (0,0)/(1,2) and at (1,1)/(2,3) score the same."""
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(16, generator=g, dtype=torch.float64), torch.randn(16, generator=g, dtype=torch.float64)
    cos, sin = (t.double() for t in rope_2d(16, (3, 4)))
    at = lambda v, r, c: apply_rope(v[None], cos[r * 4 + c][None], sin[r * 4 + c][None])[0]  # noqa: E731
    near = at(q, 0, 0) @ at(k, 1, 2)
    shifted = at(q, 1, 1) @ at(k, 2, 3)
    assert near.item() == pytest.approx(shifted.item(), abs=1e-6)  # the tables are float32
    assert abs((at(q, 0, 0) @ at(k, 0, 0)) - near) > 1e-3  # the offset does matter


def test_rmsnorm_and_swiglu_are_the_formulas():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 5, 12, generator=g)
    norm = RMSNorm(12)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(12, generator=g))
    expected = x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(norm(x), expected)
    ffn = SwiGLU(12, 20)
    w12, b12, w3, b3 = ffn.w12.weight, ffn.w12.bias, ffn.w3.weight, ffn.w3.bias
    h = x @ w12.T + b12
    expected = (h[..., :20] * torch.sigmoid(h[..., :20]) * h[..., 20:]) @ w3.T + b3
    torch.testing.assert_close(ffn(x), expected)


#################################################################################
#          LightningDiT: official layout and a forward written out             #
#################################################################################

TINY = dict(hidden=64, heads=4, depth=2, patch=1, channels=4, grid=4, classes=10)


def eva_rope_tables(head_dim, grid):
    """The official VisionRotaryEmbeddingFast tables, written from its code: per-axis dim head_dim / 2,
    freqs theta^(-arange(0, dim, 2) / dim) repeated pairwise, rows' then columns' angles, flattened row by row."""
    dim = head_dim // 2
    freqs = 1.0 / (10000 ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
    t = torch.arange(grid).float()
    f = torch.repeat_interleave(torch.einsum("i,f->if", t, freqs), 2, dim=-1)  # [grid, dim]
    both = torch.cat([f[:, None, :].expand(grid, grid, dim), f[None, :, :].expand(grid, grid, dim)], dim=-1)
    return both.cos().reshape(grid * grid, head_dim), both.sin().reshape(grid * grid, head_dim)


def official_state(wo_shift=False, qk_norm=False, seed=0):
    """A random state dict in LightningDiT's key layout (RMSNorm, SwiGLU, RoPE tables), scaled so activations stay O(1)."""
    d, c, p, n = TINY["hidden"], TINY["channels"], TINY["patch"], TINY["grid"] ** 2
    hidden = int(2 / 3 * 4 * d)
    shapes = {"pos_embed": (1, n, d), "x_embedder.proj.weight": (d, c, p, p), "x_embedder.proj.bias": (d,),
              "t_embedder.mlp.0.weight": (d, 256), "t_embedder.mlp.0.bias": (d,), "t_embedder.mlp.2.weight": (d, d),
              "t_embedder.mlp.2.bias": (d,), "y_embedder.embedding_table.weight": (TINY["classes"] + 1, d),
              "final_layer.norm_final.weight": (d,), "final_layer.linear.weight": (p * p * c, d),
              "final_layer.linear.bias": (p * p * c,), "final_layer.adaLN_modulation.1.weight": (2 * d, d),
              "final_layer.adaLN_modulation.1.bias": (2 * d,)}
    mod = 4 if wo_shift else 6
    for i in range(TINY["depth"]):
        b = f"blocks.{i}."
        shapes.update({b + "norm1.weight": (d,), b + "norm2.weight": (d,), b + "attn.qkv.weight": (3 * d, d),
                       b + "attn.qkv.bias": (3 * d,), b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,),
                       b + "mlp.w12.weight": (2 * hidden, d), b + "mlp.w12.bias": (2 * hidden,),
                       b + "mlp.w3.weight": (d, hidden), b + "mlp.w3.bias": (d,),
                       b + "adaLN_modulation.1.weight": (mod * d, d), b + "adaLN_modulation.1.bias": (mod * d,)})
        if qk_norm:
            shapes.update({b + "attn.q_norm.weight": (d // TINY["heads"],), b + "attn.k_norm.weight": (d // TINY["heads"],)})
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        if "norm" in key:  # RMSNorm weights near 1
            state[key] = 1 + 0.1 * torch.randn(shape, generator=g)
        elif len(shape) == 1:
            state[key] = 0.1 * torch.randn(shape, generator=g)
        else:
            state[key] = torch.randn(shape, generator=g) / math.sqrt(math.prod(shape[1:]))
    state["feat_rope.freqs_cos"], state["feat_rope.freqs_sin"] = eva_rope_tables(d // TINY["heads"], TINY["grid"])
    return state


def reference_lightningdit(sd, x, t, y, wo_shift=False, qk_norm=False):
    """LightningDiT's forward (models/lightningdit.py) with plain tensor ops in float64."""
    sd = {k: v.double() for k, v in sd.items()}
    heads, d = TINY["heads"], TINY["hidden"]
    rms = lambda v, w: v / torch.sqrt((v**2).mean(-1, keepdim=True) + 1e-6) * w  # noqa: E731
    lin = lambda v, name: v @ sd[name + ".weight"].T + sd[name + ".bias"]  # noqa: E731

    def rope(v):  # t * cos + rotate_half(t) * sin, rotate_half: (x1, x2) -> (-x2, x1) per pair
        pairs = v.reshape(*v.shape[:-1], -1, 2)
        rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).reshape(v.shape)
        return v * sd["feat_rope.freqs_cos"] + rotated * sd["feat_rope.freqs_sin"]

    n = x.shape[0]
    h = F.conv2d(x.double(), sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=TINY["patch"])
    h = h.flatten(2).transpose(1, 2) + sd["pos_embed"]
    freqs = torch.exp(-math.log(10000.0) * torch.arange(128, dtype=torch.float32) / 128)
    args = t.float()[:, None] * freqs[None]
    t_freq = torch.cat([torch.cos(args), torch.sin(args)], dim=-1).double()
    c = lin(F.silu(lin(t_freq, "t_embedder.mlp.0")), "t_embedder.mlp.2") + sd["y_embedder.embedding_table.weight"][y]
    c = F.silu(c)
    for i in range(TINY["depth"]):
        b = f"blocks.{i}."
        chunks = lin(c, b + "adaLN_modulation.1").chunk(4 if wo_shift else 6, dim=1)
        if wo_shift:
            (scale1, gate1, scale2, gate2), shift1, shift2 = chunks, 0, 0
        else:
            shift1, scale1, gate1, shift2, scale2, gate2 = chunks
            shift1, shift2 = shift1[:, None], shift2[:, None]
        a = rms(h, sd[b + "norm1.weight"]) * (1 + scale1[:, None]) + shift1
        q, k, v = lin(a, b + "attn.qkv").reshape(n, -1, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        if qk_norm:
            q, k = rms(q, sd[b + "attn.q_norm.weight"]), rms(k, sd[b + "attn.k_norm.weight"])
        q, k = rope(q), rope(k)
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), dim=-1) @ v
        h = h + gate1[:, None] * lin(attn.transpose(1, 2).reshape(n, -1, d), b + "attn.proj")
        m = rms(h, sd[b + "norm2.weight"]) * (1 + scale2[:, None]) + shift2
        x12 = lin(m, b + "mlp.w12")
        x1, x2 = x12.chunk(2, dim=-1)
        h = h + gate2[:, None] * lin(F.silu(x1) * x2, b + "mlp.w3")
    shift, scale = lin(c, "final_layer.adaLN_modulation.1").chunk(2, dim=1)
    out = lin(rms(h, sd["final_layer.norm_final.weight"]) * (1 + scale[:, None]) + shift[:, None], "final_layer.linear")
    g = TINY["grid"]
    return out.reshape(n, g, g, TINY["channels"]).permute(0, 3, 1, 2)  # patch 1


def inputs(seed=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, TINY["channels"], TINY["grid"], TINY["grid"], generator=g)
    return x, torch.tensor([0.05, 0.5, 0.93]), torch.tensor([1, 7, TINY["classes"]])


@pytest.mark.parametrize("wo_shift, qk_norm", [(False, False), (True, True)], ids=["xl_recipe", "wo_shift_qk_norm"])
def test_imported_lightningdit_matches_the_official_forward(wo_shift, qk_norm):
    state = official_state(wo_shift=wo_shift, qk_norm=qk_norm)
    config, converted = convert_lightningdit_state_dict(state, num_heads=TINY["heads"])
    assert "feat_rope.freqs_cos" not in converted
    assert (config["norm"], config["ffn"], config["rope"], config["qk_norm"], config["adaln_shift"]) == (
        "rmsnorm", "swiglu", True, qk_norm, not wo_shift)
    assert (config["schedule"], config["prediction_type"], config["input_size"], config["learn_sigma"]) == (
        "sit", "velocity", 4, False)
    model = DiT(**config).eval()
    model.load_state_dict(converted, strict=True)
    x, t, y = inputs()
    with torch.no_grad():
        out = model(x, t, y)
    ref = reference_lightningdit(state, x, t, y, wo_shift=wo_shift, qk_norm=qk_norm)
    assert ref.abs().mean() > 0.1
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_import_lightningdit_cli_writes_a_folder_that_samples_in_sits_time(tmp_path):
    state = official_state()
    torch.save({"ema": state, "opt": {}}, tmp_path / "ckpt.pt")
    assert main(["import", "lightningdit", str(tmp_path / "ckpt.pt"), str(tmp_path / "ld"), "--heads", "4"]) == 0
    model = load_model(tmp_path / "ld")
    assert model.config.schedule == "sit" and model.config.norm == "rmsnorm" and model.config.rope
    x, t, y = inputs()
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y).double(), reference_lightningdit(state, x, t, y), atol=1e-5, rtol=1e-5)
    from genvis.diffusion.predictions import Denoiser
    from genvis.diffusion.schedules import schedule_for_model

    seen = []
    denoiser = Denoiser(lambda x, s, **c: seen.append(s) or model(x, s, **c), schedule_for_model(model), "velocity")
    with torch.no_grad():
        pred = denoiser.predict(x, 0.25, y=y)
    assert torch.allclose(seen[0], torch.full((3,), 0.75))  # the network sees SiT's time, t = 1 data
    v = model(x, torch.full((3,), 0.75), y)  # SiT: v = x0 - eps, x = s x0 + (1 - s) eps with s = 0.75
    torch.testing.assert_close(pred.x0, x + 0.25 * v, atol=1e-5, rtol=1e-5)
    # a RoPE table that is not the one of this grid is one line naming it
    bad = dict(state, **{"feat_rope.freqs_cos": state["feat_rope.freqs_cos"].flip(0)})
    torch.save(bad, tmp_path / "bad.pt")
    assert main(["import", "lightningdit", str(tmp_path / "bad.pt"), str(tmp_path / "bad"), "--heads", "4"]) == 2
    assert not (tmp_path / "bad").exists()


def test_import_sit_keeps_dits_keys_in_sits_time(tmp_path):
    model = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=384, depth=12, num_heads=6, num_classes=10)
    g = torch.Generator().manual_seed(4)
    state = {k: torch.randn(v.shape, generator=g) * 0.02 for k, v in model.state_dict().items()}
    torch.save(state, tmp_path / "sit.pt")
    assert main(["import", "sit", str(tmp_path / "sit.pt"), str(tmp_path / "sit"), "--arch", "SiT-S/2"]) == 0
    loaded = load_model(tmp_path / "sit")
    assert (loaded.config.schedule, loaded.config.prediction_type, loaded.config.learn_sigma) == ("sit", "velocity", True)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())
    assert main(["import", "sit", str(tmp_path / "sit.pt"), str(tmp_path / "x"), "--arch", "DiT-S/2"]) == 2
