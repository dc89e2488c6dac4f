"""`genvis` command line: one module per subcommand, each with `add_parser(subparsers)`.

Every subcommand sets `func(args) -> int`; bad input raises GenvisError, printed as one line
with a non-zero exit code. Building the parser imports no torch (the subcommands import what
they need when they run), so `genvis --help` is quick.
"""
from __future__ import annotations

import sys

from genvis import __version__
from genvis.cli.options import ArgumentParser
from genvis.errors import GenvisError

EXIT_BAD_INPUT = 2


def build_parser() -> ArgumentParser:
    from genvis.cli import eval as eval_cmd
    from genvis.cli import importer, ref, sample, samplers, tokenizer, train

    parser = ArgumentParser(prog="genvis", description="Generative image modeling: train, sample, evaluate.")
    parser.add_argument("--version", action="version", version=f"genvis {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (train, sample, samplers, eval_cmd, ref, tokenizer, importer):
        module.add_parser(subparsers)
    return parser


def one_line(err: BaseException) -> str:
    """The error's message as one line. A DataLoader worker's error arrives re-raised with the
    worker's traceback in its message; its original message is then the last line."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else type(err).__name__
    last = lines[-1]
    prefix = f"{type(err).__module__}.{type(err).__name__}: "
    return last[len(prefix):] if last.startswith(prefix) else last


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
    except SystemExit as done:  # --help, --version, or a usage error already printed as one line
        return int(done.code or 0)
    if extra:  # named after the subcommand that did not take them, not after `genvis`
        print(f"genvis {args.command}: error: unrecognized arguments: {' '.join(extra)} (see genvis {args.command} --help)",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        return int(args.func(args) or 0)
    except GenvisError as err:
        print(f"genvis {args.command}: error: {one_line(err)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"genvis {args.command}: interrupted", file=sys.stderr)
        return 130
