"""genvis sample RUN_OR_MODEL --out OUT [--num-samples N] [sampling flags]"""
from __future__ import annotations


def add_parser(subparsers) -> None:
    from genvis.cli.options import add_precision_option, add_sampling_options, int_list

    p = subparsers.add_parser(
        "sample",
        help="sample images from a run directory, checkpoint or model folder (any family)",
        description="RUN_OR_MODEL: a run directory (its model/), a checkpoint (RUN/checkpoints/step_*: its EMA weights) "
        "or a model folder. OUT ending in .png: a grid; .npz: ADM-style arr_0 (uint8 NHWC) + labels; otherwise a folder "
        "of PNGs plus samples.json (labels). The output location is checked before sampling, and nothing is written "
        "half. Sample i is drawn from seed (S, i), whatever the batch size. The model's recorded tokenizer decodes "
        "its samples.",
    )
    p.add_argument("model", metavar="RUN_OR_MODEL", help="run directory, checkpoint folder or model folder")
    p.add_argument("--out", required=True, metavar="OUT", help="OUT.png | OUT.npz | OUT_DIR")
    p.add_argument("--num-samples", type=int, default=None, metavar="N",
                   help="number of samples (default: the run's sample.num, else 100)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--classes", type=int_list, default=None, metavar="LIST",
                       help="one class (3) or a list cycled over the samples (0,1,2)")
    group.add_argument("--balanced", action="store_true", help="sample i gets class i %% num_classes (what happens without --classes)")
    p.add_argument("--seed", type=int, default=0, help="sample i uses seed (SEED, i)")
    add_sampling_options(p)
    p.add_argument("--batch-size", type=int, default=64, metavar="B", help="samples per batch (memory only; images do not depend on it)")
    add_precision_option(p, compile_flag=True)
    p.add_argument("--tokenizer", default=None, metavar="DIR",
                   help="decode with this tokenizer folder instead of the one the model records (e.g. a local diffusers "
                   "AutoencoderKL for an imported DiT)")
    p.add_argument("--device", default=None, metavar="D", help="torch device (default: cuda if available, else cpu)")
    p.set_defaults(func=run)


def run(args) -> int:
    import numpy as np
    import torch

    from genvis.cli.options import check_device, flag_error, sampling_from_args
    from genvis.errors import GenvisError, OptionError
    from genvis.generate import check_output, class_labels, generate, save_samples, to_uint8
    from genvis.models import load_model, model_class, resolve_model_dir
    from genvis.tokenizers import load_tokenizer

    device = check_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.num_samples is not None and args.num_samples < 1:
        raise GenvisError(f"--num-samples {args.num_samples}: expected >= 1")
    if args.batch_size < 1:
        raise GenvisError(f"--batch-size {args.batch_size}: expected >= 1")
    folder = resolve_model_dir(args.model)
    sampling = sampling_from_args(args, args.model, model_class(folder).family)
    num = args.num_samples if args.num_samples is not None else sampling.num
    source = str(folder.resolve())
    check_output(args.out, source)
    model = load_model(folder, device=device)
    tokenizer = load_tokenizer(args.tokenizer or args.model, device=device)
    labels = class_labels(num, model.num_classes, args.classes)
    try:
        images = generate(model, tokenizer, labels, seed=args.seed, sampling=sampling, batch_size=args.batch_size,
                          precision=args.precision, progress=True, compile=args.compile)
    except OptionError as err:  # an option that does not fit this model (e.g. --cache-keep-blocks)
        raise flag_error(err) from None
    nrow = model.num_classes if args.classes is None and num >= model.num_classes else None
    kind = save_samples(to_uint8(images), np.asarray(labels), args.out, nrow=nrow, source=source)
    print(f"wrote {num} samples ({kind}) to {args.out}")
    return 0
