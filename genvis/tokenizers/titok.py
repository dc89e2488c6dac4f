"""TiTok (Yu et al. 2024, "An Image is Worth 32 Tokens"; bytedance/1d-tokenizer): an image <-> K 1D tokens.

    encoder   [cls, patches (row-major), K latent tokens] -> ViT -> ln_post(the K latent outputs)
              -> 1x1 conv to token_size channels -> z [B, token_size, 1, K]
    vq        nearest code of an l2-normalised codebook (e.g. 4096 x 12) -> ids [B, K]
    vae       z holds mean and logvar (2 x token_size channels) -> continuous tokens [B, token_size, 1, K]
    decoder   [cls, g*g mask tokens, K projected tokens] -> ViT -> ln_post(the g*g mask outputs) -> a head:
              pixels  1x1 conv to p*p*C values per cell, unpatchified ((p1, p2, c) order), 3x3 conv_out;
              proxy   (the released two-stage TiTok-L-32 / B-64 / S-128) 1x1 conv, tanh, 1x1 conv to 1024
                      logits per cell; softmax @ the MaskGIT-VQGAN codebook (1024 x 256) -> its conv decoder.

The blocks are CLIP's (pre-LayerNorm eps 1e-5, attention packed as nn.MultiheadAttention's in_proj q;k;v,
exact-erf GELU MLP), run through scaled_dot_product_attention. State-dict keys are the official ones, so an
imported checkpoint (genvis.tokenizers.titok_import) loads unchanged. `legacy_latents` reproduces the
official is_legacy encoder, which reads ln_post's [B, K, W] as [B, W, K, 1] without transposing (every
released two-stage model depends on it). The networks see the official [0, 1] images: genvis's [-1, 1]
images are mapped in and out, and decodes are not clamped.

Training (genvis train, the tokenizer task) is single-stage: pixel + perceptual + GAN + the quantizer's loss
(0.25 commitment + codebook, as TiTok) with genvis's anti-collapse options (dead-code restart, EMA codebook,
entropy term), or the KL term for vae.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from einops import rearrange

from genvis.errors import ConfigError, GenvisError
from genvis.registry import TOKENIZERS
from genvis.tokenizers.base import ModelTokenizer, TokenizerConfig
from genvis.tokenizers.losses import kl_loss
from genvis.tokenizers.vq import LOCAL, Collectives, VectorQuantizer, check_ids, validate_quantizer_section

SIZES = {"small": (512, 8, 8), "base": (768, 12, 12), "large": (1024, 24, 16)}  # width, depth, heads (official)
QUANTIZE_MODES = ("vq", "vae")
DECODER_HEADS = ("pixels", "proxy")
PROXY = dict(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, z_channels=256, groups=32)  # MaskGIT-VQGAN's decoder


# ----------------------------------------------------------------------------- ViT blocks (CLIP / TiTok layout)

class PackedAttention(nn.Module):
    """nn.MultiheadAttention's parameters (in_proj_weight [3W, W] = q;k;v, in_proj_bias, out_proj), batch first,
    through scaled_dot_product_attention."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)  # nn.MultiheadAttention's initialisation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = rearrange(F.linear(x, self.in_proj_weight, self.in_proj_bias), "b l (t h d) -> t b h l d",
                            t=3, h=self.heads)
        return self.out_proj(rearrange(F.scaled_dot_product_attention(q, k, v), "b h l d -> b l (h d)"))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = PackedAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, hidden)), ("gelu", nn.GELU()),
                                              ("c_proj", nn.Linear(hidden, width))]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


def _embedding(*shape: int) -> nn.Parameter:
    return nn.Parameter(shape[-1] ** -0.5 * torch.randn(*shape))


class TiTokEncoder(nn.Module):
    def __init__(self, image_size: int, in_channels: int, patch_size: int, num_latent_tokens: int, width: int,
                 depth: int, heads: int, mlp_ratio: float, out_channels: int, legacy_latents: bool):
        super().__init__()
        self.grid, self.legacy_latents = image_size // patch_size, legacy_latents
        self.patch_embed = nn.Conv2d(in_channels, width, patch_size, stride=patch_size)
        self.class_embedding = _embedding(1, width)
        self.positional_embedding = _embedding(self.grid ** 2 + 1, width)
        self.latent_token_positional_embedding = _embedding(num_latent_tokens, width)
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = nn.ModuleList(ResidualAttentionBlock(width, heads, mlp_ratio) for _ in range(depth))
        self.ln_post = nn.LayerNorm(width)
        self.conv_out = nn.Conv2d(width, out_channels, 1)

    def forward(self, images: torch.Tensor, latent_tokens: torch.Tensor) -> torch.Tensor:
        """images [B, C, H, W] (official [0, 1]) -> z [B, out_channels, 1, K]."""
        b = images.shape[0]
        x = self.patch_embed(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_embedding.expand(b, -1, -1).to(x.dtype), x], dim=1) + self.positional_embedding.to(x.dtype)
        latents = (latent_tokens + self.latent_token_positional_embedding).expand(b, -1, -1).to(x.dtype)
        x = self.ln_pre(torch.cat([x, latents], dim=1))
        for block in self.transformer:
            x = block(x)
        z = self.ln_post(x[:, 1 + self.grid ** 2:])  # [B, K, W]
        k, w = z.shape[1], z.shape[2]
        z = z.reshape(b, w, k, 1) if self.legacy_latents else z.transpose(1, 2).unsqueeze(-1)
        return self.conv_out(z).reshape(b, -1, 1, k)


class TiTokDecoder(nn.Module):
    def __init__(self, image_size: int, out_channels: int, patch_size: int, num_latent_tokens: int, token_size: int,
                 width: int, depth: int, heads: int, mlp_ratio: float, head: str, proxy_codebook_size: int):
        super().__init__()
        self.grid, self.head = image_size // patch_size, head
        self.decoder_embed = nn.Linear(token_size, width)
        self.class_embedding = _embedding(1, width)
        self.positional_embedding = _embedding(self.grid ** 2 + 1, width)
        self.mask_token = _embedding(1, 1, width)
        self.latent_token_positional_embedding = _embedding(num_latent_tokens, width)
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = nn.ModuleList(ResidualAttentionBlock(width, heads, mlp_ratio) for _ in range(depth))
        self.ln_post = nn.LayerNorm(width)
        if head == "proxy":
            self.ffn = nn.Sequential(nn.Conv2d(width, 2 * width, 1), nn.Tanh(), nn.Conv2d(2 * width, proxy_codebook_size, 1))
        else:
            self.patch_size = patch_size
            self.ffn = nn.Sequential(nn.Conv2d(width, patch_size * patch_size * out_channels, 1))
            self.conv_out = nn.Conv2d(out_channels, out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, token_size, 1, K] -> images [B, C, H, W] (pixels) or proxy-code logits [B, 1024, g, g]."""
        b, c, _, k = z.shape
        x = self.decoder_embed(z.reshape(b, c, k).transpose(1, 2)) + self.latent_token_positional_embedding[:k]
        masks = self.mask_token.expand(b, self.grid ** 2, -1).to(x.dtype)
        masks = torch.cat([self.class_embedding.expand(b, -1, -1).to(x.dtype), masks], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.ln_pre(torch.cat([masks, x], dim=1))
        for block in self.transformer:
            x = block(x)
        x = self.ln_post(x[:, 1:1 + self.grid ** 2])
        x = self.ffn(x.transpose(1, 2).reshape(b, -1, self.grid, self.grid))
        if self.head == "proxy":
            return x
        p = self.patch_size
        return self.conv_out(rearrange(x, "b (p1 p2 c) h w -> b c (h p1) (w p2)", p1=p, p2=p))


# ----------------------------------------------------------------------------- MaskGIT-VQGAN pixel decoder (proxy head)

class ProxyResnetBlock(nn.Module):
    """MaskGIT-VQGAN's resnet block: bias-free 3x3 convs, GroupNorm eps 1e-6. When the width changes, the
    official block adds nin_shortcut of its own OUTPUT (not of its input); released weights depend on it."""

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=1e-6)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=1e-6)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.nin_shortcut = nn.Conv2d(out_channels, out_channels, 1, bias=False) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(x))))))
        return h + (x if self.nin_shortcut is None else self.nin_shortcut(h))


class ProxyUpBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_res_blocks: int, groups: int, upsample: bool):
        super().__init__()
        self.block = nn.ModuleList(ProxyResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups)
                                   for i in range(num_res_blocks))
        self.upsample_conv = nn.Conv2d(out_channels, out_channels, 3, padding=1) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        if self.upsample_conv is not None:
            x = self.upsample_conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return x


class ProxyDecoder(nn.Module):
    """MaskGIT-VQGAN's conv decoder (no attention): conv_in, mid resnet blocks, `up` indexed by level (level 0
    finest, run coarsest first, nearest x2 + 3x3 conv after every level but 0), GroupNorm, SiLU, conv_out."""

    def __init__(self, out_channels: int = 3, ch: int = 128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks: int = 2,
                 z_channels: int = 256, groups: int = 32):
        super().__init__()
        widths = [ch * m for m in ch_mult]
        self.conv_in = nn.Conv2d(z_channels, widths[-1], 3, padding=1)
        self.mid = nn.ModuleList(ProxyResnetBlock(widths[-1], widths[-1], groups) for _ in range(num_res_blocks))
        self.up = nn.ModuleList(ProxyUpBlock(widths[min(i + 1, len(widths) - 1)], widths[i], num_res_blocks, groups, i != 0)
                                for i in range(len(widths)))
        self.norm_out = nn.GroupNorm(groups, widths[0], eps=1e-6)
        self.conv_out = nn.Conv2d(widths[0], out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.mid:
            x = block(x)
        for block in reversed(self.up):
            x = block(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class ProxyCodebook(nn.Module):
    def __init__(self, size: int, dim: int):
        super().__init__()
        self.embedding = nn.Embedding(size, dim)


# ----------------------------------------------------------------------------- the tokenizer

@dataclass
class TiTokConfig(TokenizerConfig):
    """`tokenizer:` for `arch: titok` (single-stage training). Sizes: `encoder_size` / `decoder_size` small
    (512 wide, 8 blocks, 8 heads), base (768, 12, 12) or large (1024, 24, 16), as TiTok names them, or null
    and the explicit width / depth / heads. The image size and channels come from the data."""

    patch_size: int = 16
    decoder_patch_size: Optional[int] = None  # null = patch_size
    num_latent_tokens: int = 32
    encoder_size: Optional[str] = None
    encoder_width: int = 512
    encoder_depth: int = 8
    encoder_heads: int = 8
    decoder_size: Optional[str] = None
    decoder_width: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 8
    mlp_ratio: float = 4.0
    quantize_mode: str = "vq"  # vq (ids) | vae (continuous tokens)
    codebook_size: int = 4096
    token_size: int = 12  # code dimension (vq) or token channels (vae)
    l2_norm: bool = True  # TiTok: l2-normalised lookup
    beta: float = 0.25
    ema: bool = False
    ema_decay: float = 0.99
    restart_threshold: float = 0.0
    usage_decay: float = 0.99
    entropy_weight: float = 0.0
    normalisation: str = "per_channel"  # vae: the continuous tokens' statistics stored at export (per_channel | scalar)
    stats_images: int = 10000

    def validate(self) -> None:
        super().validate()
        for key in ("encoder_size", "decoder_size"):
            if getattr(self, key) is not None and getattr(self, key) not in SIZES:
                raise ConfigError(f"key 'tokenizer.{key}': {getattr(self, key)!r} is not one of {', '.join(SIZES)} (or null)")
        for side in ("encoder", "decoder"):
            width, _, heads = self.sizes(side)
            if width % heads:
                raise ConfigError(f"key 'tokenizer.{side}_heads': {heads} does not divide tokenizer.{side}_width {width}")
        for key in ("patch_size", "num_latent_tokens", "encoder_width", "encoder_depth", "encoder_heads",
                    "decoder_width", "decoder_depth", "decoder_heads", "codebook_size", "token_size", "stats_images"):
            if getattr(self, key) < 1:
                raise ConfigError(f"key 'tokenizer.{key}': must be >= 1, got {getattr(self, key)}")
        if self.quantize_mode not in QUANTIZE_MODES:
            raise ConfigError(f"key 'tokenizer.quantize_mode': {self.quantize_mode!r} is not one of {', '.join(QUANTIZE_MODES)}")
        from genvis.tokenizers.kl import NORMALISATIONS

        if self.normalisation not in NORMALISATIONS:
            raise ConfigError(f"key 'tokenizer.normalisation': {self.normalisation!r} is not one of {', '.join(NORMALISATIONS)}")
        validate_quantizer_section(self)

    def sizes(self, side: str) -> Tuple[int, int, int]:
        """(width, depth, heads) of the encoder or decoder."""
        name = getattr(self, f"{side}_size")
        if name is not None:
            return SIZES[name]
        return getattr(self, f"{side}_width"), getattr(self, f"{side}_depth"), getattr(self, f"{side}_heads")


@TOKENIZERS.register("titok", schema=TiTokConfig, class_name="TiTokTokenizer")
class TiTokTokenizer(ModelTokenizer, ModelMixin, ConfigMixin):
    """TiTok: images [B, C, H, W] in [-1, 1] <-> ids [B, K] (vq) or continuous tokens [B, token_size, 1, K] (vae)."""

    token_layout = "sequence"

    @register_to_config
    def __init__(self, image_size: int = 256, in_channels: int = 3, patch_size: int = 16, num_latent_tokens: int = 32,
                 encoder_width: int = 512, encoder_depth: int = 8, encoder_heads: int = 8, decoder_width: int = 512,
                 decoder_depth: int = 8, decoder_heads: int = 8, decoder_patch_size: int = 16, mlp_ratio: float = 4.0,
                 quantize_mode: str = "vq", codebook_size: int = 4096, token_size: int = 12, l2_norm: bool = True,
                 beta: float = 0.25, ema: bool = False, ema_decay: float = 0.99, restart_threshold: float = 0.0,
                 usage_decay: float = 0.99, entropy_weight: float = 0.0, decoder_head: str = "pixels",
                 legacy_latents: bool = False, proxy_codebook_size: int = 1024, proxy_codebook_dim: int = 256,
                 latents_mean: Optional[List[float]] = None, latents_std: Optional[List[float]] = None):
        super().__init__()
        if quantize_mode not in QUANTIZE_MODES:
            raise GenvisError(f"quantize_mode {quantize_mode!r}: expected one of {', '.join(QUANTIZE_MODES)}")
        if decoder_head not in DECODER_HEADS:
            raise GenvisError(f"decoder_head {decoder_head!r}: expected one of {', '.join(DECODER_HEADS)}")
        for side, size, patch in (("encoder", image_size, patch_size), ("decoder", image_size, decoder_patch_size)):
            if size % patch:
                raise GenvisError(f"{side} patch size {patch} does not divide the image size {size}")
        self.kind = "discrete" if quantize_mode == "vq" else "continuous"
        enc_out = token_size if quantize_mode == "vq" else 2 * token_size
        self.latent_tokens = _embedding(num_latent_tokens, encoder_width)
        self.encoder = TiTokEncoder(image_size, in_channels, patch_size, num_latent_tokens, encoder_width, encoder_depth,
                                    encoder_heads, mlp_ratio, enc_out, legacy_latents)
        self.decoder = TiTokDecoder(image_size, in_channels, decoder_patch_size, num_latent_tokens, token_size,
                                    decoder_width, decoder_depth, decoder_heads, mlp_ratio, decoder_head, proxy_codebook_size)
        self.apply(_init_weights)
        if quantize_mode == "vq":
            self.quantize = VectorQuantizer(codebook_size, token_size, beta=beta, l2_norm=l2_norm, ema=ema,
                                            ema_decay=ema_decay, restart_threshold=restart_threshold,
                                            usage_decay=usage_decay, entropy_weight=entropy_weight)
        if decoder_head == "proxy":
            self.pixel_quantize = ProxyCodebook(proxy_codebook_size, proxy_codebook_dim)
            self.pixel_decoder = ProxyDecoder(in_channels, **{**PROXY, "z_channels": proxy_codebook_dim})

    @classmethod
    def from_section(cls, section: TiTokConfig, image_shape) -> "TiTokTokenizer":
        c, h, w = image_shape
        if h != w:
            raise ConfigError(f"key 'data.resolution': TiTok needs square images, got {h}x{w}")
        dec_patch = section.decoder_patch_size or section.patch_size
        for key, patch in (("patch_size", section.patch_size), ("decoder_patch_size", dec_patch)):
            if h % patch:
                raise ConfigError(f"key 'tokenizer.{key}': {patch} does not divide the image size {h}")
        (ew, ed, eh), (dw, dd, dh) = section.sizes("encoder"), section.sizes("decoder")
        keys = ("num_latent_tokens", "mlp_ratio", "quantize_mode", "codebook_size", "token_size", "l2_norm", "beta", "ema",
                "ema_decay", "restart_threshold", "usage_decay", "entropy_weight")
        return cls(image_size=h, in_channels=c, patch_size=section.patch_size, decoder_patch_size=dec_patch,
                   encoder_width=ew, encoder_depth=ed, encoder_heads=eh, decoder_width=dw, decoder_depth=dd,
                   decoder_heads=dh, **{k: getattr(section, k) for k in keys})

    # -- what it produces
    @property
    def vocab_size(self) -> int:
        return self.config.codebook_size

    @property
    def num_tokens(self) -> int:
        return self.config.num_latent_tokens

    @property
    def latent_channels(self) -> Optional[int]:
        return self.config.token_size if self.kind == "continuous" else None

    def latent_shape(self, image_shape) -> Tuple[int, ...]:
        """(K,) ids per image (vq), or (token_size, 1, K) continuous tokens (vae)."""
        k = self.num_tokens
        return (k,) if self.kind == "discrete" else (self.config.token_size, 1, k)

    def draw_shape(self, image_shape) -> Dict[str, Tuple[int, ...]]:
        """Per image, the random numbers one training step takes: restart keys (vq) or posterior noise (vae)."""
        return {"keys": (self.num_tokens,)} if self.kind == "discrete" else {"noise": self.latent_shape(image_shape)}

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's last weight, where the adaptive GAN weight is measured (taming)."""
        if self.config.decoder_head != "pixels":
            raise GenvisError("a two-stage (proxy) TiTok decoder is not trained here; train decoder_head pixels")
        return self.decoder.conv_out.weight

    # -- the networks, on official [0, 1] images
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """images [-1, 1] -> z [B, C', 1, K] (C' = token_size, or 2 x token_size for vae: mean; logvar)."""
        return self.encoder((images + 1) / 2, self.latent_tokens)

    def reconstruct(self, z: torch.Tensor) -> torch.Tensor:
        """Quantised (or continuous) tokens [B, token_size, 1, K] -> images in [-1, 1] (not clamped)."""
        out = self.decoder(z)
        if self.config.decoder_head == "proxy":
            codes = torch.einsum("nchw,cd->ndhw", out.softmax(dim=1), self.pixel_quantize.embedding.weight)
            out = self.pixel_decoder(codes)
        return out * 2 - 1

    def _posterior(self, z: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        mean, logvar = z.float().chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def forward(self, images: torch.Tensor, keys: Optional[torch.Tensor] = None, noise: Optional[torch.Tensor] = None,
                sync: Collectives = LOCAL) -> Dict[str, torch.Tensor]:
        """Training pass: vq {"reconstruction", "quantizer_loss", "ids", "log/..."}; vae {"reconstruction", "kl"}
        (the decoder sees mean + std * noise when `noise` [B, token_size, 1, K] is given, else the mean)."""
        z = self.features(images)
        if self.kind == "continuous":
            mean, logvar = self._posterior(z)
            sample = mean if noise is None else mean + (0.5 * logvar).exp() * noise
            return {"reconstruction": self.reconstruct(sample), "kl": kl_loss(mean, logvar).mean()}
        out = self.quantize(z, keys, sync)
        logs = {k: v for k, v in out.items() if k.startswith("log/")}
        return {"reconstruction": self.reconstruct(out["quantized"]), "quantizer_loss": out["loss"],
                "ids": out["ids"].flatten(1), **logs}

    # -- the tokenizer contract
    @torch.no_grad()
    def encode(self, images, *, sample: bool = False, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        z = self.features(images)
        if self.kind == "discrete":
            return self.quantize.ids(z).flatten(1)
        mean, logvar = self._posterior(z)
        if sample:
            noise = torch.randn(mean.shape, generator=generator, device=generator.device if generator else mean.device)
            mean = mean + (0.5 * logvar).exp() * noise.to(mean.device)
        return self.normalise(mean)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.kind == "continuous":
            if tokens.dim() != 4 or tuple(tokens.shape[1:]) != self.latent_shape(None):
                raise GenvisError(f"tokens of shape {tuple(tokens.shape)}: this TiTok decodes [B, "
                                  f"{', '.join(map(str, self.latent_shape(None)))}]")
            return self.reconstruct(self.denormalise(tokens.float()))
        ids = tokens.flatten(1) if tokens.dim() == 3 and tokens.shape[1] == 1 else tokens
        if ids.dim() != 2 or ids.shape[1] != self.num_tokens:
            raise GenvisError(f"ids of shape {tuple(tokens.shape)}: this TiTok decodes [B, {self.num_tokens}] (or [B, 1, "
                              f"{self.num_tokens}])")
        check_ids(ids, self.vocab_size)
        codes = self.quantize.lookup(ids.long()).transpose(1, 2).unsqueeze(2)  # [B, token_size, 1, K]
        return self.reconstruct(codes)

    # -- continuous tokens: per-channel (or scalar) normalisation measured on training images
    def _stats(self, like: torch.Tensor):
        c = self.config
        if c.latents_mean is None:
            return None
        return (torch.tensor(c.latents_mean, dtype=like.dtype, device=like.device).view(1, -1, 1, 1),
                torch.tensor(c.latents_std, dtype=like.dtype, device=like.device).view(1, -1, 1, 1))

    def normalise(self, z: torch.Tensor) -> torch.Tensor:
        stats = self._stats(z)
        return z if stats is None else (z - stats[0]) / stats[1]

    def denormalise(self, latents: torch.Tensor) -> torch.Tensor:
        stats = self._stats(latents)
        return latents if stats is None else latents * stats[1] + stats[0]

    @torch.no_grad()
    def measure_normalisation(self, batches: Iterable[torch.Tensor], normalisation: str = "per_channel") -> dict:
        """vae: measure the posterior means' statistics (float64) over `batches` of images and store them in the
        config, so encode() gives mean 0 / std 1 per channel (scalar: one mean and std for all channels)."""
        from genvis.tokenizers.kl import channel_statistics

        mean, std = channel_statistics((self._posterior(self.features(images))[0] for images in batches),
                                       per_channel=normalisation == "per_channel")
        if normalisation == "scalar":
            mean, std = mean.expand(self.config.token_size), std.expand(self.config.token_size)
        stored = dict(latents_mean=mean.tolist(), latents_std=std.tolist())
        self.register_to_config(**stored)
        return stored


def _init_weights(module: nn.Module) -> None:
    """TiTok's: truncated normal (std 0.02) for linear and conv weights, zero biases, LayerNorm 1 / 0."""
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        nn.init.trunc_normal_(module.weight, mean=0.0, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
