"""Sampler error against the exact probability-flow solution, genvis vs diffusers, at NFE 5, 10, 20.

    python benchmarks/sampler_error.py [--samples 1024] [--json out.json]

Model: a Gaussian mixture in D = 16 dimensions, 8 equally weighted components, means drawn
uniformly from [-1, 1] (seed 0), isotropic std s = 0.15, on DiT's "linear" schedule (1000 betas).
Its exact eps prediction at x_t = alpha x0 + sigma eps is, with v = alpha^2 s^2 + sigma^2 and
posterior weights w_k(x) = softmax_k(-|x - alpha mu_k|^2 / (2 v)),

    eps(x, t) = sigma (x - alpha sum_k w_k mu_k) / v,

computed in float64 (the samplers keep x in float32 between steps).

Reference: the probability-flow ODE dy/ds = eps(alpha y, t(s)) in y = x / alpha and s = sigma / alpha,
from x_T = z at t = 999 down to s = 0 (y = x0), integrated in float64 by scipy's solve_ivp (DOP853,
rtol = atol = 1e-11), not genvis's rk45, which feeds the model float32 x (its error against this
reference at rtol = atol = 1e-10 is printed as a cross-check). The same noise z (1024 x 16, seed 1)
goes to every sampler.

Searched rows: the grid found by genvis's evolutionary grid search (genvis.samplers.search, the
engine of `genvis samplers search`; population 16, 20 generations) for that sampler and NFE, scored
against the reference on a *different*, larger noise set (4096 samples, seed 2: with fewer, the RMS is
dominated by a few trajectories near component boundaries and the search over-fits them), then
measured on the common noise (seed 1).

Rows: every deterministic genvis sampler in the registry (every module of genvis.samplers is
imported, so samplers added later appear; stochastic ones and rk45 are left out) on every grid,
and diffusers schedulers (through sampler="diffusers:<Class>") in their default configuration and
with their documented options. Error = RMS over samples and dimensions of (sample - reference);
the NFE is counted by a wrapper around the model function. Second-order samplers (Heun) cannot
hit every NFE: the cell shows the counted NFE next to the error when it differs from the column.
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import math
import pkgutil
import time
import warnings

import torch
from scipy.integrate import solve_ivp

import genvis.samplers
from genvis.diffusion.schedules import make_schedule
from genvis.registry import SAMPLERS
from genvis.samplers import sample
from genvis.samplers.search import reference_error_score, search_grid

NFES = (5, 10, 20)
SEARCHED = ("unipc", "dpmpp-2m", "dpmpp-3m")  # samplers whose grid is also searched
GRIDS = ("default", "trailing", "linspace", "logsnr", "karras", "shift")
DIM, COMPONENTS, STD, SEED = 16, 8, 0.15, 0

# (label, diffusers class, scheduler_kwargs): defaults, then the options the diffusers docs recommend
DIFFUSERS = [
    ("DDIM", "DDIMScheduler", {}),
    ("DDIM trailing", "DDIMScheduler", {"timestep_spacing": "trailing"}),
    ("DPM++ 2M", "DPMSolverMultistepScheduler", {}),
    ("DPM++ 2M karras", "DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    ("DPM++ 2M lu-lambdas", "DPMSolverMultistepScheduler", {"use_lu_lambdas": True}),
    ("DPM++ 2M trailing", "DPMSolverMultistepScheduler", {"timestep_spacing": "trailing"}),
    ("DPM++ 3M", "DPMSolverMultistepScheduler", {"solver_order": 3}),
    ("DPM++ 3M karras", "DPMSolverMultistepScheduler", {"solver_order": 3, "use_karras_sigmas": True}),
    ("DPM++ 3M trailing", "DPMSolverMultistepScheduler", {"solver_order": 3, "timestep_spacing": "trailing"}),
    ("UniPC", "UniPCMultistepScheduler", {}),
    ("UniPC karras", "UniPCMultistepScheduler", {"use_karras_sigmas": True}),
    ("UniPC trailing", "UniPCMultistepScheduler", {"timestep_spacing": "trailing"}),
    ("UniPC order 3", "UniPCMultistepScheduler", {"solver_order": 3}),
    # NaN in diffusers 0.42: on the step onto sigma = 0, h = inf and bh1's B(h) = -h multiplies a zero correction
    ("UniPC bh1", "UniPCMultistepScheduler", {"solver_type": "bh1"}),
    ("UniPC bh1 sigma_min", "UniPCMultistepScheduler", {"solver_type": "bh1", "final_sigmas_type": "sigma_min"}),
    ("Euler", "EulerDiscreteScheduler", {}),
    ("Euler karras", "EulerDiscreteScheduler", {"use_karras_sigmas": True}),
    ("Euler trailing", "EulerDiscreteScheduler", {"timestep_spacing": "trailing"}),
    ("Heun", "HeunDiscreteScheduler", {}),
    ("Heun karras", "HeunDiscreteScheduler", {"use_karras_sigmas": True}),
    ("Heun trailing", "HeunDiscreteScheduler", {"timestep_spacing": "trailing"}),
]


class Mixture:
    """The exact eps prediction of an equal-weight isotropic Gaussian mixture (float64 inside)."""

    def __init__(self, schedule, dim: int = DIM, components: int = COMPONENTS, std: float = STD, seed: int = SEED):
        g = torch.Generator().manual_seed(seed)
        self.means = torch.rand(components, dim, generator=g, dtype=torch.float64) * 2 - 1
        self.std = std
        self.schedule = schedule

    def eps(self, x: torch.Tensor, alpha, sigma) -> torch.Tensor:
        """sigma (x - alpha sum_k w_k mu_k) / v for float64 x [B, D]; alpha, sigma scalars or [B, 1].
        The softmax logits drop -|x|^2 / (2 v), which is the same for every component."""
        v = alpha**2 * self.std**2 + sigma**2
        logits = (2 * alpha * (x @ self.means.T) - alpha**2 * (self.means**2).sum(1)) / (2 * v)
        return sigma * (x - alpha * (torch.softmax(logits, dim=1) @ self.means)) / v

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **_) -> torch.Tensor:
        """The genvis model function: t in schedule steps [B], returns eps as float32."""
        alpha, sigma = (v.view(-1, 1) for v in self.schedule.alpha_sigma(t.double()))
        return self.eps(x.double(), alpha, sigma).float()


class Counted:
    """A model function that counts its calls (one call = one evaluation for every sample)."""

    def __init__(self, fn):
        self.fn = fn
        self.calls = 0

    def __call__(self, x, t, **cond):
        self.calls += 1
        return self.fn(x, t, **cond)


def reference(model: Mixture, z: torch.Tensor, rtol: float = 1e-11) -> tuple:
    """x0 from x_T = z at the schedule's noise end: DOP853 in y = x / alpha over s = sigma / alpha, float64.

    dy/ds = eps(alpha y) with alpha = 1 / sqrt(1 + s^2), sigma = s alpha. Returns (x0, nfev)."""
    a_T, s_T = (float(v) for v in model.schedule.alpha_sigma(torch.tensor(model.schedule.noise_end, dtype=torch.float64)))
    shape = z.shape

    def rhs(s, y):
        alpha = 1.0 / math.sqrt(1.0 + s * s)
        x = torch.from_numpy(y).view(shape) * alpha
        return model.eps(x, alpha, s * alpha).flatten().numpy()

    y_T = (z.double() / a_T).flatten().numpy()
    sol = solve_ivp(rhs, (s_T / a_T, 0.0), y_T, method="DOP853", rtol=rtol, atol=rtol)
    if not sol.success:
        raise RuntimeError(f"reference integration failed: {sol.message}")
    return torch.from_numpy(sol.y[:, -1].copy()).view(shape), sol.nfev


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a.double() - b.double()) ** 2).mean().sqrt())


def discover_samplers() -> tuple:
    """Import every module of genvis.samplers (registering its samplers); returns (deterministic
    sampler names without rk45, skipped names with reasons, modules that failed to import)."""
    failed = {}
    for mod in pkgutil.iter_modules(genvis.samplers.__path__):
        try:
            importlib.import_module(f"genvis.samplers.{mod.name}")
        except Exception as err:  # another engineer's module in progress must not stop the benchmark
            failed[mod.name] = f"{type(err).__name__}: {err}"
    use, skipped = [], {}
    for name in SAMPLERS:
        if name == "rk45":
            skipped[name] = "adaptive (used for the cross-check below)"
        elif SAMPLERS.get(name).sampler_meta["stochastic"]:
            skipped[name] = "stochastic"
        else:
            use.append(name)
    return use, skipped, failed


def run(model, z, schedule, sampler: str, nfe: int, **kwargs) -> tuple:
    """(sample, counted NFE) for `steps = nfe`."""
    counted = Counted(model)
    out = sample(counted, z.clone(), sampler=sampler, steps=nfe, schedule=schedule, prediction="eps", **kwargs)
    return out, counted.calls


def cell(result: dict) -> str:
    if "error" not in result:
        return "n/a"
    text = f"{result['error']:.2e}"
    return text if result["nfe"] == result["target_nfe"] else f"{text} ({result['nfe']})"


def table(rows: list, keys: tuple, headers: tuple) -> str:
    """Markdown table: one line per distinct `keys` value, one column per target NFE."""
    lines = ["| " + " | ".join(headers + tuple(f"NFE {n}" for n in NFES)) + " |",
             "|" + "---|" * (len(headers) + len(NFES))]
    seen = {}
    for r in rows:
        seen.setdefault(tuple(r[k] for k in keys), {})[r["target_nfe"]] = r
    for key, by_nfe in seen.items():
        lines.append("| " + " | ".join(list(key) + [cell(by_nfe.get(n, {})) for n in NFES]) + " |")
    return "\n".join(lines)


def best(rows: list, nfe: int):
    ok = [r for r in rows if r["target_nfe"] == nfe and math.isfinite(r.get("error", math.nan)) and r["nfe"] <= nfe]
    return min(ok, key=lambda r: r["error"]) if ok else None


def reference_info(model: Mixture, z: torch.Tensor) -> tuple:
    """(reference x0, a description with its self-check against a looser tolerance)."""
    started = time.perf_counter()
    ref, nfev = reference(model, z)
    seconds = time.perf_counter() - started
    loose, _ = reference(model, z, rtol=1e-9)
    return ref, {"method": "scipy solve_ivp DOP853, float64, y = x/alpha over s = sigma/alpha", "rtol": 1e-11,
                 "atol": 1e-11, "nfev": nfev, "seconds": round(seconds, 2), "rms_change_vs_rtol_1e-9": rms(ref, loose),
                 "rms_of_reference": float(ref.pow(2).mean().sqrt())}


def genvis_table(model, z, ref, names: list) -> list:
    rows = []
    for name in names:
        for grid in GRIDS:
            for nfe in NFES:
                row = {"sampler": name, "grid": grid, "target_nfe": nfe}
                try:
                    out, row["nfe"] = run(model, z, model.schedule, name, nfe, grid=grid)
                    row["error"] = rms(out, ref)
                except ValueError as err:  # a grid the sampler cannot take
                    row["skipped"] = str(err)
                rows.append(row)
    return rows


def searched_table(model, z, ref, names: list) -> list:
    """Rows for grids searched on a separate noise set (4096 samples, seed SEED + 2), measured on z."""
    z_search = torch.randn(4096, z.shape[1], generator=torch.Generator().manual_seed(SEED + 2))
    ref_search, _ = reference(model, z_search, rtol=1e-9)
    rows = []
    for name in [n for n in SEARCHED if n in names]:
        for nfe in NFES:
            score = reference_error_score(model, model.schedule, "eps", name, z_search, ref_search)
            grid, search_score, history = search_grid(score, model.schedule, nfe, population=16, generations=20, seed=0)
            out, calls = run(model, z, model.schedule, name, nfe, grid=grid)
            rows.append({"sampler": name, "grid": "searched", "target_nfe": nfe, "nfe": calls, "error": rms(out, ref),
                         "search_error": search_score, "grids_scored": history[-1]["evaluations"], "timesteps": grid.tolist()})
    return rows


def diffusers_table(model, z, ref) -> list:
    rows = []
    for label, cls, options in DIFFUSERS:
        for nfe in NFES:
            row = {"scheduler": label, "class": cls, "options": json.dumps(options), "target_nfe": nfe}
            out, row["nfe"] = run(model, z, model.schedule, f"diffusers:{cls}", nfe, scheduler_kwargs=options)
            row["error"] = rms(out, ref)
            rows.append(row)
    return rows


def rk45_check(model, z, ref) -> dict:
    """genvis rk45 at rtol = atol = 1e-10 against the reference. It integrates to t_end and returns the
    x0 prediction there: t = -0.999 has sigma = 3e-4, so that jump costs ~1e-7."""
    if "rk45" not in SAMPLERS:
        return {}
    try:
        out, calls = run(model, z, model.schedule, "rk45", 1, grid=[999.0, -1.0], rtol=1e-10, atol=1e-10,
                         t_end=-0.999, max_steps=1000)
        return {"rtol": 1e-10, "nfe": calls, "error": rms(out, ref)}
    except (ValueError, RuntimeError) as err:
        return {"rtol": 1e-10, "failed": str(err).split("\n")[0]}


def print_report(samples: int, ref_info: dict, rk45: dict, names, skipped, failed, genvis_rows, diffusers_rows,
                 summary) -> None:
    print(f"# Sampler error vs the exact PF-ODE solution\n\nGaussian mixture: D={DIM}, {COMPONENTS} components, "
          f"std {STD}, means U[-1, 1] (seed {SEED}); schedule 'linear' (1000 betas); eps prediction; {samples} noise "
          f"samples. Error = RMS(sample - reference); reference RMS {ref_info['rms_of_reference']:.3f}.\n")
    print(f"Reference: {ref_info['method']}, rtol=atol=1e-11, {ref_info['nfev']} evaluations; "
          f"RMS change against rtol 1e-9: {ref_info['rms_change_vs_rtol_1e-9']:.1e}.")
    if rk45:
        outcome = f"error {rk45['error']:.1e} at NFE {rk45['nfe']}" if "error" in rk45 else f"failed: {rk45['failed']}"
        print(f"genvis rk45 (rtol=atol=1e-10, float32 model input, 999 -> t_end -0.999): {outcome}")
    print(f"genvis samplers: {', '.join(names)}; skipped: " + (", ".join(f"{k} ({v})" for k, v in skipped.items()) or "none"))
    for mod, err in failed.items():
        print(f"could not import genvis.samplers.{mod}: {err}")
    print("\n## genvis (cells: error, with the counted NFE in brackets where it differs)\n")
    print(table(genvis_rows, ("sampler", "grid"), ("sampler", "grid")))
    print("\n## diffusers (through sampler='diffusers:<Class>', scheduler built from the same betas)\n")
    print(table(diffusers_rows, ("scheduler", "options"), ("scheduler", "scheduler_kwargs")))
    if summary:
        g, d = summary["genvis"], summary["diffusers"]
        print(f"\n**NFE <= 10: best genvis {g['error']:.2e} ({g['sampler']}, grid {g['grid']}, NFE {g['nfe']}) vs best "
              f"diffusers {d['error']:.2e} ({d['scheduler']}, NFE {d['nfe']}): diffusers / genvis = "
              f"{summary['ratio_diffusers_over_genvis']:.2f}**")
        n = summary["genvis_named_grids"]
        print(f"\nNamed grids only: best genvis {n['error']:.2e} ({n['sampler']}, grid {n['grid']}): diffusers / genvis = "
              f"{summary['ratio_diffusers_over_genvis_named_grids']:.2f}")
        for r in genvis_rows:
            if r["grid"] == "searched":
                print(f"searched grid, {r['sampler']}, NFE {r['target_nfe']}: error {r['error']:.2e} on the common noise, "
                      f"{r['search_error']:.2e} on the search noise ({r['grids_scored']} grids scored): "
                      f"{[round(t) for t in r['timesteps']]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--json", help="also write all results to this JSON file")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    started = time.perf_counter()

    model = Mixture(make_schedule("linear"))
    z = torch.randn(args.samples, DIM, generator=torch.Generator().manual_seed(SEED + 1))
    ref, ref_info = reference_info(model, z)
    names, skipped, failed = discover_samplers()
    genvis_rows = genvis_table(model, z, ref, names) + searched_table(model, z, ref, names)
    diffusers_rows = diffusers_table(model, z, ref)
    rk45 = rk45_check(model, z, ref)
    g10, d10 = best(genvis_rows, 10), best(diffusers_rows, 10)
    named10 = best([r for r in genvis_rows if r["grid"] != "searched"], 10)
    summary = {"genvis": g10, "genvis_named_grids": named10, "diffusers": d10,
               "ratio_diffusers_over_genvis": d10["error"] / g10["error"],
               "ratio_diffusers_over_genvis_named_grids": d10["error"] / named10["error"]} if g10 and d10 else None

    print_report(args.samples, ref_info, rk45, names, skipped, failed, genvis_rows, diffusers_rows, summary)
    elapsed = time.perf_counter() - started
    print(f"\n({elapsed:.1f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": {"dim": DIM, "components": COMPONENTS, "std": STD, "seed": SEED, "schedule": "linear",
                                 "samples": args.samples},
                       "reference": ref_info, "rk45_check": rk45, "skipped": skipped, "import_failures": failed,
                       "genvis": genvis_rows, "diffusers": diffusers_rows, "summary": summary,
                       "seconds": round(elapsed, 1)}, f, indent=1)


if __name__ == "__main__":
    main()
