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
    d.add_argument("checkpoint", metavar="CKPT")
    d.add_argument("out", metavar="OUT_DIR")
    d.add_argument("--arch", required=True, help="e.g. DiT-XL/2, DiT-S/2")
    d.add_argument("--tokenizer", default="sd-vae", choices=["sd-vae", "pixels"], help="space the model works in (DiT: sd-vae)")
    d.add_argument("--latent-scale", type=float, default=0.18215)
    d.set_defaults(func=run_dit)


def run_dit(args) -> int:
    from genvis.models.dit import DiT, checkpoint_filter_fn, dit_config, infer_dit_config, parse_arch
    from genvis.training.checkpoint import export_model

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
    model = DiT(**config, prediction_type="eps", schedule="linear", tokenizer=args.tokenizer,
                latent_scale=args.latent_scale if args.tokenizer == "sd-vae" else 1.0)
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
    out.parent.mkdir(parents=True, exist_ok=True)
    export_model(model.eval(), out)
    print(f"imported {args.arch} ({model.num_params() / 1e6:.2f}M parameters) to {out}")
    return 0
