"""The command line as a whole: torchrun-safe flag names, help for every option, a quick `--help`,
`--version`, one-line usage errors, and registries whose lazy name tables match what registers."""
import argparse
import subprocess
import sys

import pytest

import genvis
from genvis.cli import build_parser, main


def all_parsers(parser, prefix="genvis"):
    """(command path, parser) for the parser and every subcommand below it."""
    yield prefix, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from all_parsers(sub, f"{prefix} {name}")


def option_actions():
    for path, parser in all_parsers(build_parser()):
        for action in parser._actions:
            if action.option_strings and not isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
                yield path, action


def test_no_genvis_flag_is_a_prefix_of_a_torchrun_option():
    from torch.distributed.run import get_args_parser

    torchrun = {s for a in get_args_parser()._actions for s in a.option_strings if s.startswith("--")}
    assert "--numa-binding" in torchrun or "--numa_binding" in torchrun  # the clash the rename fixed
    clashes = [(path, flag, theirs) for path, action in option_actions() for flag in action.option_strings
               for theirs in torchrun if theirs.startswith(flag)]
    assert clashes == []


def test_every_option_has_help_and_no_flag_is_abbreviated():
    missing = [(path, a.option_strings) for path, a in option_actions() if not a.help or a.help == argparse.SUPPRESS]
    assert missing == []
    for path, parser in all_parsers(build_parser()):
        assert parser.allow_abbrev is False, path


def test_help_shows_defaults_and_the_samplers():
    text = build_parser()._subparsers._group_actions[0].choices["sample"].format_help()
    assert "euler-maruyama" in text and "dpmpp-2m" in text  # the registry's names, without importing the solvers
    assert "(default: 64)" in text and "else 250" in text  # --batch-size; --steps falls back to the schema's 250
    fid = build_parser()._subparsers._group_actions[0].choices["eval"]
    assert "--num-samples" in fid._subparsers._group_actions[0].choices["sample-fid"].format_help()


def test_building_the_parser_imports_no_torch():
    code = "import sys; from genvis.cli import build_parser; build_parser(); print(sorted(m for m in ('torch', 'diffusers', 'accelerate') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"genvis {genvis.__version__}"


@pytest.mark.parametrize("argv,needle", [
    (["train"], "the following arguments are required: CONFIG"),
    (["sample", "m", "--out", "x.png", "--cfg", "two"], "argument --cfg: invalid float value: 'two'"),
    (["eval", "sample-fid", "m", "--out", "d", "--num", "5"], "required: --num-samples"),
    (["eval", "sample-fid", "m", "--out", "d", "--num-samples", "5", "--labels", "even"], "invalid choice: 'even'"),
])
def test_usage_errors_are_one_line(capsys, argv, needle):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert "key=value" not in err[0]  # the overrides of `genvis train` are optional


def test_registry_name_tables_match_what_the_modules_register():
    from genvis import registry

    for table in (registry.MODELS, registry.TASKS, registry.FAMILIES, registry.TOKENIZERS, registry.SAMPLERS, registry.DATASETS):
        table.load_all()
        assert sorted(table._entries) == sorted(table._builtins), table.kind
    with pytest.raises(KeyError, match="unknown model 'unet'; expected one of: dit"):
        registry.MODELS.entry("unet")
