"""Timestep grids: descending times in the schedule's units, ending exactly at the data end.

A grid of length K + 1 means K model evaluations at grid[:-1]; grid[-1] is the clean end
(t = -1 for a discrete VP schedule, t = 0 for rectified flow). No time appears twice.
"""
from __future__ import annotations

from typing import Callable, Dict, List

import torch

from genvis.diffusion.schedules import DiscreteVPSchedule, Schedule


def space_timesteps(num_timesteps: int, count: int) -> List[int]:
    """DiT / improved-DDPM respacing: `count` steps evenly strided over 0..T-1, first and last kept.

    Kept with the official float accumulation, so the 250-step DiT grid is the official one.
    """
    if count == 1:
        return [0]
    if count > num_timesteps:
        raise ValueError(f"cannot take {count} steps out of {num_timesteps}")
    frac_stride = (num_timesteps - 1) / (count - 1)
    cur, taken = 0.0, []
    for _ in range(count):
        taken.append(round(cur))
        cur += frac_stride
    return sorted(set(taken))


def grid_default(schedule: Schedule, steps: int) -> torch.Tensor:
    """Discrete VP: the DiT respacing over 0..T-1 then the clean end; flow: uniform in t."""
    if isinstance(schedule, DiscreteVPSchedule):
        taken = space_timesteps(schedule.num_timesteps, steps)[::-1]
        return torch.tensor(taken + [schedule.data_end], dtype=torch.float64)
    return torch.linspace(schedule.noise_end, schedule.data_end, steps + 1, dtype=torch.float64)


def grid_linspace(schedule: Schedule, steps: int) -> torch.Tensor:
    """Uniform in time from the noise end to the data end (model evaluated at the noise end)."""
    if isinstance(schedule, DiscreteVPSchedule):
        t = torch.linspace(schedule.noise_end, 0, steps, dtype=torch.float64).round()
        return torch.cat([t, torch.tensor([schedule.data_end], dtype=torch.float64)])
    return torch.linspace(schedule.noise_end, schedule.data_end, steps + 1, dtype=torch.float64)


GRIDS: Dict[str, Callable[[Schedule, int], torch.Tensor]] = {
    "default": grid_default,
    "linspace": grid_linspace,
}


def make_grid(name: str, schedule: Schedule, steps: int) -> torch.Tensor:
    if name not in GRIDS:
        raise ValueError(f"unknown grid {name!r}; expected one of: {', '.join(GRIDS)}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    grid = GRIDS[name](schedule, steps)
    assert grid[-1] == schedule.data_end and bool((grid[:-1] > grid[1:]).all()), "grid must strictly descend to the data end"
    return grid
