"""What the solvers share: registration with metadata, noise drawing, step iteration, and the
schedule quantities at the grid points (float64).

Every solver is registered with `register_sampler(name, ...)`. Its keyword-only parameters after
the common ones (cond, generator, callback, progress) are its options: `genvis samplers` lists
them and `sample()` rejects any other name. `intervals(steps)` turns the user's `steps` (model
evaluations per sample) into the number of grid intervals the solver needs.
"""
from __future__ import annotations

import functools
import inspect
from typing import Callable, Dict, Sequence, Union

import torch
from tqdm.auto import tqdm

from genvis.registry import SAMPLERS

Generator = Union[None, torch.Generator, Sequence[torch.Generator]]
COMMON_ARGS = ("denoiser", "x", "grid", "cond", "generator", "callback", "progress")


def register_sampler(name: str, *, steps_doc: str = "model evaluations per sample", intervals: Callable[[int], int] = None,
                     stochastic: bool = False, fn: Callable = None, summary: str = None, choices: Dict[str, tuple] = None,
                     discrete_grid: str = None, minimum: Dict[str, float] = None, positive: tuple = (),
                     steps_per_interval: bool = True):
    """Register `fn` (or the decorated function) as sampler `name`.

    steps_doc: what `steps` means for it; intervals: steps -> grid intervals (identity by default);
    stochastic: whether it draws noise (uses `generator`); summary: one line for `genvis samplers`;
    choices: option -> allowed values, minimum: option -> smallest allowed value, positive: options
    that must be > 0; all three are checked by `sample()` before the first model call;
    discrete_grid: what grid "default" means on a discrete schedule, where genvis's own default is
    DiT's respacing (made for DDPM/DDIM; it ends with a long step from t = 111-ish to t = 0 that
    multistep extrapolation handles badly); steps_per_interval: whether the callback runs once per grid
    interval (False for adaptive solvers: progress bars then count without a total).
    """

    def decorator(f):
        meta = {
            "name": name,
            "steps_doc": steps_doc,
            "intervals": intervals or (lambda steps: steps),
            "stochastic": stochastic,
            "summary": summary or (inspect.getdoc(f) or "").split("\n")[0],
            "choices": dict(choices or {}),
            "discrete_grid": discrete_grid,
            "minimum": dict(minimum or {}),
            "positive": tuple(positive),
            "steps_per_interval": steps_per_interval,
        }
        # one function under several names (or a partial): give each name its own metadata holder
        wrapped = functools.partial(f) if hasattr(f, "sampler_meta") else f
        wrapped.sampler_meta = meta
        SAMPLERS.register(name)(wrapped)
        return f

    return decorator(fn) if fn is not None else decorator


def sampler_options(fn: Callable) -> Dict[str, object]:
    """A solver's own options and their defaults (keyword arguments beyond the common ones)."""
    sig = inspect.signature(fn)
    return {k: p.default for k, p in sig.parameters.items() if k not in COMMON_ARGS and p.kind is not p.VAR_KEYWORD}


def check_option_types(what: str, defaults: Dict[str, object], options: Dict[str, object]) -> None:
    """Each option's value must have its default's type (an int is accepted for a float; a None default
    takes any value, which the solver checks), so a typo fails before the first model call."""
    for key, value in options.items():
        default = defaults.get(key)
        if default is None:
            continue
        if isinstance(default, bool):
            ok, expected = isinstance(value, bool), "true or false"
        elif isinstance(default, (int, float)):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
                isinstance(value, int) or not isinstance(default, int))
            expected = "an integer" if isinstance(default, int) else "a number"
        else:
            ok, expected = isinstance(value, type(default)), f"a {type(default).__name__}"
        if not ok:
            raise ValueError(f"{what}: option {key}={value!r}; expected {expected} (default {default!r})")


def randn_like(x: torch.Tensor, generator: Generator = None) -> torch.Tensor:
    """Standard normal noise shaped like x. A list of generators gives sample i its own stream,
    so a sample's noise does not depend on which batch it is drawn in."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    if len(generator) != x.shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {x.shape[0]}")
    # drawn on each generator's own device (the per-sample streams are CPU generators), then moved
    return torch.stack([torch.randn(x.shape[1:], generator=g, dtype=x.dtype, device=g.device) for g in generator]).to(x.device)


def steps_of(grid: torch.Tensor, progress: bool, desc: str):
    """(i, t, t_next) over consecutive grid points, with an optional progress bar."""
    pairs = list(zip(range(len(grid) - 1), grid[:-1].tolist(), grid[1:].tolist()))
    return tqdm(pairs, desc=desc, leave=False) if progress else pairs


class GridTable:
    """alpha, sigma, lambda = log(alpha / sigma) at every grid point, float64 Python floats.

    lambda is -inf where alpha = 0 (flow's noise end) and +inf at the data end (sigma = 0).
    """

    def __init__(self, schedule, grid: torch.Tensor):
        g = torch.as_tensor(grid, dtype=torch.float64)
        alpha, sigma = schedule.alpha_sigma(g)
        self.t = g.tolist()
        self.alpha = alpha.tolist()
        self.sigma = sigma.tolist()
        self.lam = schedule.log_snr(g).tolist()

    def __len__(self) -> int:
        return len(self.t)
