"""Sampling acceleration by model wrappers: every sampler gets them, like guidance.

- T-Stitch (Pan et al. 2024, "T-Stitch: Accelerating Sampling in Pre-Trained Diffusion Models
  with Trajectory Stitching"): a small model takes the first, high-noise part of the trajectory
  and a large model the rest. Both must share the latent space, time units and prediction type.
- DiT step caching (in the spirit of DeepCache, Ma et al. 2024, and Delta-DiT, Chen et al. 2024):
  the deep blocks of a DiT change slowly between neighbouring sampling steps, so their residual
  r = h_L - h_k (hidden state after all L blocks minus after the first k) is computed on refresh
  calls only and reused on the calls in between, which run just the first k blocks:

      full call:    h_k = B_{1..k}(embed(x, t, y)),  r = B_{k+1..L}(h_k) - h_k,  out = head(h_k + r)
      cached call:  h_k = B_{1..k}(embed(x, t, y)),  out = head(h_k + r_stored)

Both wrap a model function model_fn(x, t, **cond) that sees the times the Denoiser passes it
(`Schedule.to_model_time` of the schedule time: the identity, except for SiT-time networks, schedule "sit",
which count the other way; T-Stitch is told the schedule and switches at the same point of the path).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch


class TStitch:
    """model_fn(x, t, **cond) calling `small_fn` where t > switch_time (t < switch_time for networks whose time runs
    from noise to data, `reversed`) and `large_fn` elsewhere.

    Every sample of a batch must fall on the same side of the switch (samplers call the model
    with one time per step). `small_calls` / `large_calls` count the calls to each model.
    """

    def __init__(self, small_fn: Callable, large_fn: Callable, switch_time: float, reversed: bool = False):
        self.small_fn = small_fn
        self.large_fn = large_fn
        self.switch_time = float(switch_time)
        self.reversed = reversed
        self.small_calls = 0
        self.large_calls = 0

    def uses_small(self, t: torch.Tensor) -> bool:
        """Whether time(s) t go to the small model (the threshold is compared in t's own dtype, so
        a grid time passed as float32 lands on the same side as in float64)."""
        t = torch.as_tensor(t)
        switch = torch.tensor(self.switch_time, dtype=t.dtype if t.is_floating_point() else torch.float64)
        above = t < switch if self.reversed else t > switch
        if bool(above.all()):
            return True
        if not bool(above.any()):
            return False
        raise ValueError(f"T-Stitch: one batch holds times on both sides of the switch time {self.switch_time:g}")

    def __call__(self, x: torch.Tensor, t: torch.Tensor, *args, **cond) -> torch.Tensor:
        if self.uses_small(t):
            self.small_calls += 1
            return self.small_fn(x, t, *args, **cond)
        self.large_calls += 1
        return self.large_fn(x, t, *args, **cond)


def tstitch(small_fn: Callable, large_fn: Callable, grid, fraction: float = 0.4, schedule=None) -> TStitch:
    """T-Stitch on a K-interval grid: the small model runs the first n = round(fraction * K) steps
    (rounded half up), the large model the remaining K - n.

    Step i goes from grid[i] to grid[i+1], so the switch time is grid[n]: the small model answers
    every call with t > grid[n] (the grid times grid[0..n-1] and every intermediate evaluation of a
    multi-stage solver inside those steps), the large model every call with t <= grid[n]. fraction 0
    is the large model alone, fraction 1 the small model alone. `grid` is a genvis grid (descending,
    ending at the data end), the one the sampler will be run on; `schedule` (when given) converts the switch
    to the networks' own time (`to_model_time`), which SiT-time networks count the other way.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"T-Stitch fraction must lie in [0, 1], got {fraction}")
    grid = torch.as_tensor(grid, dtype=torch.float64).flatten()
    if len(grid) < 2:
        raise ValueError("T-Stitch needs a grid with at least one step")
    steps = len(grid) - 1
    n_small = math.floor(fraction * steps + 0.5)
    switch = grid[n_small]
    if schedule is None:
        return TStitch(small_fn, large_fn, float(switch))
    ends = schedule.to_model_time(torch.tensor([schedule.data_end, schedule.noise_end], dtype=torch.float64))
    return TStitch(small_fn, large_fn, float(schedule.to_model_time(switch)), reversed=bool(ends[1] < ends[0]))


class DiTStepCache:
    """model_fn(x, t, y) around a genvis DiT that reuses the deep blocks' residual between refreshes.

    Args:
        model: a genvis.models.dit.DiT (anything with embed / run_blocks / head and `blocks`).
        refresh: a full call every `refresh` calls (counted from the last full call); refresh = 1
            runs the full model every time and is exact.
        keep_blocks: k, the blocks always recomputed (0 <= k < depth); blocks k..depth-1 are cached.

    A full call also happens whenever the input shape differs from the stored residual's call (e.g.
    a guidance interval switching between one and two model batches) and whenever t is larger than
    at the previous call (a new sampling run starting at the noise end, or a solver stepping back
    up in time), so one wrapper can serve consecutive runs. `full_calls` / `cached_calls` count the
    calls (`reset()` zeroes them and drops the residual); `block_fraction` is the share of block
    evaluations actually run compared with the uncached model.
    """

    def __init__(self, model, refresh: int = 2, keep_blocks: int = 2):
        depth = len(model.blocks)
        if refresh < 1:
            raise ValueError(f"refresh must be >= 1, got {refresh}")
        if not 0 <= keep_blocks < depth:
            raise ValueError(f"keep_blocks must lie in [0, {depth - 1}] for a {depth}-block DiT, got {keep_blocks}")
        self.model = model
        self.refresh = refresh
        self.keep_blocks = keep_blocks
        self.depth = depth
        self.reset()

    def reset(self) -> None:
        """Forget the stored residual and zero the counters."""
        self.residual: Optional[torch.Tensor] = None
        self.shape: Optional[torch.Size] = None
        self.last_t = math.inf
        self.since_refresh = 0
        self.full_calls = 0
        self.cached_calls = 0

    @property
    def block_fraction(self) -> float:
        """(full * depth + cached * keep_blocks) / ((full + cached) * depth)."""
        calls = self.full_calls + self.cached_calls
        if calls == 0:
            return 1.0
        run = self.full_calls * self.depth + self.cached_calls * self.keep_blocks
        return run / (calls * self.depth)

    def _needs_refresh(self, x: torch.Tensor, t: float) -> bool:
        return (self.residual is None or x.shape != self.shape or t > self.last_t
                or self.since_refresh + 1 >= self.refresh)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h, c = self.model.embed(x, t, y)
        h = self.model.run_blocks(h, c, 0, self.keep_blocks)
        t_max = float(torch.as_tensor(t).max())
        refresh = self._needs_refresh(x, t_max)
        self.last_t = t_max
        if refresh:
            deep = self.model.run_blocks(h, c, self.keep_blocks, self.depth)
            self.residual = deep - h
            self.shape = x.shape
            self.since_refresh = 0
            self.full_calls += 1
            return self.model.head(deep, c)
        self.since_refresh += 1
        self.cached_calls += 1
        return self.model.head(h + self.residual, c)
