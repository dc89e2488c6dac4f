"""genvis train CONFIG [key=value ...]"""
from __future__ import annotations


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a generator from a YAML config (resumes an existing output_dir)",
        description="Train from CONFIG with dotted overrides, e.g. `genvis train configs/digits/dit.yaml train.steps=200 model.size=tiny`. "
        "Rerunning on an existing output_dir resumes from its last checkpoint.",
    )
    p.add_argument("config", help="YAML config file")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides (strict: unknown keys are errors)")
    p.set_defaults(func=run)


def run(args) -> int:
    from genvis.config import load_config
    from genvis.training.loop import train

    cfg = load_config(args.config, args.overrides)
    export = train(cfg)
    print(f"model: {export}")
    return 0
