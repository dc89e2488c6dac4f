"""How to sample a generator: one dataclass per model family, validated once, when it is made.

The run config's `sample:` section, the sampling flags shared by `genvis sample` and
`genvis eval sample-fid`, and `genvis.generate` all carry the model family's dataclass
(`DiffusionSampling`, `VARSampling`, `MaskGITSampling`). Its fields are
checked in `__post_init__`, so an instance is always valid; a bad value raises OptionError naming
the field (the config loader reports it as `sample.<field>`, the CLI as `--<flag>`).

This module imports no torch at import time: the CLI reads the defaults for `--help` from it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from genvis.errors import OptionError

# MaskGIT's mask schedules (genvis.samplers.tokens.mask_ratio) and guidance schedules, here so that the CLI and
# the config schema read them without torch
MASK_SCHEDULES = ("arccos", "cosine", "linear")
MASKGIT_CFG_SCHEDULES = ("constant", "linear")


@dataclass
class SampleDefaults:
    """What every family's sampling options have."""

    num: int = 100  # images for `genvis sample` without --num-samples, and for training preview grids

    def __post_init__(self):
        if self.num < 1:
            raise OptionError("num", f"{self.num}: expected >= 1")


@dataclass
class DiffusionSampling(SampleDefaults):
    """Sampling options of diffusion / flow generators (genvis.samplers.diffusion).

    Args:
        sampler: a solver name (`genvis samplers`) or diffusers:<SchedulerClass>. Default ddpm.
        steps: model evaluations per sample (per guided pair). Default 250 (DiT's FID protocol).
        grid: timestep grid: a name, a .json file or "t1,t2,..." (Python: also a list/tensor of times).
        grid_options: the named grid's options, e.g. {"rho": 5}.
        options: the sampler's own options, e.g. {"order": 3}.
        cfg: classifier-free guidance scale (1 = none).
        cfg_channels: guide only the first K output channels (official DiT: 3); None = all.
        cfg_interval: [t_lo, t_hi]: guide only for normalised times t_lo < u <= t_hi (0 data, 1 noise).
        cfg_schedule: constant | linear (scale over time).
        stitch_small: T-Stitch: a smaller model (path, or a loaded model) of the same latent space that
            runs the first `stitch_fraction` of the steps.
        cache_refresh: DiT step caching: run the deep blocks on every N-th call only (1 = off).
        cache_keep_blocks: blocks computed on every call when caching.
    """

    sampler: str = "ddpm"
    steps: int = 250
    grid: str = "default"
    grid_options: Dict[str, Any] = field(default_factory=dict)
    options: Dict[str, Any] = field(default_factory=dict)
    cfg: float = 1.0
    cfg_channels: Optional[int] = None
    cfg_interval: Optional[List[float]] = None
    cfg_schedule: str = "constant"
    stitch_small: Optional[str] = field(default=None, metadata={"model": True})
    stitch_fraction: float = 0.4
    cache_refresh: int = 1
    cache_keep_blocks: int = 2

    def __post_init__(self):
        super().__post_init__()
        from genvis.samplers.core import check_options, get_sampler
        from genvis.samplers.grids import parse_grid_spec

        if self.steps < 1:
            raise OptionError("steps", f"{self.steps}: expected >= 1")
        try:
            fn = get_sampler(self.sampler)
        except ValueError as err:
            raise OptionError("sampler", str(err)) from None
        self.options = dict(self.options or {})
        self.grid_options = dict(self.grid_options or {})
        try:
            check_options(self.sampler, fn, self.options)
        except ValueError as err:
            raise OptionError("options", str(err)) from None
        try:
            parse_grid_spec(self.grid, **self.grid_options)
        except ValueError as err:
            raise OptionError("grid_options" if "option" in str(err) else "grid", str(err)) from None
        if self.cfg_interval is not None:
            values = list(self.cfg_interval)
            if len(values) != 2 or not 0.0 <= float(values[0]) < float(values[1]) <= 1.0:
                raise OptionError("cfg_interval", f"{values}: expected [t_lo, t_hi] with 0 <= t_lo < t_hi <= 1 "
                                  "(normalised time, 0 data, 1 noise)")
            self.cfg_interval = [float(v) for v in values]
        from genvis.samplers.guidance import CFG_SCHEDULES

        if self.cfg_schedule not in CFG_SCHEDULES:
            raise OptionError("cfg_schedule", f"{self.cfg_schedule!r}: expected one of: {', '.join(CFG_SCHEDULES)}")
        if self.cfg_channels is not None and self.cfg_channels < 1:
            raise OptionError("cfg_channels", f"{self.cfg_channels}: expected >= 1")
        if not 0.0 <= self.stitch_fraction <= 1.0:
            raise OptionError("stitch_fraction", f"{self.stitch_fraction}: expected a value in [0, 1]")
        if self.cache_refresh < 1:
            raise OptionError("cache_refresh", f"{self.cache_refresh}: expected >= 1")
        if self.cache_keep_blocks < 0:
            raise OptionError("cache_keep_blocks", f"{self.cache_keep_blocks}: expected >= 0")

    def guidance(self):
        """The CFG these options describe."""
        from genvis.samplers.guidance import CFG

        interval = tuple(self.cfg_interval) if self.cfg_interval is not None else None
        return CFG(self.cfg, interval=interval, schedule=self.cfg_schedule, channels=self.cfg_channels)


@dataclass
class VARSampling(SampleDefaults):
    """Sampling options of VAR generators (genvis.samplers.tokens.decode_var).

    Args:
        cfg: classifier-free guidance scale reached at the last scale (1 = none). It grows linearly over the
            S scales: s_k = 1 + (cfg - 1) k / (S - 1), logits = s_k cond - (s_k - 1) uncond. VAR's own
            `cfg` c is genvis's 1 + c: its FID recipe, cfg 1.5, is cfg 2.5 here.
        top_k: keep the k most likely ids of each token (0 = all). VAR's FID recipe: 900.
        top_p: then keep the smallest set of ids whose probability reaches top_p (0 = all). VAR: 0.96.
        temperature: the logits are divided by it before top-k / top-p (1 = VAR).
        smooth: VAR's `more_smooth` (visualisation, not its FID protocol): each scale's codes enter the next
            scale's input as a Gumbel-softmax mixture of the code vectors (tau = max(0.27 (1 - 0.95 k / (S - 1)),
            0.005), logits x (1 + k / (S - 1))) instead of the sampled code.
        kv_cache: decode each scale against the cached keys/values of the earlier ones (False: recompute the
            whole prefix at every scale; the same images, slower, for benchmarks).
    """

    cfg: float = 1.0
    top_k: int = 0
    top_p: float = 0.0
    temperature: float = 1.0
    smooth: bool = False
    kv_cache: bool = True

    def __post_init__(self):
        super().__post_init__()
        if not self.cfg >= 1.0:
            raise OptionError("cfg", f"{self.cfg}: expected >= 1 (1 = no guidance)")
        if self.top_k < 0:
            raise OptionError("top_k", f"{self.top_k}: expected >= 0 (0 = no top-k filtering)")
        if not 0.0 <= self.top_p <= 1.0:
            raise OptionError("top_p", f"{self.top_p}: expected a value in [0, 1] (0 = no top-p filtering)")
        if not self.temperature > 0.0:
            raise OptionError("temperature", f"{self.temperature}: expected > 0")


@dataclass
class MaskGITSampling(SampleDefaults):
    """Sampling options of MaskGIT generators (genvis.samplers.tokens.decode_maskgit), TiTok's ImageBert.generate.

    Decoding starts from all N tokens masked; step k of `steps` (progress r = (k + 1) / steps) predicts every
    masked token, keeps the most confident and re-masks the rest, so that floor(N mask_ratio(r)) stay masked.

    Args:
        steps: decoding steps (model evaluations per sample, per guided pair). Default 8.
        mask_schedule: the fraction still masked after progress r: arccos (acos(r) / (pi / 2), TiTok) | cosine
            (cos(r pi / 2), MaskGIT's paper) | linear (1 - r).
        temperature: T of the "randomized temperature": the ids are argmax(logits + T_k g) and the confidence
            the chosen logit + T_k g' (g, g' Gumbel noise), with T_k = T (1 - r) annealed to 0 at the last step.
            0 = greedy: the most likely ids, re-masked by their logit. Default 1.
        cfg: classifier-free guidance scale, logits = uncond + s (cond - uncond) (1 = none). TiTok's
            guidance_scale g (cond + g (cond - uncond)) is genvis's 1 + g.
        cfg_schedule: linear: s_k = 1 + (cfg - 1) k / steps (TiTok's "linear" guidance_decay: no guidance at
            the first step, growing) | constant: cfg at every step.
        anneal_softmax: TiTok's softmax_temperature_annealing: the logits are divided by 0.5 + 0.8 (1 - r).

    TiTok-L-32's recipe (configs/infer/TiTok/titok_l32.yaml, sample_imagenet_titok.py): steps 8, temperature 9.5,
    cfg 5.5 (guidance_scale 4.5), cfg_schedule linear, anneal_softmax true.
    """

    steps: int = 8
    mask_schedule: str = "arccos"
    temperature: float = 1.0
    cfg: float = 1.0
    cfg_schedule: str = "linear"
    anneal_softmax: bool = False

    def __post_init__(self):
        super().__post_init__()
        if self.steps < 1:
            raise OptionError("steps", f"{self.steps}: expected >= 1")
        if self.mask_schedule not in MASK_SCHEDULES:
            raise OptionError("mask_schedule", f"{self.mask_schedule!r}: expected one of: {', '.join(MASK_SCHEDULES)}")
        if not self.temperature >= 0.0 or self.temperature == float("inf"):
            raise OptionError("temperature", f"{self.temperature}: expected a finite value >= 0 (0 = greedy)")
        if not self.cfg >= 1.0:
            raise OptionError("cfg", f"{self.cfg}: expected >= 1 (1 = no guidance)")
        if self.cfg_schedule not in MASKGIT_CFG_SCHEDULES:
            raise OptionError("cfg_schedule", f"{self.cfg_schedule!r}: expected one of: {', '.join(MASKGIT_CFG_SCHEDULES)}")
