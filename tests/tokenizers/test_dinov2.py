"""genvis.tokenizers.dinov2 against a plain functional ViT written here from the published formulas (pre-norm blocks
with layer scale, softmax(q k^T / sqrt(d)) v, erf GELU, LayerNorm eps 1e-6, the patch embedding as a matmul over
unfolded patches) and timm's resample_abs_pos_embed written out with F.interpolate, on tiny random state dicts in
timm's and the facebookresearch/dinov2 hub's layouts."""
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from genvis.errors import GenvisError
from genvis.tokenizers.dinov2 import DINOv2, load_dinov2, resample_pos_embed

D, DEPTH, HEADS, PATCH, HIDDEN = 64, 2, 4, 14, 128


def assert_one_line(err):
    message = str(err.value)
    assert message and "\n" not in message, message


def tiny_state(grid=4, seed=0, D=D, HIDDEN=HIDDEN):
    """Random timm-layout DINOv2 weights (biases everywhere, LayerNorm affine, layer scale)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=0.1, base=0.0):
        return base + scale * torch.randn(*shape, generator=g)

    state = {"cls_token": rnd(1, 1, D, scale=0.5), "pos_embed": rnd(1, 1 + grid * grid, D, scale=0.5),
             "patch_embed.proj.weight": rnd(D, 3, PATCH, PATCH, scale=0.05), "patch_embed.proj.bias": rnd(D),
             "norm.weight": rnd(D, base=1.0), "norm.bias": rnd(D)}
    for i in range(DEPTH):
        p = f"blocks.{i}."
        state.update({
            p + "norm1.weight": rnd(D, base=1.0), p + "norm1.bias": rnd(D),
            p + "attn.qkv.weight": rnd(3 * D, D, scale=0.2), p + "attn.qkv.bias": rnd(3 * D),
            p + "attn.proj.weight": rnd(D, D, scale=0.2), p + "attn.proj.bias": rnd(D),
            p + "ls1.gamma": rnd(D, scale=0.3, base=0.5),
            p + "norm2.weight": rnd(D, base=1.0), p + "norm2.bias": rnd(D),
            p + "mlp.fc1.weight": rnd(HIDDEN, D, scale=0.2), p + "mlp.fc1.bias": rnd(HIDDEN),
            p + "mlp.fc2.weight": rnd(D, HIDDEN, scale=0.2), p + "mlp.fc2.bias": rnd(D),
            p + "ls2.gamma": rnd(D, scale=0.3, base=0.5),
        })
    return state


def ref_pos_embed(pos_embed, h, w):
    """timm's resample_abs_pos_embed(pos_embed, (h, w), num_prefix_tokens=1): bicubic, antialias, no corners."""
    G = math.isqrt(pos_embed.shape[1] - 1)
    if (h, w) == (G, G):
        return pos_embed
    patch = pos_embed[:, 1:].reshape(1, G, G, -1).permute(0, 3, 1, 2)
    patch = F.interpolate(patch, size=(h, w), mode="bicubic", antialias=True)
    return torch.cat([pos_embed[:, :1], patch.permute(0, 2, 3, 1).reshape(1, h * w, -1)], dim=1)


def layer_norm(x, weight, bias, eps=1e-6):
    mean = x.mean(-1, keepdim=True)
    var = (x - mean).square().mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def reference(state, images, heads=HEADS, imagenet_norm=False):
    """The DINOv2 forward of VA-VAE's foundation model, in float64 with plain tensor ops."""
    s = {k: v.double() for k, v in state.items()}
    x = images.double().expand(-1, 3, -1, -1)
    x = F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False)
    if imagenet_norm:
        mean = torch.tensor([0.485, 0.456, 0.406], dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225], dtype=x.dtype).view(1, 3, 1, 1)
        x = ((x + 1) / 2 - mean) / std
    B, n = x.shape[0], 224 // PATCH
    patches = x.reshape(B, 3, n, PATCH, n, PATCH).permute(0, 2, 4, 1, 3, 5).reshape(B, n * n, 3 * PATCH * PATCH)
    t = patches @ s["patch_embed.proj.weight"].reshape(D, -1).T + s["patch_embed.proj.bias"]
    t = torch.cat([s["cls_token"].expand(B, 1, D), t], dim=1) + ref_pos_embed(s["pos_embed"], n, n)
    N, d = t.shape[1], D // heads
    for i in range(DEPTH):
        p = f"blocks.{i}."
        h = layer_norm(t, s[p + "norm1.weight"], s[p + "norm1.bias"])
        qkv = (h @ s[p + "attn.qkv.weight"].T + s[p + "attn.qkv.bias"]).reshape(B, N, 3, heads, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each B, heads, N, d
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1) @ v
        a = attn.transpose(1, 2).reshape(B, N, D) @ s[p + "attn.proj.weight"].T + s[p + "attn.proj.bias"]
        t = t + s[p + "ls1.gamma"] * a
        h = layer_norm(t, s[p + "norm2.weight"], s[p + "norm2.bias"])
        h = h @ s[p + "mlp.fc1.weight"].T + s[p + "mlp.fc1.bias"]
        h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
        t = t + s[p + "ls2.gamma"] * (h @ s[p + "mlp.fc2.weight"].T + s[p + "mlp.fc2.bias"])
    t = layer_norm(t, s["norm.weight"], s["norm.bias"])[:, 1:]
    return t.reshape(B, n, n, D).permute(0, 3, 1, 2).float()


def images(B=2, C=3, side=64, seed=1):
    return torch.rand(B, C, side, side, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture
def weights(tmp_path):
    path = tmp_path / "dinov2.safetensors"
    save_file(tiny_state(), str(path))
    return path


# ----------------------------------------------------------------------------- forward

def test_forward_matches_reference(weights):
    model = load_dinov2(weights, num_heads=HEADS)
    assert (model.dim, model.depth, model.num_heads, model.patch_size) == (D, DEPTH, HEADS, PATCH)
    x = images()
    out = model(x)
    assert out.shape == (2, D, 16, 16) and out.dtype == torch.float32
    expected = reference(tiny_state(), x)
    assert torch.allclose(out, expected, atol=1e-4), (out - expected).abs().max()  # float32 rounding
    out64 = load_dinov2(weights, num_heads=HEADS).double()(x)  # the same module in float64: the same numbers
    assert out64.dtype == torch.float32 and torch.allclose(out64, expected, atol=1e-6)
    # timm's data config instead of VA-VAE's raw [-1, 1] input
    normed = load_dinov2(weights, num_heads=HEADS, imagenet_norm=True)(x[:1])
    assert torch.allclose(normed, reference(tiny_state(), x[:1], imagenet_norm=True), atol=1e-4)
    assert not torch.allclose(normed, out[:1], atol=1e-3)
    # grey images are repeated to RGB; non-square inputs are resized to 224 x 224 too
    grey = x[:1, :1]
    assert torch.allclose(model(grey), model(grey.expand(-1, 3, -1, -1)), atol=1e-6)
    wide = torch.rand(1, 3, 32, 48) * 2 - 1
    assert torch.allclose(model(wide), reference(tiny_state(), wide), atol=1e-4)


def test_pos_embed_resample_is_timms():
    for grid, target in ((4, (16, 16)), (20, (16, 16)), (37, (16, 16)), (6, (3, 5))):
        pos = torch.randn(1, 1 + grid * grid, 8, generator=torch.Generator().manual_seed(grid))
        out = resample_pos_embed(pos, target)
        assert out.shape == (1, 1 + target[0] * target[1], 8)
        assert torch.allclose(out, ref_pos_embed(pos, *target), atol=1e-6)
        assert torch.equal(out[:, 0], pos[:, 0])  # the class position is kept
    pos = torch.randn(1, 17, 8)
    assert resample_pos_embed(pos, (4, 4)) is pos  # the stored grid: unchanged, as timm
    # antialias matters even when upsampling (PIL's a = -0.5 cubic against -0.75)
    plain = F.interpolate(pos[:, 1:].reshape(1, 4, 4, 8).permute(0, 3, 1, 2), size=(16, 16), mode="bicubic")
    assert not torch.allclose(resample_pos_embed(pos, (16, 16))[:, 1:], plain.permute(0, 2, 3, 1).reshape(1, 256, 8))


def test_pos_embed_cached_per_grid_and_not_saved(weights):
    model = load_dinov2(weights, num_heads=HEADS)
    first = model.pos_embed_for((16, 16))
    assert model.pos_embed_for((16, 16)) is first
    assert set(model.state_dict()) == set(tiny_state())
    with torch.no_grad():  # new weights in place: not the stale copy
        model.pos_embed.mul_(2)
    assert torch.allclose(model.pos_embed_for((16, 16)), 2 * first, atol=1e-6)


def test_hub_layout_loads_like_timm(tmp_path, weights):
    """The facebookresearch/dinov2 hub checkpoint (torch.save, mask_token, blocks possibly chunked as blocks.C.N)."""
    hub = dict(tiny_state(), mask_token=torch.zeros(1, D))
    torch.save(hub, tmp_path / "dinov2_hub.pth")
    chunked = {k.replace("blocks.", "blocks.0.", 1) if k.startswith("blocks.") else k: v for k, v in hub.items()}
    torch.save({"model": chunked}, tmp_path / "dinov2_chunked.pt")
    x = images(B=1)
    expected = load_dinov2(weights, num_heads=HEADS)(x)
    for name in ("dinov2_hub.pth", "dinov2_chunked.pt"):
        assert torch.allclose(load_dinov2(tmp_path / name, num_heads=HEADS)(x), expected, atol=1e-6)


def test_batch_independent_and_frozen(weights):
    model = load_dinov2(weights, num_heads=HEADS)
    x = images(B=2)
    batch = model(x)
    assert torch.allclose(model(x[1:2]), batch[1:2], atol=1e-5)
    assert all(not p.requires_grad for p in model.parameters())
    assert not batch.requires_grad
    model.train()
    assert not model.training and not any(m.training for m in model.modules())
    # a fresh module is frozen too, and gradients still reach the images when asked for
    fresh = DINOv2(D, DEPTH, HEADS, pos_grid=4)
    assert not fresh.training and all(not p.requires_grad for p in fresh.parameters())
    xg = x[:1].clone().requires_grad_(True)
    model(xg).square().sum().backward()
    assert xg.grad is not None and all(p.grad is None for p in model.parameters())


def test_heads_from_the_width_table(tmp_path, weights):
    with pytest.raises(GenvisError, match="num_heads") as err:
        load_dinov2(weights)  # width 64 is not a released size
    assert_one_line(err)
    path = tmp_path / "small.safetensors"
    save_file(tiny_state(D=384, HIDDEN=4 * 384), str(path))  # ViT-S's width
    assert load_dinov2(path).num_heads == 6


# ----------------------------------------------------------------------------- errors

def test_bad_files_give_one_line_naming_file_and_key(tmp_path):
    def fails(state, name, *expected):
        path = tmp_path / name
        if name.endswith(".safetensors"):
            save_file(state, str(path))
        else:
            torch.save(state, path)
        with pytest.raises(GenvisError) as err:
            load_dinov2(path, num_heads=HEADS)
        assert_one_line(err)
        for text in (str(path),) + expected:
            assert text in str(err.value), str(err.value)

    state = tiny_state()
    fails({k: v for k, v in state.items() if k != "blocks.1.mlp.fc2.bias"}, "missing.safetensors",
          "missing", "blocks.1.mlp.fc2.bias")
    fails({k: v for k, v in state.items() if k != "cls_token"}, "no_cls.safetensors", "cls_token")
    fails(dict(state, **{"head.weight": torch.zeros(10, D)}), "head.safetensors", "unexpected", "head.weight")
    fails(dict(state, reg_token=torch.zeros(1, 4, D)), "reg.safetensors", "reg_token", "register")
    fails(dict(state, register_tokens=torch.zeros(1, 4, D)), "reg_hub.pth", "register_tokens")
    swiglu = {k.replace("mlp.fc1", "mlp.w12"): v for k, v in state.items()}
    fails(swiglu, "giant.pth", "blocks.0.mlp.w12", "SwiGLU")
    fails([torch.zeros(1)], "list.pth", "not a state dict")
    fails(dict(state, pos_embed=torch.zeros(1, 1 + 15, D)), "grid.safetensors", "pos_embed")
    with pytest.raises(GenvisError) as err:
        load_dinov2(tmp_path / "absent.safetensors")
    assert_one_line(err)
    assert "absent.safetensors" in str(err.value)
