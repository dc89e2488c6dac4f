"""genvis train CONFIG [key=value ...]"""
from __future__ import annotations


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train from a YAML config (the config's task says what: a generator, a tokenizer, ...)",
        description="Train from CONFIG, optionally with dotted overrides, e.g. `genvis train configs/digits/dit.yaml "
        "train.steps=200 model.size=tiny`. Keys are strictly typed: a typo or a wrong type is one error line naming "
        "the key. Rerunning on an existing output_dir resumes from its last checkpoint; the rerun may change only "
        "train.steps (upward), train.lr/warmup_steps/grad_clip, the log/checkpoint/sample cadences and sample.* "
        "(recorded in config_changes.jsonl).",
    )
    p.add_argument("config", metavar="CONFIG", help="YAML config file (see configs/)")
    p.add_argument("overrides", nargs="*", default=[], metavar="key=value",
                   help="optional dotted overrides, e.g. train.steps=200 output_dir=runs/try")
    p.set_defaults(func=run)


def run(args) -> int:
    from genvis.config import load_config
    from genvis.training.loop import train

    cfg = load_config(args.config, args.overrides)
    export = train(cfg)
    print(f"model: {export}")
    return 0
