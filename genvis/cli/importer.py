"""genvis import dit CKPT OUT_DIR --arch DiT-XL/2
genvis import sit CKPT OUT_DIR --arch SiT-XL/2
genvis import lightningdit CKPT OUT_DIR [--tokenizer DIR] [--heads N]
genvis import vae CKPT OUT_DIR [--stats latents_stats.pt] [--scaling-factor F]
genvis import vq CKPT OUT_DIR [--layout auto|llamagen|taming] [--codebook-size K] [--codebook-dim D] [--image-channels C]
genvis import var-vae CKPT OUT_DIR [--scales 1,2,3,4,5,6,8,10,13,16]
genvis import var CKPT OUT_DIR [--tokenizer DIR] [--scales LIST]
genvis import titok SRC OUT_DIR [--config FILE] [--l2-norm | --no-l2-norm] [--encoder-heads N] [--decoder-heads N]
genvis import maskgit CKPT OUT_DIR [--tokenizer DIR] [--heads N]"""
from __future__ import annotations

import argparse
from pathlib import Path

from genvis.cli.options import int_list
from genvis.errors import GenvisError
from genvis.io import atomic_dir, load_checkpoint_file, load_state_strict, unwrap_state_dict


def _generator_arguments(p, tokenizer_help: str) -> None:
    """CKPT, OUT_DIR, --tokenizer and --embed-tokenizer of a generator import."""
    p.add_argument("checkpoint", metavar="CKPT", help="the official file (.pt, .pth, .bin or .safetensors)")
    p.add_argument("out", metavar="OUT_DIR", help="the genvis model folder to write")
    p.add_argument("--tokenizer", default=None, metavar="DIR",
                   help=f"{tokenizer_help}, recorded in the model folder so that `genvis sample OUT_DIR` needs no flag "
                   "(default: none recorded)")
    p.add_argument("--embed-tokenizer", action="store_true",
                   help="copy the tokenizer into OUT_DIR/tokenizer/ instead of recording its path")


def _tokenizer_arguments(p, formats: str) -> None:
    """CKPT and OUT_DIR of a tokenizer import."""
    p.add_argument("checkpoint", metavar="CKPT", help=f"the official file ({formats})")
    p.add_argument("out", metavar="OUT_DIR", help="the genvis tokenizer folder to write")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("import", help="convert an official checkpoint into a genvis model folder")
    sub = p.add_subparsers(dest="family", required=True, metavar="FAMILY")
    d = sub.add_parser(
        "dit",
        help="official DiT / SiT-layout checkpoint (.pt state dict or training checkpoint, or .safetensors)",
        description="Loads with torch.load(weights_only=True): a file that needs pickle is refused.",
    )
    _generator_arguments(d, "the tokenizer whose latents the model generates: for official DiT a local diffusers "
                         "AutoencoderKL folder (sd-vae-ft-ema or sd-vae-ft-mse; its config holds the 0.18215 scaling factor)")
    d.add_argument("--arch", required=True, help="e.g. DiT-XL/2, DiT-S/2")
    d.set_defaults(func=run_dit, time="dit")

    si = sub.add_parser(
        "sit",
        help="official SiT checkpoint (willisma/SiT: SiT-XL-2-256x256.pt): DiT's keys, SiT's flow convention",
        description="The network counts time as SiT does (t = 1 data) and predicts velocity: the model folder says so "
        "(schedule 'sit', prediction 'velocity'), and every genvis sampler converts. Loads with "
        "torch.load(weights_only=True): a file that needs pickle is refused.",
    )
    _generator_arguments(si, "the tokenizer whose latents the model generates (SiT: a local sd-vae-ft-ema folder)")
    si.add_argument("--arch", required=True, help="e.g. SiT-XL/2, SiT-B/2")
    si.set_defaults(func=run_dit, time="sit")

    ld = sub.add_parser(
        "lightningdit",
        help="official LightningDiT checkpoint (hustvl/LightningDiT: lightningdit-xl-imgnet-64ep.pt ...) -> a genvis DiT "
        "model folder with LightningDiT's options",
        description="Sizes, patch, latent channels, classes and the options (RMSNorm, SwiGLU, qk-norm, 2D RoPE, "
        "wo_shift) are read off the tensor shapes; the saved RoPE tables are checked against genvis's and dropped; a "
        "training checkpoint's 'ema' entry is taken. The network counts time as SiT does (schedule 'sit', velocity). "
        "Loads with torch.load(weights_only=True).",
    )
    _generator_arguments(ld, "the tokenizer whose latents the model generates (LightningDiT: `genvis import vae` of "
                         "VA-VAE f16d32, with its per-channel latent statistics)")
    ld.add_argument("--heads", type=int, default=None, metavar="N",
                    help="attention heads, for a width outside LightningDiT's sizes (768, 1024, 1152, 1536, 1792)")
    ld.set_defaults(func=run_lightningdit)

    k = sub.add_parser(
        "vae",
        help="LDM-layout KL autoencoder (VA-VAE vavae-imagenet256-f16d32-dinov2.pt, MAR kl16, kl-f8 ...) -> a genvis KL "
        "tokenizer folder (a diffusers AutoencoderKL)",
        description="Widths, levels, latent channels and the attention blocks (VA-VAE's at the 16x16 level) are read off "
        "the tensor shapes. A training checkpoint's 'state_dict' (or 'model') entry is taken; loss.*, foundation_model.*, "
        "linear_proj.* and model_ema.* (training only) are dropped; a whole latent-diffusion checkpoint's "
        "first_stage_model.* is taken. Loads with torch.load(weights_only=True).",
    )
    _tokenizer_arguments(k, ".pt, .ckpt, .pth or .safetensors")
    k.add_argument("--stats", default=None, metavar="FILE",
                   help="per-channel latent mean and std stored in the tokenizer, so generators see (z - mean) / std: "
                   "LightningDiT's latents_stats.pt ({'mean', 'std'} of [1, C, 1, 1]). Default: none stored")
    k.add_argument("--scaling-factor", type=float, default=1.0, metavar="F",
                   help="multiplies the normalised latents (LightningDiT's latent_multiplier 1.0; kl-f8 without "
                   "--stats: SD's 0.18215). Default: 1.0")
    k.set_defaults(func=run_vae)

    v = sub.add_parser(
        "vq",
        help="official LlamaGen (VQ-16, VQ-8) or taming VQGAN checkpoint -> a genvis VQ tokenizer folder",
        description="The architecture (widths, levels, attention, codebook) is read off the tensor shapes; a training "
        "checkpoint's 'ema' entry is taken, else 'model', else 'state_dict'. LlamaGen's quantize.codebook_used and "
        "taming's loss.* (discriminator, LPIPS) are dropped. Loads with torch.load(weights_only=True): a file that "
        "needs pickle is refused.",
    )
    _tokenizer_arguments(v, ".pt, .ckpt or .safetensors")
    v.add_argument("--layout", choices=("auto", "llamagen", "taming"), default="auto",
                   help="key layout of the checkpoint (auto: from its key names; LlamaGen's codebook is looked up "
                   "l2-normalised, taming's is not)")
    v.add_argument("--codebook-size", type=int, default=None, metavar="K", help="check: the number of codes expected")
    v.add_argument("--codebook-dim", type=int, default=None, metavar="D", help="check: the code dimension expected")
    v.add_argument("--image-channels", type=int, default=None, metavar="C", help="check: the image channels expected")
    v.set_defaults(func=run_vq)

    r = sub.add_parser(
        "var-vae",
        help="official VAR VQ-VAE (vae_ch160v4096z32.pth) -> a genvis multi-scale VQ tokenizer folder",
        description="The architecture is read off the tensor shapes; phi ratio 0.5 (VAR's). Loads with "
        "torch.load(weights_only=True).",
    )
    _tokenizer_arguments(r, ".pth or .safetensors")
    r.add_argument("--scales", type=int_list, default=None, metavar="LIST",
                   help="token map sides, coarse to fine, e.g. 1,2,3,4,5,6,8,10,13,16 (default: VAR's, when the "
                   "checkpoint's quantize.ema_vocab_hit_SV has 10 rows; required otherwise)")
    r.set_defaults(func=run_var_vae)

    a = sub.add_parser(
        "var",
        help="official VAR transformer (var_d16.pth .. var_d30.pth) -> a genvis VAR model folder",
        description="Depth, width, heads, vocabulary and classes are read off the tensor shapes. The buffers VAR saves "
        "(lvl_1L, attn_bias_for_masking, zero_k_bias) are checked against the rebuilt ones and dropped; any other "
        "unknown or missing key stops the import. Loads with torch.load(weights_only=True).",
    )
    _generator_arguments(a, "its multi-scale VQ tokenizer (`genvis import var-vae` of vae_ch160v4096z32.pth), checked "
                         "against the model (vocabulary, code width, scales)")
    a.add_argument("--scales", type=int_list, default=None, metavar="LIST",
                   help="token map sides, coarse to fine (default: the tokenizer's, else VAR's 1,2,3,4,5,6,8,10,13,16)")
    a.set_defaults(func=run_var)

    t = sub.add_parser(
        "titok",
        help="official TiTok tokenizer (bytedance/1d-tokenizer: a Hugging Face folder or tokenizer_titok_*.bin) -> "
        "a genvis TiTok tokenizer folder",
        description="The architecture (widths, depths, tokens, codebook or vae channels, patch and image sizes, decoder "
        "path: single-stage pixels or the released two-stage proxy codes + MaskGIT-VQGAN pixel decoder) is read off the "
        "tensor shapes; the official config (a folder's config.json, or --config), when there is one, is checked against "
        "them key by key. A stage-1 checkpoint (no pixel decoder) is refused. Loads with torch.load(weights_only=True): "
        "a file that needs pickle is refused.",
    )
    t.add_argument("source", metavar="SRC", help="a Hugging Face TiTok folder (config.json + model.safetensors or "
                   "pytorch_model.bin), or a state dict file (.bin, .pt, .pth or .safetensors)")
    t.add_argument("out", metavar="OUT_DIR", help="the genvis tokenizer folder to write")
    t.add_argument("--config", default=None, metavar="FILE",
                   help="the official YAML / JSON config (configs/infer/TiTok/*.yaml), checked against the weights; "
                   "replaces a folder's config.json")
    t.add_argument("--l2-norm", action=argparse.BooleanOptionalAction, default=None,
                   help="l2-normalised codebook lookup when no config says (official use_l2_norm); default: on for "
                   "12-dim codes (the released L-32 / B-64 / S-128), off otherwise (the vq8k models)")
    t.add_argument("--encoder-heads", type=int, default=None, metavar="N",
                   help="encoder attention heads, for a width outside the official sizes (512, 768, 1024: 8, 12, 16 heads)")
    t.add_argument("--decoder-heads", type=int, default=None, metavar="N",
                   help="decoder attention heads, for a width outside the official sizes (512, 768, 1024: 8, 12, 16 heads)")
    t.set_defaults(func=run_titok)

    m = sub.add_parser(
        "maskgit",
        help="official TiTok generator (bytedance/1d-tokenizer ImageBert: generator_titok_l32.bin ...) -> a genvis "
        "MaskGIT model folder",
        description="Vocabulary, tokens, classes, width, depth and MLP width are read off the tensor shapes (the head "
        "count is not in them: --heads, TiTok's 16). BertModel's position_ids buffer is dropped; any other unknown or "
        "missing key stops the import. Loads with torch.load(weights_only=True).",
    )
    _generator_arguments(m, "its TiTok tokenizer (`genvis import titok`), checked against the model (vocabulary, "
                         "token count)")
    m.add_argument("--heads", type=int, default=16, metavar="N", help="attention heads (default: 16, TiTok's generators)")
    m.set_defaults(func=run_maskgit)


def _read_generator_state(args):
    """(checkpoint path, its state dict unwrapped) for `genvis import dit|var|maskgit`, after checking the flags."""
    if args.embed_tokenizer and args.tokenizer is None:
        raise GenvisError("--embed-tokenizer: needs --tokenizer DIR (the tokenizer to copy)")
    ckpt_path = Path(args.checkpoint)
    raw = load_checkpoint_file(ckpt_path)
    if not isinstance(raw, dict):
        raise GenvisError(f"{ckpt_path}: expected a state dict or a training checkpoint dict, got {type(raw).__name__}")
    return ckpt_path, unwrap_state_dict(raw)


def _write_generator(model, args, tokenizer) -> Path:
    """The model folder OUT_DIR, written atomically, with `tokenizer` (or nothing) recorded in it."""
    from genvis.tokenizers import record_tokenizer

    out = Path(args.out)
    with atomic_dir(out) as tmp:
        model.eval().save_pretrained(str(tmp), safe_serialization=True)
        if tokenizer is not None:
            record_tokenizer(tmp, tokenizer, args.tokenizer, embed=args.embed_tokenizer)
    return out


def _check_tokenizer(check, model, tokenizer, args) -> None:
    """`check(model, tokenizer)` (a family's tokenizer check), its error naming --tokenizer."""
    if tokenizer is not None:
        try:
            check(model, tokenizer)
        except GenvisError as err:
            raise GenvisError(f"--tokenizer {args.tokenizer}: {err}") from None


def run_dit(args) -> int:
    """`genvis import dit` (eps + learned variance on DiT's 1000 steps) and `genvis import sit` (the same keys, SiT's
    time and velocity)."""
    from genvis.models.dit import dit_config, infer_dit_config, parse_arch

    try:
        size, patch = parse_arch(args.arch, prefix="SiT" if args.time == "sit" else "DiT")
    except ValueError as err:
        raise GenvisError(f"--arch: {err}") from None
    ckpt_path, state = _read_generator_state(args)
    needed = ["pos_embed", "x_embedder.proj.weight", "final_layer.linear.weight", "y_embedder.embedding_table.weight"]
    missing = [k for k in needed if k not in state]
    if missing:
        raise GenvisError(f"{ckpt_path}: not an official DiT layout: missing key(s) {', '.join(missing)}")
    inferred = infer_dit_config(state, patch)
    config = dit_config(size, patch)
    for key in ("hidden_size", "depth"):
        if inferred[key] != config[key]:
            raise GenvisError(f"{ckpt_path}: {key} is {inferred[key]} but --arch {args.arch} has {config[key]}")
    config.update({k: v for k, v in inferred.items() if k not in ("hidden_size", "depth")})
    time = dict(prediction_type="velocity", schedule="sit") if args.time == "sit" else dict(prediction_type="eps",
                                                                                           schedule="linear")
    _import_dit({**config, **time}, state, ckpt_path, args, args.arch)
    return 0


def run_lightningdit(args) -> int:
    from genvis.models.dit import convert_lightningdit_state_dict

    ckpt_path, state = _read_generator_state(args)
    try:
        config, state = convert_lightningdit_state_dict(state, num_heads=args.heads)
    except ValueError as err:
        raise GenvisError(f"{ckpt_path}: {err}") from None
    _import_dit(config, state, ckpt_path, args, f"LightningDiT (width {config['hidden_size']}, depth {config['depth']}, "
                f"patch {config['patch_size']})")
    return 0


def _import_dit(config: dict, state: dict, ckpt_path: Path, args, what: str) -> None:
    """Build the DiT `config` describes, load `state` strictly, check --tokenizer's channels, write OUT_DIR."""
    from genvis.models.dit import DiT

    tokenizer = None
    if args.tokenizer is not None:
        from genvis.tokenizers import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer)
        if tokenizer.latent_channels not in (None, config["in_channels"]):
            raise GenvisError(f"--tokenizer {args.tokenizer}: its latents have {tokenizer.latent_channels} channels, the "
                              f"checkpoint's model takes {config['in_channels']}")
    model = DiT(**config)
    load_state_strict(model, state, str(ckpt_path), what)
    out = _write_generator(model, args, tokenizer)
    print(f"imported {what} ({model.num_params() / 1e6:.2f}M parameters) to {out}")


def _write_tokenizer(model, converted, ckpt_path: Path, out: Path) -> None:
    from genvis.tokenizers.vq_import import load_strict

    load_strict(model, converted, str(ckpt_path))
    with atomic_dir(out) as tmp:
        model.eval().save_pretrained(tmp)


def _dropped(converted) -> str:
    if not converted.dropped:
        return ""
    if converted.layout == "taming":
        return f"; dropped {len(converted.dropped)} loss.* keys"
    return f"; dropped {', '.join(converted.dropped)}"


def run_vae(args) -> int:
    from diffusers import AutoencoderKL

    from genvis.tokenizers.kl import KLTokenizer
    from genvis.tokenizers.kl_import import convert_ldm_vae, read_latent_stats
    from genvis.tokenizers.vq_import import unwrap_checkpoint

    ckpt_path = Path(args.checkpoint)
    where = str(ckpt_path)
    if not args.scaling_factor > 0:
        raise GenvisError(f"--scaling-factor {args.scaling_factor}: expected a positive number")
    config, state, dropped = convert_ldm_vae(unwrap_checkpoint(load_checkpoint_file(ckpt_path), where), where)
    mean = std = None
    if args.stats is not None:
        mean, std = read_latent_stats(args.stats, config["latent_channels"], where=f"--stats {args.stats}")
    vae = AutoencoderKL(**config, scaling_factor=args.scaling_factor, latents_mean=mean, latents_std=std)
    load_state_strict(vae, state, where, "the LDM KL autoencoder inferred from its shapes")
    out = Path(args.out)
    with atomic_dir(out) as tmp:
        KLTokenizer(vae.eval()).save_pretrained(tmp)
    levels = len(config["block_out_channels"])
    attention = [l for l, kind in enumerate(config["down_block_types"]) if kind.startswith("Attn")]
    params = sum(p.numel() for p in vae.parameters())
    normalised = f"per-channel statistics from {args.stats}" if mean is not None else "no latent statistics stored"
    print(f"imported KL autoencoder ({params / 1e6:.2f}M parameters, f{2 ** (levels - 1)}, {config['latent_channels']} "
          f"latent channels, attention at levels {attention or 'none'}{' and the middle' if config['mid_block_add_attention'] else ''}; "
          f"{normalised}, scaling factor {args.scaling_factor:g}"
          f"{f'; dropped {len(dropped)} training-only keys' if dropped else ''}) to {out}")
    return 0


def run_vq(args) -> int:
    from genvis.tokenizers.vq import VQTokenizer
    from genvis.tokenizers.vq_import import check_expected, convert_vq

    ckpt_path = Path(args.checkpoint)
    where = str(ckpt_path)
    converted = convert_vq(load_checkpoint_file(ckpt_path), layout=args.layout, where=where)
    check_expected(converted, where, codebook_size=args.codebook_size, codebook_dim=args.codebook_dim,
                   in_channels=args.image_channels)
    model = VQTokenizer(**converted.config)
    out = Path(args.out)
    _write_tokenizer(model, converted, ckpt_path, out)
    c = converted.config
    params = sum(p.numel() for p in model.parameters())
    print(f"imported {converted.layout} VQ ({params / 1e6:.2f}M parameters, f{model.downsample}, codebook "
          f"{c['codebook_size']} x {c['codebook_dim']}{' l2-normalised' if c['l2_norm'] else ''}{_dropped(converted)}) to {out}")
    return 0


def run_var_vae(args) -> int:
    from genvis.tokenizers.multiscale_vq import MultiScaleVQTokenizer
    from genvis.tokenizers.vq_import import convert_var_vae

    ckpt_path = Path(args.checkpoint)
    converted = convert_var_vae(load_checkpoint_file(ckpt_path), scales=args.scales, where=str(ckpt_path))
    model = MultiScaleVQTokenizer(**converted.config)
    out = Path(args.out)
    _write_tokenizer(model, converted, ckpt_path, out)
    c = converted.config
    params = sum(p.numel() for p in model.parameters())
    print(f"imported var VQ-VAE ({params / 1e6:.2f}M parameters, f{model.downsample}, codebook {c['codebook_size']} x "
          f"{c['z_channels']}, scales {','.join(map(str, c['scales']))}{_dropped(converted)}) to {out}")
    return 0


def run_var(args) -> int:
    from genvis.models.var import VAR, VAR_SCALES, convert_var_state_dict
    from genvis.samplers.tokens import check_var_tokenizer
    from genvis.tokenizers import load_tokenizer

    ckpt_path, state = _read_generator_state(args)
    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer is not None else None
    scales = args.scales or (list(tokenizer.scales) if getattr(tokenizer, "token_layout", None) == "scales" else VAR_SCALES)
    config, state = convert_var_state_dict(state, scales, str(ckpt_path))
    model = VAR(**config)
    load_state_strict(model, state, str(ckpt_path), f"VAR-d{config['depth']}")
    _check_tokenizer(check_var_tokenizer, model, tokenizer, args)
    out = _write_generator(model, args, tokenizer)
    print(f"imported VAR-d{config['depth']} ({model.num_params() / 1e6:.2f}M parameters, vocabulary {config['vocab_size']}, "
          f"{config['num_classes']} classes, scales {','.join(map(str, scales))}) to {out}")
    return 0


def run_titok(args) -> int:
    from genvis.tokenizers.titok import TiTokTokenizer
    from genvis.tokenizers.titok_import import convert_titok, describe, load_titok, read_titok_source

    checkpoint, official, where = read_titok_source(args.source, args.config)
    kwargs, state = convert_titok(checkpoint, official, where, l2_norm=args.l2_norm, encoder_heads=args.encoder_heads,
                                  decoder_heads=args.decoder_heads)
    model = TiTokTokenizer(**kwargs)
    load_titok(model, state, where)
    out = Path(args.out)
    with atomic_dir(out) as tmp:
        model.eval().save_pretrained(tmp)
    params = sum(p.numel() for p in model.parameters())
    print(f"imported TiTok ({params / 1e6:.2f}M parameters, {describe(kwargs)}) to {out}")
    return 0


def run_maskgit(args) -> int:
    from genvis.models.maskgit import MaskGIT, convert_maskgit_state_dict
    from genvis.samplers.tokens import check_maskgit_tokenizer
    from genvis.tokenizers import load_tokenizer

    ckpt_path, state = _read_generator_state(args)
    if args.heads < 1:
        raise GenvisError(f"--heads {args.heads}: expected >= 1")
    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer is not None else None
    config, state = convert_maskgit_state_dict(state, str(ckpt_path), num_heads=args.heads)
    model = MaskGIT(**config)
    load_state_strict(model, state, str(ckpt_path), "MaskGIT")
    _check_tokenizer(check_maskgit_tokenizer, model, tokenizer, args)
    out = _write_generator(model, args, tokenizer)
    print(f"imported MaskGIT ({model.num_params() / 1e6:.2f}M parameters, {config['depth']} blocks, width "
          f"{config['hidden_size']}, vocabulary {config['vocab_size']}, {config['num_tokens']} tokens, "
          f"{config['num_classes']} classes) to {out}")
    return 0
