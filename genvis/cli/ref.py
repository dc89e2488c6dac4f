"""genvis ref DATA --out ref.npz: ADM-format reference statistics (mu, sigma, mu_s, sigma_s, optional arr_0)."""
from __future__ import annotations

import json

from genvis.cli.options import add_evaluation_options, extractor_args


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "ref",
        help="reference statistics (mu, sigma, mu_s, sigma_s) in ADM format",
        description="DATA: an image folder (PNG/JPEG), an ADM .npz (arr_0 uint8 NHWC) or a dataset config YAML. "
        "Writes OUT.npz with mu (float64 [D]) and sigma (float64 [D, D]) of the chosen features, mu_s and sigma_s "
        "of the spatial features for sFID (ADM's mixed_6/conv[..., :7] for inception), and with "
        "--with-images also arr_0 (uint8 NHWC), so KID and precision/recall can use it. The file is written atomically.",
    )
    p.add_argument("data", metavar="DATA")
    p.add_argument("--out", required=True, metavar="OUT.npz", help="the reference file to write (atomically)")
    p.add_argument("--with-images", action="store_true", help="also store the images as arr_0")
    p.add_argument("--split", default="train", help="dataset split when DATA is a dataset config (default train)")
    add_evaluation_options(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from genvis.evaluation.features import SPATIAL_LAYER, STATS_LAYER, build_extractor
    from genvis.evaluation.reference import open_source, write_reference

    chosen = extractor_args(args)
    source = open_source(args.data, split=args.split)
    extractor = build_extractor(chosen["features"], weights=chosen["weights"], device=args.device,
                                features=[STATS_LAYER[args.features], SPATIAL_LAYER[args.features]])
    info = write_reference(source, args.out, extractor, batch_size=args.batch_size, include_images=args.with_images,
                           progress=True)
    print(json.dumps({**info, "features": args.features, "source": source.name}, indent=2))
    return 0
