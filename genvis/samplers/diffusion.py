"""The diffusion family's sampler: a diffusion / flow generator + DiffusionSampling -> latents.

`genvis.generate` hands each batch here. What it needs of a model (the diffusion-family protocol,
DiT and its variants provide it): `model(x, t, y)` returning its raw output, `model.config` with
`prediction_type`, `learn_sigma` and the schedule (`schedule_for_model`), `model.sample_shape`
(C, H, W of what it generates) and `model.null_class`. Step caching also needs the DiT pieces
`embed` / `run_blocks` / `head` and `blocks` (genvis.samplers.accel).

Everything that does not depend on the batch (the solver, its options, the grid, the guidance,
the T-Stitch and cache settings against the model) is checked once, in the constructor.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from genvis.diffusion.schedules import schedule_for_model
from genvis.errors import GenvisError, OptionError
from genvis.registry import FAMILIES
from genvis.samplers.common import randn_like
from genvis.samplers.core import SamplingPlan, get_sampler, resolve_grid
from genvis.samplers.options import DiffusionSampling

# what two models must share for T-Stitch (one latent space, schedule and prediction type)
STITCH_SHARED = ("in_channels", "input_size", "prediction_type", "schedule", "learn_sigma", "num_classes",
                 "num_train_timesteps", "beta_start", "beta_end", "flow_shift")


def check_stitch(model, small) -> None:
    """T-Stitch needs two models of one latent space, schedule and prediction type."""
    for key in STITCH_SHARED:
        if getattr(small.config, key) != getattr(model.config, key):
            raise GenvisError(f"T-Stitch: the small model's {key} is {getattr(small.config, key)!r}, "
                              f"the large model's {getattr(model.config, key)!r}; both must share it")


def accelerated(model, grid, stitch_small=None, stitch_fraction: float = 0.4, cache_refresh: int = 1,
                cache_keep_blocks: int = 2) -> Callable:
    """The network call with T-Stitch and/or DiT step caching applied (the plain model without either);
    build one per sampling run (a step cache holds state)."""
    from genvis.samplers.accel import DiTStepCache, tstitch

    def cached(m):
        return DiTStepCache(m, refresh=cache_refresh, keep_blocks=cache_keep_blocks) if cache_refresh > 1 else m

    if stitch_small is None:
        return cached(model)
    return tstitch(cached(stitch_small), cached(model), grid, stitch_fraction, schedule=schedule_for_model(model))


def check_tokenizer(model, tokenizer) -> None:
    """The tokenizer (None: raw latents) must decode what the model generates."""
    if tokenizer is not None and tokenizer.kind != "continuous":
        raise GenvisError(f"a diffusion model generates continuous latents; {type(tokenizer).__name__} decodes token ids")
    expected = tokenizer.latent_channels if tokenizer is not None else None
    if expected is not None and expected != model.sample_shape[0]:
        raise GenvisError(f"the tokenizer's latents have {expected} channels but the model generates "
                          f"{model.sample_shape[0]}; give the tokenizer the model was trained with")


@FAMILIES.register("diffusion", schema=DiffusionSampling)
class DiffusionFamilySampler:
    """Samples a diffusion-family `model` with `options` (their model paths already loaded); `tokenizer`
    (or None) is what will decode the latents, checked against the model."""

    def __init__(self, model, options: DiffusionSampling, tokenizer=None):
        check_tokenizer(model, tokenizer)
        c = model.config
        self.model = model
        self.options = options
        if options.cache_refresh > 1 and options.cache_keep_blocks >= len(model.blocks):
            raise OptionError("cache_keep_blocks", f"{options.cache_keep_blocks}: expected 0..{len(model.blocks) - 1} "
                              f"(fewer than the model's {len(model.blocks)} blocks)")
        if isinstance(options.stitch_small, str):
            raise GenvisError("stitch_small: load the model first (genvis.generate does)")
        if options.stitch_small is not None:
            check_stitch(model, options.stitch_small)
        # the sampler, its options and the grid spec were checked when `options` was made; what is left
        # depends on the model: the grid on its schedule
        fn = get_sampler(options.sampler)
        schedule = schedule_for_model(model)
        try:
            grid = resolve_grid(options.grid, schedule, fn, options.steps, options.grid_options)
        except ValueError as err:  # e.g. explicit times outside this model's schedule
            raise OptionError("grid", str(err)) from None
        self.plan = SamplingPlan(fn, options.options, grid, schedule, c.prediction_type, c.learn_sigma, options.guidance(),
                                 model.null_class)
        self.steps_per_batch = len(grid) - 1 if fn.sampler_meta.get("steps_per_interval", True) else None

    def compile(self) -> None:
        """torch.compile the network in place (nn.Module.compile; the step cache and T-Stitch call its blocks
        and stay eager)."""
        self.model.compile()

    def __call__(self, labels: torch.Tensor, generators, *, autocast: Callable, callback: Optional[Callable] = None) -> torch.Tensor:
        """Latents [B, *model.sample_shape] for `labels` [B] (on the model's device); sample i's noise and
        every stochastic step come from generators[i]."""
        device = labels.device
        o = self.options
        x = randn_like(torch.empty(len(labels), *self.model.sample_shape), generators).to(device)
        # a fresh wrapper per batch: a step cache must not carry a residual from the previous batch
        network = accelerated(self.model, self.plan.grid, o.stitch_small, o.stitch_fraction, o.cache_refresh,
                              o.cache_keep_blocks)

        def call(x, t, y):
            with autocast():
                return network(x, t, y).float()

        return self.plan.run(call, x, cond={"y": labels}, generator=generators, callback=callback)
