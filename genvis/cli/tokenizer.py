"""genvis tokenizer recon | extract | stats TOKENIZER --data CONFIG ..."""
from __future__ import annotations

import json


def _add_source(p, split: str, tokenizer_help: str = "tokenizer folder, or a model folder / run recording one") -> None:
    """TOKENIZER, --data and --split: what every tokenizer action reads."""
    p.add_argument("tokenizer", metavar="TOKENIZER", help=tokenizer_help)
    p.add_argument("--data", required=True, metavar="CONFIG", help="a run config YAML whose data: section names the images")
    p.add_argument("--split", default=split, help="dataset split (digits: train | test | all; folders have one)")


def add_parser(subparsers) -> None:
    from genvis.cli.options import add_evaluation_options

    p = subparsers.add_parser("tokenizer", help="reconstruction metrics, latent extraction and latent statistics of a tokenizer")
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")

    r = sub.add_parser(
        "recon", help="PSNR, SSIM, reconstruction Frechet distance (and codebook usage) as JSON, and a side-by-side PNG",
        description="Encodes and decodes the images of a dataset config with TOKENIZER (a tokenizer folder, a diffusers "
        "AutoencoderKL folder, or a model folder / run that records one) and prints PSNR, SSIM and the Frechet distance "
        "between the features of the originals and of the reconstructions (digits features offline; Inception with "
        "local weights). For a discrete tokenizer also the codebook usage and perplexity of the images' ids, per scale "
        "for a multi-scale one (with the usage of the codes each scale can reach: min(vocab, p*p*N)).",
    )
    _add_source(r, split="test")
    r.add_argument("--num-images", type=int, default=None, metavar="N", help="the first N images (default: all)")
    r.add_argument("--out", default=None, metavar="SIDE.png", help="write originals (top) over reconstructions (bottom)")
    add_evaluation_options(r)
    r.set_defaults(features="digits", func=run_recon)

    e = sub.add_parser(
        "extract", help="encode a dataset once into latent or id shards (data.name=latents data.path=DIR trains on them)",
        description="Encodes every image of the dataset (posterior mode, normalised; or a discrete tokenizer's int64 "
        "ids, every scale concatenated for a multi-scale one) into safetensors shards of latents and labels, sharded over Accelerate processes by index; a rerun skips finished shards, and no shard "
        "is ever half-written. DIR/latents.json records the tokenizer, so a generator trained on DIR records it too.",
    )
    _add_source(e, split="train")
    e.add_argument("--out", required=True, metavar="DIR", help="the latents folder to write (or to resume)")
    e.add_argument("--flip", action="store_true", help="also store the latents of the mirrored images (fast-DiT style), "
                   "for data.random_flip=true")
    e.add_argument("--shard-size", type=int, default=1000, metavar="N", help="images per shard file (the unit of resumption)")
    e.add_argument("--batch-size", type=int, default=64, metavar="B", help="images per encoder call")
    e.add_argument("--device", default=None, metavar="D", help="torch device (default: the process's)")
    e.set_defaults(func=run_extract)

    s = sub.add_parser(
        "stats", help="measure a KL tokenizer's latent statistics on a dataset and store them in its config",
        description="Measures the per-channel mean and std of the raw latents (posterior mode) over the images and "
        "writes them into TOKENIZER/config.json the way diffusers reads them: per_channel -> latents_mean / latents_std "
        "(scaling_factor 1); scalar -> shift_factor / scaling_factor. Afterwards encode() gives mean 0 / std 1.",
    )
    _add_source(s, split="train", tokenizer_help="a KL tokenizer folder (genvis or diffusers AutoencoderKL)")
    s.add_argument("--num-images", type=int, default=10000, metavar="N", help="images to measure on (a seeded subset)")
    s.add_argument("--normalisation", default="per_channel", choices=["per_channel", "scalar"], help="how to store them")
    s.add_argument("--batch-size", type=int, default=64, metavar="B", help="images per encoder call")
    s.set_defaults(func=run_stats)


def _data_config(path: str):
    from genvis.config import load_config

    return load_config(path, ["output_dir=unused"]).data


def run_recon(args) -> int:
    from genvis.cli.options import extractor_args
    from genvis.evaluation.recon import reconstruction_metrics
    from genvis.tokenizers import load_tokenizer

    chosen = extractor_args(args)
    tokenizer = load_tokenizer(args.tokenizer, device=args.device)
    result = reconstruction_metrics(tokenizer, _data_config(args.data), split=args.split, num_images=args.num_images,
                                    batch_size=args.batch_size, features=chosen["features"], weights=chosen["weights"],
                                    device=args.device, side_by_side=args.out, progress=True)
    print(json.dumps(result, indent=2))
    return 0


def run_extract(args) -> int:
    from genvis.cli.options import check_device
    from genvis.errors import GenvisError
    from genvis.tokenizers.extract import extract_latents

    if args.shard_size < 1 or args.batch_size < 1:
        raise GenvisError("--shard-size and --batch-size must be >= 1")
    if args.device is not None:
        check_device(args.device)
    out = extract_latents(args.tokenizer, _data_config(args.data), args.out, flip=args.flip, batch_size=args.batch_size,
                          shard_size=args.shard_size, device=args.device, split=args.split, progress=True)
    print(f"latents: {out}")
    return 0


def run_stats(args) -> int:
    import torch

    from genvis.data import build_dataset
    from genvis.errors import GenvisError
    from genvis.io import write_text_atomic
    from genvis.tokenizers import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer)
    if not hasattr(tokenizer, "measure_normalisation"):
        raise GenvisError(f"{args.tokenizer}: a {type(tokenizer).__name__} has no latent statistics to measure")
    if args.num_images < 1 or args.batch_size < 1:
        raise GenvisError("--num-images and --batch-size must be >= 1")
    dataset = build_dataset(_data_config(args.data), split=args.split)
    count = min(args.num_images, len(dataset))
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:count].tolist()

    def batches():
        for start in range(0, count, args.batch_size):
            yield torch.stack([dataset[i][0] for i in order[start : start + args.batch_size]])

    stored = tokenizer.measure_normalisation(batches(), args.normalisation)
    write_text_atomic(f"{args.tokenizer}/config.json", tokenizer.vae.to_json_string())
    print(json.dumps({**stored, "num_images": count}, indent=2))
    return 0
