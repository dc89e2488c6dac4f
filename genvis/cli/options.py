"""Command-line pieces shared by several subcommands: the parser and help format, KEY=VALUE pairs,
the sampling flags (`genvis sample` and `genvis eval sample-fid`), devices, the evaluation options.

Nothing here imports torch at import time: `genvis --help` stays fast.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Dict, List, Optional

from genvis.errors import GenvisError, OptionError, first_line
from genvis.evaluation import FEATURE_SETS
from genvis.precision import PRECISIONS


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors (`genvis sample: error: ...`) and no abbreviated flags: torchrun
    would claim an abbreviation that is a prefix of one of its own options."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


class HelpFormatter(argparse.HelpFormatter):
    """Shows each option's default after its help, except None / False (nothing to show) or where the
    help already says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


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


def int_list(text: str) -> List[int]:
    """'1,2,3' -> [1, 2, 3] (an argparse type: class lists, scale lists)."""
    try:
        values = [int(c) for c in text.split(",") if c.strip() != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an integer or a comma-separated list, e.g. 3 or 1,2,4") from None
    if not values:
        raise argparse.ArgumentTypeError(f"{text!r}: empty; expected an integer or a comma-separated list, e.g. 3 or 1,2,4")
    return values


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
    p.add_argument("--batch-size", type=int, default=64, metavar="B", help="images per batch (memory only; results do not depend on it)")
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


# --------------------------------------------------------------------------- sampling flags

# flag dest -> field of the family's sampling dataclass (DiffusionSampling, VARSampling, MaskGITSampling); a flag
# whose field the family lacks "does not apply"
SAMPLING_FLAGS = {
    "sampler": "sampler", "steps": "steps", "grid": "grid", "grid_option": "grid_options", "option": "options",
    "cfg": "cfg", "cfg_channels": "cfg_channels", "cfg_interval": "cfg_interval", "cfg_schedule": "cfg_schedule",
    "stitch_small": "stitch_small", "stitch_fraction": "stitch_fraction", "cache_refresh": "cache_refresh",
    "cache_keep_blocks": "cache_keep_blocks", "top_k": "top_k", "top_p": "top_p", "temperature": "temperature",
    "smooth": "smooth", "kv_cache": "kv_cache", "mask_schedule": "mask_schedule", "anneal_softmax": "anneal_softmax",
}
FIELD_FLAGS = {**{field: "--" + dest.replace("_", "-") for dest, field in SAMPLING_FLAGS.items()}, "num": "--num-samples"}


def _interval(text: str) -> List[float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected two numbers T_LO,T_HI, e.g. 0.1,0.9") from None
    return [lo, hi]


def add_sampling_options(p) -> None:
    """The sampling flags of `genvis sample` and `genvis eval sample-fid`. Unset flags take the run's
    `sample:` defaults (a run directory or checkpoint), else the family's defaults (DiffusionSampling,
    VARSampling, MaskGITSampling)."""
    from genvis.registry import SAMPLERS
    from genvis.samplers.options import MASK_SCHEDULES, DiffusionSampling, MaskGITSampling, VARSampling

    schemas = {"MaskGIT": MaskGITSampling, "VAR": VARSampling, "diffusion": DiffusionSampling}
    d = {name: {f.name: f.default for f in dataclasses.fields(schema) if f.default is not dataclasses.MISSING}
         for name, schema in schemas.items()}

    def default(field):
        """'default: the run's sample.<field>, else <value>' (the values of the families that have the field
        and differ, e.g. 'else 250 (MaskGIT: 8)')."""
        values = [(name, d[name][field]) for name in ("diffusion", "VAR", "MaskGIT") if field in d[name]]
        first = values[0][1]
        others = [f"{name}: {value}" for name, value in values[1:] if value != first]
        return f"default: the run's sample.{field}, else {first}" + (f" ({'; '.join(others)})" if others else "")

    g = p.add_argument_group("sampling (unset flags take the run's sample: section; see `genvis samplers`)")
    g.add_argument("--sampler", default=None, metavar="NAME",
                   help=f"{' | '.join(SAMPLERS.names())} | diffusers:<SchedulerClass> ({default('sampler')})")
    g.add_argument("--steps", type=int, default=None, metavar="N",
                   help=f"model evaluations per sample; MaskGIT: decoding steps ({default('steps')})")
    g.add_argument("--grid", default=None, metavar="GRID",
                   help=f"timestep grid: a name (`genvis samplers`), a .json file, or t1,t2,... ({default('grid')})")
    g.add_argument("--grid-option", action="append", default=None, metavar="KEY=VALUE",
                   help="named grid option, repeatable, e.g. rho=5 or shift=3 (default: the run's, if --grid is unset)")
    g.add_argument("--option", action="append", default=None, metavar="KEY=VALUE",
                   help="sampler option, repeatable, e.g. order=3 or variant=bh1 (default: the run's, if --sampler is unset)")
    g.add_argument("--cfg", type=float, default=None, metavar="SCALE",
                   help=f"classifier-free guidance scale, 1 = none; VAR: the scale reached at the last scale, growing "
                   f"linearly from 1 (VAR's own cfg c is 1 + c here); MaskGIT: uncond + s (cond - uncond) (TiTok's "
                   f"guidance_scale g is 1 + g here) ({default('cfg')})")
    g.add_argument("--cfg-channels", type=int, default=None, metavar="K",
                   help="guide only the first K output channels (official DiT: 3) (default: all)")
    g.add_argument("--cfg-interval", type=_interval, default=None, metavar="T_LO,T_HI",
                   help="guide only for normalised times t_lo < u <= t_hi (u: 0 data, 1 noise); other steps cost one call "
                   "(default: every step)")
    g.add_argument("--cfg-schedule", default=None, metavar="NAME", help=f"guidance scale over time: constant | linear; "
                   f"MaskGIT linear: 1 + (cfg - 1) k / steps at step k, TiTok's ({default('cfg_schedule')})")
    g.add_argument("--stitch-small", default=None, metavar="RUN_OR_MODEL",
                   help="T-Stitch: a smaller model of the same latent space runs the first --stitch-fraction of the steps "
                   "(default: none)")
    g.add_argument("--stitch-fraction", type=float, default=None, metavar="F", help=f"({default('stitch_fraction')})")
    g.add_argument("--cache-refresh", type=int, default=None, metavar="N",
                   help=f"DiT step caching: run the deep blocks every N-th call only, 1 = off ({default('cache_refresh')})")
    g.add_argument("--cache-keep-blocks", type=int, default=None, metavar="K",
                   help=f"blocks computed on every call when caching ({default('cache_keep_blocks')})")
    t = p.add_argument_group("token generators (VAR, MaskGIT)")
    t.add_argument("--top-k", type=int, default=None, metavar="K", help=f"keep the K most likely ids, 0 = all ({default('top_k')})")
    t.add_argument("--top-p", type=float, default=None, metavar="P",
                   help=f"then keep the smallest set of ids of probability >= P, 0 = all ({default('top_p')})")
    t.add_argument("--temperature", type=float, default=None, metavar="T",
                   help=f"VAR: the logits are divided by T; MaskGIT: the scale of the Gumbel noise of the id choice and "
                   f"of the confidence, annealed to T (1 - r) at progress r (0 = greedy; TiTok-L-32: 9.5) "
                   f"({default('temperature')})")
    t.add_argument("--smooth", action=argparse.BooleanOptionalAction, default=None,
                   help="VAR's more_smooth: Gumbel-softmax code mixtures feed the next scale (visualisation, not FID) "
                   f"({default('smooth')})")
    t.add_argument("--kv-cache", action=argparse.BooleanOptionalAction, default=None,
                   help=f"decode each scale against the cached keys/values of the earlier ones; --no-kv-cache recomputes "
                   f"the whole prefix (the same images, slower) ({default('kv_cache')})")
    t.add_argument("--mask-schedule", default=None, metavar="NAME",
                   help=f"MaskGIT: the fraction of ids still masked after progress r: {' | '.join(MASK_SCHEDULES)} "
                   f"({default('mask_schedule')})")
    t.add_argument("--anneal-softmax", action=argparse.BooleanOptionalAction, default=None,
                   help="MaskGIT: divide the logits by 0.5 + 0.8 (1 - r) (TiTok's softmax_temperature_annealing) "
                   f"({default('anneal_softmax')})")


def flag_error(err: OptionError) -> GenvisError:
    """An OptionError about a sampling field, named by its flag."""
    return GenvisError(f"{FIELD_FLAGS.get(err.key, err.key)}: {err.message}")


def run_sampling_defaults(path, family: str):
    """The sampling options of the run that `path` belongs to (its config.yaml `sample:` section, typed
    by the family's schema), or the schema's defaults for a plain model folder."""
    from genvis.io import find_run_dir
    from genvis.registry import FAMILIES

    run = find_run_dir(path)
    if run is None:
        return FAMILIES.schema(family)()
    from genvis.config import load_config

    return load_config(str(run / "config.yaml")).sample


def sampling_from_args(args, path, family: str):
    """The family's sampling options: the run's defaults, with every flag the user set on top. A flag
    --sampler drops the run's sampler options, and --grid its grid options (they belong to them)."""
    base = run_sampling_defaults(path, family)
    fields = {f.name for f in dataclasses.fields(base)}
    changes = {}
    for dest, field in SAMPLING_FLAGS.items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        if field not in fields:
            raise GenvisError(f"{FIELD_FLAGS[field]}: does not apply to {family} models")
        if dest in ("option", "grid_option"):
            try:
                value = parse_pairs(value, "--" + dest.replace("_", "-"))
            except argparse.ArgumentTypeError as err:
                raise GenvisError(str(err)) from None
        changes[field] = value
    if "sampler" in changes and changes["sampler"] != base.sampler:
        changes.setdefault("options", {})
    if "grid" in changes and changes["grid"] != base.grid:
        changes.setdefault("grid_options", {})
    try:
        return dataclasses.replace(base, **changes)
    except OptionError as err:
        raise flag_error(err) from None


def check_device(name: str) -> str:
    """A device name torch accepts and this machine has (one line otherwise)."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise GenvisError(f"--device {name!r}: {first_line(err)}; expected e.g. cpu, cuda, cuda:1") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GenvisError(f"--device {name!r}: CUDA is not available on this machine; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise GenvisError(f"--device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return name


def add_precision_option(p, default: str = "auto", compile_flag: bool = False) -> None:
    p.add_argument("--precision", default=default, choices=PRECISIONS,
                   help="network precision: auto = bf16 where the hardware runs it natively, else fp32")
    if compile_flag:
        p.add_argument("--compile", action="store_true",
                       help="torch.compile (inductor) the network and the tokenizer's decoder: the first batch "
                       "pays the compilation (tens of seconds on a CPU), later ones run the compiled code; results agree "
                       "with eager within the precision's tolerance")
