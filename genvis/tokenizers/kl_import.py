"""LDM-layout KL autoencoder checkpoints -> a diffusers AutoencoderKL (genvis's KL tokenizer), the config read off
the shapes.

The layout is CompVis latent-diffusion's AutoencoderKL (taming's Encoder / Decoder with a diagonal Gaussian), which
VA-VAE (hustvl/LightningDiT vavae/, tokenizer/autoencoder.py), MAR's kl16 and the original kl-f8 / kl-f16 use:

    encoder.down.{l}.block.{b}.{norm1,conv1,norm2,conv2,nin_shortcut}   -> encoder.down_blocks.{l}.resnets.{b}.{..., conv_shortcut}
    encoder.down.{l}.attn.{b}.{norm,q,k,v,proj_out} (1x1 convs)        -> encoder.down_blocks.{l}.attentions.{b}.{group_norm,
                                                                           to_q,to_k,to_v,to_out.0} (linear weights)
    encoder.down.{l}.downsample.conv                                    -> encoder.down_blocks.{l}.downsamplers.0.conv
    {encoder,decoder}.mid.block_1 / attn_1 / block_2                    -> mid_block.resnets.0 / attentions.0 / resnets.1
    {encoder,decoder}.norm_out                                          -> conv_norm_out
    decoder.up.{l}.* (level l, listed finest first)                     -> decoder.up_blocks.{levels - 1 - l}.*, upsample ->
                                                                           upsamplers.0
    quant_conv, post_quant_conv, conv_in, conv_out                      -> unchanged

A level with attention blocks becomes diffusers' AttnDownEncoderBlock2D / AttnUpDecoderBlock2D (one head over all
channels, as LDM's AttnBlock: VA-VAE attends at the 16x16 level). A Lightning training checkpoint's "state_dict"
is taken; the training-only parts are dropped: loss.* (LPIPS, discriminator), foundation_model.* and linear_proj.*
(VA-VAE's frozen DINOv2 and its alignment projection), model_ema.* (LitEma). A whole latent-diffusion checkpoint's
first_stage_model.* is the autoencoder (the rest is dropped). Any other key, or a missing one, stops the import.
"""
from __future__ import annotations

import re
from typing import Dict, Optional, Tuple

import torch

from genvis.errors import GenvisError
from genvis.tokenizers.kl import down_block_types, up_block_types
from genvis.tokenizers.vq_import import _indices, _shape

TRAINING_ONLY = ("loss.", "foundation_model.", "linear_proj.", "model_ema.")  # dropped from a training checkpoint
WHOLE_LDM = "first_stage_model."  # a latent-diffusion checkpoint's autoencoder

_RESNET = {"nin_shortcut": "conv_shortcut"}
_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_MID = {"block_1": "resnets.0", "attn_1": "attentions.0", "block_2": "resnets.1"}


def select_autoencoder(state: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], list]:
    """(the autoencoder's tensors, the keys dropped): a whole latent-diffusion checkpoint's first_stage_model.*,
    without the training-only parts (TRAINING_ONLY)."""
    if any(k.startswith(WHOLE_LDM) for k in state):
        dropped = [k for k in state if not k.startswith(WHOLE_LDM)]
        state = {k[len(WHOLE_LDM):]: v for k, v in state.items() if k.startswith(WHOLE_LDM)}
    else:
        dropped = []
    dropped += [k for k in state if k.startswith(TRAINING_ONLY)]
    return {k: v for k, v in state.items() if not k.startswith(TRAINING_ONLY)}, dropped


def infer_ldm_vae_config(state: Dict[str, torch.Tensor], where: str = "checkpoint") -> dict:
    """diffusers AutoencoderKL arguments for an LDM-layout state dict: widths, levels, resnets per level, latent
    channels, image channels and where the attention blocks are, all from the keys and shapes."""
    ch, in_channels = _shape(state, "encoder.conv_in.weight", where)[:2]
    levels = _indices(state, r"^encoder\.down\.(\d+)\.")
    if not levels or levels != list(range(len(levels))):
        raise GenvisError(f"{where}: encoder levels {levels}: expected encoder.down.0 .. encoder.down.N "
                          "(an LDM-layout KL autoencoder)")
    decoder_levels = _indices(state, r"^decoder\.up\.(\d+)\.")
    if decoder_levels != levels:
        raise GenvisError(f"{where}: the decoder has levels {decoder_levels} (decoder.up.*), the encoder {levels}; "
                          "expected the same")
    widths = [_shape(state, f"encoder.down.{l}.block.0.conv1.weight", where)[0] for l in levels]
    per_level = len(_indices(state, r"^encoder\.down\.0\.block\.(\d+)\."))
    decoder_per_level = len(_indices(state, r"^decoder\.up\.0\.block\.(\d+)\."))
    if decoder_per_level != per_level + 1:
        raise GenvisError(f"{where}: decoder.up.0 has {decoder_per_level} resnet blocks and encoder.down.0 {per_level}; "
                          "the LDM decoder has one more per level")
    moments = _shape(state, "quant_conv.weight", where)[0]
    latent = _shape(state, "post_quant_conv.weight", where)[1]
    z_channels = _shape(state, "encoder.conv_out.weight", where)[0]
    if moments != 2 * latent or z_channels != moments:
        raise GenvisError(f"{where}: encoder.conv_out makes {z_channels} channels, quant_conv {moments} and "
                          f"post_quant_conv takes {latent}; diffusers' AutoencoderKL needs z_channels = embed_dim "
                          f"(2 x {latent} moments throughout)")
    out_channels = _shape(state, "decoder.conv_out.weight", where)[0]
    encoder_attention = _indices(state, r"^encoder\.down\.(\d+)\.attn\.")
    decoder_attention = _indices(state, r"^decoder\.up\.(\d+)\.attn\.")
    mid = {side: any(k.startswith(f"{side}.mid.attn_1.") for k in state) for side in ("encoder", "decoder")}
    if mid["encoder"] != mid["decoder"]:
        has, lacks = ("encoder", "decoder") if mid["encoder"] else ("decoder", "encoder")
        raise GenvisError(f"{where}: the {has} has middle attention ({has}.mid.attn_1) and the {lacks} none; "
                          "diffusers' AutoencoderKL builds both alike")
    return dict(in_channels=in_channels, out_channels=out_channels,
                down_block_types=down_block_types(len(levels), encoder_attention),
                up_block_types=up_block_types(len(levels), decoder_attention), block_out_channels=tuple(widths), layers_per_block=per_level,
                latent_channels=latent, norm_num_groups=32, mid_block_add_attention=mid["encoder"])


def _rename(key: str, levels: int) -> str:
    """One LDM key's diffusers name (a key outside the layout comes back unchanged, for the strict loading to name)."""
    m = re.match(r"^(encoder|decoder)\.(down|up)\.(\d+)\.(block|attn|downsample|upsample)\.(.*)$", key)
    if m:
        side, part, level, kind, rest = m.groups()
        index = int(level) if part == "down" else levels - 1 - int(level)
        base = f"{side}.{part}_blocks.{index}"
        if kind in ("downsample", "upsample"):
            return f"{base}.{kind}rs.0.{rest}"
        if rest.count(".") < 2:
            return key
        number, name, param = rest.split(".", 2)
        table = _RESNET if kind == "block" else _ATTENTION
        return f"{base}.{'resnets' if kind == 'block' else 'attentions'}.{number}.{table.get(name, name)}.{param}"
    m = re.match(r"^(encoder|decoder)\.mid\.(block_1|attn_1|block_2)\.([^.]+)\.(.*)$", key)
    if m:
        side, block, name, param = m.groups()
        table = _ATTENTION if block == "attn_1" else _RESNET
        return f"{side}.mid_block.{_MID[block]}.{table.get(name, name)}.{param}"
    return re.sub(r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out.", key)


def convert_ldm_vae(state: Dict[str, torch.Tensor], where: str = "checkpoint") -> Tuple[dict, Dict[str, torch.Tensor], list]:
    """(diffusers AutoencoderKL config, its state dict, the source keys dropped) from an LDM-layout KL autoencoder's
    state dict (already unwrapped from its training checkpoint)."""
    state, dropped = select_autoencoder(state)
    config = infer_ldm_vae_config(state, where)
    levels = len(config["block_out_channels"])
    out = {}
    for key, value in state.items():
        new = _rename(key, levels)
        if ".attentions." in new and new.endswith(".weight") and value.dim() == 4:
            value = value[:, :, 0, 0]  # LDM's 1x1 conv q / k / v / proj_out -> diffusers' linear
        out[new] = value
    return config, out, dropped


def read_latent_stats(path, channels: int, where: Optional[str] = None) -> Tuple[list, list]:
    """(mean, std) as lists of `channels` floats from LightningDiT's latents_stats.pt ({"mean", "std"} of shape
    [1, C, 1, 1]; .pt read with weights_only=True, or the same keys in a .safetensors file)."""
    from genvis.io import load_checkpoint_file

    where = where or str(path)
    stats = load_checkpoint_file(path)
    if not isinstance(stats, dict) or not {"mean", "std"} <= set(stats):
        found = ", ".join(map(str, stats)) if isinstance(stats, dict) else type(stats).__name__
        raise GenvisError(f"{where}: expected a dict with 'mean' and 'std' tensors (LightningDiT's latents_stats.pt), "
                          f"found {found}")
    values = []
    for name in ("mean", "std"):
        t = stats[name]
        if not isinstance(t, torch.Tensor) or t.numel() != channels:
            shape = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise GenvisError(f"{where}: '{name}' is {shape}; the autoencoder has {channels} latent channels "
                              f"(expected [1, {channels}, 1, 1])")
        values.append([float(x) for x in t.double().flatten()])
    if min(values[1]) <= 0:
        raise GenvisError(f"{where}: 'std' has a value <= 0 ({min(values[1])}); expected positive standard deviations")
    return values[0], values[1]
