"""Official TiTok checkpoints (bytedance/1d-tokenizer; Yu et al. 2024, arXiv:2406.07550) -> TiTokTokenizer.

Sources (read_titok_source):
    a Hugging Face folder, as TiTok.from_pretrained reads it: config.json holding the official OmegaConf config
        ({"model": {"vq_model": {...}}, "dataset": {"preprocessing": {"crop_size": 256}}, ...}) beside
        model.safetensors or pytorch_model.bin;
    a state dict file (tokenizer_titok_l32.bin, .pt, .pth: torch.load with weights_only=True; or .safetensors),
        with an optional official YAML / JSON config (configs/infer/TiTok/*.yaml).

genvis's TiTok keeps the official key names, so nothing is renamed; the architecture is read off the shapes:

    widths, image grid      {encoder,decoder}.positional_embedding [g*g + 1, W]
    depths                  {encoder,decoder}.transformer.{i}
    heads                   the official table by width (512 -> 8, 768 -> 12, 1024 -> 16), or the sizes a config
                            names (vit_enc_model_size / vit_dec_model_size); any other width needs them given
    tokens K                latent_tokens [K, W]
    patch, image size       encoder.patch_embed.weight [W, C, p, p]; image = g * p
    vq                      quantize.embedding.weight [codebook_size, token_size]
    vae                     no codebook; encoder.conv_out makes 2 x token_size channels (mean; logvar)
    decoder path            decoder.conv_out: "pixels", the single-stage ViT decoder (official is_legacy False:
                              the vq8k and vae models); its encoder reads ln_post the fixed way
                            decoder.ffn.2 + pixel_decoder.* + pixel_quantize.*: "proxy", the two-stage decoder
                              (is_legacy and finetune_decoder True: the released L-32 / B-64 / S-128), whose
                              encoder reads ln_post [B, K, W] as [B, W, K, 1] (legacy_latents)
                            decoder.ffn.2 alone: a stage-1 checkpoint, refused: it has no pixel decoder

The l2-normalised lookup (official use_l2_norm) is not in the weights. It is the config's use_l2_norm, else
l2_norm= (`--l2-norm` / `--no-l2-norm`), else the released models' value: True for 12-dim codes (L-32, B-64,
S-128), False otherwise (the vq8k models' 64-dim codes).

A config is checked against the weights: every key it states, and is_legacy / finetune_decoder / quantize_mode
at TiTok's defaults (True / True / "vq") when it does not state them, since the official model is built
with those; a disagreement is one line naming the key and both values.

The loading is strict (vq_import.load_strict): an unknown or missing key is named; genvis's own training
statistic quantize.usage keeps its initial value.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from genvis.errors import GenvisError, first_line
from genvis.io import load_checkpoint_file
from genvis.tokenizers.titok import PROXY, SIZES
from genvis.tokenizers.vq_import import OWN_BUFFERS, Converted, _first, _indices, _shape, load_strict, unwrap_checkpoint

HEADS_BY_WIDTH = {width: heads for width, _, heads in SIZES.values()}  # official head width 64
RELEASED_L2_DIM = 12  # the released L-32 / B-64 / S-128 (use_l2_norm True); the vq8k models use 64-dim codes without
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
OFFICIAL_DEFAULTS = {"is_legacy": True, "finetune_decoder": True, "quantize_mode": "vq"}  # TiTok's config.get(...)


# ----------------------------------------------------------------------------- reading the source

def read_official_config(path) -> dict:
    """An official TiTok config file (YAML or JSON) -> the dict holding "model" (a {"config": {...}} wrapper is
    opened); one line unless it has a model.vq_model section."""
    path = Path(path)
    if not path.is_file():
        raise GenvisError(f"{path}: config file not found")
    try:
        if path.suffix == ".json":
            data = json.loads(path.read_text())
        else:
            from omegaconf import OmegaConf

            data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as err:
        raise GenvisError(f"{path}: not a readable YAML / JSON config ({first_line(err)})") from None
    return official_section(data, str(path))


def official_section(data, where: str = "config") -> dict:
    """`data` (or its "config" entry) when it holds model.vq_model as a mapping, else one line."""
    if isinstance(data, dict) and "model" not in data and isinstance(data.get("config"), dict):
        data = data["config"]
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or not isinstance(model.get("vq_model"), dict):
        raise GenvisError(f"{where}: not an official TiTok config (no model.vq_model section)")
    return data


def read_titok_source(src, config=None) -> Tuple[Dict[str, torch.Tensor], Optional[dict], str]:
    """(checkpoint as read, official config or None, where) for a Hugging Face folder or a state dict file.
    `config` (a YAML / JSON file) replaces the folder's config.json."""
    src = Path(src)
    if src.is_dir():
        weights = next((src / name for name in HF_WEIGHTS if (src / name).is_file()), None)
        if weights is None:
            raise GenvisError(f"{src}: no {' or '.join(HF_WEIGHTS)} (a Hugging Face TiTok folder holds config.json "
                              "and one of them)")
        if config is None and (src / "config.json").is_file():
            config = src / "config.json"
        checkpoint = load_checkpoint_file(weights)
        where = str(weights)
    elif src.is_file():
        checkpoint, where = load_checkpoint_file(src), str(src)
    else:
        raise GenvisError(f"{src}: not found (expected a Hugging Face TiTok folder or a state dict file)")
    return checkpoint, (read_official_config(config) if config is not None else None), where


# ----------------------------------------------------------------------------- the architecture, off the shapes

def _grid(state, key: str, where: str) -> Tuple[int, int]:
    """(g, W) of a positional embedding [g*g + 1, W]."""
    length, width = _shape(state, key, where, dims=2)
    g = math.isqrt(max(length - 1, 0))
    if length < 2 or g * g != length - 1:
        raise GenvisError(f"{where}: {key} has {length} positions, expected a class position plus a square grid (g*g + 1)")
    return g, width


def _depth(state, side: str, where: str) -> int:
    blocks = _indices(state, rf"^{side}\.transformer\.(\d+)\.")
    if not blocks or blocks != list(range(len(blocks))):
        raise GenvisError(f"{where}: {side} blocks {blocks}: expected {side}.transformer.0 .. {side}.transformer.N")
    return len(blocks)


def _mlp_ratio(state, side: str, width: int, where: str) -> float:
    key = f"{side}.transformer.0.mlp.c_fc.weight"
    hidden = _shape(state, key, where, dims=2)[0]
    ratio = hidden / width
    if int(width * ratio) != hidden:
        raise GenvisError(f"{where}: {key} is {list(state[key].shape)}: {hidden} is not a whole multiple of {width} / N")
    return ratio


def _pixel_decoder(state, where: str) -> dict:
    """The MaskGIT-VQGAN decoder's sizes (ch, ch_mult, num_res_blocks, z_channels, out_channels) off its shapes."""
    levels = _indices(state, r"^pixel_decoder\.up\.(\d+)\.")
    if not levels or levels != list(range(len(levels))):
        raise GenvisError(f"{where}: pixel decoder levels {levels}: expected pixel_decoder.up.0 .. pixel_decoder.up.N")
    out_channels, ch = _shape(state, "pixel_decoder.conv_out.weight", where, dims=4)[:2]
    ch_mult = []
    for level in levels:
        width = _shape(state, f"pixel_decoder.up.{level}.block.0.conv1.weight", where, dims=4)[0]
        if width % ch:
            raise GenvisError(f"{where}: pixel_decoder.up.{level}.block.0.conv1 has {width} channels, not a multiple "
                              f"of the base width {ch} (pixel_decoder.conv_out)")
        ch_mult.append(width // ch)
    return dict(ch=ch, ch_mult=tuple(ch_mult), num_res_blocks=len(_indices(state, r"^pixel_decoder\.up\.0\.block\.(\d+)\.")),
                z_channels=_shape(state, "pixel_decoder.conv_in.weight", where, dims=4)[1], out_channels=out_channels)


def read_architecture(state: Dict[str, torch.Tensor], where: str = "checkpoint") -> dict:
    """What the weights say, in official terms: {"image_size", "in_channels", "patch_size", "num_latent_tokens",
    "encoder": (width, depth), "decoder": (width, depth), "decoder_patch_size", "mlp_ratio", "quantize_mode",
    "codebook_size" (vq), "token_size", "decoder_head" ("pixels" | "proxy"), "proxy_codebook" (P, Z)}.
    A stage-1 checkpoint is refused."""
    if "latent_tokens" not in state or "encoder.positional_embedding" not in state:
        raise GenvisError(f"{where}: not an official TiTok layout (no latent_tokens / encoder.positional_embedding; "
                          f"first keys: {_first(state)})")
    arch = {}
    grid, width = _grid(state, "encoder.positional_embedding", where)
    embed = _shape(state, "encoder.patch_embed.weight", where, dims=4)
    if embed[0] != width or embed[2] != embed[3]:
        raise GenvisError(f"{where}: encoder.patch_embed.weight is {list(embed)}, expected [{width}, C, p, p] "
                          f"(width {width} from encoder.positional_embedding)")
    arch.update(in_channels=embed[1], patch_size=embed[2], image_size=grid * embed[2])
    tokens, token_width = _shape(state, "latent_tokens", where, dims=2)
    if token_width != width:
        raise GenvisError(f"{where}: latent_tokens is [{tokens}, {token_width}], expected [K, {width}] (the encoder width)")
    arch["num_latent_tokens"] = tokens
    arch["encoder"] = (width, _depth(state, "encoder", where))
    dec_grid, dec_width = _grid(state, "decoder.positional_embedding", where)
    arch["decoder"] = (dec_width, _depth(state, "decoder", where))
    ratios = {side: _mlp_ratio(state, side, arch[side][0], where) for side in ("encoder", "decoder")}
    if ratios["encoder"] != ratios["decoder"]:
        raise GenvisError(f"{where}: MLP ratios {ratios['encoder']:g} (encoder) and {ratios['decoder']:g} (decoder) "
                          "differ; genvis's TiTok uses one mlp_ratio (official: 4)")
    arch["mlp_ratio"] = ratios["encoder"]

    # quantizer
    z_out = _shape(state, "encoder.conv_out.weight", where, dims=4)[0]
    dec_in = _shape(state, "decoder.decoder_embed.weight", where, dims=2)[1]
    if "quantize.embedding.weight" in state:
        size, dim = _shape(state, "quantize.embedding.weight", where, dims=2)
        arch.update(quantize_mode="vq", codebook_size=size, token_size=dim)
        if z_out != dim:
            raise GenvisError(f"{where}: encoder.conv_out makes {z_out} channels but quantize.embedding.weight is "
                              f"[{size}, {dim}]; the codes have the encoder's channels")
    elif z_out % 2 == 0 and z_out // 2 == dec_in:
        arch.update(quantize_mode="vae", token_size=z_out // 2)
    else:
        raise GenvisError(f"{where}: no quantize.embedding.weight (a vq TiTok's codebook) and encoder.conv_out makes "
                          f"{z_out} channels, not 2 x the decoder's {dec_in} input channels (a vae TiTok's mean; logvar)")
    if dec_in != arch["token_size"]:
        raise GenvisError(f"{where}: decoder.decoder_embed takes {dec_in} channels, the tokens have {arch['token_size']}")

    # decoder path
    legacy, pixels = "decoder.ffn.2.weight" in state, "decoder.conv_out.weight" in state
    if legacy == pixels:
        raise GenvisError(f"{where}: {'both' if legacy else 'neither'} decoder.ffn.2 (two-stage proxy codes) "
                          f"{'and' if legacy else 'nor'} decoder.conv_out (single-stage pixels): not a TiTok decoder")
    if pixels:
        c = arch["in_channels"]
        rows = _shape(state, "decoder.ffn.0.weight", where, dims=4)[0]
        patch = math.isqrt(rows // c)
        if patch * patch * c != rows or dec_grid * patch != arch["image_size"]:
            raise GenvisError(f"{where}: decoder.ffn.0 makes {rows} values per cell of the decoder's {dec_grid}x{dec_grid} "
                              f"grid, expected p*p*{c} with {dec_grid}*p = {arch['image_size']} (the encoder's image size)")
        arch.update(decoder_head="pixels", decoder_patch_size=patch)
        return arch
    has_pixel_decoder = any(k.startswith(("pixel_decoder.", "pixel_quantize.")) for k in state)
    if not has_pixel_decoder:
        raise GenvisError(f"{where}: a stage-1 TiTok checkpoint (decoder.ffn.2 outputs proxy-code logits) has no pixel "
                          "decoder (pixel_decoder.*, pixel_quantize.*); import a stage-2 (finetune_decoder) or "
                          "single-stage checkpoint")
    if arch["quantize_mode"] != "vq":
        raise GenvisError(f"{where}: a vae TiTok with the two-stage pixel decoder; official TiTok builds that decoder "
                          "only for vq")
    size, dim = _shape(state, "pixel_quantize.embedding.weight", where, dims=2)
    logits = _shape(state, "decoder.ffn.2.weight", where, dims=4)[0]
    if logits != size:
        raise GenvisError(f"{where}: decoder.ffn.2 makes {logits} proxy-code logits but pixel_quantize.embedding.weight "
                          f"is [{size}, {dim}]")
    proxy = _pixel_decoder(state, where)
    official = {k: PROXY[k] for k in ("ch", "ch_mult", "num_res_blocks")}
    if {k: proxy[k] for k in official} != official:
        raise GenvisError(f"{where}: the pixel decoder has base width {proxy['ch']}, ch_mult {proxy['ch_mult']}, "
                          f"{proxy['num_res_blocks']} res blocks per level; genvis's TiTok builds MaskGIT-VQGAN's "
                          f"({official['ch']}, {official['ch_mult']}, {official['num_res_blocks']})")
    if proxy["z_channels"] != dim or proxy["out_channels"] != arch["in_channels"]:
        raise GenvisError(f"{where}: pixel_decoder.conv_in takes {proxy['z_channels']} channels and conv_out makes "
                          f"{proxy['out_channels']}; expected {dim} (pixel_quantize) and {arch['in_channels']} (the images)")
    upsampling = 2 ** (len(proxy["ch_mult"]) - 1)
    if dec_grid * upsampling != arch["image_size"]:
        raise GenvisError(f"{where}: the decoder's {dec_grid}x{dec_grid} grid upsampled {upsampling}x by the pixel decoder "
                          f"makes {dec_grid * upsampling}-pixel images, the encoder takes {arch['image_size']}")
    arch.update(decoder_head="proxy", decoder_patch_size=upsampling, proxy_codebook=(size, dim))
    return arch


# ----------------------------------------------------------------------------- the official config against the weights

def _check_config(arch: dict, config: dict, where: str) -> None:
    vq = config["model"]["vq_model"]
    crop = ((config.get("dataset") or {}).get("preprocessing") or {}).get("crop_size")
    mode, proxy = arch["quantize_mode"], arch["decoder_head"] == "proxy"
    found = {  # the decoder path first: it decides what the other keys mean
        "quantize_mode": (mode, "quantize.embedding.weight" if mode == "vq" else "no quantize.embedding.weight"),
        "is_legacy": (proxy, "decoder.ffn.2: proxy-code logits" if proxy else "decoder.conv_out: pixels"),
        "finetune_decoder": (proxy, "pixel_decoder.*" if proxy else "no pixel_decoder.*"),
        "num_latent_tokens": (arch["num_latent_tokens"], f"latent_tokens has {arch['num_latent_tokens']} rows"),
        "vit_enc_patch_size": (arch["patch_size"], "encoder.patch_embed.weight"),
        "vit_dec_patch_size": (arch["decoder_patch_size"], "decoder.ffn.0.weight" if not proxy else
                               "the decoder grid upsampled by the pixel decoder"),
        "token_size": (arch["token_size"], "quantize.embedding.weight" if mode == "vq" else
                       "encoder.conv_out makes 2 x token_size channels"),
    }
    if mode == "vq":
        found["codebook_size"] = (arch["codebook_size"], "quantize.embedding.weight")
    for key, (value, evidence) in found.items():
        stated = key in vq
        said = vq[key] if stated else OFFICIAL_DEFAULTS.get(key)
        if said is None or said == value:
            continue
        unset = "" if stated else " (unset: TiTok's default)"
        raise GenvisError(f"{where}: config model.vq_model.{key} is {said!r}{unset} but the weights have {value!r} ({evidence})")
    for key, side in (("vit_enc_model_size", "encoder"), ("vit_dec_model_size", "decoder")):
        if key not in vq:
            continue
        if vq[key] not in SIZES:
            raise GenvisError(f"{where}: config model.vq_model.{key} is {vq[key]!r}, not an official size ({', '.join(SIZES)})")
        width, depth, _ = SIZES[vq[key]]
        if (width, depth) != arch[side]:
            raise GenvisError(f"{where}: config model.vq_model.{key} is {vq[key]!r} (width {width}, {depth} blocks) but the "
                              f"weights have width {arch[side][0]}, {arch[side][1]} blocks ({side}.positional_embedding, "
                              f"{side}.transformer.*)")
    if crop is not None and crop != arch["image_size"]:
        raise GenvisError(f"{where}: config dataset.preprocessing.crop_size is {crop!r} but the weights have "
                          f"{arch['image_size']} (encoder.positional_embedding's grid x the patch size)")


def _heads(arch: dict, config: Optional[dict], side: str, given: Optional[int], where: str) -> int:
    width = arch[side][0]
    named = ((config or {}).get("model", {}).get("vq_model", {})).get(f"vit_{side[:3]}_model_size")
    official = SIZES[named][2] if named is not None else HEADS_BY_WIDTH.get(width)
    if given is not None:
        if named is not None and given != official:
            raise GenvisError(f"{where}: {side} heads {given} disagree with config model.vq_model.vit_{side[:3]}_model_size "
                              f"{named!r} ({official} heads)")
        if given < 1 or width % given:
            raise GenvisError(f"{where}: {side} heads {given} do not divide the {side} width {width}")
        return given
    if official is None:
        widths = ", ".join(map(str, HEADS_BY_WIDTH))
        raise GenvisError(f"{where}: {side} width {width} is not an official TiTok size ({widths}); give its attention "
                          f"heads (--{side}-heads)")
    return official


# ----------------------------------------------------------------------------- conversion

def convert_titok(state, official_config: Optional[dict] = None, where: str = "checkpoint", *,
                  l2_norm: Optional[bool] = None, encoder_heads: Optional[int] = None,
                  decoder_heads: Optional[int] = None) -> Tuple[dict, Dict[str, torch.Tensor]]:
    """An official TiTok state dict (or a training checkpoint holding one) and its official config (None: not
    known) -> (TiTokTokenizer constructor arguments, the state dict to load). l2_norm: the lookup when the config
    does not say (None: the released models' rule, see the module docstring); encoder_heads / decoder_heads:
    for widths outside the official table."""
    state = unwrap_checkpoint(state, where)
    arch = read_architecture(state, where)
    if official_config is not None:
        official_config = official_section(official_config, where)
        _check_config(arch, official_config, where)
    vq = (official_config or {}).get("model", {}).get("vq_model", {})
    kwargs = dict(image_size=arch["image_size"], in_channels=arch["in_channels"], patch_size=arch["patch_size"],
                  num_latent_tokens=arch["num_latent_tokens"],
                  encoder_width=arch["encoder"][0], encoder_depth=arch["encoder"][1],
                  encoder_heads=_heads(arch, official_config, "encoder", encoder_heads, where),
                  decoder_width=arch["decoder"][0], decoder_depth=arch["decoder"][1],
                  decoder_heads=_heads(arch, official_config, "decoder", decoder_heads, where),
                  decoder_patch_size=arch["decoder_patch_size"], mlp_ratio=arch["mlp_ratio"],
                  quantize_mode=arch["quantize_mode"], token_size=arch["token_size"],
                  decoder_head=arch["decoder_head"], legacy_latents=arch["decoder_head"] == "proxy")
    if arch["quantize_mode"] == "vq":
        stated = vq.get("use_l2_norm")
        if stated is not None and l2_norm is not None and bool(stated) != l2_norm:
            raise GenvisError(f"{where}: {'--l2-norm' if l2_norm else '--no-l2-norm'} disagrees with config "
                              f"model.vq_model.use_l2_norm {stated!r}")
        if stated is None:
            stated = l2_norm if l2_norm is not None else arch["token_size"] == RELEASED_L2_DIM
        kwargs.update(codebook_size=arch["codebook_size"], l2_norm=bool(stated))
        if vq.get("commitment_cost") is not None:
            kwargs["beta"] = float(vq["commitment_cost"])
    if arch["decoder_head"] == "proxy":
        kwargs.update(proxy_codebook_size=arch["proxy_codebook"][0], proxy_codebook_dim=arch["proxy_codebook"][1])
    return kwargs, state


def load_titok(model: torch.nn.Module, state: Dict[str, torch.Tensor], where: str = "checkpoint") -> None:
    """Strict loading of a converted state into a TiTokTokenizer (vq_import.load_strict): every key named when
    unknown or missing, except genvis's quantize.usage, which keeps its initial value."""
    load_strict(model, Converted("titok", state, {}, keep_initial=OWN_BUFFERS), where)


def describe(kwargs: dict) -> str:
    """The import's summary: K tokens, the codebook (or continuous channels), the decoder path."""
    k = kwargs["num_latent_tokens"]
    if kwargs["quantize_mode"] == "vq":
        tokens = (f"{k} tokens, codebook {kwargs['codebook_size']} x {kwargs['token_size']}"
                  f"{' l2-normalised' if kwargs['l2_norm'] else ''}")
    else:
        tokens = f"{k} continuous tokens of {kwargs['token_size']} channels (vae)"
    if kwargs["decoder_head"] == "proxy":
        decoder = (f"two-stage decoder: ViT -> {kwargs['proxy_codebook_size']} proxy codes -> MaskGIT-VQGAN pixel decoder, "
                   "legacy latents")
    else:
        decoder = "single-stage ViT decoder -> pixels"
    return f"{tokens}, {decoder}"
