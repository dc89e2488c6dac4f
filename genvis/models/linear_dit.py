"""Linear-attention DiT: DiT's adaLN-Zero transformer with O(N) attention (LiT, Sana, DiG).

The block is DiT's block with its softmax attention replaced by

    relu    ReLU-kernel linear attention (LiT, Sana):
                o_i = sum_j (relu(q_i) . relu(k_j)) v_j / (sum_j relu(q_i) . relu(k_j) + eps)
            computed as relu(q) (relu(K)^T V) over relu(q) (sum_j relu(k_j)): O(N) in the tokens. The whole
            kernel runs in fp32 whatever the autocast dtype: the normaliser is a sum over all N tokens and
            overflows fp16 (the NaNs Sana users report).
    gated   gated linear attention with data-dependent decay and bidirectional scans (DiG / ViG),
            genvis.models.gla.

and, as options, a depthwise conv on V added to the attention output (LiT, 5x5), Mix-FFN in place of
the MLP (Sana: 1x1 conv, 3x3 depthwise conv, GLU, 1x1 conv) and no position embedding (Sana).
`recipe` picks the published combination; each choice can be overridden:

    recipe   attention   heads            v_conv   ffn      pos_embed
    lit      relu        2                5        mlp      yes
    sana     relu        hidden / 32      0        mixffn   no
    dig      gated       DiT's            0        mlp      yes

Parameter names are DiT's wherever the tensor is the same (attn.qkv, attn.proj, mlp.fc1/fc2, adaLN,
embedders, final layer; a head count does not change qkv's shape), so a trained DiT's weights load
into the shared tensors (`genvis.models.inherit_weights`, `model.init_from`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import register_to_config
from einops import rearrange

from genvis.errors import ConfigError
from genvis.models.dit import DIT_SIZES, DiT, DiTBlock, DiTConfig, check_patch_size, input_size
from genvis.models.layers import Mlp
from genvis.registry import MODELS

ATTENTION_KINDS = ("relu", "gated")
FFN_KINDS = ("mlp", "mixffn")


def relu_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = 1e-15) -> torch.Tensor:
    """ReLU-kernel linear attention, [B, H, N, d] each -> [B, H, N, d_v], in fp32 (returned in q's dtype).

    Cost O(N d d_v) per head: relu(K)^T V is a [d, d_v] summary of all tokens and sum_j relu(k_j) a [d] one. Sana
    pads V with a column of ones to get both from one matmul. Under torch.compile on the CPU, the backward of that
    pad fused with the heads' permutes into kernels of 20-44 ms per block (LinearDiT-S/2, batch 32; the block's
    other fused kernels take 1-5 ms), and the compiled bf16 training step ran 0.92x eager; with the sum, 1.27x."""
    dtype = q.dtype
    with torch.autocast(device_type=q.device.type, enabled=False):
        # contiguous [B, H, N, d] fp32 copies: the heads split off a fused qkv are strided views, on which
        # batched matmuls run at a fraction of their speed
        q, k = (F.relu(x.to(torch.float32, memory_format=torch.contiguous_format)) for x in (q, k))
        out = q @ (k.transpose(-1, -2) @ v.float())  # [B, H, N, d_v]
        out = out / (q @ k.sum(dim=-2).unsqueeze(-1) + eps)  # normaliser [B, H, N, 1]
    return out.to(dtype)


def _to_grid(x: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    return rearrange(x, "b (h w) c -> b c h w", h=grid[0], w=grid[1])


def _to_tokens(x: torch.Tensor) -> torch.Tensor:
    return rearrange(x, "b c h w -> b (h w) c")


def _depthwise(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """A depthwise conv on a token grid [B, C, H, W] in fp32: the grid of tokens is already channels-last in
    memory, where PyTorch's CPU depthwise kernels (forward and backward) are 3-7x faster than in bf16."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        return conv(x.float())


class LinearAttention(nn.Module):
    """ReLU linear attention on tokens [B, N, D] of a (rows, columns) grid, with DiT's qkv / proj layers and an
    optional depthwise conv on V (LiT) whose output is added to the attention's (zero-initialised, so an
    inherited DiT starts from its attention's linear counterpart)."""

    def __init__(self, dim: int, num_heads: int, grid: Tuple[int, int], v_conv: int = 0, eps: float = 1e-15):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads, self.grid, self.eps = num_heads, grid, eps
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.v_conv = nn.Conv2d(dim, dim, v_conv, padding=v_conv // 2, groups=dim) if v_conv else None

    def reset_extra(self) -> None:
        """Initialise what DiT does not have (DiT's init covers qkv / proj)."""
        if self.v_conv is not None:
            nn.init.zeros_(self.v_conv.weight)
            nn.init.zeros_(self.v_conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv(x)
        q, k, v = rearrange(qkv, "b n (three h d) -> three b h n d", three=3, h=self.num_heads)
        out = rearrange(relu_linear_attention(q, k, v, self.eps), "b h n d -> b n (h d)")
        if self.v_conv is not None:  # V's [B, N, D] columns of the fused projection, seen as a grid (no copy)
            v_grid = _to_grid(qkv[..., 2 * out.shape[-1]:], self.grid)
            out = out + _to_tokens(_depthwise(self.v_conv, v_grid)).to(out.dtype)
        return self.proj(out)


class MixFFN(nn.Module):
    """Sana's Mix-FFN (GLUMBConv): 1x1 conv to 2 x hidden + SiLU, 3x3 depthwise conv, GLU (x * silu(gate)),
    1x1 conv back to dim (no bias)."""

    def __init__(self, dim: int, hidden_dim: int, grid: Tuple[int, int]):
        super().__init__()
        self.grid = grid
        self.inverted_conv = nn.Conv2d(dim, 2 * hidden_dim, 1)
        self.depth_conv = nn.Conv2d(2 * hidden_dim, 2 * hidden_dim, 3, padding=1, groups=2 * hidden_dim)
        self.point_conv = nn.Conv2d(hidden_dim, dim, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.inverted_conv(_to_grid(x, self.grid)))
        h = _depthwise(self.depth_conv, h).to(h.dtype)
        h, gate = h.chunk(2, dim=1)
        return _to_tokens(self.point_conv(h * F.silu(gate)))


class LinearDiT(DiT):
    """DiT with linear attention (see the module docstring). Takes DiT's arguments plus:

    Args:
        attention: relu | gated.
        v_conv: kernel size of the depthwise conv on V (0 = none; relu attention only).
        ffn: mlp (DiT's) | mixffn (Sana's).
        use_pos_embed: add DiT's fixed sin-cos position embedding.
        gla_chunk_size: chunk length of gated attention's chunkwise-parallel form.
    """

    @register_to_config
    def __init__(
        self,
        input_size: Union[int, Sequence[int]] = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 2,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        prediction_type: str = "eps",
        schedule: str = "linear",
        num_train_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        flow_shift: float = 1.0,
        attention: str = "relu",
        v_conv: int = 5,
        ffn: str = "mlp",
        use_pos_embed: bool = True,
        gla_chunk_size: int = 64,
    ):
        super(DiT, self).__init__()  # DiT's __init__ would register DiT's config; the modules come from _build
        if attention not in ATTENTION_KINDS:
            raise ValueError(f"attention {attention!r}: expected one of {', '.join(ATTENTION_KINDS)}")
        if ffn not in FFN_KINDS:
            raise ValueError(f"ffn {ffn!r}: expected one of {', '.join(FFN_KINDS)}")
        if v_conv and (attention != "relu" or v_conv % 2 == 0):
            raise ValueError(f"v_conv {v_conv}: an odd kernel size, for relu attention only")
        self.attention_kind, self.v_conv_size, self.ffn_kind = attention, v_conv, ffn
        self.gla_chunk_size = gla_chunk_size
        self._build(input_size, patch_size, in_channels, hidden_size, depth, num_heads, mlp_ratio, class_dropout_prob,
                    num_classes, learn_sigma, pos_embed=use_pos_embed)

    def make_block(self, hidden_size: int, num_heads: int, mlp_ratio: float) -> nn.Module:
        if self.attention_kind == "gated":
            from genvis.models.gla import GatedLinearAttention

            attn = GatedLinearAttention(hidden_size, num_heads, chunk_size=self.gla_chunk_size)
        else:
            attn = LinearAttention(hidden_size, num_heads, self.grid, v_conv=self.v_conv_size)
        hidden = int(hidden_size * mlp_ratio)
        mlp = MixFFN(hidden_size, hidden, self.grid) if self.ffn_kind == "mixffn" else Mlp(hidden_size, hidden)
        return DiTBlock(hidden_size, num_heads, mlp_ratio, attn=attn, mlp=mlp)

    def initialize_weights(self) -> None:
        """DiT's initialisation, then the attention's own parts (DiT's xavier pass touches only nn.Linear)."""
        super().initialize_weights()
        for block in self.blocks:
            block.attn.reset_extra()

    def flops_per_image(self) -> float:
        """Forward matmul FLOPs per image (2 * MACs): DiT's without the N^2 term, plus per block the kernel's.
        ReLU: relu(K)^T V, q times that and q times the sum of relu(k): 2 N D (2 d_k + 1). Gated, both
        directions over the N_pad tokens of whole chunks of C, as the scan's usual plan (one factored C x C
        block per chunk) computes them: per token Q K^T and A V over the chunk plus the state's K^T V and
        q S, 2 * 2 * N_pad * D * (2 C + 2 d_k); and its linears: out_gate 2 N D^2, the low-rank decay gate
        2 N * 2 D r."""
        n, d = math.prod(self.grid), self.config.hidden_size
        dk = d // self.config.num_heads
        quadratic = 2 * 2 * n * n * d
        if self.attention_kind == "gated":
            c = self.gla_chunk_size
            n_pad = -(-n // c) * c
            rank = self.blocks[0].attn.gate[0].out_features
            kernel = 2 * 2 * n_pad * d * (2 * c + 2 * dk) + 2 * n * d * d + 2 * n * 2 * d * rank
        else:
            kernel = 2 * n * d * (2 * dk + 1)
        return super().flops_per_image() + self.config.depth * (kernel - quadratic)


# recipe -> (attention, heads (None = DiT's for the size; "w/32" = width / 32), v_conv, ffn, pos_embed)
RECIPES: Dict[str, Tuple[str, object, int, str, bool]] = {
    "lit": ("relu", 2, 5, "mlp", True),
    "sana": ("relu", "w/32", 0, "mixffn", False),
    "dig": ("gated", None, 0, "mlp", True),
}


@dataclass
class LinearDiTConfig(DiTConfig):
    """The run config's `model:` section for `arch: linear_dit`: DiT's keys plus the recipe and its choices
    (null = the recipe's; see genvis.models.linear_dit)."""

    arch: str = "linear_dit"
    recipe: str = "lit"  # lit | sana | dig
    attention: Optional[str] = None  # relu | gated
    v_conv: Optional[int] = None  # depthwise conv on V: odd kernel size, 0 = none
    ffn: Optional[str] = None  # mlp | mixffn
    pos_embed: Optional[bool] = None

    def resolved(self) -> dict:
        """The LinearDiT arguments this section names (sizes included)."""
        attention, heads, v_conv, ffn, pos_embed = RECIPES[self.recipe]
        depth, hidden, dit_heads = DIT_SIZES[self.size]
        hidden = self.hidden_size or hidden
        heads = hidden // 32 if heads == "w/32" else (dit_heads if heads is None else heads)
        pick = lambda value, default: default if value is None else value  # noqa: E731
        return dict(depth=pick(self.depth, depth), hidden_size=hidden, num_heads=pick(self.num_heads, heads),
                    attention=pick(self.attention, attention), v_conv=pick(self.v_conv, v_conv),
                    ffn=pick(self.ffn, ffn), use_pos_embed=pick(self.pos_embed, pos_embed))

    def validate(self) -> None:
        if self.recipe not in RECIPES:
            raise ConfigError(f"key 'model.recipe': {self.recipe!r} is not one of {', '.join(RECIPES)}")
        for key in ("norm", "qk_norm", "rope", "adaln_shift"):
            if getattr(self, key) is not None:
                raise ConfigError(f"key 'model.{key}': a DiT option (arch: dit); linear_dit keeps DiT's blocks, set null")
        if self.size not in DIT_SIZES:
            raise ConfigError(f"key 'model.size': {self.size!r} is not one of {', '.join(DIT_SIZES)}")
        if self.patch_size not in (1, 2, 4, 8):
            raise ConfigError(f"key 'model.patch_size': {self.patch_size} is not one of 1, 2, 4, 8")
        for key in ("depth", "hidden_size", "num_heads"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ConfigError(f"key 'model.{key}': must be >= 1, got {getattr(self, key)}")
        if not 0.0 <= self.class_dropout < 1.0:
            raise ConfigError(f"key 'model.class_dropout': {self.class_dropout}: expected a value in [0, 1)")
        r = self.resolved()
        if r["num_heads"] < 1 or r["hidden_size"] % r["num_heads"]:
            raise ConfigError(f"key 'model.num_heads': width {r['hidden_size']} is not divisible by {r['num_heads']} heads")
        if r["attention"] not in ATTENTION_KINDS:
            raise ConfigError(f"key 'model.attention': {r['attention']!r} is not one of {', '.join(ATTENTION_KINDS)}")
        if r["ffn"] not in FFN_KINDS:
            raise ConfigError(f"key 'model.ffn': {r['ffn']!r} is not one of {', '.join(FFN_KINDS)}")
        if r["v_conv"] < 0 or (r["v_conv"] and r["v_conv"] % 2 == 0):
            raise ConfigError(f"key 'model.v_conv': {r['v_conv']}: expected 0 (none) or an odd kernel size")
        if r["v_conv"] and r["attention"] != "relu":
            raise ConfigError(f"key 'model.v_conv': the conv on V is for relu attention; set 0 with attention {r['attention']!r}")


@MODELS.register("linear_dit", schema=LinearDiTConfig, cls=LinearDiT, family=LinearDiT.family, task="diffusion")
def linear_dit_from_config(section: LinearDiTConfig, *, sample_shape: Tuple[int, int, int], num_classes: int,
                           **diffusion) -> LinearDiT:
    """The LinearDiT a run config describes (see dit_from_config)."""
    channels, height, width = sample_shape
    check_patch_size(section.patch_size, height, width)
    return LinearDiT(**section.resolved(), patch_size=section.patch_size, input_size=input_size(height, width),
                     in_channels=channels, num_classes=num_classes, class_dropout_prob=section.class_dropout, **diffusion)
