"""genvis eval sample-fid RUN --num N --ref REF --out DIR: sharded, resumable sampling + evaluation."""
from __future__ import annotations

import argparse
import json

from genvis.cli.options import add_evaluation_options, extractor_args
from genvis.evaluation import METRICS


def add_parser(eval_subparsers) -> None:
    p = eval_subparsers.add_parser(
        "sample-fid",
        help="sample N images over all Accelerate processes (resumable) and evaluate them against REF",
        description="Sample i uses label i of a fixed list and seed (SEED, i), so the images and the metric do not "
        "depend on the number of processes or the batch size. Finished shards (DIR/shards/) are written atomically "
        "and a rerun samples only the missing ones; the result is DIR/samples.npz (ADM style) and DIR/metrics.json. "
        "Run under `accelerate launch -m genvis eval sample-fid ...` for several GPUs.",
    )
    p.add_argument("model", metavar="RUN_OR_MODEL")
    p.add_argument("--num", type=int, required=True)
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--ref", default=None, help="reference: image folder, .npz (arr_0 or mu/sigma), dataset config; "
                   "omitted: sample only")
    p.add_argument("--labels", default="uniform", help="uniform (seeded draws, DiT's protocol) | balanced (i %% classes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sampler", default="ddpm")
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--grid", default="default")
    p.add_argument("--cfg", type=float, default=1.0)
    p.add_argument("--cfg-channels", type=int, default=None)
    p.add_argument("--option", action="append", default=None, metavar="KEY=VALUE", help="sampler option")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard file (the unit of resumption)")
    p.add_argument("--precision", default="auto")
    p.add_argument("--vae", default=None, help="local diffusers AutoencoderKL folder, for latent models (e.g. imported DiT)")
    p.add_argument("--metrics", default="fid", metavar="LIST", help=f"comma-separated, from {','.join(METRICS)} (default fid)")
    add_evaluation_options(p, device_default=None)
    p.set_defaults(func=run)


def run(args) -> int:
    from genvis.cli.options import parse_pairs
    from genvis.errors import GenvisError
    from genvis.evaluation.distributed import run_sample_fid
    from genvis.samplers import check_options, get_sampler

    try:
        options = parse_pairs(args.option, "--option")
        check_options(args.sampler, get_sampler(args.sampler), options)
    except (ValueError, argparse.ArgumentTypeError) as err:
        raise GenvisError(str(err)) from None
    try:
        result = run_sample_fid(
            args.model, args.out, num=args.num, ref=args.ref, label_mode=args.labels, seed=args.seed,
            shard_size=args.shard_size, batch_size=args.batch_size, metrics=args.metrics.split(","),
            **extractor_args(args), device=args.device, vae=args.vae, sampler=args.sampler, steps=args.steps,
            grid=args.grid, cfg=args.cfg, cfg_channels=args.cfg_channels, precision=args.precision, **options,
        )
    except ValueError as err:
        raise GenvisError(str(err)) from None
    if result is not None:
        print(json.dumps(result, indent=2))
    return 0
