"""Timestep-grid search (genvis.samplers.search) on Gaussian data, where the exact model and the
exact probability-flow solution are known in closed form (as in test_samplers_gaussian.py):
for x0 ~ N(M, S^2), E[x0 | x_t] = M + alpha S^2 (x_t - alpha M) / (alpha^2 S^2 + sigma^2) and the
PF-ODE maps x_T to M + S (x_T - alpha_T M) / sqrt(alpha_T^2 S^2 + sigma_T^2).
"""
import json

import pytest
import torch

from genvis.diffusion.schedules import make_schedule
from genvis.samplers import make_grid, sample
from genvis.samplers.grids import check_grid
from genvis.samplers.search import reference_error_score, save_grid_json, search_grid

from gaussian_data import exact_model, exact_solution

NAMED = ("default", "logsnr", "karras", "uniform")


class Recording:
    """A score function that remembers every grid it was asked to score."""

    def __init__(self, fn):
        self.fn, self.grids = fn, []

    def __call__(self, grid):
        self.grids.append(grid.clone())
        return self.fn(grid)


def problem(schedule_name, prediction, sampler, n=512):
    schedule = make_schedule(schedule_name)
    noise = torch.randn(n, 1, generator=torch.Generator().manual_seed(0))
    model = exact_model(schedule, prediction)
    score = reference_error_score(model, schedule, prediction, sampler, noise, exact_solution(schedule, noise))
    return schedule, model, noise, score


def assert_valid(grid, schedule, steps):
    assert grid.dtype == torch.float64 and len(grid) == steps + 1
    assert torch.equal(check_grid(grid, schedule), grid)
    assert float(grid[0]) == schedule.noise_end and float(grid[-1]) == schedule.data_end
    assert bool((grid[1:-1] >= schedule.t_min).all())
    if schedule.discrete:
        assert torch.equal(grid, grid.round())


def test_search_beats_every_named_grid_ddim_4_steps():
    schedule, model, noise, score = problem("linear", "eps", "ddim")
    recording = Recording(score)
    best, best_score, history = search_grid(recording, schedule, 4, seed=0)
    named = {name: score(make_grid(name, schedule, 4)) for name in NAMED}
    # the score is the RMS error against the closed-form solution, recomputed here by hand
    out = sample(model, noise, sampler="ddim", steps=4, schedule=schedule, prediction="eps", grid=best)
    rms = (out.double() - exact_solution(schedule, noise)).pow(2).mean().sqrt().item()
    assert best_score == pytest.approx(rms, rel=1e-9)
    assert best_score < 0.75 * min(named.values()), (best.tolist(), best_score, named)
    assert_valid(best, schedule, 4)
    for grid in recording.grids:
        assert_valid(grid, schedule, 4)
    keys = [tuple(g.tolist()) for g in recording.grids]
    assert len(keys) == len(set(keys)), "a grid was scored twice"
    assert [h["generation"] for h in history] == list(range(11))
    assert history[-1]["evaluations"] == len(keys) and history[-1]["best_grid"] == best.tolist()
    bests = [h["best_score"] for h in history]
    assert all(a >= b for a, b in zip(bests, bests[1:])) and bests[-1] == best_score
    # the first population holds the named grids (default and uniform are integer grids already)
    assert bests[0] <= min(named["default"], named["uniform"])


def test_search_is_deterministic_for_a_seed():
    schedule, _, _, score = problem("linear", "eps", "ddim", n=64)
    runs = [search_grid(score, schedule, 4, population=8, generations=4, seed=s) for s in (3, 3, 4)]
    (g1, s1, h1), (g2, s2, h2), (g3, _, h3) = runs
    assert torch.equal(g1, g2) and s1 == s2 and h1 == h2
    assert_valid(g3, schedule, 4)
    assert [h["best_grid"] for h in h1] != [h["best_grid"] for h in h3]  # the seed matters


def test_search_on_a_continuous_schedule_uses_float_times():
    schedule, _, _, score = problem("flow", "velocity", "euler", n=128)
    recording = Recording(score)
    best, best_score, _ = search_grid(recording, schedule, 3, population=8, generations=5, seed=0)
    for grid in recording.grids:
        assert_valid(grid, schedule, 3)
    assert any(not float(t).is_integer() for g in recording.grids for t in g[1:-1])
    assert best_score < min(score(make_grid(name, schedule, 3)) for name in NAMED)


def test_one_step_has_a_single_candidate():
    schedule, _, _, score = problem("linear", "eps", "ddim", n=16)
    best, best_score, history = search_grid(score, schedule, 1)
    assert best.tolist() == [999.0, -1.0] and history[-1]["evaluations"] == 1
    assert best_score == score(best)


def test_saved_grid_round_trips_through_make_grid(tmp_path):
    schedule = make_schedule("linear")
    grid = torch.tensor([999.0, 333.0, 170.0, 73.0, -1.0], dtype=torch.float64)
    path = tmp_path / "ddim4.json"
    save_grid_json(path, grid, schedule, {"sampler": "ddim", "score": 0.129})
    data = json.loads(path.read_text())
    assert data == {"timesteps": grid.tolist(), "schedule": "linear", "steps": 4, "sampler": "ddim", "score": 0.129}
    assert torch.equal(make_grid(str(path), schedule, 4), grid)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddim4.json"]  # no temporary file left behind
    with pytest.raises(ValueError, match="schedule"):
        make_grid(str(path), make_schedule("cosine"), 4)
    with pytest.raises(ValueError, match="meta may not set steps"):
        save_grid_json(path, grid, schedule, {"steps": 3})
    with pytest.raises(ValueError, match="strictly decrease"):
        save_grid_json(path, [999.0, 999.0, -1.0], schedule)
