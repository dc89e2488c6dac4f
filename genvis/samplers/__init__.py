"""Samplers: every ODE/SDE solver is a plain function with one signature (k-diffusion style),

    sample_<name>(denoiser, x, grid, *, cond=None, generator=None, callback=None, progress=False, **options) -> x0

where `denoiser(x, t, **cond)` returns the data prediction for schedule time t (and
`denoiser.predict` gives x0, eps and any learned variance) and `grid` is a strictly descending
timestep grid ending at the data end (genvis.samplers.grids). Guidance wraps the model function
(genvis.samplers.guidance), so every sampler gets it. `sample()` is the entry point for a model
function; `genvis.samplers.diffusion` runs a diffusion-family generator for `genvis.generate`, and
`genvis.samplers.tokens` decodes VAR (`decode_var`) and MaskGIT (`decode_maskgit`).

The names below are imported on first use (PEP 562), so `genvis --help` and the config schema
(`genvis.samplers.options`) do not pay for torch.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "sample": "core", "plan_sampling": "core", "SamplingPlan": "core", "get_sampler": "core", "check_options": "core",
    "resolve_grid": "core", "make_grid": "grids", "GRIDS": "grids", "CFG": "guidance", "DiffusionSampling": "options",
    "VARSampling": "options", "MaskGITSampling": "options", "decode_var": "tokens", "decode_maskgit": "tokens",
}


def __getattr__(name: str):
    if name == "SAMPLERS":
        from genvis.registry import SAMPLERS

        return SAMPLERS
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"genvis.samplers.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'genvis.samplers' has no attribute {name!r}")


__all__ = [*_EXPORTS, "SAMPLERS"]
