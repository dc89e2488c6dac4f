"""Official VQ tokenizer checkpoints -> genvis's layout (genvis.tokenizers.conv), the config read off the shapes.

    LlamaGen VQ-16 / VQ-8   encoder.conv_blocks.{l}.{res,attn,downsample}.*, encoder.mid.{0,1,2}, and
                            decoder.conv_blocks.{i} listed coarsest first (level = levels - 1 - i) with
                            .res / .attn / .upsample; separate q, k, v; buffer quantize.codebook_used
                            (a training statistic, dropped); l2-normalised codebook lookup.
    taming VQGAN (VQModel)  encoder.down / decoder.up / mid.block_1, attn_1, block_2 as genvis; separate
                            q, k, v; the training losses' loss.* (discriminator, LPIPS) dropped.
    VAR VQ-VAE              genvis's own layout (vae_ch160v4096z32); a fully shared (quant_resi.qresi) or
                            non-shared (quant_resi.{i}) phi becomes qresi_ls with one or S entries, which
                            picks the same phi per scale.

An attention block's three 1x1 convs q, k, v become genvis's one `qkv` conv, weight and bias cat(q, k, v)
along the output channels. A training checkpoint is unwrapped first: its "ema" entry, else "model", else
"state_dict" (LlamaGen's own demo scripts' order; Lightning keeps taming's weights in "state_dict"), and
DDP "module." / torch.compile "_orig_mod." prefixes are removed.

The loading is strict: every converted tensor must be a parameter or buffer of the model built from the
inferred config, with its shape, and every one of the model's tensors must come from the checkpoint except
genvis's own training statistics (quantize.usage, ema_count, ema_sum), which keep their initial values.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence

import torch

from genvis.errors import GenvisError
from genvis.io import WRAPPER_ENTRIES, unwrap_state_dict

OWN_BUFFERS = ("quantize.usage", "quantize.ema_count", "quantize.ema_sum")  # genvis's training statistics
VQ_LAYOUTS = ("llamagen", "taming")


@dataclass
class Converted:
    """A checkpoint in genvis's layout: `state` (genvis key -> tensor), `config` (constructor arguments of
    VQTokenizer or MultiScaleVQTokenizer), `origin` (genvis key -> the source key(s) it came from, for
    messages), `dropped` (source keys deliberately left out) and `keep_initial` (model tensors that the
    checkpoint does not hold and that keep their initial values)."""

    layout: str
    state: Dict[str, torch.Tensor]
    config: dict
    origin: Dict[str, str] = field(default_factory=dict)
    dropped: List[str] = field(default_factory=list)
    keep_initial: Sequence[str] = OWN_BUFFERS


# ----------------------------------------------------------------------------- reading a checkpoint

def unwrap_checkpoint(checkpoint, where: str = "checkpoint") -> Dict[str, torch.Tensor]:
    """A plain state dict, or the "ema" / "model" / "state_dict" entry of a training checkpoint (first found
    in that order), without wrapper prefixes; non-tensor entries are left out."""
    if not isinstance(checkpoint, dict):
        raise GenvisError(f"{where}: expected a state dict or a training checkpoint dict, got {type(checkpoint).__name__}")
    state = unwrap_state_dict(checkpoint)
    if not state:
        raise GenvisError(f"{where}: holds no tensors (expected a state dict, or a checkpoint with an "
                          f"{' / '.join(repr(e) for e in WRAPPER_ENTRIES)} entry)")
    return state


def detect_layout(state: Dict[str, torch.Tensor]) -> Optional[str]:
    """"llamagen", "taming", "var" or None, from the key names."""
    if any(k.startswith("encoder.conv_blocks.") for k in state):
        return "llamagen"
    if "quantize.ema_vocab_hit_SV" in state or any(k.startswith("quantize.quant_resi.") for k in state):
        return "var"
    if any(k.startswith("encoder.down.") for k in state):
        return "taming"
    return None


# ----------------------------------------------------------------------------- key conversion

def fuse_qkv(state: Dict[str, torch.Tensor], origin: Dict[str, str]) -> Dict[str, torch.Tensor]:
    """Every `P.q`, `P.k`, `P.v` triple of 1x1 convs (weights and biases all present) -> `P.qkv`. An incomplete
    triple is left as it is, for the strict loading to name."""
    out = dict(state)
    for key in [k for k in state if k.endswith(".q.weight")]:
        prefix = key[: -len(".q.weight")]
        names = [f"{prefix}.{n}.{p}" for p in ("weight", "bias") for n in "qkv"]
        if not all(n in state for n in names):
            continue
        for part in ("weight", "bias"):
            parts = [f"{prefix}.{n}.{part}" for n in "qkv"]
            if len({tuple(state[n].shape) for n in parts}) != 1:
                continue
            out[f"{prefix}.qkv.{part}"] = torch.cat([state[n] for n in parts], dim=0)
            origin[f"{prefix}.qkv.{part}"] = f"{prefix}.{{q,k,v}}.{part}"
            for n in parts:
                del out[n]
                origin.pop(n, None)
    return out


_LLAMAGEN_ENCODER = [
    (re.compile(r"^encoder\.conv_blocks\.(\d+)\.res\."), r"encoder.down.\1.block."),
    (re.compile(r"^encoder\.conv_blocks\.(\d+)\.attn\."), r"encoder.down.\1.attn."),
    (re.compile(r"^encoder\.conv_blocks\.(\d+)\.downsample\."), r"encoder.down.\1.downsample."),
    (re.compile(r"^(encoder|decoder)\.mid\.0\."), r"\1.mid.block_1."),
    (re.compile(r"^(encoder|decoder)\.mid\.1\."), r"\1.mid.attn_1."),
    (re.compile(r"^(encoder|decoder)\.mid\.2\."), r"\1.mid.block_2."),
]
_LLAMAGEN_DECODER = re.compile(r"^decoder\.conv_blocks\.(\d+)\.(res|attn|upsample)\.(.*)$")
_DECODER_PART = {"res": "block", "attn": "attn", "upsample": "upsample"}


def from_llamagen(state: Dict[str, torch.Tensor], where: str = "checkpoint") -> Converted:
    """LlamaGen's VQModel state dict -> genvis's layout (see the module docstring); the config is inferred."""
    decoder_levels = {int(m.group(1)) for k in state if (m := _LLAMAGEN_DECODER.match(k))}
    levels = max(decoder_levels) + 1 if decoder_levels else 0
    out, origin, dropped = {}, {}, []
    for key, value in state.items():
        if key == "quantize.codebook_used":
            dropped.append(key)
            continue
        new = key
        m = _LLAMAGEN_DECODER.match(key)
        if m:
            new = f"decoder.up.{levels - 1 - int(m.group(1))}.{_DECODER_PART[m.group(2)]}.{m.group(3)}"
        else:
            for pattern, replacement in _LLAMAGEN_ENCODER:
                new = pattern.sub(replacement, new)
        out[new] = value
        origin[new] = key
    out = fuse_qkv(out, origin)
    converted = Converted("llamagen", out, {}, origin, dropped)
    converted.config = infer_vq_config(out, where, l2_norm=True)
    return converted


def from_taming(state: Dict[str, torch.Tensor], where: str = "checkpoint") -> Converted:
    """taming's VQModel state dict -> genvis's layout: q, k, v fused, loss.* dropped; the config is inferred."""
    if "quantize.embed.weight" in state or "quantize.proj.weight" in state:
        raise GenvisError(f"{where}: quantize.embed / quantize.proj: a taming GumbelQuantize model; genvis imports "
                          "the nearest-code VQModel (quantize.embedding.weight)")
    out, origin, dropped = {}, {}, []
    for key, value in state.items():
        if key.startswith("loss."):
            dropped.append(key)
            continue
        out[key] = value
        origin[key] = key
    out = fuse_qkv(out, origin)
    converted = Converted("taming", out, {}, origin, dropped)
    converted.config = infer_vq_config(out, where, l2_norm=False)
    return converted


def convert_vq(checkpoint, layout: str = "auto", where: str = "checkpoint") -> Converted:
    """A LlamaGen or taming VQ checkpoint (any wrapper) -> Converted for VQTokenizer."""
    state = unwrap_checkpoint(checkpoint, where)
    found = detect_layout(state)
    if found == "var":
        raise GenvisError(f"{where}: a VAR multi-scale VQ-VAE (quantize.quant_resi / quantize.ema_vocab_hit_SV); "
                          "import it with `genvis import var-vae`")
    if layout == "auto":
        if found is None:
            raise GenvisError(f"{where}: not a LlamaGen or taming VQ layout (no encoder.conv_blocks.* or "
                              f"encoder.down.* keys; first keys: {_first(state)})")
        layout = found
    elif layout not in VQ_LAYOUTS:
        raise GenvisError(f"--layout {layout}: expected auto, {' or '.join(VQ_LAYOUTS)}")
    elif found != layout:
        marker = "encoder.conv_blocks.*" if layout == "llamagen" else "encoder.down.*"
        seen = f"; it looks like {found}" if found else f"; first keys: {_first(state)}"
        raise GenvisError(f"{where}: --layout {layout} expects {marker} keys, which it has none of{seen}")
    return (from_llamagen if layout == "llamagen" else from_taming)(state, where)


_PHI_NON_SHARED = re.compile(r"^quantize\.quant_resi\.(\d+)\.(.*)$")


def convert_var_vae(checkpoint, scales: Optional[Sequence[int]] = None, where: str = "checkpoint") -> Converted:
    """VAR's VQVAE state dict -> Converted for MultiScaleVQTokenizer. Scales: `scales`, else VAR's default
    (1, 2, 3, 4, 5, 6, 8, 10, 13, 16) when quantize.ema_vocab_hit_SV has 10 rows; otherwise an error. When
    `scales` has another count than that buffer's rows, the buffer (usage statistics) is left at its
    initial value, as VAR's own VQVAE.load_state_dict does."""
    from genvis.tokenizers.multiscale_vq import VAR_SCALES

    state = unwrap_checkpoint(checkpoint, where)
    if detect_layout(state) != "var":
        raise GenvisError(f"{where}: not a VAR VQ-VAE layout (no quantize.ema_vocab_hit_SV or quantize.quant_resi.* "
                          f"keys; first keys: {_first(state)})")
    out, origin, dropped = {}, {}, []
    for key, value in state.items():
        new = key
        if key.startswith("quantize.quant_resi.qresi."):  # share_quant_resi=1: one phi for all scales
            new = "quantize.quant_resi.qresi_ls.0." + key[len("quantize.quant_resi.qresi."):]
        elif (m := _PHI_NON_SHARED.match(key)):  # share_quant_resi=0: one phi per scale
            new = f"quantize.quant_resi.qresi_ls.{m.group(1)}.{m.group(2)}"
        out[new] = value
        origin[new] = key
    hits = out.get("quantize.ema_vocab_hit_SV")
    keep_initial = list(OWN_BUFFERS)
    if scales is None:
        if hits is None or hits.dim() != 2 or hits.shape[0] != len(VAR_SCALES):
            rows = "no quantize.ema_vocab_hit_SV" if hits is None else \
                f"quantize.ema_vocab_hit_SV has {hits.shape[0] if hits.dim() else 0} scales, not VAR's default {len(VAR_SCALES)}"
            raise GenvisError(f"{where}: {rows}: give the token map sides with --scales (e.g. "
                              f"{','.join(map(str, VAR_SCALES))})")
        scales = VAR_SCALES
    scales = [int(p) for p in scales]
    if len(scales) < 2 or any(p < 1 for p in scales) or any(a >= b for a, b in zip(scales, scales[1:])):
        raise GenvisError(f"--scales {','.join(map(str, scales))}: expected at least two increasing positive sides")
    if hits is not None and (hits.dim() != 2 or hits.shape[0] != len(scales)):
        del out["quantize.ema_vocab_hit_SV"]
        dropped.append("quantize.ema_vocab_hit_SV")
        keep_initial.append("quantize.ema_vocab_hit_SV")
    phis = sorted({int(m.group(1)) for k in out if (m := re.match(r"^quantize\.quant_resi\.qresi_ls\.(\d+)\.", k))})
    if not phis:
        raise GenvisError(f"{where}: no quantize.quant_resi.* phi convs (VAR's quant_resi 0.5 has them)")
    if phis != list(range(len(phis))):
        raise GenvisError(f"{where}: phi convs quantize.quant_resi.qresi_ls.{{{','.join(map(str, phis))}}}: "
                          f"expected 0..{len(phis) - 1}")
    config = infer_conv_config(out, where)
    size, dim = _shape(out, "quantize.embedding.weight", where, dims=2)
    if dim != config["z_channels"]:
        raise GenvisError(f"{where}: quantize.embedding.weight is [{size}, {dim}] but encoder.conv_out makes "
                          f"{config['z_channels']} channels; VAR's codes have z_channels dims")
    config.update(codebook_size=size, scales=tuple(scales), phi_ratio=0.5, phi_count=len(phis), l2_norm=False)
    return Converted("var", out, config, origin, dropped, tuple(keep_initial))


# ----------------------------------------------------------------------------- config inference

def _first(state: Dict[str, torch.Tensor], n: int = 3) -> str:
    keys = list(state)
    return ", ".join(keys[:n]) + (" ..." if len(keys) > n else "")


def _shape(state: Dict[str, torch.Tensor], key: str, where: str, dims: Optional[int] = None) -> tuple:
    if key not in state:
        raise GenvisError(f"{where}: missing key {key}")
    shape = tuple(state[key].shape)
    if dims is not None and len(shape) != dims:
        raise GenvisError(f"{where}: {key} has shape {list(shape)}, expected {dims} dimensions")
    return shape


def _indices(state: Iterable[str], pattern: str) -> List[int]:
    regex = re.compile(pattern)
    return sorted({int(m.group(1)) for k in state if (m := regex.match(k))})


def _attention(state: Dict[str, torch.Tensor], levels: int, where: str) -> tuple:
    """(level_attention, mid_attention), refusing a placement genvis's conv stack cannot hold: attention at
    a level other than the coarsest, or in the encoder and not the decoder (or the other way)."""
    per_side = {}
    for side, part in (("encoder", "down"), ("decoder", "up")):
        with_attn = _indices(state, rf"^{side}\.{part}\.(\d+)\.attn\.")
        wrong = [l for l in with_attn if l != levels - 1]
        if wrong:
            raise GenvisError(f"{where}: attention at level {wrong[0]} ({side}.{part}.{wrong[0]}.attn.*, "
                              f"{2 ** wrong[0]}x downsampled); genvis supports attention only at the coarsest level "
                              f"({levels - 1}) and in the middle")
        per_side[side] = (bool(with_attn), any(k.startswith(f"{side}.mid.attn_1.") for k in state))
    for i, what in enumerate(("coarsest-level", "middle")):
        if per_side["encoder"][i] != per_side["decoder"][i]:
            has, lacks = ("encoder", "decoder") if per_side["encoder"][i] else ("decoder", "encoder")
            raise GenvisError(f"{where}: the {has} has {what} attention and the {lacks} has none; genvis builds both alike")
    return per_side["encoder"]


def infer_conv_config(state: Dict[str, torch.Tensor], where: str = "checkpoint", norm_groups: int = 32) -> dict:
    """The conv encoder / decoder arguments (genvis.tokenizers.conv) read off a genvis-layout state dict."""
    ch, in_channels = _shape(state, "encoder.conv_in.weight", where, dims=4)[:2]
    levels = _indices(state, r"^encoder\.down\.(\d+)\.")
    if not levels or levels != list(range(len(levels))):
        raise GenvisError(f"{where}: encoder levels {levels}: expected encoder.down.0 .. encoder.down.N")
    ch_mult = []
    for level in levels:
        width = _shape(state, f"encoder.down.{level}.block.0.conv1.weight", where, dims=4)[0]
        if width % ch:
            raise GenvisError(f"{where}: encoder.down.{level}.block.0.conv1 has {width} channels, not a multiple of "
                              f"the base width {ch} (encoder.conv_in)")
        ch_mult.append(width // ch)
    num_res_blocks = len(_indices(state, r"^encoder\.down\.0\.block\.(\d+)\."))
    z_channels = _shape(state, "encoder.conv_out.weight", where, dims=4)[0]
    out_channels = _shape(state, "decoder.conv_out.weight", where, dims=4)[0]
    if out_channels != in_channels:
        raise GenvisError(f"{where}: the encoder takes {in_channels} image channels and the decoder makes "
                          f"{out_channels}; genvis's tokenizers use one image channel count")
    odd = [w for w in [ch, *(ch * m for m in ch_mult)] if w % norm_groups]
    if odd:
        raise GenvisError(f"{where}: width {odd[0]} is not a multiple of the {norm_groups} GroupNorm groups of the "
                          "official models")
    level_attention, mid_attention = _attention(state, len(levels), where)
    kernel = _shape(state, "quant_conv.weight", where, dims=4)[-1]
    return dict(in_channels=in_channels, ch=ch, ch_mult=tuple(ch_mult), num_res_blocks=num_res_blocks,
                z_channels=z_channels, norm_groups=norm_groups, level_attention=level_attention,
                mid_attention=mid_attention, quant_conv_kernel=kernel)


def infer_vq_config(state: Dict[str, torch.Tensor], where: str = "checkpoint", l2_norm: bool = False) -> dict:
    """VQTokenizer's constructor arguments for a genvis-layout state dict (l2_norm is not in the weights)."""
    config = infer_conv_config(state, where)
    size, dim = _shape(state, "quantize.embedding.weight", where, dims=2)
    config.update(codebook_size=size, codebook_dim=dim, l2_norm=l2_norm)
    return config


def check_expected(converted: Converted, where: str = "checkpoint", **expected: Optional[int]) -> None:
    """One line when a value the user stated (codebook_size, codebook_dim, in_channels; None = not stated)
    disagrees with the checkpoint's."""
    options = {"codebook_size": "--codebook-size", "codebook_dim": "--codebook-dim", "in_channels": "--image-channels"}
    for key, value in expected.items():
        if value is None or value == converted.config.get(key):
            continue
        if key == "in_channels":
            source = f"encoder.conv_in.weight is {list(converted.state['encoder.conv_in.weight'].shape)} " \
                     f"({converted.config[key]} image channels)"
        else:
            what = "codes" if key == "codebook_size" else "dims per code"
            source = f"quantize.embedding.weight is {list(converted.state['quantize.embedding.weight'].shape)} " \
                     f"({converted.config[key]} {what})"
        raise GenvisError(f"{where}: {options[key]} {value} disagrees with the checkpoint: {source}")


# ----------------------------------------------------------------------------- strict loading

def _listing(keys: List[str], n: int = 5) -> str:
    return ", ".join(keys[:n]) + (f" ... ({len(keys)} in all)" if len(keys) > n else "")


def check_state(model_state: Dict[str, torch.Tensor], converted: Converted, where: str = "checkpoint") -> None:
    """One line unless `converted.state` covers every tensor of `model_state` (a model's state_dict, which
    may live on the meta device) but its keep_initial ones, with no key left over and every shape equal."""
    state = converted.state
    missing = [k for k in model_state if k not in state and k not in converted.keep_initial]
    unexpected = [converted.origin.get(k, k) for k in state if k not in model_state]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {_listing(missing)} (genvis names)")
        if unexpected:
            parts.append(f"unexpected {_listing(unexpected)}")
        raise GenvisError(f"{where}: keys do not match the {converted.layout} layout inferred from its shapes: "
                          f"{'; '.join(parts)}")
    for key, value in state.items():
        if tuple(value.shape) != tuple(model_state[key].shape):
            source = converted.origin.get(key, key)
            named = key if source == key else f"{source} (genvis {key})"
            raise GenvisError(f"{where}: {named} has shape {list(value.shape)}, the model inferred from the other "
                              f"shapes needs {list(model_state[key].shape)}")


def load_strict(model: torch.nn.Module, converted: Converted, where: str = "checkpoint") -> None:
    """check_state, then copy the tensors into `model` (float32 as the model's)."""
    check_state(model.state_dict(), converted, where)
    model.load_state_dict(converted.state, strict=False)
