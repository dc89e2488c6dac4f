"""Sample quality vs model evaluations on a trained digits DiT: Frechet distance and class accuracy.

    python benchmarks/sampler_digits.py [--run runs/digits-dit] [--num 1000] [--nfe 5,10,20] [--json out.json]

Without --run (or when the folder has no trained model) it first trains the `make demo` preset
(configs/digits/dit.yaml, rectified flow, about 3 minutes on 2 CPU cores) into
runs/bench-sampler-digits. Every row samples the same --num class-balanced images from the same
seeds (sample i from seed (0, i)) with the run's guidance scale, and scores them with the shipped
digits classifier (`genvis eval digits`). The reference row is 250-step DDPM ancestral sampling
(DiT's FID recipe). `steps` is the evaluation budget of every genvis sampler (heun spends 2 per
interval and 1 on the last, so an even budget leaves one unused); NFE counts network evaluations per sample, a guided conditional +
unconditional pair counting once (it is one batched call), as in the DPM-Solver and UniPC papers.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from genvis.evaluation.digits import digits_metrics
from genvis.generate import class_labels, generate
from genvis.models import load_model
from genvis.registry import SAMPLERS
from genvis.tokenizers import load_tokenizer

# (sampler, grid, options): the rows of the table at each NFE, when the sampler is registered
ROWS = [
    ("euler", "default", {}),
    ("heun", "default", {}),
    ("dpmpp-2m", "default", {}),
    ("dpmpp-2m", "logsnr", {}),
    ("dpmpp-3m", "default", {}),
    ("dpm-singlestep", "default", {}),
    ("unipc", "default", {}),
    ("unipc", "logsnr", {}),
    ("dpmpp-2m-sde", "default", {}),
    ("euler-maruyama", "default", {}),
    ("ddpm", "default", {}),
]


def trained_run(run) -> Path:
    if run is not None and (Path(run) / "model" / "config.json").is_file():
        return Path(run)
    from genvis.config import load_config
    from genvis.training.loop import train

    out = Path(run or "runs/bench-sampler-digits")
    print(f"training the digits preset into {out} ...", flush=True)
    train(load_config("configs/digits/dit.yaml", [f"output_dir={out}"]))
    return out


def measure(model, tokenizer, labels, cfg, sampler, steps, grid, options) -> dict:
    calls = [0]
    hook = model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    t0 = time.perf_counter()
    images = generate(model, tokenizer, labels, seed=0, sampler=sampler, steps=steps, grid=grid, cfg=cfg, options=options,
                      batch_size=len(labels))
    seconds = time.perf_counter() - t0
    hook.remove()
    metrics = digits_metrics(images, labels)
    return {"sampler": sampler, "grid": grid, "options": options, "steps": steps, "nfe": calls[0],
            "fd": metrics["fd"], "class_accuracy": metrics["class_accuracy"], "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default=None)
    parser.add_argument("--num", type=int, default=1000)
    parser.add_argument("--nfe", default="5,10,20")
    parser.add_argument("--reference-steps", type=int, default=250)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_grad_enabled(False)

    run = trained_run(args.run)
    model = load_model(run)
    tokenizer = load_tokenizer(run)  # what decodes the model's output (pixels for the digits preset)
    cfg = _run_cfg(run)
    labels = class_labels(args.num, model.num_classes)
    nfes = [int(v) for v in args.nfe.split(",")]

    results = [dict(measure(model, tokenizer, labels, cfg, "ddpm", args.reference_steps, "default", {}), reference=True)]
    ref = results[0]
    print(f"reference: ddpm {args.reference_steps} steps: fd {ref['fd']:.1f}, accuracy {ref['class_accuracy']:.3f}", flush=True)
    for nfe in nfes:
        for sampler, grid, options in ROWS:
            if sampler not in SAMPLERS:
                continue
            row = measure(model, tokenizer, labels, cfg, sampler, nfe, grid, options)
            results.append(row)
            print(f"  nfe {row['nfe']:>3} {sampler:<15} {grid:<8} fd {row['fd']:7.1f}  acc {row['class_accuracy']:.3f}", flush=True)

    print()
    print(f"digits DiT ({run}), {args.num} samples, cfg {cfg}; reference ddpm {args.reference_steps}: "
          f"fd {ref['fd']:.1f}, class accuracy {ref['class_accuracy']:.3f}")
    print()
    header = "| sampler | grid | " + " | ".join(f"NFE {n}: fd / acc" for n in nfes) + " |"
    print(header)
    print("|" + "---|" * (2 + len(nfes)))
    for sampler, grid, options in ROWS:
        cells = []
        for nfe in nfes:
            match = [r for r in results[1:] if r["sampler"] == sampler and r["grid"] == grid and r["steps"] == nfe]
            cells.append(f"{match[0]['fd']:.1f} / {match[0]['class_accuracy']:.3f}" if match else "-")
        if any(c != "-" for c in cells):
            print(f"| {sampler} | {grid} | " + " | ".join(cells) + " |")
    print()
    for nfe in nfes:
        rows = [r for r in results[1:] if r["nfe"] <= nfe and r["steps"] == nfe]
        if rows:
            best = min(rows, key=lambda r: r["fd"])
            print(f"best at NFE {nfe}: {best['sampler']} ({best['grid']}) fd {best['fd']:.1f} = "
                  f"{best['fd'] / ref['fd']:.3f} x the ddpm-{args.reference_steps} fd")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


def _run_cfg(run: Path) -> float:
    from omegaconf import OmegaConf

    cfg_path = run / "config.yaml"
    return float(OmegaConf.load(cfg_path).sample.cfg) if cfg_path.is_file() else 1.0


if __name__ == "__main__":
    main()
