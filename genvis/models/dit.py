"""DiT: Scalable Diffusion Models with Transformers (Peebles & Xie, 2023).

Official layout and initialisation (facebookresearch/DiT models.py): adaLN-Zero blocks, fixed
2D sin-cos position embedding stored as a frozen parameter, a label table with one extra null
row for classifier-free guidance, and learned-sigma output channels. Official state dicts load
unchanged; `forward(x, t, y)` returns exactly what the official model returns.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from einops import rearrange

from genvis.models.layers import (
    Attention,
    LabelEmbedder,
    Mlp,
    PatchEmbed,
    SwiGLU,
    TimestepEmbedder,
    get_2d_sincos_pos_embed,
    make_norm,
    modulate,
    rope_2d,
)
from genvis.errors import ConfigError
from genvis.registry import MODELS

#################################################################################
#                                 DiT blocks                                    #
#################################################################################


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning. `norm` is the pre-norm ("layernorm": DiT's, no affine;
    "rmsnorm": LightningDiT's, with weight); without `adaln_shift` the modulation is scale and gate only (4D,
    LightningDiT's wo_shift)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0,
                 attn: Optional[nn.Module] = None, mlp: Optional[nn.Module] = None, norm: str = "layernorm",
                 adaln_shift: bool = True):
        super().__init__()
        self.norm1 = make_norm(norm, hidden_size)
        self.attn = attn if attn is not None else Attention(hidden_size, num_heads=num_heads, qkv_bias=True)
        self.norm2 = make_norm(norm, hidden_size)
        self.mlp = mlp if mlp is not None else Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.shift = adaln_shift
        chunks = 6 if adaln_shift else 4
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, chunks * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
                ) -> torch.Tensor:
        if self.shift:
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        else:
            scale_msa, gate_msa, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(4, dim=1)
            shift_msa = shift_mlp = None
        h = modulate(self.norm1(x), shift_msa, scale_msa)
        x = x + gate_msa.unsqueeze(1) * (self.attn(h) if rope is None else self.attn(h, rope))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, norm: str = "layernorm"):
        super().__init__()
        self.norm_final = make_norm(norm, hidden_size)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


#################################################################################
#                                 DiT model                                     #
#################################################################################

# name -> (depth, hidden_size, num_heads). "tiny" is genvis's CPU size for the digits demo.
DIT_SIZES: Dict[str, Tuple[int, int, int]] = {
    "tiny": (6, 192, 3),
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
    "1p0B": (24, 1536, 24),  # LightningDiT's larger sizes
    "1p6B": (28, 1792, 28),
}

# recipe -> the architecture options it picks (each overridable in the run config's model section)
RECIPES: Dict[str, Dict[str, object]] = {
    "dit": dict(norm="layernorm", ffn="mlp", qk_norm=False, rope=False, pos_embed=True, adaln_shift=True),
    "lightningdit": dict(norm="rmsnorm", ffn="swiglu", qk_norm=False, rope=True, pos_embed=True, adaln_shift=True),
}


NORMS = ("layernorm", "rmsnorm")
FFNS = ("mlp", "swiglu")


def token_grid(input_size: Union[int, Sequence[int]], patch_size: int) -> Tuple[int, int]:
    """(rows, columns) of p x p patches of an input of size `input_size` (an int: square; [H, W]: a rectangle)."""
    height, width = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    if height % patch_size or width % patch_size:
        raise ValueError(f"patch size {patch_size} does not divide the input size {height}x{width}")
    return height // patch_size, width // patch_size


class DiT(ModelMixin, ConfigMixin):
    """Class-conditional diffusion transformer.

    Args:
        input_size: spatial size of the input (latent or pixel grid), default 32; [H, W] for a rectangle,
            e.g. [1, K] for a 1D tokenizer's K continuous tokens (KL-TiTok) with patch size 1.
        patch_size: patch size p (1, 2, 4 or 8), default 2.
        in_channels: input channels, default 4.
        hidden_size, depth, num_heads, mlp_ratio: transformer width/depth/heads/MLP ratio (DiT-XL: 1152/28/16/4).
        class_dropout_prob: label dropout used in training; > 0 adds the null row to the label table. Default 0.1.
        num_classes: number of real classes (the null class is index `num_classes`), default 1000.
        learn_sigma: output 2 * in_channels channels (prediction, then variance interpolation values). Default True.
        prediction_type: what the output (first in_channels channels) predicts: eps | v | x0 | velocity. Default eps.
        schedule: the noise schedule the model was trained on: "linear" (discrete VP, t in 0..999 with
            t=999 noise) or "flow" (rectified flow, t in [0, 1] with t=1 noise). Default linear.
        num_train_timesteps, beta_start, beta_end: the discrete VP schedule (DiT: 1000, 1e-4, 0.02).
        flow_shift: for schedule "flow", the resolution shift of the default sampling grid
            (t' = s t / (1 + (s - 1) t); SD3 uses s = sqrt(tokens / base tokens)). Default 1 (none).
        norm: the blocks' and final layer's pre-norm, "layernorm" (DiT) or "rmsnorm" (with weight; LightningDiT).
        ffn: "mlp" (DiT's tanh-GELU MLP, hidden mlp_ratio x D) or "swiglu" (hidden int(2/3 x mlp_ratio x D)).
        qk_norm: normalise q and k per head before attention (with `norm`'s kind; LayerNorm with affine).
        rope: 2D rotary position embedding of the token grid in attention (EVA-02 / LightningDiT layout).
        use_pos_embed: add the fixed sin-cos position embedding (kept with RoPE, as LightningDiT does).
        adaln_shift: adaLN with shift (6D); False is LightningDiT's wo_shift (scale and gate only, 4D).

    The space the model works in (pixels, or a tokenizer's normalised latents) is not part of its
    config: the tokenizer owns it, and an exported model folder records its tokenizer.
    """

    family = "diffusion"  # sampled by genvis.samplers.diffusion

    @register_to_config
    def __init__(
        self,
        input_size: Union[int, Sequence[int]] = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
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
        norm: str = "layernorm",
        ffn: str = "mlp",
        qk_norm: bool = False,
        rope: bool = False,
        use_pos_embed: bool = True,
        adaln_shift: bool = True,
    ):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm {norm!r}: expected one of {', '.join(NORMS)}")
        if ffn not in FFNS:
            raise ValueError(f"ffn {ffn!r}: expected one of {', '.join(FFNS)}")
        self.norm_kind, self.ffn_kind, self.qk_norm, self.adaln_shift = norm, ffn, qk_norm, adaln_shift
        self._build(input_size, patch_size, in_channels, hidden_size, depth, num_heads, mlp_ratio, class_dropout_prob,
                    num_classes, learn_sigma, pos_embed=use_pos_embed, rope=rope)

    def _build(self, input_size, patch_size, in_channels, hidden_size, depth, num_heads, mlp_ratio, class_dropout_prob,
               num_classes, learn_sigma, pos_embed: bool = True, rope: bool = False) -> None:
        """The modules (shared with the DiT variants, which replace `make_block`)."""
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.grid = token_grid(input_size, patch_size)  # (rows, columns) of patches

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        # Fixed sin-cos embedding, kept as a frozen parameter because official checkpoints store it.
        if pos_embed:
            self.pos_embed = nn.Parameter(torch.zeros(1, math.prod(self.grid), hidden_size), requires_grad=False)
        else:
            self.register_parameter("pos_embed", None)
        self.rope = rope
        if rope:  # computed, not stored: official checkpoints' feat_rope buffers are checked and dropped on import
            cos, sin = rope_2d(hidden_size // num_heads, self.grid)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.blocks = nn.ModuleList([self.make_block(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        norm = getattr(self, "norm_kind", "layernorm")  # the DiT variants keep DiT's LayerNorm
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, norm=norm)
        self.initialize_weights()

    def make_block(self, hidden_size: int, num_heads: int, mlp_ratio: float) -> nn.Module:
        hidden = int(hidden_size * mlp_ratio)
        mlp = SwiGLU(hidden_size, int(2 / 3 * hidden)) if self.ffn_kind == "swiglu" else Mlp(hidden_size, hidden)
        attn = Attention(hidden_size, num_heads, qkv_bias=True, qk_norm=self.norm_kind if self.qk_norm else None)
        return DiTBlock(hidden_size, num_heads, mlp_ratio, attn=attn, mlp=mlp, norm=self.norm_kind,
                        adaln_shift=self.adaln_shift)

    def initialize_weights(self) -> None:
        """Official DiT initialisation: xavier linears, N(0, 0.02) embeddings, zeroed adaLN and output."""

        def _basic_init(module):
            if isinstance(module, nn.Linear):
                torch.nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)

        self.apply(_basic_init)
        if self.pos_embed is not None:
            pos_embed = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], self.grid)
            self.pos_embed.data.copy_(torch.from_numpy(pos_embed).float().unsqueeze(0))
        # Patch embedding initialised like nn.Linear (xavier on the flattened kernel).
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, p*p*C] -> [B, C, H, W] (the official (p, q, c) ordering within a patch)."""
        h, w = self.grid
        return rearrange(x, "b (h w) (p q c) -> b c (h p) (w q)", h=h, w=w, p=self.patch_size, q=self.patch_size)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """
        x: [B, C, H, W] noisy input; t: [B] timesteps in the schedule's units (float or int);
        y: [B] class labels (index num_classes = null). Returns [B, out_channels, H, W].
        """
        h, c = self.embed(x, t, y)
        return self.head(self.run_blocks(h, c), c)

    # forward = embed -> run_blocks -> head; the pieces let samplers reuse part of the network
    # (genvis.samplers.accel.DiTStepCache).

    def embed(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Tokens h = patch embedding + position embedding [B, N, D] and conditioning c = t_emb + y_emb [B, D]."""
        h = self.x_embedder(x)
        if self.pos_embed is not None:
            h = h + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y)
        return h, c

    def run_blocks(self, h: torch.Tensor, c: torch.Tensor, start: int = 0, stop: Optional[int] = None) -> torch.Tensor:
        """Blocks start..stop-1 (Python slice semantics; default all) applied to the tokens h."""
        rope = (self.rope_cos, self.rope_sin) if self.rope else None
        for block in self.blocks[start:stop]:
            h = block(h, c, rope)
        return h

    def head(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Final adaLN layer and unpatchify: tokens [B, N, D] -> [B, out_channels, H, W]."""
        return self.unpatchify(self.final_layer(h, c))

    @property
    def null_class(self) -> int:
        return self.num_classes

    @property
    def sample_shape(self) -> Tuple[int, int, int]:
        """(C, H, W) of what the model generates (its input)."""
        gh, gw = self.grid
        return (self.in_channels, gh * self.patch_size, gw * self.patch_size)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_image(self) -> float:
        """Forward matmul FLOPs per image (2 * MACs), as used for the fraction-of-peak figures."""
        n = math.prod(self.grid)
        d = self.config.hidden_size
        hidden = int(d * self.config.mlp_ratio)
        mlp = 3 * d * int(2 / 3 * hidden) if self.ffn_kind == "swiglu" else 2 * d * hidden
        per_block = 2 * n * (3 * d * d + d * d + mlp) + 2 * 2 * n * n * d
        per_block += 2 * d * (6 if getattr(self, "adaln_shift", True) else 4) * d
        patch = self.patch_size**2
        return self.config.depth * per_block + 2 * n * d * patch * (self.in_channels + self.out_channels)


def dit_config(size: str, patch_size: int, **kwargs) -> dict:
    """Constructor arguments of DiT-{size}/{patch_size}; kwargs override (including depth/width/heads)."""
    depth, hidden, heads = DIT_SIZES[size]
    return {**dict(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=patch_size), **kwargs}


def parse_arch(name: str, prefix: str = "DiT") -> Tuple[str, int]:
    """'DiT-XL/2' -> ('XL', 2) (prefix "SiT": SiT's names for the same sizes)."""
    sizes = ("S", "B", "L", "XL")
    match = re.fullmatch(rf"{prefix}-(\w+)/(\d+)", name)
    if match is None or match.group(1) not in sizes or int(match.group(2)) not in (2, 4, 8):
        choices = ", ".join(f"{prefix}-{s}/{p}" for s in sizes for p in (2, 4, 8))
        raise ValueError(f"unknown {prefix} architecture {name!r}; expected one of: {choices}")
    return match.group(1), int(match.group(2))


def build_dit(size: str = "S", patch_size: int = 2, **kwargs) -> DiT:
    return DiT(**dit_config(size, patch_size, **kwargs))


@dataclass
class DiTConfig:
    """The run config's `model:` section for `arch: dit`."""

    arch: str = "dit"
    size: str = "S"  # tiny | S | B | L | XL
    patch_size: int = 2
    depth: Optional[int] = None  # override the size's depth / width / heads (null = from size)
    hidden_size: Optional[int] = None
    num_heads: Optional[int] = None
    class_dropout: float = 0.1  # label dropout in training; > 0 adds the null class for guidance
    learn_sigma: bool = True  # only for eps prediction on a discrete VP schedule (DiT's hybrid loss)
    init_from: Optional[str] = None  # a trained model (run, checkpoint or model folder) whose shared tensors start the run
    recipe: str = "dit"  # dit | lightningdit: the architecture options below (null = the recipe's)
    norm: Optional[str] = None  # layernorm | rmsnorm
    ffn: Optional[str] = None  # mlp | swiglu
    qk_norm: Optional[bool] = None
    rope: Optional[bool] = None  # 2D rotary position embedding in attention
    pos_embed: Optional[bool] = None  # the fixed sin-cos position embedding
    adaln_shift: Optional[bool] = None  # false: scale and gate only (LightningDiT's wo_shift)

    def options(self) -> dict:
        """The DiT constructor's architecture options this section names."""
        picked = {k: (v if getattr(self, k) is None else getattr(self, k)) for k, v in RECIPES[self.recipe].items()}
        picked["use_pos_embed"] = picked.pop("pos_embed")
        return picked

    def validate(self) -> None:
        if self.recipe not in RECIPES:
            raise ConfigError(f"key 'model.recipe': {self.recipe!r} is not one of {', '.join(RECIPES)}")
        if self.norm is not None and self.norm not in NORMS:
            raise ConfigError(f"key 'model.norm': {self.norm!r} is not one of {', '.join(NORMS)}")
        if self.ffn is not None and self.ffn not in FFNS:
            raise ConfigError(f"key 'model.ffn': {self.ffn!r} is not one of {', '.join(FFNS)}")
        if self.size not in DIT_SIZES:
            raise ConfigError(f"key 'model.size': {self.size!r} is not one of {', '.join(DIT_SIZES)}")
        if self.patch_size not in (1, 2, 4, 8):
            raise ConfigError(f"key 'model.patch_size': {self.patch_size} is not one of 1, 2, 4, 8")
        for key in ("depth", "hidden_size", "num_heads"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ConfigError(f"key 'model.{key}': must be >= 1, got {getattr(self, key)}")
        depth, hidden, heads = DIT_SIZES[self.size]
        hidden, heads = self.hidden_size or hidden, self.num_heads or heads
        if hidden % heads:
            raise ConfigError(f"key 'model.hidden_size': {hidden} is not divisible by model.num_heads = {heads}")
        if self.options()["rope"] and (hidden // heads) % 4:
            raise ConfigError(f"key 'model.rope': 2D RoPE needs a head width (hidden_size / num_heads = {hidden // heads}) "
                              "divisible by 4")
        if not 0.0 <= self.class_dropout < 1.0:
            raise ConfigError(f"key 'model.class_dropout': {self.class_dropout}: expected a value in [0, 1)")


def check_patch_size(patch_size: int, height: int, width: int) -> None:
    """The config's patch size tiles an input of height x width (one line naming the key otherwise)."""
    if height % patch_size or width % patch_size:
        raise ConfigError(f"key 'model.patch_size': {patch_size} does not divide the input size {height}x{width}"
                          + (" (a 1 x K row of 1D tokens needs patch_size 1)" if height == 1 else ""))


def input_size(height: int, width: int) -> Union[int, list]:
    """The config value of `input_size`: an int for a square input (the official DiT config), else [H, W]."""
    return height if height == width else [height, width]


@MODELS.register("dit", schema=DiTConfig, cls=DiT, family=DiT.family, task="diffusion")
def dit_from_config(section: DiTConfig, *, sample_shape: Tuple[int, int, int], num_classes: int, **diffusion) -> DiT:
    """The DiT a run config describes, for inputs of `sample_shape` (C, H, W); `diffusion` holds what the
    training task decides (prediction_type, schedule and its parameters, learn_sigma)."""
    channels, height, width = sample_shape
    check_patch_size(section.patch_size, height, width)
    sizes = {k: getattr(section, k) for k in ("depth", "hidden_size", "num_heads") if getattr(section, k) is not None}
    return build_dit(section.size, section.patch_size, **sizes, **section.options(),
                     input_size=input_size(height, width), in_channels=channels, num_classes=num_classes, class_dropout_prob=section.class_dropout, **diffusion)


#################################################################################
#                       Foreign checkpoints (official DiT)                      #
#################################################################################

def infer_dit_config(state_dict: Dict[str, torch.Tensor], patch_size: int) -> dict:
    """Input size, channels, classes and learn_sigma read off an official-layout state dict."""
    hidden = state_dict["pos_embed"].shape[-1]
    num_patches = state_dict["pos_embed"].shape[1]
    grid = int(round(num_patches**0.5))
    in_channels = state_dict["x_embedder.proj.weight"].shape[1]
    out_dim = state_dict["final_layer.linear.weight"].shape[0]
    out_channels = out_dim // (patch_size * patch_size)
    table_rows = state_dict["y_embedder.embedding_table.weight"].shape[0]
    depth = 1 + max((int(k.split(".")[1]) for k in state_dict if k.startswith("blocks.")), default=-1)
    return dict(
        input_size=grid * patch_size,
        in_channels=in_channels,
        hidden_size=hidden,
        depth=depth,
        learn_sigma=out_channels == 2 * in_channels,
        num_classes=table_rows - 1,
        class_dropout_prob=0.1,
    )


# width -> heads of the named sizes (LightningDiT's: B 768/12, L 1024/16, XL 1152/16, 1p0B 1536/24, 1p6B 1792/28)
HEADS_OF_WIDTH = {hidden: heads for _, hidden, heads in DIT_SIZES.values()}


def convert_lightningdit_state_dict(state: Dict[str, torch.Tensor], num_heads: Optional[int] = None
                                    ) -> Tuple[dict, Dict[str, torch.Tensor]]:
    """(DiT constructor arguments, state dict) of an official LightningDiT checkpoint (hustvl/LightningDiT
    models/lightningdit.py). Sizes, patch, channels, classes and every option (RMSNorm, SwiGLU, qk-norm, RoPE,
    wo_shift) are read off the tensors; the RoPE tables it saves (feat_rope.freqs_cos / freqs_sin) are checked
    against genvis's and dropped (genvis computes them). The network counts time as SiT does and predicts
    velocity: schedule "sit", prediction "velocity". Raises ValueError naming what does not fit."""
    needed = ("pos_embed", "x_embedder.proj.weight", "final_layer.linear.weight", "y_embedder.embedding_table.weight",
              "blocks.0.adaLN_modulation.1.weight")
    missing = [k for k in needed if k not in state]
    if missing:
        raise ValueError(f"not a LightningDiT / DiT layout: missing key(s) {', '.join(missing)}")
    hidden, in_channels, patch, _ = state["x_embedder.proj.weight"].shape
    heads = num_heads or HEADS_OF_WIDTH.get(hidden)
    if heads is None:
        raise ValueError(f"width {hidden} is not one of the DiT / LightningDiT sizes "
                         f"({', '.join(map(str, HEADS_OF_WIDTH))}): give the number of heads")
    if "blocks.0.attn.q_norm.weight" in state and state["blocks.0.attn.q_norm.weight"].shape[0] * heads != hidden:
        raise ValueError(f"q_norm has width {state['blocks.0.attn.q_norm.weight'].shape[0]}, not hidden / heads = "
                         f"{hidden} / {heads}")
    config = infer_dit_config(state, patch)
    state = dict(state)
    rope = "feat_rope.freqs_cos" in state
    config.update(
        patch_size=patch, num_heads=heads, prediction_type="velocity", schedule="sit",
        norm="rmsnorm" if "blocks.0.norm1.weight" in state else "layernorm",
        ffn="swiglu" if "blocks.0.mlp.w12.weight" in state else "mlp",
        qk_norm="blocks.0.attn.q_norm.weight" in state, rope=rope,
        adaln_shift=state["blocks.0.adaLN_modulation.1.weight"].shape[0] == 6 * hidden,
    )
    if rope:
        cos, sin = rope_2d(hidden // heads, token_grid(config["input_size"], patch))
        for name, ours in (("freqs_cos", cos), ("freqs_sin", sin)):
            theirs = state.pop(f"feat_rope.{name}").float()
            if theirs.shape != ours.shape or not torch.allclose(theirs, ours, atol=1e-4):
                raise ValueError(f"feat_rope.{name} {tuple(theirs.shape)} is not the 2D RoPE table of a "
                                 f"{hidden // heads}-wide head on this grid")
    return config, state
