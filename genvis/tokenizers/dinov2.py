"""A frozen DINOv2 ViT (Oquab et al. 2023) as the vision foundation model of VA-VAE's alignment loss (Yao et al.
2025, hustvl/LightningDiT vavae/ldm/models/foundation_models.py):

    model = timm.create_model("hf-hub:timm/vit_large_patch14_dinov2.lvd142m", pretrained=True, dynamic_img_size=True)
    x = F.interpolate(images, size=(224, 224), mode="bilinear", align_corners=False)
    feat = model.forward_features(x)[:, 1:]  -> [B, 1024, 16, 16]

The images are the autoencoder's own input (autoencoder.py: `aux_feature = self.foundation_model(input)`), in
[-1, 1] (taming's ImagePaths: image / 127.5 - 1), fed to the ViT without ImageNet normalisation; `imagenet_norm=True`
applies timm's data config instead. The grid is always 16 x 16 (VA-VAE reshapes to h // 16: right for 256-px input).

Parameter names follow timm's VisionTransformer (cls_token, pos_embed, patch_embed.proj, blocks.N.{norm1, attn.qkv,
attn.proj, ls1.gamma, norm2, mlp.fc1, mlp.fc2, ls2.gamma}, norm), which the original facebookresearch/dinov2 hub
checkpoints share up to mask_token (dropped) and chunked block indices. Register tokens (the reg4 models) and the
SwiGLU MLP (giant2) are refused. Nothing is downloaded: load_dinov2 reads a local file.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from genvis.errors import GenvisError
from genvis.io import load_checkpoint_file, load_state_strict

PathLike = Union[str, Path]

IMAGE_SIZE = 224  # VA-VAE's input side: 16 x 16 patches of 14 px
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HEADS = {384: 6, 768: 12, 1024: 16, 1536: 24}  # width -> heads of ViT-S/B/L/g DINOv2 (head dim 64)
EXPECTED = "a DINOv2 ViT state dict (timm vit_*_patch14_dinov2 or facebookresearch/dinov2 hub layout)"


def resample_pos_embed(pos_embed: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    """pos_embed [1, 1 + G * G, D] (class position first) for an h x w patch grid: the class position kept, the
    G x G patch positions resized bicubically, timm's resample_abs_pos_embed (antialias on, align_corners off,
    in float32; unchanged when the grid is G x G). DINOv2's own code adds 0.1 to the size; timm, so VA-VAE, does not.
    """
    h, w = grid
    G = math.isqrt(pos_embed.shape[1] - 1)
    if (h, w) == (G, G):
        return pos_embed
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    patch_pos = rearrange(patch_pos.float(), "1 (gh gw) d -> 1 d gh gw", gh=G, gw=G)
    patch_pos = F.interpolate(patch_pos, size=(h, w), mode="bicubic", antialias=True, align_corners=False)
    patch_pos = rearrange(patch_pos, "1 d h w -> 1 (h w) d").to(pos_embed.dtype)
    return torch.cat([cls_pos, patch_pos], dim=1)


class LayerScale(nn.Module):
    """x * gamma per channel (CaiT's layer scale, DINOv2's ls1 / ls2)."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (timm's layout: q;k;v, then heads), via SDPA."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.num_heads)
        x = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(d)) v
        return self.proj(rearrange(x, "b h n d -> b n (h d)"))


class Mlp(nn.Module):
    """fc2(gelu(fc1(x))), exact (erf) GELU."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm ViT block with layer scale: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x)))."""

    def __init__(self, dim: int, num_heads: int, hidden_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, hidden_dim)
        self.ls2 = LayerScale(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DINOv2(nn.Module):
    """DINOv2 ViT patch features [B, dim, 16, 16] of images [B, 3 (or 1), H, W] in [-1, 1], VA-VAE's way: resized
    to 224 x 224 (bilinear, align_corners off), patch embedding, class token, position embedding resized to the
    16 x 16 grid (`resample_pos_embed`, cached per grid), the blocks, the final norm, class token dropped.

    Frozen: no parameter requires grad and the module stays in eval mode (train() is a no-op). No graph is built
    unless the images require grad (VA-VAE's do not; it also wraps the call in no_grad).

    Args:
        dim, depth, num_heads, patch_size: the ViT's (ViT-L/14: 1024, 24, 16, 14).
        pos_grid: side G of the stored position grid (37 for the released 518-px models).
        hidden_dim: the MLP's hidden width (default 4 * dim).
        imagenet_norm: False (VA-VAE): the [-1, 1] images go in as they are; True: mapped to [0, 1] and normalised
            with ImageNet mean / std (timm's data config for these models).
        image_size: the side the images are resized to (VA-VAE: 224).
    """

    def __init__(self, dim: int, depth: int, num_heads: int, patch_size: int = 14, pos_grid: int = 37,
                 hidden_dim: Optional[int] = None, imagenet_norm: bool = False, image_size: int = IMAGE_SIZE):
        super().__init__()
        if dim % num_heads:
            raise GenvisError(f"DINOv2: width {dim} is not divisible by num_heads={num_heads}")
        self.dim, self.depth, self.num_heads, self.patch_size = dim, depth, num_heads, patch_size
        self.imagenet_norm, self.image_size = imagenet_norm, image_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + pos_grid * pos_grid, dim))
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, patch_size, stride=patch_size)
        self.blocks = nn.ModuleList(Block(dim, num_heads, hidden_dim or 4 * dim) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self._pos_cache: Dict[tuple, torch.Tensor] = {}  # a plain dict: not in the state dict
        self._freeze()

    def _freeze(self) -> None:
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True):
        return super().train(False)

    def pos_embed_for(self, grid: Tuple[int, int]) -> torch.Tensor:
        """The position embedding [1, 1 + h * w, dim] for an h x w patch grid, computed once per grid (and per
        pos_embed tensor, device and dtype: a reload or .to() does not reuse a stale copy)."""
        p = self.pos_embed
        key = (tuple(grid), p.device, p.dtype, p.data_ptr(), p._version)
        if key not in self._pos_cache:
            with torch.no_grad():
                self._pos_cache = {k: v for k, v in self._pos_cache.items() if k[1:] == key[1:]}
                self._pos_cache[key] = resample_pos_embed(p.detach(), grid)
        return self._pos_cache[key]

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised tokens [B, 1 + h * w, dim] (class token first) of network inputs x [B, 3, H, W]: timm's
        forward_features with dynamic_img_size."""
        x = self.patch_embed.proj(x)  # B, D, h, w
        grid = tuple(x.shape[-2:])
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), rearrange(x, "b d h w -> b (h w) d")], dim=1)
        x = x + self.pos_embed_for(grid)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, C, H, W] in [-1, 1], C = 3 (or 1: repeated to RGB) -> patch features [B, dim, h, w] float32,
        h = w = image_size // patch_size (16 for VA-VAE)."""
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise GenvisError(f"images of shape {tuple(images.shape)}: expected [B, C, H, W] with C = 1 or 3")
        x = images.to(self.pos_embed.dtype).expand(-1, 3, -1, -1)
        x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        if self.imagenet_norm:
            mean = torch.tensor(IMAGENET_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
            std = torch.tensor(IMAGENET_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
            x = ((x + 1) / 2 - mean) / std
        side = self.image_size // self.patch_size
        tokens = self.forward_tokens(x)[:, 1:]  # drop the class token
        return rearrange(tokens, "b (h w) d -> b d h w", h=side, w=side).float()


def _dinov2_state(state: dict, path: Path) -> Dict[str, torch.Tensor]:
    """A timm- or hub-layout DINOv2 state dict -> timm's keys as float32 tensors (mask_token dropped, chunked
    block indices blocks.C.N. flattened), or a one-line GenvisError naming the file and the key at fault."""
    for wrapper in ("model", "state_dict"):  # a training checkpoint holding the weights, as timm unwraps it
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise GenvisError(f"{path}: holds a {type(state).__name__}, not a state dict; expected {EXPECTED}")
    for key in ("reg_token", "register_tokens"):
        if key in state:
            raise GenvisError(f"{path}: key '{key}': DINOv2 with register tokens (reg4) is not supported; "
                              "expected a model without registers (vit_*_patch14_dinov2.lvd142m)")
    out = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise GenvisError(f"{path}: key '{key}' holds a {type(value).__name__}, not a tensor; expected {EXPECTED}")
        if re.search(r"\.mlp\.w(12|3)\.", key):
            raise GenvisError(f"{path}: key '{key}': the SwiGLU MLP (DINOv2 giant2) is not supported")
        if key == "mask_token":
            continue
        out[re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", key)] = value.detach().float().contiguous()
    return out


def _need(state: Dict[str, torch.Tensor], key: str, ndim: int, path: Path) -> torch.Tensor:
    value = state.get(key)
    if value is None:
        raise GenvisError(f"{path}: key '{key}' missing; expected {EXPECTED}")
    if value.ndim != ndim:
        raise GenvisError(f"{path}: key '{key}' has shape {tuple(value.shape)}; expected {ndim} dims ({EXPECTED})")
    return value


def load_dinov2(path: PathLike, num_heads: Optional[int] = None, imagenet_norm: bool = False) -> DINOv2:
    """A frozen DINOv2 from a local state dict file (.safetensors, or .pth / .pt read with weights_only=True) in
    timm's or the facebookresearch/dinov2 hub's layout. Width, depth, patch size, stored grid and MLP width are read
    off the tensors; heads from the width (384: 6, 768: 12, 1024: 16, 1536: 24) unless `num_heads` is given. A
    missing file, a file that is not a state dict, or a missing / unexpected / misshapen key: one-line GenvisError.
    """
    path = Path(path)
    if not path.is_file():
        raise GenvisError(f"{path}: DINOv2 weights not found; expected {EXPECTED}")
    state = _dinov2_state(load_checkpoint_file(path), path)

    dim = _need(state, "cls_token", 3, path).shape[-1]
    patch = _need(state, "patch_embed.proj.weight", 4, path)
    if patch.shape[1] != 3 or patch.shape[2] != patch.shape[3]:
        raise GenvisError(f"{path}: key 'patch_embed.proj.weight' has shape {tuple(patch.shape)}; expected "
                          f"[{dim}, 3, p, p]")
    positions = _need(state, "pos_embed", 3, path).shape[1] - 1
    grid = math.isqrt(max(positions, 0))
    if grid * grid != positions or grid == 0:
        raise GenvisError(f"{path}: key 'pos_embed' holds {positions + 1} positions; expected 1 + G * G "
                          "(a class position and a square grid)")
    indices = {int(m.group(1)) for m in map(re.compile(r"^blocks\.(\d+)\.").match, state) if m}
    if not indices:
        raise GenvisError(f"{path}: no blocks.N.* keys; expected {EXPECTED}")
    depth = max(indices) + 1
    fc1, fc2 = _need(state, "blocks.0.mlp.fc1.weight", 2, path), state.get("blocks.0.mlp.fc2.weight")
    if fc2 is not None and fc2.ndim == 2 and fc2.shape[1] != fc1.shape[0]:
        raise GenvisError(f"{path}: key 'blocks.0.mlp.fc1.weight' has {fc1.shape[0]} outputs and fc2 "
                          f"{fc2.shape[1]} inputs: a packed SwiGLU MLP (DINOv2 giant2), which is not supported")
    if num_heads is None:
        if dim not in HEADS:
            raise GenvisError(f"{path}: width {dim} is not a released DINOv2 size ({', '.join(map(str, HEADS))}); "
                              "pass num_heads")
        num_heads = HEADS[dim]
    if num_heads <= 0 or dim % num_heads:
        raise GenvisError(f"{path}: width {dim} is not divisible by num_heads={num_heads}")

    with torch.device("meta"):  # the weights come from the file: skip the random inits
        model = DINOv2(dim, depth, num_heads, patch_size=patch.shape[-1], pos_grid=grid, hidden_dim=fc1.shape[0],
                       imagenet_norm=imagenet_norm)
    model.to_empty(device="cpu")
    load_state_strict(model, state, str(path), f"DINOv2 ViT (width {dim}, depth {depth})")
    return model
