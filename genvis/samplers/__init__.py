"""Samplers: every ODE/SDE solver is a plain function with one signature (k-diffusion style),

    sample_<name>(denoiser, x, grid, *, cond=None, generator=None, callback=None, progress=False, **options) -> x0

where `denoiser(x, t, **cond)` returns the data prediction for schedule time t and `grid` is a
descending timestep grid ending at the data end (genvis.samplers.grids). Guidance wraps the model
function (genvis.samplers.guidance), so every sampler gets it for free.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from genvis.diffusion.predictions import Denoiser
from genvis.diffusion.schedules import Schedule, make_schedule
from genvis.registry import SAMPLERS
from genvis.samplers import ddim, ddpm, euler  # noqa: F401  (register the solvers)
from genvis.samplers.grids import GRIDS, make_grid


def get_sampler(name: str) -> Callable:
    try:
        return SAMPLERS.get(name)
    except KeyError as err:
        raise ValueError(err.args[0]) from None


def sample(
    model_fn: Callable,
    noise: torch.Tensor,
    *,
    sampler: str,
    steps: int,
    schedule,
    prediction: str,
    grid="default",
    learn_sigma: bool = False,
    cond: Optional[dict] = None,
    generator=None,
    progress: bool = False,
    **options,
) -> torch.Tensor:
    """Run `sampler` for `steps` model evaluations from `noise`; returns the data end x0.

    model_fn(x, t, **cond) gets t in the schedule's own units (0..999 for "linear", [0, 1] with
    t = 1 noise for "flow") and returns the native prediction of type `prediction`.
    `grid` is a grid name or an explicit descending tensor of times ending at the data end.
    """
    if not isinstance(schedule, Schedule):
        schedule = make_schedule(schedule)
    fn = get_sampler(sampler)
    if isinstance(grid, str):
        grid = make_grid(grid, schedule, steps)
    denoiser = Denoiser(model_fn, schedule, prediction, learn_sigma=learn_sigma)
    return fn(denoiser, noise, torch.as_tensor(grid, dtype=torch.float64), cond=cond, generator=generator, progress=progress, **options)


__all__ = ["sample", "get_sampler", "make_grid", "GRIDS", "SAMPLERS"]
