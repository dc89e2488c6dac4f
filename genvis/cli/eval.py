"""genvis eval digits SAMPLES | genvis eval fid SAMPLES --ref REF [options] | genvis eval sample-fid ..."""
from __future__ import annotations

import json

from genvis.cli.options import add_evaluation_options, extractor_args
from genvis.evaluation import METRICS


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("eval", help="evaluate samples")
    sub = p.add_subparsers(dest="metric", required=True, metavar="METRIC")
    d = sub.add_parser(
        "digits",
        help="class accuracy and Frechet distance in the digits-classifier feature space",
        description="SAMPLES: an ADM-style .npz (arr_0 uint8 [N, H, W, C], optional labels [N]) or a folder of PNG "
        "images (labels from its samples.json, written by `genvis sample`: {\"labels\": [...], \"files\": [...]}). "
        "Prints JSON with fd (against the held-out digits split rendered at the samples' resolution; images must be "
        "square, at least 8x8) and, when there are labels (classes 0..9), class_accuracy.",
    )
    d.add_argument("samples", metavar="SAMPLES")
    d.set_defaults(func=run_digits)

    f = sub.add_parser(
        "fid",
        help="FID / sFID / IS / KID / precision-recall of samples against a reference, as JSON",
        description="SAMPLES and REF: an image folder (PNG/JPEG), an ADM .npz (arr_0 uint8 NHWC) or a dataset config "
        "YAML; REF may also be ADM reference statistics (mu, sigma; mu_s, sigma_s for sfid), which give FID/sFID "
        "only unless the file also holds arr_0. Metric keys follow torch-fidelity (frechet_inception_distance, "
        "inception_score_mean, ...; sFID: spatial_frechet_inception_distance).",
    )
    f.add_argument("samples", metavar="SAMPLES")
    f.add_argument("--ref", default=None, metavar="REF", help="reference images or statistics (not needed for isc alone)")
    f.add_argument("--metrics", default="fid", metavar="LIST", help=f"comma-separated, from {','.join(METRICS)} (default fid)")
    f.add_argument("--split", default="train", help="dataset split when SAMPLES/REF is a dataset config (default train)")
    add_evaluation_options(f)
    f.set_defaults(func=run_fid)

    from genvis.cli import sample_fid  # `eval sample-fid`: sharded, resumable sampling + evaluation

    sample_fid.add_parser(sub)


def run_digits(args) -> int:
    from genvis.evaluation.digits import evaluate_samples

    print(json.dumps(evaluate_samples(args.samples, progress=True), indent=2))
    return 0


def run_fid(args) -> int:
    from genvis.evaluation.reference import compute_metrics

    result = compute_metrics(args.samples, args.ref, metrics=args.metrics.split(","), **extractor_args(args),
                             batch_size=args.batch_size, device=args.device, split=args.split, progress=True)
    print(json.dumps(result, indent=2))
    return 0
