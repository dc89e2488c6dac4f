"""Timestep-grid search by evolution (AutoDiffusion, Li et al. 2023, the time-step part).

A candidate is a valid genvis grid with `steps` model-evaluation times:

    grid = [noise_end, t_1, ..., t_{steps-1}, data_end],   noise_end > t_1 > ... > t_{steps-1} >= t_min,

integer times on discrete schedules (the steps the model was trained on), floats otherwise. Only
the interior times t_1..t_{steps-1} are searched. A score function maps a grid to a number, lower
is better; `reference_error_score` builds the usual one, the RMS distance of a sampler's output on
that grid from a reference solution of the same noise.

Evolution (truncation selection with elitism): the initial population holds the named grids
(projected onto the candidates) and mutations of them; each generation keeps the `elite` best and
fills the population with children, each either a crossover of two elite parents (the sorted
union of their interior times, of which steps-1 are chosen at random) or a mutation of one (one
interior time t_i redrawn uniformly from [t_i - m (t_i - t_{i+1}), t_i + m (t_{i-1} - t_i)],
m = `mutation`, excluding the neighbours and t_i itself). Duplicates are dropped, every grid is
scored once (scores are cached) and the run is a deterministic function of `seed`.
"""
from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from genvis.diffusion.schedules import Schedule
from genvis.samplers import sample
from genvis.samplers.grids import check_grid, make_grid
from genvis.io import write_json_atomic

Grid = Tuple[float, ...]  # interior times only, descending


class _Space:
    """The candidate grids of one schedule and step count: interior times in [lo, hi), descending."""

    def __init__(self, schedule: Schedule, steps: int):
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self.schedule = schedule
        self.steps = steps
        self.integer = schedule.discrete
        self.hi = float(schedule.noise_end)  # exclusive: grid[0] is the noise end itself
        self.lo = float(schedule.t_min)  # inclusive
        if self.integer and self.hi - self.lo < steps - 1:
            raise ValueError(f"cannot place {steps - 1} distinct integer times in [{self.lo:g}, {self.hi:g})")

    def full(self, interior: Grid) -> torch.Tensor:
        return torch.tensor([self.hi, *interior, self.schedule.data_end], dtype=torch.float64)

    def project(self, grid: torch.Tensor) -> Optional[Grid]:
        """A named grid's interior times, rounded on discrete schedules and clipped into [lo, hi);
        None when that leaves repeated times."""
        values = grid[1:-1].tolist()
        if self.integer:
            values = [float(round(v)) for v in values]
            top = self.hi - 1
        else:
            top = math.nextafter(self.hi, -math.inf)
        values = [min(max(v, self.lo), top) for v in values]
        if len(values) != self.steps - 1 or any(a <= b for a, b in zip(values, values[1:])):
            return None
        return tuple(values)

    def mutate(self, interior: Grid, strength: float, rng: random.Random) -> Grid:
        """One interior time redrawn within its (scaled) neighbour interval; unchanged when none can move."""
        order = list(range(len(interior)))
        rng.shuffle(order)
        for i in order:
            t = interior[i]
            prev = interior[i - 1] if i > 0 else self.hi  # exclusive bounds
            nxt = interior[i + 1] if i + 1 < len(interior) else None
            lower = t - strength * (t - (self.lo if nxt is None else nxt))
            upper = t + strength * (prev - t)
            if self.integer:
                first = max(math.ceil(lower), int(self.lo) if nxt is None else int(nxt) + 1)
                last = min(math.floor(upper), int(prev) - 1)
                choices = [v for v in range(first, last + 1) if v != t]
                if not choices:
                    continue
                new = float(rng.choice(choices))
            else:
                new = lower + (upper - lower) * rng.random()
                if new == t or new >= prev or (nxt is not None and new <= nxt) or new < self.lo:
                    continue
            return interior[:i] + (new,) + interior[i + 1:]
        return interior

    def crossover(self, a: Grid, b: Grid, rng: random.Random) -> Grid:
        """steps-1 times chosen at random from the union of both parents' interior times."""
        pool = sorted(set(a) | set(b), reverse=True)
        return tuple(sorted(rng.sample(pool, len(a)), reverse=True))


def search_grid(
    score_fn: Callable[[torch.Tensor], float],
    schedule: Schedule,
    steps: int,
    *,
    population: int = 16,
    generations: int = 10,
    elite: int = 4,
    mutation: float = 0.5,
    seed: int = 0,
    init: Sequence[str] = ("default", "logsnr", "karras", "uniform"),
) -> Tuple[torch.Tensor, float, List[Dict]]:
    """Evolve timestep grids of `steps` intervals to minimise `score_fn(grid) -> float`.

    Args:
        score_fn: grid (float64 tensor of steps + 1 times, a valid genvis grid) -> score, lower is
            better; NaN counts as +inf.
        schedule: the noise schedule the grids are for; steps: grid intervals (model-evaluation times).
        population: candidates per generation; generations: rounds after the initial population.
        elite: the best candidates kept each generation (and the parents of the children).
        mutation: m in (0, 1], how far a mutation may move a time, as a fraction of the gap to
            each neighbour (1: anywhere between them).
        seed: the random seed; init: the named grids (genvis.samplers.grids) seeding the population.

    Returns (best_grid, best_score, history): history has one entry per generation (0 = initial
    population) with "generation", "best_score", "best_grid" (a list) and "evaluations" (score_fn
    calls so far).
    """
    if population < 2 or not 1 <= elite < population:
        raise ValueError(f"need population >= 2 and 1 <= elite < population, got population={population}, elite={elite}")
    if not 0.0 < mutation <= 1.0:
        raise ValueError(f"mutation must lie in (0, 1], got {mutation}")
    space = _Space(schedule, steps)
    rng = random.Random(seed)
    scores: Dict[Grid, float] = {}

    def score(interior: Grid) -> float:
        if interior not in scores:
            value = float(score_fn(space.full(interior)))
            scores[interior] = math.inf if math.isnan(value) else value
        return scores[interior]

    def fill(members: List[Grid], make: Callable[[], Grid]) -> List[Grid]:
        # stops early when the candidate space has too few distinct grids left
        for _ in range(50 * population):
            if len(members) >= population:
                break
            child = make()
            if child not in members:
                members.append(child)
        return members

    seeds: List[Grid] = []
    for name in init:
        projected = space.project(make_grid(name, schedule, steps))
        if projected is not None and projected not in seeds:
            seeds.append(projected)
    if not seeds:
        raise ValueError(f"none of the grids {list(init)} gives a valid candidate for {steps} steps on {schedule.name!r}")
    members = fill(list(seeds[:population]), lambda: space.mutate(rng.choice(seeds), mutation, rng))

    def ranked(pool: List[Grid]) -> List[Grid]:
        return sorted(pool, key=lambda g: (score(g), g))  # the grid itself breaks ties deterministically

    members = ranked(members)
    history = []

    def record(generation: int) -> None:
        best = members[0]
        history.append({"generation": generation, "best_score": score(best), "best_grid": space.full(best).tolist(),
                        "evaluations": len(scores)})

    record(0)
    for generation in range(1, generations + 1):
        parents = members[:elite]

        def child() -> Grid:
            if len(parents) > 1 and rng.random() < 0.5:
                a, b = rng.sample(parents, 2)
                return space.crossover(a, b, rng)
            return space.mutate(rng.choice(parents), mutation, rng)

        members = ranked(fill(list(parents), child))
        record(generation)
    best = members[0]
    return space.full(best), score(best), history


def rms_score(run: Callable[[torch.Tensor], torch.Tensor], reference: torch.Tensor) -> Callable[[torch.Tensor], float]:
    """score_fn(grid) = sqrt(mean((run(grid) - reference)^2)): `run` samples on a grid (from the same
    noise as `reference`, e.g. a tight rk45 solution or a closed form)."""
    def score_fn(grid: torch.Tensor) -> float:
        return float(torch.sqrt(torch.mean((run(grid).double() - reference.double()) ** 2)))

    return score_fn


def reference_error_score(model_fn: Callable, schedule: Schedule, prediction: str, sampler: str, noise: torch.Tensor,
                          reference: torch.Tensor, **opts) -> Callable[[torch.Tensor], float]:
    """rms_score of `sample(model_fn, noise, sampler=sampler, grid=grid, ...)`; opts go to
    genvis.samplers.sample (cfg, cond, null_label, learn_sigma, sampler options)."""
    return rms_score(lambda grid: sample(model_fn, noise, sampler=sampler, steps=len(grid) - 1, schedule=schedule,
                                         prediction=prediction, grid=grid, **opts), reference)


def save_grid_json(path, grid, schedule: Schedule, meta: Optional[dict] = None) -> None:
    """Write {"timesteps": [...], "schedule": name, "steps": n, **meta} (e.g. sampler, score)
    atomically; `make_grid(path, schedule, n)` loads it back."""
    grid = check_grid(grid, schedule)
    meta = dict(meta or {})
    clash = sorted({"timesteps", "schedule", "steps"} & set(meta))
    if clash:
        raise ValueError(f"meta may not set {', '.join(clash)}")
    write_json_atomic(Path(path), {"timesteps": grid.tolist(), "schedule": schedule.name, "steps": len(grid) - 1, **meta})
