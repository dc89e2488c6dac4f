"""genvis import dit CKPT OUT_DIR --arch DiT-XL/2
genvis import vq CKPT OUT_DIR [--layout auto|llamagen|taming] [--codebook-size K] [--codebook-dim D] [--image-channels C]
genvis import var-vae CKPT OUT_DIR [--scales 1,2,3,4,5,6,8,10,13,16]
genvis import var CKPT OUT_DIR [--tokenizer DIR] [--scales LIST]"""
from __future__ import annotations

from pathlib import Path

from genvis.cli.options import int_list
from genvis.errors import GenvisError
from genvis.io import atomic_dir, load_checkpoint_file, load_state_strict, unwrap_state_dict


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("import", help="convert an official checkpoint into a genvis model folder")
    sub = p.add_subparsers(dest="family", required=True, metavar="FAMILY")
    d = sub.add_parser(
        "dit",
        help="official DiT / SiT-layout checkpoint (.pt state dict or training checkpoint, or .safetensors)",
        description="Loads with torch.load(weights_only=True): a file that needs pickle is refused.",
    )
    d.add_argument("checkpoint", metavar="CKPT", help="the official file (.pt or .safetensors)")
    d.add_argument("out", metavar="OUT_DIR", help="the genvis model folder to write")
    d.add_argument("--arch", required=True, help="e.g. DiT-XL/2, DiT-S/2")
    d.add_argument("--tokenizer", default=None, metavar="DIR",
                   help="the tokenizer whose latents the model generates, recorded in the model folder so that "
                   "`genvis sample OUT_DIR` needs no flag: for official DiT a local diffusers AutoencoderKL folder "
                   "(sd-vae-ft-ema or sd-vae-ft-mse; its config holds the 0.18215 scaling factor). Default: none recorded")
    d.add_argument("--embed-tokenizer", action="store_true",
                   help="copy the tokenizer into OUT_DIR/tokenizer/ instead of recording its path")
    d.set_defaults(func=run_dit)

    v = sub.add_parser(
        "vq",
        help="official LlamaGen (VQ-16, VQ-8) or taming VQGAN checkpoint -> a genvis VQ tokenizer folder",
        description="The architecture (widths, levels, attention, codebook) is read off the tensor shapes; a training "
        "checkpoint's 'ema' entry is taken, else 'model', else 'state_dict'. LlamaGen's quantize.codebook_used and "
        "taming's loss.* (discriminator, LPIPS) are dropped. Loads with torch.load(weights_only=True): a file that "
        "needs pickle is refused.",
    )
    v.add_argument("checkpoint", metavar="CKPT", help="the official file (.pt, .ckpt or .safetensors)")
    v.add_argument("out", metavar="OUT_DIR", help="the genvis tokenizer folder to write")
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
    r.add_argument("checkpoint", metavar="CKPT", help="the official file (.pth or .safetensors)")
    r.add_argument("out", metavar="OUT_DIR", help="the genvis tokenizer folder to write")
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
    a.add_argument("checkpoint", metavar="CKPT", help="the official file (.pth or .safetensors)")
    a.add_argument("out", metavar="OUT_DIR", help="the genvis model folder to write")
    a.add_argument("--tokenizer", default=None, metavar="DIR",
                   help="its multi-scale VQ tokenizer (`genvis import var-vae` of vae_ch160v4096z32.pth), checked against "
                   "the model (vocabulary, code width, scales) and recorded so that `genvis sample OUT_DIR` needs no flag")
    a.add_argument("--embed-tokenizer", action="store_true",
                   help="copy the tokenizer into OUT_DIR/tokenizer/ instead of recording its path")
    a.add_argument("--scales", type=int_list, default=None, metavar="LIST",
                   help="token map sides, coarse to fine (default: the tokenizer's, else VAR's 1,2,3,4,5,6,8,10,13,16)")
    a.set_defaults(func=run_var)


def _read_generator_state(args):
    """(checkpoint path, its state dict unwrapped) for `genvis import dit|var`, after checking the flags."""
    if args.embed_tokenizer and args.tokenizer is None:
        raise GenvisError("--embed-tokenizer: needs --tokenizer DIR (the tokenizer to copy)")
    ckpt_path = Path(args.checkpoint)
    raw = load_checkpoint_file(ckpt_path)
    if not isinstance(raw, dict):
        raise GenvisError(f"{ckpt_path}: expected a state dict or a training checkpoint dict, got {type(raw).__name__}")
    return ckpt_path, unwrap_state_dict(raw)


def run_dit(args) -> int:
    from genvis.models.dit import DiT, dit_config, infer_dit_config, parse_arch
    from genvis.tokenizers import record_tokenizer

    try:
        size, patch = parse_arch(args.arch)
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
    tokenizer = None
    if args.tokenizer is not None:
        from genvis.tokenizers import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer)
        if tokenizer.latent_channels not in (None, config["in_channels"]):
            raise GenvisError(f"--tokenizer {args.tokenizer}: its latents have {tokenizer.latent_channels} channels, the "
                              f"checkpoint's model takes {config['in_channels']}")
    model = DiT(**config, prediction_type="eps", schedule="linear")
    load_state_strict(model, state, str(ckpt_path), args.arch)
    out = Path(args.out)
    with atomic_dir(out) as tmp:
        model.eval().save_pretrained(str(tmp), safe_serialization=True)
        if tokenizer is not None:
            record_tokenizer(tmp, tokenizer, args.tokenizer, embed=args.embed_tokenizer)
    print(f"imported {args.arch} ({model.num_params() / 1e6:.2f}M parameters) to {out}")
    return 0


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
    from genvis.tokenizers import load_tokenizer, record_tokenizer

    ckpt_path, state = _read_generator_state(args)
    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer is not None else None
    scales = args.scales or (list(tokenizer.scales) if getattr(tokenizer, "token_layout", None) == "scales" else VAR_SCALES)
    config, state = convert_var_state_dict(state, scales, str(ckpt_path))
    model = VAR(**config)
    load_state_strict(model, state, str(ckpt_path), f"VAR-d{config['depth']}")
    if tokenizer is not None:
        try:
            check_var_tokenizer(model, tokenizer)
        except GenvisError as err:
            raise GenvisError(f"--tokenizer {args.tokenizer}: {err}") from None
    out = Path(args.out)
    with atomic_dir(out) as tmp:
        model.eval().save_pretrained(str(tmp), safe_serialization=True)
        if tokenizer is not None:
            record_tokenizer(tmp, tokenizer, args.tokenizer, embed=args.embed_tokenizer)
    print(f"imported VAR-d{config['depth']} ({model.num_params() / 1e6:.2f}M parameters, vocabulary {config['vocab_size']}, "
          f"{config['num_classes']} classes, scales {','.join(map(str, scales))}) to {out}")
    return 0
