"""genvis eval digits SAMPLES.npz"""
from __future__ import annotations

import json


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("eval", help="evaluate samples")
    sub = p.add_subparsers(dest="metric", required=True, metavar="METRIC")
    d = sub.add_parser(
        "digits",
        help="class accuracy and Frechet distance in the digits-classifier feature space",
        description="Reads an ADM-style .npz (arr_0 uint8 NHWC, labels) and prints JSON with class_accuracy and fd "
        "(against the held-out digits split at the samples' resolution).",
    )
    d.add_argument("samples", metavar="SAMPLES.npz")
    d.set_defaults(func=run_digits)


def run_digits(args) -> int:
    from genvis.evaluation.digits import evaluate_npz

    print(json.dumps(evaluate_npz(args.samples), indent=2))
    return 0
