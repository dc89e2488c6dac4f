"""Command-line options shared by several subcommands: KEY=VALUE pairs, the evaluation options."""
from __future__ import annotations

import argparse
import json
from typing import Dict, List, Optional

from genvis.evaluation import FEATURE_SETS


def parse_value(text: str):
    """'3' -> 3, '0.5' -> 0.5, 'true'/'false' -> bool, 'none' -> None, '{...}' / '[...]' -> JSON
    (e.g. scheduler_kwargs={"solver_order": 3}), anything else stays a string."""
    low = text.strip().lower()
    if low[:1] in ("{", "["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise argparse.ArgumentTypeError(f"{text!r}: not valid JSON ({err})") from None
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_pairs(items: Optional[List[str]], flag: str) -> Dict[str, object]:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise argparse.ArgumentTypeError(f"{flag} {item!r}: expected KEY=VALUE, e.g. order=3")
        out[key.strip()] = parse_value(value)
    return out


def add_evaluation_options(p, device_default="cpu") -> None:
    """--features, --inception-weights, --batch-size, --device (shared by `eval fid`, `eval sample-fid`, `ref`)."""
    p.add_argument("--features", default="inception", metavar="NAME",
                   help=f"feature space: {' | '.join(FEATURE_SETS)} (default inception; digits is offline)")
    p.add_argument("--inception-weights", default=None, metavar="FILE",
                   help="torch-fidelity Inception-v3 state dict (tensors only); needed offline unless it is in the "
                   "torch hub cache")
    p.add_argument("--batch-size", type=int, default=64, metavar="B")
    p.add_argument("--device", default=device_default, metavar="D",
                   help=f"torch device for the feature extractor (default {device_default or 'the process device'})")


def extractor_args(args) -> dict:
    """{"features", "weights"} from checked --features / --batch-size; --inception-weights applies to the
    inception features only."""
    from genvis.errors import GenvisError
    from genvis.evaluation.features import check_feature_set

    check_feature_set(args.features)
    if args.batch_size < 1:
        raise GenvisError(f"--batch-size {args.batch_size}: expected a positive integer")
    return {"features": args.features, "weights": args.inception_weights if args.features == "inception" else None}
