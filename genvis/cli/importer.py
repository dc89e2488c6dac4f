"""genvis import dit CKPT OUT_DIR --arch DiT-XL/2"""
from __future__ import annotations

from pathlib import Path

from genvis.errors import GenvisError
from genvis.io import load_checkpoint_file


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


def run_dit(args) -> int:
    from genvis.io import atomic_dir
    from genvis.models.dit import DiT, checkpoint_filter_fn, dit_config, infer_dit_config, parse_arch
    from genvis.tokenizers import record_tokenizer

    try:
        size, patch = parse_arch(args.arch)
    except ValueError as err:
        raise GenvisError(f"--arch: {err}") from None
    ckpt_path = Path(args.checkpoint)
    raw = load_checkpoint_file(ckpt_path)
    if not isinstance(raw, dict):
        raise GenvisError(f"{ckpt_path}: expected a state dict or a training checkpoint dict, got {type(raw).__name__}")
    state = checkpoint_filter_fn(raw)
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
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise GenvisError(f"{ckpt_path}: tensor shapes do not match {args.arch}: {str(err).splitlines()[-1].strip()}") from None
    if result.missing_keys or result.unexpected_keys:
        parts = []
        if result.missing_keys:
            parts.append(f"missing {', '.join(result.missing_keys[:5])}{' ...' if len(result.missing_keys) > 5 else ''}")
        if result.unexpected_keys:
            parts.append(f"unexpected {', '.join(result.unexpected_keys[:5])}{' ...' if len(result.unexpected_keys) > 5 else ''}")
        raise GenvisError(f"{ckpt_path}: keys do not match {args.arch}: {'; '.join(parts)}")
    out = Path(args.out)
    with atomic_dir(out) as tmp:
        model.eval().save_pretrained(str(tmp), safe_serialization=True)
        if tokenizer is not None:
            record_tokenizer(tmp, tokenizer, args.tokenizer, embed=args.embed_tokenizer)
    print(f"imported {args.arch} ({model.num_params() / 1e6:.2f}M parameters) to {out}")
    return 0
