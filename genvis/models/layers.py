"""Building blocks shared by the transformer generators: embedders, adaLN modulation, attention, MLP.

Parameter names follow the official DiT code (facebookresearch/DiT, which uses timm's
Attention / Mlp / PatchEmbed), so official state dicts load without renaming.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange


def modulate(x: torch.Tensor, shift: Optional[torch.Tensor], scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation; x [B, N, C], shift/scale [B, C] (shift None: scale only, LightningDiT's wo_shift)."""
    if shift is None:
        return x * (1 + scale.unsqueeze(1))
    return torch.addcmul(shift.unsqueeze(1), x, 1 + scale.unsqueeze(1))


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight over the last dim, normalised in float32 (LLaMA / LightningDiT)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def make_norm(kind: str, dim: int) -> nn.Module:
    """A DiT block's pre-norm: "layernorm" (DiT's: no affine, eps 1e-6) or "rmsnorm" (with weight, eps 1e-6)."""
    if kind == "rmsnorm":
        return RMSNorm(dim)
    return nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)


class SwiGLU(nn.Module):
    """w3(silu(x1) * x2) with [x1, x2] = w12(x) (LightningDiT's SwiGLUFFN layout, biases included)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden_dim)
        self.w3 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


def rope_2d(head_dim: int, grid: Tuple[int, int], theta: float = 10000.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [rows * columns, head_dim] of 2D axial rotary embeddings on a token grid (EVA-02's
    VisionRotaryEmbeddingFast, LightningDiT's layout): the first half of a head's channels rotates with the
    token's row, the second with its column; in each half, channel pair (2i, 2i+1) turns by position *
    theta^(-2i / (head_dim / 2)). Tokens are listed row by row."""
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs a head width divisible by 4, got {head_dim}")
    half = head_dim // 2
    freqs = theta ** (-torch.arange(0, half, 2, dtype=torch.float64) / half)  # [half / 2]
    rows, cols = grid
    angle_r = torch.repeat_interleave(torch.arange(rows, dtype=torch.float64)[:, None] * freqs, 2, dim=-1)
    angle_c = torch.repeat_interleave(torch.arange(cols, dtype=torch.float64)[:, None] * freqs, 2, dim=-1)
    angles = torch.cat([angle_r[:, None].expand(rows, cols, half), angle_c[None].expand(rows, cols, half)], dim=-1)
    angles = angles.reshape(rows * cols, head_dim)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (2i, 2i+1) of x [..., N, D] by the angles whose cos / sin [N, D] are given."""
    pairs = x.unflatten(-1, (-1, 2))
    rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)  # (a, b) -> (-b, a)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, [B] -> [B, dim]; cos half first, as DiT."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """t [B] -> [B, D]: 256-d sinusoid -> Linear -> SiLU -> Linear."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )
        self.frequency_embedding_size = frequency_embedding_size

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        emb = timestep_embedding(t, self.frequency_embedding_size).to(self.mlp[0].weight.dtype)
        return self.mlp(emb)


class LabelEmbedder(nn.Module):
    """Class labels [B] -> [B, D]. Row `num_classes` is the null class used for classifier-free guidance.

    Label dropout is not drawn here: the training loop passes labels already replaced by the
    null class, drawn from its own seeded per-step RNG, so training stays deterministic and
    independent of the number of processes.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        use_cfg_embedding = int(dropout_prob > 0)
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(labels)


class PatchEmbed(nn.Module):
    """[B, C, H, W] -> [B, (H/p)(W/p), D] with a stride-p convolution (timm's layout: `proj`)."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # B, D, H/p, W/p
        return rearrange(x, "b d h w -> b (h w) d")


@torch.library.custom_op("genvis::softmax", mutates_args=())
def softmax_kernel(x: torch.Tensor) -> torch.Tensor:
    """softmax over the last dimension as one opaque op: ATen's kernel, which keeps each row in cache. Inductor
    otherwise decomposes softmax into a kernel that writes exp(x - max) to a float32 buffer of the whole input
    and reads it back; inside a compiled VAR block that kernel took 407 ms per d8 batch, ATen's 190 ms."""
    return torch.softmax(x, dim=-1)


@softmax_kernel.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def _softmax_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(output)


def _softmax_backward(ctx, grad: torch.Tensor) -> torch.Tensor:
    (out,) = ctx.saved_tensors
    return torch._softmax_backward_data(grad, out, -1, out.dtype)


softmax_kernel.register_autograd(_softmax_backward, setup_context=_softmax_setup)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor] = None,
              scale: Optional[float] = None) -> torch.Tensor:
    """softmax(q k^T * scale) v for q [B, H, N, D], k, v [B, H, M, D]; scale defaults to 1 / sqrt(D); mask [N, M]
    bool (True = may attend) or None. The same quantity as F.scaled_dot_product_attention(q, k, v, mask, scale=scale).

    SDPA everywhere except for bf16/fp16 on the CPU with short sequences (M <= 1024), where two
    batched matmuls and a softmax beat PyTorch's CPU flash kernel: DiT-S/2 bf16 training step
    7.8 vs 6.9 img/s on 2 Zen-4 cores (benchmarks/dit_speed.py); in fp32 the flash kernel wins.
    PyTorch's CPU softmax accumulates in fp32.
    """
    if q.device.type != "cpu" or q.dtype == torch.float32 or k.shape[-2] > 1024:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    scores = (q * (q.shape[-1] ** -0.5 if scale is None else scale)) @ k.transpose(-1, -2)  # B, H, N, M
    if mask is not None:
        scores = scores.masked_fill(~mask, -torch.inf)
    return (softmax_kernel(scores) if torch.compiler.is_compiling() else scores.softmax(dim=-1)) @ v


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (with bias); optionally q / k normalised per head
    (`qk_norm`: "layernorm" as timm's, affine with eps 1e-5, or "rmsnorm") and rotated by RoPE."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, qk_norm: Optional[str] = None):
        super().__init__()
        assert dim % num_heads == 0, f"width {dim} is not divisible by {num_heads} heads"
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        head_dim = dim // num_heads
        if qk_norm is not None:
            norm = (lambda: RMSNorm(head_dim)) if qk_norm == "rmsnorm" else (lambda: nn.LayerNorm(head_dim))
            self.q_norm, self.k_norm = norm(), norm()
        else:
            self.q_norm = self.k_norm = None
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.num_heads)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        x = attention(q, k, v)  # B, H, N, Dh
        return self.proj(rearrange(x, "b h n d -> b n (h d)"))


class KVCache:
    """The keys and values an attention layer has seen, [B, H, n, D], grown along n by each call (decoding a
    sequence in chunks: each chunk attends to everything before it without recomputing it)."""

    def __init__(self):
        self.k: Optional[torch.Tensor] = None
        self.v: Optional[torch.Tensor] = None

    def append(self, k: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Add this call's k, v; returns all keys and values so far."""
        if self.k is not None:
            k, v = torch.cat((self.k, k), dim=-2), torch.cat((self.v, v), dim=-2)
        self.k, self.v = k, v
        return k, v


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU, tanh approximation: 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))) (DiT's and VAR's MLP activation).

    Eager: F.gelu(approximate="tanh"). Under torch.compile the same function in its sigmoid form,
    x sigmoid(2 sqrt(2 / pi) x (1 + 0.044715 x^2)) (0.5 (1 + tanh u) = sigmoid(2 u)), in float32 and cast back to
    x's dtype: inductor's CPU kernels for it run forward + backward in 10 ms on a DiT-S/2 batch-32 MLP activation
    [8192, 1536] in bf16, against 22 ms for its tanh-GELU (2 Zen-4 cores); the two differ by under 5e-7 in float32.
    """
    if not torch.compiler.is_compiling():
        return F.gelu(x, approximate="tanh")
    xf = x.float()
    return (xf * torch.sigmoid(1.5957691216057308 * xf * (1.0 + 0.044715 * xf * xf))).to(x.dtype)


@torch.library.custom_op("genvis::gelu", mutates_args=())
def gelu_kernel(x: torch.Tensor) -> torch.Tensor:
    """Exact (erf) GELU as one opaque op: ATen's kernel. Inductor's CPU kernel for erf-GELU ran 1.75 ms on a
    [2048, 2048] bf16 activation (MaskGIT 12 x 512, batch 8 with guidance) against 0.99 ms for ATen's (2 Zen-4
    cores), 96 times per MaskGIT batch."""
    return F.gelu(x)


@gelu_kernel.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def _gelu_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[0])


def _gelu_backward(ctx, grad: torch.Tensor) -> torch.Tensor:
    (x,) = ctx.saved_tensors
    return torch.ops.aten.gelu_backward(grad, x)


gelu_kernel.register_autograd(_gelu_backward, setup_context=_gelu_setup)


def gelu(x: torch.Tensor) -> torch.Tensor:
    """Exact GELU, x Phi(x) (BERT's "gelu"): F.gelu, as `gelu_kernel` under torch.compile."""
    return gelu_kernel(x) if torch.compiler.is_compiling() else F.gelu(x)


class Mlp(nn.Module):
    """fc1 -> GELU(tanh) -> fc2."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(gelu_tanh(self.fc1(x)))


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: Union[int, Tuple[int, int]]) -> np.ndarray:
    """Fixed 2D sin-cos position embedding [gh * gw, embed_dim] of a gh x gw token grid (an int: square), in
    MAE/DiT's layout (float64): the first half encodes the column, the second the row, rows listed first. A
    1 x K row of 1D tokens gets the column half; its row half is the constant of row 0."""
    gh, gw = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
    grid = np.meshgrid(np.arange(gw, dtype=np.float32), np.arange(gh, dtype=np.float32))  # w goes first, as in MAE
    grid = np.stack(grid, axis=0).reshape(2, 1, gh, gw)
    emb_h = _1d_sincos(embed_dim // 2, grid[0])
    emb_w = _1d_sincos(embed_dim // 2, grid[1])
    return np.concatenate([emb_h, emb_w], axis=1)


def _1d_sincos(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)
