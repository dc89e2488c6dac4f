"""genvis sample RUN_OR_MODEL --num N --out OUT [...]"""
from __future__ import annotations

import argparse

from genvis.errors import GenvisError


def _classes(text: str):
    try:
        return [int(c) for c in text.split(",") if c.strip() != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--classes {text!r}: expected a class index or a comma-separated list, e.g. 3 or 0,1,2") from None


def add_parser(subparsers) -> None:
    from genvis.registry import SAMPLERS

    p = subparsers.add_parser(
        "sample",
        help="sample images from a run directory or model folder",
        description="OUT ending in .png: a grid; .npz: ADM-style arr_0 (uint8 NHWC) + labels; otherwise a folder of PNGs. "
        "Sample i is drawn from seed (S, i), whatever the batch size.",
    )
    p.add_argument("model", metavar="RUN_OR_MODEL", help="run directory (uses its model/) or model folder")
    p.add_argument("--num", type=int, default=None, help="number of samples (default: the run's sample.num, else 100)")
    p.add_argument("--out", required=True, help="OUT.png | OUT.npz | OUT_DIR")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--classes", type=_classes, default=None, help="one class (3) or a list cycled over samples (0,1,2)")
    group.add_argument("--balanced", action="store_true", help="sample i gets class i %% num_classes (the default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale (1 = none)")
    p.add_argument("--cfg-channels", type=int, default=None, help="guide only the first K channels (official DiT: 3); default all")
    p.add_argument("--cfg-interval", default=None, metavar="T_LO,T_HI",
                   help="guide only for normalised times t_lo < u <= t_hi (u: 0 data, 1 noise); other steps cost one call")
    p.add_argument("--cfg-schedule", default="constant", help="guidance scale over time: constant | linear")
    p.add_argument("--steps", type=int, default=None, help="model evaluations per sample (see `genvis samplers`)")
    p.add_argument("--sampler", default=None, help=f"one of: {', '.join(SAMPLERS.names())}, or diffusers:<SchedulerClass>")
    p.add_argument("--grid", default=None, help="timestep grid: a name (see `genvis samplers`), a .json file, or t1,t2,...")
    p.add_argument("--grid-option", action="append", default=None, metavar="KEY=VALUE", help="grid option, e.g. rho=5 or shift=3")
    p.add_argument("--option", action="append", default=None, metavar="KEY=VALUE", help="sampler option, e.g. order=3 or variant=bh1")
    p.add_argument("--stitch-small", default=None, metavar="RUN_OR_MODEL",
                   help="T-Stitch: a smaller model of the same latent space runs the first --stitch-fraction of the steps")
    p.add_argument("--stitch-fraction", type=float, default=0.4)
    p.add_argument("--cache-refresh", type=int, default=1,
                   help="DiT step caching: run the deep blocks every N-th call only (1 = off)")
    p.add_argument("--cache-keep-blocks", type=int, default=2, help="blocks computed on every call when caching")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--precision", default="auto", help="auto (bf16 where native) | fp32 | bf16")
    p.add_argument("--vae", default=None, help="local diffusers AutoencoderKL folder, for latent models (e.g. imported DiT)")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.set_defaults(func=run)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _run_defaults(path):
    """A run directory's own sampling defaults (config.yaml `sample:`), if it is one."""
    from pathlib import Path

    from omegaconf import OmegaConf

    cfg_path = Path(path) / "config.yaml"
    if cfg_path.is_file():
        return OmegaConf.load(cfg_path).get("sample", {})
    return {}


def run(args) -> int:
    import numpy as np

    from genvis.generate import class_labels, generate, save_samples, to_uint8
    from genvis.models import load_model
    from genvis.cli.options import parse_pairs
    from genvis.samplers import check_options, get_sampler
    from genvis.samplers.guidance import CFG, parse_interval
    from genvis.tokenizers import tokenizer_for_model

    defaults = _run_defaults(args.model)
    sampler = args.sampler or defaults.get("sampler", "ddpm")
    steps = args.steps or defaults.get("steps", 250)
    cfg = args.cfg if args.cfg is not None else defaults.get("cfg", 1.0)
    num = args.num or defaults.get("num", 100)
    if num < 1 or steps < 1 or args.batch_size < 1 or args.cache_refresh < 1:
        raise GenvisError("--num, --steps, --batch-size and --cache-refresh must be >= 1")
    if not 0.0 <= args.stitch_fraction <= 1.0:
        raise GenvisError(f"--stitch-fraction {args.stitch_fraction}: expected a value in [0, 1]")
    try:
        options = parse_pairs(args.option, "--option")
        grid_options = parse_pairs(args.grid_option, "--grid-option")
        interval = parse_interval(args.cfg_interval) if args.cfg_interval else None
        CFG(cfg, interval=interval, schedule=args.cfg_schedule, channels=args.cfg_channels)
        check_options(sampler, get_sampler(sampler), options)
    except (ValueError, argparse.ArgumentTypeError) as err:
        raise GenvisError(str(err)) from None
    model = load_model(args.model, device=args.device)
    if args.cache_refresh > 1 and not 0 <= args.cache_keep_blocks < model.config.depth:
        raise GenvisError(f"--cache-keep-blocks {args.cache_keep_blocks}: expected 0..{model.config.depth - 1} "
                          f"(fewer than the model's {model.config.depth} blocks)")
    small = load_model(args.stitch_small, device=args.device) if args.stitch_small else None
    labels = class_labels(num, model.num_classes, args.classes)
    tokenizer = tokenizer_for_model(model, args.vae, device=args.device)
    try:
        images = generate(
            model, labels, seed=args.seed, sampler=sampler, steps=steps, grid=args.grid or defaults.get("grid", "default"),
            grid_options=grid_options, cfg=cfg, cfg_channels=args.cfg_channels, cfg_interval=interval,
            cfg_schedule=args.cfg_schedule, batch_size=args.batch_size, precision=args.precision, tokenizer=tokenizer,
            stitch_small=small, stitch_fraction=args.stitch_fraction, cache_refresh=args.cache_refresh,
            cache_keep_blocks=args.cache_keep_blocks, progress=True, **options,
        )
    except ValueError as err:  # a value the samplers reject (names, grids and option types are checked above)
        raise GenvisError(str(err)) from None
    nrow = model.num_classes if args.classes is None and num >= model.num_classes else None
    kind = save_samples(to_uint8(images), np.asarray(labels), args.out, nrow=nrow)
    print(f"wrote {num} samples ({kind}) to {args.out}")
    return 0
