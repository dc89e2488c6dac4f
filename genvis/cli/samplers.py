"""genvis samplers: the samplers, timestep grids, schedules and guidance options, with their options."""
from __future__ import annotations

import argparse
import inspect


def add_parser(subparsers) -> None:
    from genvis.cli.options import add_precision_option

    p = subparsers.add_parser("samplers", help="list samplers, timestep grids and their options; search a grid",
                              description="Without an action: lists every sampler (what --steps means for it, its --option keys "
                              "and defaults), every timestep grid (--grid, --grid-option), the schedules and the guidance options.")
    p.set_defaults(func=run)
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    s = actions.add_parser(
        "search", help="evolutionary timestep-grid search for a model and sampler; writes a grid JSON for --grid",
        description="AutoDiffusion-style search: grids of --steps model evaluations are evolved to minimise the metric, "
        "'reference' (RMS distance to a tight rk45 solution from the same noise) or 'digits' (Frechet distance of the "
        "samples in the digits-classifier feature space). The best grid is written to OUT (a .json) atomically.",
    )
    s.add_argument("model", metavar="RUN_OR_MODEL", help="run directory, checkpoint folder or model folder")
    s.add_argument("--sampler", default="ddim", metavar="NAME", help="the sampler to search a grid for")
    s.add_argument("--steps", type=int, required=True, metavar="N", help="model evaluations per sample")
    s.add_argument("--out", required=True, metavar="OUT.json", help="grid file to write; use it with genvis sample --grid OUT")
    s.add_argument("--metric", default="reference", choices=["reference", "digits"],
                   help="reference: RMS distance to an rk45 solution; digits: Frechet distance in the digits feature space")
    s.add_argument("--num-samples", type=int, default=64, metavar="N", help="samples scored per candidate grid")
    s.add_argument("--cfg", type=float, default=1.0, metavar="SCALE", help="classifier-free guidance scale")
    s.add_argument("--population", type=int, default=16, metavar="N", help="grids per generation")
    s.add_argument("--generations", type=int, default=10, metavar="N", help="generations to evolve")
    s.add_argument("--seed", type=int, default=0, help="seed of the samples and of the search")
    s.add_argument("--reference-tol", type=float, default=1e-5, metavar="TOL", help="rk45 rtol = atol of the reference solution")
    s.add_argument("--option", action="append", default=None, metavar="KEY=VALUE", help="sampler option, repeatable")
    add_precision_option(s, default="fp32")
    s.add_argument("--device", default="cpu", metavar="D", help="torch device")
    s.set_defaults(func=run_search)


def _fmt(options: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in options.items()) or "-"


def describe() -> str:
    from genvis.diffusion.schedules import SCHEDULES
    from genvis.registry import SAMPLERS
    from genvis.samplers import get_sampler
    from genvis.samplers.common import sampler_options
    from genvis.samplers.grids import GRIDS, grid_options
    from genvis.samplers.guidance import CFG_SCHEDULES

    lines = ["samplers (--sampler NAME, options as --option KEY=VALUE):"]
    for name in SAMPLERS.names():
        fn = get_sampler(name)
        meta = fn.sampler_meta
        kind = "SDE" if meta["stochastic"] else "ODE"
        lines.append(f"  {name:<16} {kind}  {meta['summary']}")
        lines.append(f"  {'':<16}      steps: {meta['steps_doc']}")
        if meta.get("discrete_grid"):
            lines.append(f"  {'':<16}      grid 'default' on discrete schedules: {meta['discrete_grid']}")
        lines.append(f"  {'':<16}      options: {_fmt(sampler_options(fn))}")
    lines.append("  diffusers:<SchedulerClass>  any diffusers scheduler (e.g. diffusers:UniPCMultistepScheduler);")
    lines.append("                   options scheduler_kwargs / step_kwargs as JSON, e.g. --option 'scheduler_kwargs={\"solver_order\": 3}'")
    lines.append("")
    lines.append("grids (--grid NAME | FILE.json | t1,t2,...; options as --grid-option KEY=VALUE):")
    for name, fn in GRIDS.items():
        opts = ", ".join(f"{k}={v!r}" for k, v in grid_options(fn).items()) or "-"
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


def run_search(args) -> int:
    from genvis.cli.options import check_device, parse_pairs
    from genvis.diffusion.schedules import schedule_for_model
    from genvis.errors import GenvisError
    from genvis.generate import class_labels, generate
    from genvis.models import load_model
    from genvis.samplers import check_options, get_sampler
    from genvis.samplers.search import rms_score, save_grid_json, search_grid

    if not args.out.endswith(".json"):
        raise GenvisError(f"--out {args.out}: expected a .json file")
    if args.steps < 1 or args.num_samples < 2 or args.population < 2 or args.generations < 0:
        raise GenvisError("--steps must be >= 1, --num-samples and --population >= 2, --generations >= 0")
    try:
        options = parse_pairs(args.option, "--option")
        fn = get_sampler(args.sampler)
        check_options(args.sampler, fn, options)
    except (ValueError, argparse.ArgumentTypeError) as err:
        raise GenvisError(str(err)) from None
    if fn.sampler_meta["stochastic"] and args.metric == "reference":
        raise GenvisError(f"--sampler {args.sampler}: the reference metric needs a deterministic (ODE) sampler")
    model = load_model(args.model, device=check_device(args.device))
    schedule = schedule_for_model(model)
    labels = class_labels(args.num_samples, model.num_classes)
    # scored in the generator's own output space (no tokenizer decode)
    common = dict(seed=args.seed, cfg=args.cfg, batch_size=args.num_samples, precision=args.precision)

    def run_grid(grid, sampler=args.sampler, **opts):
        return generate(model, None, labels, sampler=sampler, steps=len(grid) - 1, grid=grid, options=opts, **common)

    if args.metric == "reference":
        print(f"reference solution: rk45, tolerance {args.reference_tol:g} ...", flush=True)
        ref = generate(model, None, labels, sampler="rk45", steps=1,
                       options={"rtol": args.reference_tol, "atol": args.reference_tol}, **common)
        score = rms_score(lambda grid: run_grid(grid, **options), ref)
    else:
        from genvis.evaluation.digits import digits_metrics

        def score(grid):
            return digits_metrics(run_grid(grid, **options), labels)["fd"]

    intervals = fn.sampler_meta["intervals"](args.steps)
    try:
        best, best_score, history = search_grid(score, schedule, intervals, population=args.population,
                                                elite=max(1, args.population // 4), generations=args.generations, seed=args.seed)
    except ValueError as err:
        raise GenvisError(str(err)) from None
    for h in history:
        print(f"generation {h['generation']:>3}: best {args.metric} {h['best_score']:.5g} ({h['evaluations']} grids scored)")
    save_grid_json(args.out, best, schedule, {"sampler": args.sampler, "metric": args.metric, "score": best_score,
                                              "cfg": args.cfg, "num": args.num_samples})
    print(f"wrote {args.out}: {[round(v, 4) for v in best.tolist()]}")
    return 0
