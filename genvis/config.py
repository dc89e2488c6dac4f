"""Typed run configuration: dataclass schemas read through OmegaConf structured configs.

    cfg = load_config("configs/digits/dit.yaml", ["train.steps=200", "model.size=tiny"])

YAML and dotted overrides are merged onto the schema in strict mode: an unknown key or a
value of the wrong type raises ConfigError with one line naming the full key.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from genvis.errors import ConfigError


@dataclass
class DataConfig:
    name: str = "digits"  # digits | folder
    path: Optional[str] = None  # image-folder root (class sub-folders) for name=folder
    resolution: int = 16
    channels: int = 1
    random_flip: bool = False
    num_workers: int = 0


@dataclass
class ModelConfig:
    arch: str = "dit"
    size: str = "S"  # tiny | S | B | L | XL
    patch_size: int = 2
    depth: Optional[int] = None  # override the size's depth / width / heads (null = from size)
    hidden_size: Optional[int] = None
    num_heads: Optional[int] = None
    class_dropout: float = 0.1
    learn_sigma: bool = True  # only for eps prediction on a discrete VP schedule (DiT's hybrid loss)


@dataclass
class DiffusionConfig:
    objective: str = "eps"  # eps | v | flow
    schedule: str = "linear"  # linear (DiT's 1000 betas) | flow
    num_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    time_sampling: str = "uniform"  # uniform | logit_normal (flow)
    logit_mean: float = 0.0
    logit_std: float = 1.0
    flow_shift: float = 1.0  # flow: resolution shift of the model's default sampling grid


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 128  # global batch: all processes and accumulation steps together
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 0
    grad_clip: float = 1.0  # 0 = no clipping
    ema_decay: float = 0.9999
    ema_warmup: bool = True  # decay min(ema_decay, (1 + step) / (10 + step)) early on
    mixed_precision: str = "auto"  # auto (bf16 where the hardware runs it natively) | fp32 | bf16 | fp16
    checkpoint_every: int = 500
    keep_checkpoints: int = 2  # 0 = keep all
    sample_every: int = 0  # 0 = never
    log_every: int = 50


@dataclass
class SampleConfig:
    """Defaults for periodic grids during training and for `genvis sample` on this run."""

    sampler: str = "ddpm"
    steps: int = 250
    grid: str = "default"
    cfg: float = 1.0
    num: int = 100


@dataclass
class RunConfig:
    seed: int = 0
    output_dir: str = MISSING
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)


def _wrap(err: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(err, "full_key", None) or ""
    msg = getattr(err, "msg", None) or str(err).splitlines()[0]
    msg = msg.splitlines()[0]
    where = f"{source}: " if source else ""
    if key:
        return ConfigError(f"{where}key '{key}': {msg}")
    return ConfigError(f"{where}{msg}")


def load_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> RunConfig:
    """Schema defaults <- YAML file <- dotted `key=value` overrides, all strictly typed."""
    cfg = OmegaConf.structured(RunConfig)
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            file_cfg = OmegaConf.load(p)
        except Exception as err:  # yaml syntax errors
            raise ConfigError(f"{path}: not valid YAML: {str(err).splitlines()[0]}") from None
        try:
            cfg = OmegaConf.merge(cfg, file_cfg)
        except OmegaConfBaseException as err:
            raise _wrap(err, str(path)) from None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. train.steps=200")
        key, value = item.split("=", 1)
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([f"{key}={value}"]))
        except OmegaConfBaseException as err:
            raise _wrap(err, f"override {item!r}") from None
    if OmegaConf.is_missing(cfg, "output_dir"):
        raise ConfigError("key 'output_dir': missing; set it in the YAML or as output_dir=PATH")
    run = OmegaConf.to_object(cfg)
    validate(run)
    return run


def _choice(key: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"key '{key}': {value!r} is not one of {', '.join(map(str, choices))}")


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def validate(cfg: RunConfig) -> None:
    """Value checks that types alone cannot express."""
    from genvis.models.dit import DIT_SIZES

    _choice("data.name", cfg.data.name, ["digits", "folder"])
    _choice("data.channels", cfg.data.channels, [1, 3])
    _choice("model.arch", cfg.model.arch, ["dit"])
    _choice("model.size", cfg.model.size, list(DIT_SIZES))
    _choice("model.patch_size", cfg.model.patch_size, [1, 2, 4, 8])
    _choice("diffusion.objective", cfg.diffusion.objective, ["eps", "v", "flow"])
    _choice("diffusion.schedule", cfg.diffusion.schedule, ["linear", "flow"])
    _choice("diffusion.time_sampling", cfg.diffusion.time_sampling, ["uniform", "logit_normal"])
    _choice("train.mixed_precision", cfg.train.mixed_precision, ["auto", "fp32", "bf16", "fp16"])
    if cfg.diffusion.flow_shift <= 0:
        raise ConfigError(f"key 'diffusion.flow_shift': must be > 0, got {cfg.diffusion.flow_shift}")
    if (cfg.diffusion.objective == "flow") != (cfg.diffusion.schedule == "flow"):
        raise ConfigError("key 'diffusion.schedule': objective 'flow' needs schedule 'flow' and the other objectives a VP schedule")
    if cfg.data.name == "folder" and not cfg.data.path:
        raise ConfigError("key 'data.path': data.name=folder needs the image-folder root")
    if cfg.data.resolution % cfg.model.patch_size:
        raise ConfigError(f"key 'model.patch_size': {cfg.model.patch_size} does not divide data.resolution={cfg.data.resolution}")
    for key in ("train.steps", "train.batch_size", "train.grad_accum"):
        section, name = key.split(".")
        if getattr(getattr(cfg, section), name) < 1:
            raise ConfigError(f"key '{key}': must be >= 1")
    for key in ("train.checkpoint_every", "train.sample_every", "train.log_every", "train.keep_checkpoints", "train.warmup_steps"):
        section, name = key.split(".")
        if getattr(getattr(cfg, section), name) < 0:
            raise ConfigError(f"key '{key}': must be >= 0")
    from genvis.samplers import get_sampler
    from genvis.samplers.grids import GRIDS

    try:
        get_sampler(cfg.sample.sampler)
    except ValueError as err:
        raise ConfigError(f"key 'sample.sampler': {err}") from None
    explicit = all(_is_number(v) for v in cfg.sample.grid.split(","))
    if cfg.sample.grid not in GRIDS and not cfg.sample.grid.endswith(".json") and not explicit:
        raise ConfigError(f"key 'sample.grid': unknown grid {cfg.sample.grid!r}; expected one of: {', '.join(GRIDS)}, "
                          "a .json file or t1,t2,...")


def to_yaml(cfg: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
