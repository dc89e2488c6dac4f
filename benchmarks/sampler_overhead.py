"""Sampler cost per step, without the network: genvis vs the same diffusers scheduler, same run.

    python benchmarks/sampler_overhead.py [--batch 16] [--steps 50] [--repeats 7]

The "network" is a near-free eps function (0.1 x), so the time is the solver's own arithmetic and
bookkeeping on DiT-XL/2's 4x32x32 latents. genvis runs through `genvis.samplers.sample` (grid
building, the prediction conversion, the update); diffusers through its scheduler loop
(set_timesteps, scale_model_input, step). Timing rounds are interleaved; the best of --repeats is kept.
"""
from __future__ import annotations

import argparse
import logging
import time
import warnings

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, UniPCMultistepScheduler

from genvis.samplers import sample

BETAS = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
PAIRS = [  # (genvis sampler, grid, diffusers scheduler built on the same timesteps' spacing)
    ("ddim", "leading", lambda: DDIMScheduler(**BETAS, clip_sample=False, timestep_spacing="leading")),
    ("dpmpp-2m", "logsnr", lambda: DPMSolverMultistepScheduler(**BETAS, use_lu_lambdas=True)),
    ("unipc", "logsnr", lambda: UniPCMultistepScheduler(**BETAS)),
    ("euler", "linspace", lambda: EulerDiscreteScheduler(**BETAS)),
]


def model(x, t, **_):
    return 0.1 * x


def run_genvis(name, grid, noise, steps):
    sample(model, noise, sampler=name, steps=steps, schedule="linear", prediction="eps", grid=grid)


def run_diffusers(make, noise, steps):
    sched = make()
    sched.set_timesteps(steps)
    x = noise * sched.init_noise_sigma
    for t in sched.timesteps:
        x = sched.step(model(sched.scale_model_input(x, t), t), t, x).prev_sample


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    torch.set_grad_enabled(False)
    noise = torch.randn(args.batch, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    print(f"batch {args.batch} x 4x32x32, {args.steps} steps, microseconds per step (best of {args.repeats})\n")
    print("| sampler | genvis us/step | diffusers us/step | diffusers / genvis |")
    print("|---|---|---|---|")
    for name, grid, make in PAIRS:
        best = {"genvis": float("inf"), "diffusers": float("inf")}
        for _ in range(args.repeats):
            for who, fn in (("genvis", lambda: run_genvis(name, grid, noise, args.steps)),
                            ("diffusers", lambda: run_diffusers(make, noise, args.steps))):
                t0 = time.perf_counter()
                fn()
                best[who] = min(best[who], time.perf_counter() - t0)
        g, d = (best[k] / args.steps * 1e6 for k in ("genvis", "diffusers"))
        print(f"| {name} ({grid}) vs {make().__class__.__name__} | {g:.0f} | {d:.0f} | {d / g:.2f} |")


if __name__ == "__main__":
    main()
