"""The convolutional encoder and decoder of VQGAN / LDM (Esser et al. 2021), shared by the VQ-VAE and
the multi-scale residual VQ-VAE, in the layout of VAR's VQ-VAE (which is taming's with a fused qkv):

    encoder.conv_in, encoder.down.{level}.block.{i}.{norm1,conv1,norm2,conv2,nin_shortcut},
    encoder.down.{level}.attn.{i}.{norm,qkv,proj_out}, encoder.down.{level}.downsample.conv,
    encoder.mid.{block_1,attn_1,block_2}, encoder.norm_out, encoder.conv_out
    decoder.conv_in, decoder.mid.*, decoder.up.{level}.block / attn / upsample.conv, decoder.norm_out, decoder.conv_out

Level 0 is the finest in both (the decoder's `up` list is indexed by level, run coarsest first). The
encoder has `num_res_blocks` resnet blocks per level, the decoder one more; attention (one head, scale
C^-1/2) follows every block of the coarsest level when `level_attention`, and sits between the two
middle blocks when `mid_attention`. Downsampling pads (0, 1, 0, 1) and applies a stride-2 3x3 conv;
upsampling is nearest x2 then a 3x3 conv. GroupNorm eps 1e-6, SiLU. Taming's and LlamaGen's layouts
(separate q, k, v; LlamaGen's `conv_blocks`, decoder listed coarsest first) convert to this one in
genvis.tokenizers.vq_import.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, groups: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, q, k, v from one fused 1x1 conv."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(2, 3).unbind(1)  # each [B, HW, C]
        out = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)).squeeze(1)
        return x + self.proj_out(out.transpose(1, 2).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _mid(channels: int, groups: int, attention: bool, dropout: float) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels, groups, dropout)
    mid.attn_1 = AttnBlock(channels, groups) if attention else nn.Identity()
    mid.block_2 = ResnetBlock(channels, channels, groups, dropout)
    return mid


class ConvEncoder(nn.Module):
    """images [B, in_channels, H, W] -> features [B, z_channels, H / f, W / f], f = 2 ** (len(ch_mult) - 1)."""

    def __init__(self, in_channels: int, ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int,
                 groups: int = 32, level_attention: bool = True, mid_attention: bool = True, dropout: float = 0.0):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        levels = len(ch_mult)
        self.down = nn.ModuleList()
        block_in = ch
        for level, mult in enumerate(ch_mult):
            down = nn.Module()
            down.block, down.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks):
                down.block.append(ResnetBlock(block_in, ch * mult, groups, dropout))
                block_in = ch * mult
                if level == levels - 1 and level_attention:
                    down.attn.append(AttnBlock(block_in, groups))
            if level != levels - 1:
                down.downsample = Downsample(block_in)
            self.down.append(down)
        self.mid = _mid(block_in, groups, mid_attention, dropout)
        self.norm_out = _norm(block_in, groups)
        self.conv_out = nn.Conv2d(block_in, z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level, down in enumerate(self.down):
            for i, block in enumerate(down.block):
                h = block(h)
                if len(down.attn):
                    h = down.attn[i](h)
            if hasattr(down, "downsample"):
                h = down.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class ConvDecoder(nn.Module):
    """features [B, z_channels, h, w] -> images [B, out_channels, h * f, w * f] (not clamped)."""

    def __init__(self, out_channels: int, ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int,
                 groups: int = 32, level_attention: bool = True, mid_attention: bool = True, dropout: float = 0.0):
        super().__init__()
        levels = len(ch_mult)
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = _mid(block_in, groups, mid_attention, dropout)
        ups = []
        for level in reversed(range(levels)):
            up = nn.Module()
            up.block, up.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                up.block.append(ResnetBlock(block_in, ch * ch_mult[level], groups, dropout))
                block_in = ch * ch_mult[level]
                if level == levels - 1 and level_attention:
                    up.attn.append(AttnBlock(block_in, groups))
            if level != 0:
                up.upsample = Upsample(block_in)
            ups.insert(0, up)
        self.up = nn.ModuleList(ups)  # up[0] is the finest level
        self.norm_out = _norm(block_in, groups)
        self.conv_out = nn.Conv2d(block_in, out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for up in reversed(self.up):
            for i, block in enumerate(up.block):
                h = block(h)
                if len(up.attn):
                    h = up.attn[i](h)
            if hasattr(up, "upsample"):
                h = up.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))
