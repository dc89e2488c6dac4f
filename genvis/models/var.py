"""VAR: Visual Autoregressive Modeling, next-scale prediction (Tian et al., NeurIPS 2024).

A decoder-only transformer over the ids of a multi-scale residual VQ tokenizer
(genvis.tokenizers.multiscale_vq), coarse to fine: the whole scale k is predicted at once from
the class and the scales before it. Layout and numerics follow FoundationVision/VAR (models/var.py,
basic_var.py), so official var_d16 .. var_d30 state dicts load (`genvis import var`) and give its logits:

- the class embedding (num_classes + 1 rows, the last the null class) is the start token, plus
  `pos_start`; every token adds a learned position (`pos_1LC`) and level (`lvl_embed`) embedding;
- the other tokens are `word_embed` of the teacher-forcing input: f_hat after scales 0..k-1
  area-downsampled to scale k (MultiScaleQuantizer.teacher_forcing_input);
- blocks: x + gamma1 * attn(LN(x) (1 + scale1) + shift1), x + gamma2 * ffn(LN(x) (1 + scale2) + shift2),
  with the six AdaLN chunks from the class embedding in VAR's order (gamma1, gamma2, scale1, scale2,
  shift1, shift2); LayerNorm eps 1e-6 without affine; tanh-GELU MLP;
- attention: one qkv matrix without bias, its bias cat(q_bias, 0, v_bias); q and k l2-normalised,
  q times exp(min(scale_mul, ln 100)) per head, softmax scale 1; a block-causal mask (a token sees
  its own scale and the earlier ones) in training, a KV cache when decoding (genvis.samplers.tokens);
- head: LN(x) (1 + scale) + shift (chunks in that order) then a linear layer to the vocabulary.

Sizes follow the depth: width 64 * depth, heads = depth (d16: 310M parameters, d30: 2.0B).
Label dropout for guidance is drawn by the training task, not inside forward (VAR's forward drops
labels even in eval mode).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from einops import rearrange

from genvis.errors import ConfigError, GenvisError
from genvis.models.layers import KVCache, Mlp, attention
from genvis.registry import MODELS

MAX_SCALE_MUL = math.log(100)  # VAR clamps the learned log attention scale here
VAR_SCALES = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)  # 256 px with the f16 tokenizer: 680 tokens

#################################################################################
#                                 VAR blocks                                    #
#################################################################################


class VARAttention(nn.Module):
    """Self-attention with VAR's parameter layout (mat_qkv, q_bias, v_bias, scale_mul_1H11, proj)."""

    def __init__(self, dim: int, num_heads: int, l2_norm: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads, self.l2_norm = num_heads, l2_norm
        self.mat_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias, self.v_bias = nn.Parameter(torch.zeros(dim)), nn.Parameter(torch.zeros(dim))
        self.register_buffer("zero_k_bias", torch.zeros(dim), persistent=False)
        self.proj = nn.Linear(dim, dim)
        if l2_norm:
            self.scale = 1.0
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), 4.0).log())
        else:
            self.scale = 0.25 / math.sqrt(dim // num_heads)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None, cache: Optional[KVCache] = None) -> torch.Tensor:
        """x [B, l, C]; mask [l, l_total] bool (True = may attend) or None; with `cache`, the keys and values of
        the earlier calls are prepended (decoding one scale at a time)."""
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = F.linear(x, self.mat_qkv.weight, bias)
        q, k, v = rearrange(qkv, "b l (three h d) -> three b h l d", three=3, h=self.num_heads)
        if self.l2_norm:
            q = F.normalize(q, dim=-1) * self.scale_mul_1H11.clamp_max(MAX_SCALE_MUL).exp()
            k = F.normalize(k, dim=-1)
        q, k = q.to(v.dtype), k.to(v.dtype)  # scale_mul is a float32 parameter: back to the compute dtype
        if cache is not None:
            k, v = cache.append(k, v)
        out = attention(q, k, v, mask, scale=self.scale)
        return self.proj(rearrange(out, "b h l d -> b l (h d)"))


class VARBlock(nn.Module):
    """AdaLN self-attention block (VAR's AdaLNSelfAttn without shared AdaLN)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, norm_eps: float = 1e-6, l2_norm: bool = True):
        super().__init__()
        self.dim = dim
        self.attn = VARAttention(dim, num_heads, l2_norm)
        self.ffn = Mlp(dim, round(dim * mlp_ratio))
        self.ln_wo_grad = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, cond_BD: torch.Tensor, mask: Optional[torch.Tensor] = None,
                cache: Optional[KVCache] = None, keep: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [B, l, C], cond_BD [B, C]; keep [B, 2]: stochastic-depth multipliers of the two branches (training)."""
        gamma1, gamma2, scale1, scale2, shift1, shift2 = self.ada_lin(cond_BD).view(-1, 1, 6, self.dim).unbind(2)
        a = self.attn(self.ln_wo_grad(x) * (scale1 + 1) + shift1, mask, cache) * gamma1
        if keep is not None:
            a = a * keep[:, 0, None, None].to(a.dtype)
        x = x + a
        f = self.ffn(self.ln_wo_grad(x) * (scale2 + 1) + shift2) * gamma2
        if keep is not None:
            f = f * keep[:, 1, None, None].to(f.dtype)
        return x + f


class AdaLNBeforeHead(nn.Module):
    def __init__(self, dim: int, norm_eps: float = 1e-6):
        super().__init__()
        self.dim = dim
        self.ln_wo_grad = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        scale, shift = self.ada_lin(cond_BD).view(-1, 1, 2, self.dim).unbind(2)
        return self.ln_wo_grad(x) * (scale + 1) + shift


#################################################################################
#                                  VAR model                                    #
#################################################################################


def scale_ranges(scales: Sequence[int]) -> List[Tuple[int, int]]:
    """[(begin, end)] of each scale's tokens in the concatenated sequence."""
    out, start = [], 0
    for p in scales:
        out.append((start, start + p * p))
        start += p * p
    return out


def scale_levels(scales: Sequence[int]) -> torch.Tensor:
    """[L] long: the scale index of each token (VAR's lvl_1L without its batch axis)."""
    return torch.cat([torch.full((p * p,), k, dtype=torch.long) for k, p in enumerate(scales)])


def block_causal_mask(scales: Sequence[int]) -> torch.Tensor:
    """[L, L] bool: token i may attend to token j when j's scale is not after i's (VAR's attn_bias_for_masking)."""
    level = scale_levels(scales)
    return level[:, None] >= level[None, :]


class VAR(ModelMixin, ConfigMixin):
    """Class-conditional next-scale prediction transformer.

    Args:
        vocab_size: the tokenizer's codebook size V (VAR: 4096).
        token_dim: the tokenizer's code dimension Cvae, the width of the teacher-forcing input (VAR: 32).
        scales: the tokenizer's scale sides, coarse to fine (VAR 256 px: 1, 2, 3, 4, 5, 6, 8, 10, 13, 16).
        num_classes: real classes; row `num_classes` of the class embedding is the null class. Default 1000.
        depth: blocks (VAR: 16, 20, 24, 30). embed_dim / num_heads: width and heads (VAR: 64 * depth, depth).
        mlp_ratio: MLP hidden width over embed_dim, default 4. norm_eps: LayerNorm eps, default 1e-6.
        attn_l2_norm: l2-normalised q/k with a learned per-head scale (VAR's released models: True).
        drop_path_rate: stochastic depth of the last block (linearly from 0 at the first); VAR: 0.1 * depth / 24.
            The training task draws the masks; forward applies the `keep` multipliers it is given.
    """

    family = "var"  # sampled by genvis.samplers.tokens

    @register_to_config
    def __init__(self, vocab_size: int = 4096, token_dim: int = 32, scales: Tuple[int, ...] = VAR_SCALES,
                 num_classes: int = 1000, depth: int = 16, embed_dim: int = 1024, num_heads: int = 16,
                 mlp_ratio: float = 4.0, norm_eps: float = 1e-6, attn_l2_norm: bool = True, drop_path_rate: float = 0.0):
        super().__init__()
        if not scales or any(int(p) < 1 for p in scales):
            raise ConfigError(f"VAR scales {list(scales)}: expected a non-empty list of positive token map sides")
        self.scales = tuple(int(p) for p in scales)
        self.ranges = scale_ranges(self.scales)
        self.num_tokens = self.ranges[-1][1]
        self.first_l = self.scales[0] ** 2
        self.num_classes = num_classes
        C = embed_dim

        self.word_embed = nn.Linear(token_dim, C)
        self.class_emb = nn.Embedding(num_classes + 1, C)
        self.pos_start = nn.Parameter(torch.zeros(1, self.first_l, C))
        self.pos_1LC = nn.Parameter(torch.zeros(1, self.num_tokens, C))
        self.lvl_embed = nn.Embedding(len(self.scales), C)
        self.blocks = nn.ModuleList([VARBlock(C, num_heads, mlp_ratio, norm_eps, attn_l2_norm) for _ in range(depth)])
        self.head_nm = AdaLNBeforeHead(C, norm_eps)
        self.head = nn.Linear(C, vocab_size)

        self.register_buffer("lvl_1L", scale_levels(self.scales)[None], persistent=False)
        self.register_buffer("mask_LL", block_causal_mask(self.scales), persistent=False)
        self.initialize_weights()

    def initialize_weights(self, init_adaln: float = 0.5, init_adaln_gamma: float = 1e-5, init_head: float = 0.02) -> None:
        """VAR's init_weights (build_vae_var's defaults): truncated normal std sqrt(1 / (3 C)) everywhere, output
        projections divided by sqrt(2 depth), head weights x init_head, AdaLN weights x init_adaln (the gamma
        chunks x init_adaln_gamma; VAR's recipes use 1e-3 for d16/d20, 1e-4 for d24, 1e-5 for d30)."""
        std = math.sqrt(1 / self.config.embed_dim / 3)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(m.weight, std=std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        for p in (self.pos_start, self.pos_1LC):
            nn.init.trunc_normal_(p, std=std)
        with torch.no_grad():
            self.head.weight.mul_(init_head)
            self.head.bias.zero_()
            self.head_nm.ada_lin[-1].weight.mul_(init_adaln)
            self.head_nm.ada_lin[-1].bias.zero_()
            C, depth = self.config.embed_dim, len(self.blocks)
            for block in self.blocks:
                block.attn.proj.weight.div_(math.sqrt(2 * depth))
                block.ffn.fc2.weight.div_(math.sqrt(2 * depth))
                block.ada_lin[-1].weight[2 * C:].mul_(init_adaln)
                block.ada_lin[-1].weight[: 2 * C].mul_(init_adaln_gamma)
                block.ada_lin[-1].bias.zero_()

    # forward = (start tokens | embed the teacher-forcing input) -> run; the decoding loop
    # (genvis.samplers.tokens.decode_var) calls the pieces one scale at a time with a KV cache.

    def start_tokens(self, cond_BD: torch.Tensor) -> torch.Tensor:
        """The first scale's tokens [B, first_l, C]: class embedding + pos_start + position + level."""
        b = cond_BD.shape[0]
        lvl_pos = self.lvl_embed(self.lvl_1L[:, : self.first_l]) + self.pos_1LC[:, : self.first_l]
        return cond_BD[:, None].expand(b, self.first_l, -1) + self.pos_start + lvl_pos

    def embed_scale(self, k: int, x_BlCv: torch.Tensor) -> torch.Tensor:
        """Tokens [B, p_k^2, C] of scale k >= 1 from its teacher-forcing input [B, p_k^2, token_dim]."""
        begin, end = self.ranges[k]
        lvl_pos = self.lvl_embed(self.lvl_1L[:, begin:end]) + self.pos_1LC[:, begin:end]
        with torch.autocast(device_type=x_BlCv.device.type, enabled=False):  # fp32, as VAR's forward and decoding
            return self.word_embed(x_BlCv.float()) + lvl_pos

    def run(self, x_BLC: torch.Tensor, cond_BD: torch.Tensor, mask: Optional[torch.Tensor] = None,
            caches: Optional[List[KVCache]] = None, keep: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Blocks and head: tokens [B, l, C] -> logits [B, l, V] (float32). `caches`: one KVCache per block;
        `keep` [B, depth, 2]: stochastic-depth multipliers."""
        for i, block in enumerate(self.blocks):
            x_BLC = block(x_BLC, cond_BD, mask, None if caches is None else caches[i], None if keep is None else keep[:, i])
        return self.head(self.head_nm(x_BLC.float(), cond_BD.float())).float()

    def forward(self, labels: torch.Tensor, x_BLCv_wo_first_l: torch.Tensor, keep: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Teacher forcing. labels [B] (num_classes = null); x_BLCv_wo_first_l [B, L - first_l, token_dim]
        (MultiScaleQuantizer.teacher_forcing_input). Returns logits [B, L, V]: position i predicts token i."""
        expected = (labels.shape[0], self.num_tokens - self.first_l, self.config.token_dim)
        if tuple(x_BLCv_wo_first_l.shape) != expected:
            raise GenvisError(f"teacher-forcing input of shape {tuple(x_BLCv_wo_first_l.shape)}: expected {list(expected)} "
                              f"(the scales {list(self.scales)} after the first, code width {self.config.token_dim})")
        cond_BD = self.class_emb(labels)
        rest = [self.embed_scale(k, x) for k, x in
                enumerate(x_BLCv_wo_first_l.split([p * p for p in self.scales[1:]], dim=1), start=1)]
        x_BLC = torch.cat([self.start_tokens(cond_BD), *rest], dim=1)
        return self.run(x_BLC, cond_BD, self.mask_LL, keep=keep)

    def new_caches(self) -> List[KVCache]:
        """One empty KV cache per block, for a decoding run (`run(..., caches=...)`)."""
        return [KVCache() for _ in self.blocks]

    def drop_rates(self) -> torch.Tensor:
        """[depth]: stochastic depth drop probability of each block (linear from 0 to drop_path_rate)."""
        return torch.linspace(0, self.config.drop_path_rate, len(self.blocks))

    def no_weight_decay(self) -> List[str]:
        """Parameters VAR trains without weight decay: biases, 1-D tensors, position/level embeddings, scale_mul."""
        skip = ("pos_start", "pos_1LC", "lvl_embed", "scale_mul")
        return [n for n, p in self.named_parameters() if p.ndim <= 1 or n.endswith("bias") or any(s in n for s in skip)]

    @property
    def null_class(self) -> int:
        return self.num_classes

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_image(self, kv_cache: bool = True) -> float:
        """Forward matmul FLOPs (2 x MACs) of decoding one image (without guidance): with the KV cache, each
        scale's tokens once; without, the whole prefix at every scale."""
        C, V, depth = self.config.embed_dim, self.config.vocab_size, len(self.blocks)
        hidden = round(C * self.config.mlp_ratio)
        total = 0.0
        for begin, end in self.ranges:
            queries = end - begin if kv_cache else end
            linear = queries * (4 * C * C + 2 * C * hidden)
            total += depth * (linear + 2 * queries * end * C) + queries * C * V
        return 2 * total


def var_config(depth: int, **kwargs) -> dict:
    """VAR-d{depth}: width 64 * depth, depth heads (build_vae_var); kwargs override."""
    return {**dict(depth=depth, embed_dim=64 * depth, num_heads=depth), **kwargs}


@dataclass
class VARConfig:
    """The run config's `model:` section for `arch: var`. Vocabulary, token width and scales come from the
    tokenizer the run trains on."""

    arch: str = "var"
    depth: int = 16  # VAR: 16, 20, 24, 30
    embed_dim: Optional[int] = None  # null = 64 * depth
    num_heads: Optional[int] = None  # null = depth
    mlp_ratio: float = 4.0
    attn_l2_norm: bool = True
    drop_path_rate: Optional[float] = None  # null = VAR's 0.1 * depth / 24
    class_dropout: float = 0.1  # label dropout in training (VAR's cond_drop_rate)
    init_adaln_gamma: float = 1e-5  # VAR's --alng: d16/d20 1e-3, d24 1e-4, d30 1e-5
    init_from: Optional[str] = None  # a trained VAR (run, checkpoint or model folder) whose tensors start the run

    def validate(self) -> None:
        if self.depth < 1:
            raise ConfigError(f"key 'model.depth': must be >= 1, got {self.depth}")
        width, heads = self.embed_dim or 64 * self.depth, self.num_heads or self.depth
        if width < 1 or heads < 1 or width % heads:
            raise ConfigError(f"key 'model.embed_dim': {width} is not divisible by model.num_heads = {heads}")
        if self.mlp_ratio <= 0:
            raise ConfigError(f"key 'model.mlp_ratio': must be > 0, got {self.mlp_ratio}")
        if self.drop_path_rate is not None and not 0.0 <= self.drop_path_rate < 1.0:
            raise ConfigError(f"key 'model.drop_path_rate': {self.drop_path_rate}: expected a value in [0, 1)")
        if not 0.0 <= self.class_dropout < 1.0:
            raise ConfigError(f"key 'model.class_dropout': {self.class_dropout}: expected a value in [0, 1)")

    def resolved(self) -> dict:
        rate = 0.1 * self.depth / 24 if self.drop_path_rate is None else self.drop_path_rate
        return var_config(self.depth, **{k: v for k, v in (("embed_dim", self.embed_dim), ("num_heads", self.num_heads))
                                        if v is not None}, mlp_ratio=self.mlp_ratio, attn_l2_norm=self.attn_l2_norm,
                          drop_path_rate=rate)


@MODELS.register("var", schema=VARConfig, cls=VAR, family=VAR.family, task="tokens")
def var_from_config(section: VARConfig, *, vocab_size: int, token_dim: int, scales: Sequence[int], num_classes: int) -> VAR:
    """The VAR a run config describes, over a tokenizer with `vocab_size` codes of `token_dim` on `scales`."""
    model = VAR(vocab_size=vocab_size, token_dim=token_dim, scales=tuple(scales), num_classes=num_classes,
                **section.resolved())
    model.initialize_weights(init_adaln_gamma=section.init_adaln_gamma)
    return model


#################################################################################
#                         Foreign checkpoints (official VAR)                    #
#################################################################################

# in official state dicts, rebuilt here (checked equal on import)
OFFICIAL_BUFFERS = ("lvl_1L", "attn_bias_for_masking")


def infer_var_config(state_dict: Dict[str, torch.Tensor], scales: Sequence[int]) -> dict:
    """Constructor arguments read off an official-layout state dict (depth from the block indices, width from
    pos_1LC, heads from scale_mul_1H11 or the VAR rule, vocabulary and token width from head / word_embed)."""
    pos = state_dict["pos_1LC"]
    width = pos.shape[-1]
    depth = 1 + max(int(k.split(".")[1]) for k in state_dict if k.startswith("blocks."))
    scale_mul = state_dict.get("blocks.0.attn.scale_mul_1H11")
    heads = scale_mul.shape[1] if scale_mul is not None else depth
    fc1 = state_dict["blocks.0.ffn.fc1.weight"].shape[0]
    return dict(vocab_size=state_dict["head.weight"].shape[0], token_dim=state_dict["word_embed.weight"].shape[1],
                scales=tuple(scales), num_classes=state_dict["class_emb.weight"].shape[0] - 1, depth=depth,
                embed_dim=width, num_heads=heads, mlp_ratio=fc1 / width, attn_l2_norm=scale_mul is not None)


def convert_var_state_dict(state: Dict[str, torch.Tensor], scales: Sequence[int], where: str) -> Tuple[dict, Dict[str, torch.Tensor]]:
    """(constructor arguments, state dict for VAR) from an official var_d* state dict, checked strictly: the
    buffers VAR saves (lvl_1L, attn_bias_for_masking, blocks.*.attn.zero_k_bias) must equal what genvis rebuilds
    and are dropped; anything else unknown or missing is named (first few) in one line."""
    needed = ("pos_1LC", "class_emb.weight", "word_embed.weight", "head.weight", "blocks.0.ffn.fc1.weight")
    missing = [k for k in needed if k not in state]
    if missing:
        raise GenvisError(f"{where}: not an official VAR layout: missing key(s) {', '.join(missing)}")
    length = sum(p * p for p in scales)
    if state["pos_1LC"].shape[1] != length:
        raise GenvisError(f"{where}: pos_1LC has {state['pos_1LC'].shape[1]} positions but the scales "
                          f"{','.join(map(str, scales))} make {length}; give the scales the model was trained on (--scales)")
    config = infer_var_config(state, scales)
    if config["embed_dim"] % config["num_heads"]:
        raise GenvisError(f"{where}: width {config['embed_dim']} is not divisible by {config['num_heads']} heads")
    expected = {"lvl_1L": scale_levels(scales)[None],
                "attn_bias_for_masking": torch.where(block_causal_mask(scales), 0.0, -torch.inf)[None, None]}
    out = {}
    for key, value in state.items():
        if key in expected or key.endswith(".attn.zero_k_bias"):
            reference = expected.get(key, torch.zeros_like(value))
            if value.shape != reference.shape or not torch.equal(value.to(reference.dtype), reference):
                raise GenvisError(f"{where}: buffer {key} differs from VAR's for scales {','.join(map(str, scales))}")
            continue
        out[key] = value
    return config, out
