"""genvis samplers: the samplers, timestep grids, schedules and guidance options, with their options."""
from __future__ import annotations

import inspect


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("samplers", help="list samplers, timestep grids and their options",
                              description="Lists every sampler (what --steps means for it, its --option keys and defaults), "
                              "every timestep grid (--grid, --grid-option), the schedules and the guidance options.")
    p.set_defaults(func=run)


def _fmt(options: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in options.items()) or "-"


def describe() -> str:
    from genvis.diffusion.schedules import SCHEDULES
    from genvis.registry import SAMPLERS
    from genvis.samplers import get_sampler
    from genvis.samplers.common import sampler_options
    from genvis.samplers.grids import GRIDS
    from genvis.samplers.guidance import CFG_SCHEDULES

    lines = ["samplers (--sampler NAME, options as --option KEY=VALUE):"]
    for name in SAMPLERS.names():
        fn = get_sampler(name)
        meta = fn.sampler_meta
        kind = "SDE" if meta["stochastic"] else "ODE"
        lines.append(f"  {name:<16} {kind}  {meta['summary']}")
        lines.append(f"  {'':<16}      steps: {meta['steps_doc']}")
        lines.append(f"  {'':<16}      options: {_fmt(sampler_options(fn))}")
    lines.append("  diffusers:<SchedulerClass>  any diffusers scheduler (e.g. diffusers:UniPCMultistepScheduler);")
    lines.append("                   option scheduler_kwargs passes constructor arguments")
    lines.append("")
    lines.append("grids (--grid NAME | FILE.json | t1,t2,...; options as --grid-option KEY=VALUE):")
    for name, fn in GRIDS.items():
        params = list(inspect.signature(fn).parameters.values())[2:]
        opts = ", ".join(f"{p.name}={p.default!r}" for p in params) or "-"
        doc = (inspect.getdoc(fn) or "").split("\n")[0]
        lines.append(f"  {name:<10} options: {opts}" + (f"  ({doc})" if doc else ""))
    lines.append("")
    lines.append(f"schedules (model config `schedule`): {', '.join(SCHEDULES)}")
    lines.append(f"guidance: --cfg SCALE, --cfg-interval T_LO,T_HI (0 data .. 1 noise), --cfg-schedule {' | '.join(CFG_SCHEDULES)}, "
                 "--cfg-channels K")
    return "\n".join(lines)


def run(args) -> int:
    print(describe())
    return 0
