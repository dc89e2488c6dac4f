"""Timestep grids: descending times in the schedule's units, ending exactly at the data end.

A grid of length K + 1 means K steps with the model evaluated at grid[:-1]; grid[-1] is the
clean end (t = -1 for a discrete VP schedule, t = 0 for the continuous ones). No time appears
twice, and nothing is rounded: Karras and logSNR grids on a discrete schedule give fractional
steps (the schedule interpolates log alpha_bar), where diffusers rounds and can repeat a step.

Grids are written against `log_snr` / `t_of_log_snr`, so each one works with every schedule:

    default    discrete VP: DiT's respacing; flow: uniform in t after the schedule's shift;
               EDM: Karras (rho 7); continuous VP: uniform in t
    trailing   diffusers' "trailing" spacing (discrete: 999, 899, ...); continuous: uniform in t
    linspace   diffusers' "linspace": round(linspace(T-1, 0, K)); continuous: uniform in t
    leading    diffusers' "leading": (K-1, ..., 0) * (T // K) (discrete schedules only)
    uniform    uniform in t from the noise end, no rounding
    logsnr     uniform in lambda = log(alpha / sigma) (DPM-Solver's "logSNR" grid)
    karras     Karras et al. 2022: sigma/alpha uniform in the rho-th root (option rho, default 7)
    shift      uniform in the flow-equivalent time tau = sigma / (alpha + sigma), then
               tau' = s tau / (1 + (s - 1) tau) (option shift, default the schedule's or 3)

A grid can also be an explicit list of times (the data end is appended when missing), a string
"999,500,200,0", or a JSON file: a list, or {"timesteps": [...], "schedule": name}.
"""
from __future__ import annotations

import inspect
import json
import math
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch

from genvis.diffusion.schedules import DiscreteVPSchedule, Schedule, f64, flow_shift
from genvis.samplers.common import check_option_types


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


def _close(schedule: Schedule, evals) -> torch.Tensor:
    """Model-evaluation times + the data end."""
    return torch.cat([f64(evals).flatten(), f64([schedule.data_end])])


def _discrete(schedule: Schedule, steps: int, name: str) -> DiscreteVPSchedule:
    if not isinstance(schedule, DiscreteVPSchedule):
        raise ValueError(f"grid {name!r} is defined for discrete schedules only; {schedule.name!r} is continuous "
                         "(use uniform, logsnr, karras or shift)")
    if steps > schedule.num_timesteps:
        raise ValueError(f"grid {name!r}: cannot take {steps} steps out of {schedule.num_timesteps}")
    return schedule


def grid_uniform(schedule: Schedule, steps: int) -> torch.Tensor:
    """Uniform in t from the noise end to the data end, no rounding."""
    return torch.linspace(schedule.noise_end, schedule.data_end, steps + 1, dtype=torch.float64)


def grid_trailing(schedule: Schedule, steps: int) -> torch.Tensor:
    """diffusers "trailing": round(T - i T / K) - 1 (999, 899, ...); continuous: uniform."""
    if not schedule.discrete:
        return grid_uniform(schedule, steps)
    s = _discrete(schedule, steps, "trailing")
    T = s.num_timesteps
    return _close(s, (torch.arange(T, 0, -T / steps, dtype=torch.float64).round() - 1)[:steps])


def grid_linspace(schedule: Schedule, steps: int) -> torch.Tensor:
    """diffusers "linspace": round(linspace(T - 1, 0, K)); continuous: uniform."""
    if not schedule.discrete:
        return grid_uniform(schedule, steps)
    s = _discrete(schedule, steps, "linspace")
    return _close(s, torch.linspace(s.noise_end, 0, steps, dtype=torch.float64).round())


def grid_leading(schedule: Schedule, steps: int) -> torch.Tensor:
    """diffusers "leading": (K - 1, ..., 0) * (T // K) (discrete schedules only)."""
    s = _discrete(schedule, steps, "leading")
    ratio = s.num_timesteps // steps
    return _close(s, (torch.arange(steps - 1, -1, -1, dtype=torch.float64) * ratio))


def grid_default(schedule: Schedule, steps: int) -> torch.Tensor:
    """Discrete VP: DiT's respacing; flow: uniform after the schedule's shift; EDM: Karras; else uniform."""
    if isinstance(schedule, DiscreteVPSchedule):
        s = _discrete(schedule, steps, "default")
        if steps == 1:  # the respacing keeps only t = 0, which would evaluate pure noise as if nearly clean
            return _close(s, [s.noise_end])
        return _close(s, space_timesteps(s.num_timesteps, steps)[::-1])
    if schedule.is_flow:
        return flow_shift(grid_uniform(schedule, steps), schedule.shift)
    if schedule.name == "edm":
        return grid_karras(schedule, steps)
    return grid_uniform(schedule, steps)


def _log_snr_range(schedule: Schedule, steps: int):
    """(head, lambda_lo, lambda_hi, count): the grid is `head` (the noise end, when its log-SNR is
    -inf) followed by `count` points spread over [lambda_lo, lambda_hi], the last at t_min."""
    lam_hi = float(schedule.log_snr(f64(schedule.t_min)))
    lam_lo = float(schedule.log_snr(f64(schedule.noise_end)))
    if math.isfinite(lam_lo):
        return [], lam_lo, lam_hi, steps
    # alpha = 0 at the noise end (flow): keep that point, then start at the mirror of t_min's log-SNR
    return [schedule.noise_end], -lam_hi, lam_hi, steps - 1


def grid_logsnr(schedule: Schedule, steps: int) -> torch.Tensor:
    """Uniform in lambda = log(alpha / sigma) down to t_min (DPM-Solver)."""
    head, lo, hi, n = _log_snr_range(schedule, steps)
    lam = torch.linspace(lo, hi, n, dtype=torch.float64) if n > 1 else f64([lo] * n)
    return _close(schedule, torch.cat([f64(head), schedule.t_of_log_snr(lam)]))


def grid_karras(schedule: Schedule, steps: int, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. 2022: sigma / alpha uniform in its 1/rho power down to t_min."""
    if not rho > 0:
        raise ValueError(f"grid 'karras': rho must be > 0, got {rho}")
    head, lo, hi, n = _log_snr_range(schedule, steps)
    s_max, s_min = math.exp(-lo), math.exp(-hi)  # sigma / alpha
    ramp = torch.linspace(0, 1, n, dtype=torch.float64) if n > 1 else torch.zeros(n, dtype=torch.float64)
    sig = (s_max ** (1 / rho) + ramp * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
    return _close(schedule, torch.cat([f64(head), schedule.t_of_log_snr(-torch.log(sig))]))


def grid_shift(schedule: Schedule, steps: int, shift: Optional[float] = None) -> torch.Tensor:
    """Uniform flow-equivalent time tau, warped tau' = s tau / (1 + (s - 1) tau) (default s: the schedule's, else 3)."""
    if shift is None:
        shift = schedule.shift if schedule.is_flow and schedule.shift != 1.0 else 3.0
    if isinstance(shift, bool) or not isinstance(shift, (int, float)) or shift <= 0:
        raise ValueError(f"grid 'shift': shift must be > 0, got {shift}")
    if schedule.is_flow:
        return flow_shift(grid_uniform(schedule, steps), shift)
    # the same warp on the flow-equivalent time tau = sigma / (alpha + sigma) = sigmoid(-lambda), normalised
    # to u in [0, 1] over [tau(t_min), tau(noise_end)] so both ends stay where they are
    lam_end = schedule.log_snr(f64([schedule.noise_end, schedule.t_min]))
    tau_hi, tau_lo = torch.sigmoid(-lam_end).tolist()
    u = flow_shift(torch.linspace(1, 0, steps, dtype=torch.float64), shift) if steps > 1 else f64([1.0])
    tau = tau_lo + u * (tau_hi - tau_lo)
    t = schedule.t_of_log_snr(torch.log1p(-tau) - torch.log(tau))
    t[0] = schedule.noise_end  # exact, not through the round trip
    if steps > 1:
        t[-1] = schedule.t_min
    return _close(schedule, t)


GRIDS: Dict[str, Callable[..., torch.Tensor]] = {
    "default": grid_default,
    "trailing": grid_trailing,
    "linspace": grid_linspace,
    "leading": grid_leading,
    "uniform": grid_uniform,
    "logsnr": grid_logsnr,
    "karras": grid_karras,
    "shift": grid_shift,
}

GridSpec = Union[str, Sequence[float], torch.Tensor]


def load_grid_file(path, schedule: Optional[Schedule] = None) -> torch.Tensor:
    """A grid JSON file: a list of times, or {"timesteps": [...], "schedule": name, ...}."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"grid file {path}: cannot read it as JSON ({err})") from None
    if isinstance(data, dict):
        if "timesteps" not in data:
            raise ValueError(f"grid file {path}: expected a list of times or an object with key 'timesteps'")
        want = data.get("schedule")
        if want is not None and schedule is not None and want != schedule.name:
            raise ValueError(f"grid file {path}: written for schedule {want!r}, but the model's schedule is {schedule.name!r}")
        data = data["timesteps"]
    if not isinstance(data, list) or not all(isinstance(v, (int, float)) for v in data):
        raise ValueError(f"grid file {path}: 'timesteps' must be a list of numbers")
    return f64(data)


def check_grid(grid, schedule: Schedule, what: str = "grid") -> torch.Tensor:
    """Validate an explicit grid: strictly descending, inside [data_end, noise_end]; appends the data end."""
    grid = f64(grid).flatten()
    if len(grid) == 0:
        raise ValueError(f"{what}: empty")
    if float(grid[-1]) != schedule.data_end:
        grid = torch.cat([grid, f64([schedule.data_end])])
    if len(grid) < 2:
        raise ValueError(f"{what}: needs at least one time before the data end {schedule.data_end:g}")
    if not bool((grid[:-1] > grid[1:]).all()):
        raise ValueError(f"{what}: times must strictly decrease (no repeats), got {grid.tolist()}")
    if float(grid[0]) > schedule.noise_end + 1e-9 or float(grid[-1]) < schedule.data_end:
        raise ValueError(f"{what}: times must lie in [{schedule.data_end:g}, {schedule.noise_end:g}] for schedule "
                         f"{schedule.name!r}, got {grid[0].item():g}..{grid[-1].item():g}")
    return grid


def grid_options(fn: Callable) -> Dict[str, object]:
    """A named grid's own options and their defaults (the parameters after schedule and steps)."""
    return {p.name: p.default for p in list(inspect.signature(fn).parameters.values())[2:]}


def parse_grid_spec(spec: GridSpec, **options):
    """Check a grid spec without a schedule: ("name", fn) for a named grid (its options checked),
    ("file", path) for a JSON file, ("times", [t, ...]) for "t1,t2,..." or a list / tensor. Raises
    ValueError naming what is wrong. make_grid and the sampling options both go through it."""
    if isinstance(spec, str) and spec in GRIDS:
        fn = GRIDS[spec]
        accepted = grid_options(fn)
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            raise ValueError(f"grid {spec!r}: unknown option(s) {', '.join(unknown)}; "
                             f"it takes: {', '.join(accepted) or 'no options'}")
        check_option_types(f"grid {spec!r}", accepted, options)
        return "name", fn
    if options:
        raise ValueError(f"grid options {sorted(options)} apply to named grids only")
    if isinstance(spec, str):
        if spec.endswith(".json"):
            if not Path(spec).is_file():
                raise ValueError(f"grid file {spec}: not found")
            return "file", spec
        try:
            values = [float(v) for v in spec.split(",")]
        except ValueError:
            raise ValueError(f"unknown grid {spec!r}; expected one of: {', '.join(GRIDS)}, a .json file, "
                             "or a comma-separated list of times") from None
        return "times", values
    return "times", spec


def make_grid(spec: GridSpec, schedule: Schedule, steps: int, **options) -> torch.Tensor:
    """A grid from a name (with its options, e.g. rho or shift), a JSON path, "t1,t2,..." or a list."""
    kind, value = parse_grid_spec(spec, **options)
    if kind == "name":
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        return check_grid(value(schedule, steps, **options), schedule, f"grid {spec!r}")
    if kind == "file":
        return check_grid(load_grid_file(value, schedule), schedule, f"grid file {value}")
    return check_grid(value, schedule, f"grid {spec!r}" if isinstance(spec, str) else "grid")
