"""genvis eval sample-fid RUN --num-samples N --out DIR [--ref REF]: sharded, resumable sampling + evaluation."""
from __future__ import annotations

import json

from genvis.cli.options import add_evaluation_options, add_precision_option, add_sampling_options, extractor_args
from genvis.evaluation import METRICS


def add_parser(eval_subparsers) -> None:
    p = eval_subparsers.add_parser(
        "sample-fid",
        help="sample N images over all Accelerate processes (resumable) and evaluate them against REF",
        description="Sample i uses label i of a fixed list and seed (SEED, i), so the images and the metric do not "
        "depend on the number of processes or the batch size. Finished shards (DIR/shards/) are written atomically "
        "and a rerun samples only the missing ones; the result is DIR/samples.npz (ADM style) and DIR/metrics.json. "
        "Sampling flags default to the run's sample: section, as for `genvis sample`. "
        "Run under `accelerate launch -m genvis eval sample-fid ...` or torchrun for several processes.",
    )
    p.add_argument("model", metavar="RUN_OR_MODEL", help="run directory, checkpoint folder or model folder")
    p.add_argument("--num-samples", type=int, required=True, metavar="N", help="number of samples (DiT's protocol: 50000)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (shards, samples.npz, metrics.json, run.json)")
    p.add_argument("--ref", default=None, help="reference: image folder, .npz (arr_0 or mu/sigma), dataset config "
                   "(default: none, sample only)")
    p.add_argument("--labels", default="uniform", choices=["uniform", "balanced"],
                   help="uniform: seeded draws (DiT's protocol); balanced: sample i gets class i %% classes")
    p.add_argument("--seed", type=int, default=0, help="sample i uses seed (SEED, i); uniform labels are drawn from SEED")
    add_sampling_options(p)
    p.add_argument("--shard-size", type=int, default=1000, metavar="N", help="samples per shard file (the unit of resumption)")
    add_precision_option(p, compile_flag=True)
    p.add_argument("--tokenizer", default=None, metavar="DIR",
                   help="decode with this tokenizer folder instead of the one the model records")
    p.add_argument("--metrics", default="fid", metavar="LIST", help=f"comma-separated, from {','.join(METRICS)}")
    add_evaluation_options(p, device_default=None)
    p.set_defaults(func=run)


def run(args) -> int:
    from genvis.cli.options import check_device, flag_error, sampling_from_args
    from genvis.errors import OptionError
    from genvis.evaluation.distributed import run_sample_fid
    from genvis.models import model_class

    if args.device is not None:
        check_device(args.device)
    sampling = sampling_from_args(args, args.model, model_class(args.model).family)
    try:
        result = run_sample_fid(
            args.model, args.out, num=args.num_samples, ref=args.ref, label_mode=args.labels, seed=args.seed,
            shard_size=args.shard_size, batch_size=args.batch_size, metrics=args.metrics.split(","),
            **extractor_args(args), device=args.device, tokenizer=args.tokenizer, sampling=sampling,
            precision=args.precision, compile=args.compile,
        )
    except OptionError as err:
        raise flag_error(err) from None
    if result is not None:
        print(json.dumps(result, indent=2))
    return 0
