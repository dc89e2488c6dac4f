"""Typed run configuration: dataclass schemas read through OmegaConf structured configs.

    cfg = load_config("configs/digits/dit.yaml", ["train.steps=200", "model.size=tiny"])

RunConfig{seed, output_dir, data, tokenizer, model, task, train, sample}. `model.arch` and
`task.name` pick registry entries (genvis.registry MODELS / TASKS) whose dataclass schemas type
the rest of their sections, and the model's family (FAMILIES) types `sample:`. YAML and dotted
overrides are merged onto the schema in strict mode: an unknown key or a value of the wrong type
raises ConfigError with one line naming the full key, whatever the family. Each section then
checks its own values (`validate()`, or the sampling dataclass's own checks). This module
imports no model code: the registries import an entry's module when it is looked up.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional, Sequence

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from genvis.data import DataConfig
from genvis.errors import ConfigError, OptionError
from genvis.precision import PRECISIONS
from genvis.registry import FAMILIES, MODELS, TASKS, TOKENIZERS, Registry


LR_SCHEDULES = ("constant", "linear", "cosine")


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 128  # global batch: all processes and accumulation steps together
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 0
    lr_schedule: str = "constant"  # after warmup: constant | linear | cosine, down to lr * lr_end_ratio at the last step
    lr_end_ratio: float = 0.0  # VAR's wpe (0.1 for d16/d20, 0.01 for d24/d30)
    grad_clip: float = 1.0  # 0 = no clipping
    ema_decay: float = 0.9999
    ema_warmup: bool = True  # decay min(ema_decay, (1 + step) / (10 + step)) early on
    mixed_precision: str = "auto"  # auto (bf16 where the hardware runs it natively) | fp32 | bf16 | fp16
    checkpoint_every: int = 500
    keep_checkpoints: int = 2  # 0 = keep all
    sample_every: int = 0  # 0 = never
    log_every: int = 50
    compile: bool = False  # torch.compile (inductor) of the trained modules; compile time is logged on its own

    def validate(self) -> None:
        if self.mixed_precision not in PRECISIONS:
            raise ConfigError(f"key 'train.mixed_precision': {self.mixed_precision!r} is not one of {', '.join(PRECISIONS)}")
        for key in ("steps", "batch_size", "grad_accum"):
            if getattr(self, key) < 1:
                raise ConfigError(f"key 'train.{key}': must be >= 1, got {getattr(self, key)}")
        for key in ("checkpoint_every", "sample_every", "log_every", "keep_checkpoints", "warmup_steps", "lr",
                    "weight_decay", "grad_clip"):
            if getattr(self, key) < 0:
                raise ConfigError(f"key 'train.{key}': must be >= 0, got {getattr(self, key)}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"key 'train.lr_schedule': {self.lr_schedule!r} is not one of {', '.join(LR_SCHEDULES)}")
        if not 0.0 <= self.lr_end_ratio <= 1.0:
            raise ConfigError(f"key 'train.lr_end_ratio': {self.lr_end_ratio}: expected a value in [0, 1]")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"key 'train.betas': {list(self.betas)}: expected two values in [0, 1)")
        if not 0.0 <= self.ema_decay <= 1.0:
            raise ConfigError(f"key 'train.ema_decay': {self.ema_decay}: expected a value in [0, 1]")


@dataclass
class RunConfig:
    seed: int = 0
    output_dir: str = MISSING
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: Any = None  # typed by TOKENIZERS[tokenizer.arch] (the base TokenizerConfig when arch is null)
    model: Any = None  # typed by the schema of MODELS[model.arch]; null for tasks that train no model (a tokenizer)
    task: Any = None  # typed by the schema of TASKS[task.name]
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: Any = None  # typed by the sampling schema of the model's family (FAMILIES); null without a model


def _wrap(err: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(err, "full_key", None) or ""
    msg = getattr(err, "msg", None) or str(err).splitlines()[0]
    msg = msg.splitlines()[0]
    where = f"{source}: " if source else ""
    if key:
        return ConfigError(f"{where}key '{key}': {msg}")
    return ConfigError(f"{where}{msg}")


def _read_yaml(path: str) -> DictConfig:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        loaded = OmegaConf.load(p)
    except Exception as err:  # yaml syntax errors
        raise ConfigError(f"{path}: not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{path}: expected a mapping of sections (seed, data, model, task, train, sample, ...)")
    return loaded


def _parse_overrides(overrides: Sequence[str]) -> List[DictConfig]:
    out = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. train.steps=200")
        try:
            out.append((item, OmegaConf.from_dotlist([item])))
        except OmegaConfBaseException as err:
            raise _wrap(err, f"override {item!r}") from None
    return out


def _pick(raw: DictConfig, key: str, default: str, registry: Registry) -> str:
    value = OmegaConf.select(raw, key, default=default)
    if not isinstance(value, str) or value not in registry:
        raise ConfigError(f"key '{key}': {value!r} is not one of {', '.join(registry.names())}")
    return value


def _schema(registry: Registry, name: str, key: str) -> type:
    schema = registry.schema(name)
    if schema is None:
        raise ConfigError(f"key '{key}': {registry.kind} {name!r} has no config schema")
    return schema


def load_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> RunConfig:
    """Schema defaults <- YAML file <- dotted `key=value` overrides, all strictly typed."""
    file_cfg = _read_yaml(path) if path is not None else OmegaConf.create({})
    parsed = _parse_overrides(overrides)
    raw = OmegaConf.merge(file_cfg, *[dotlist for _, dotlist in parsed]) if parsed else file_cfg

    task = OmegaConf.select(raw, "task.name", default=None)
    if task is not None and task in TASKS and not TASKS.entry(task).meta.get("model", True):
        arch = None  # the task trains no generator (a tokenizer): no model or sample section
        for section in ("model", "sample"):
            if section in raw:
                raise ConfigError(f"key '{section}': task '{task}' trains no generator; remove the section")
    else:
        arch = _pick(raw, "model.arch", "dit", MODELS)
        task = _pick(raw, "task.name", str(MODELS.entry(arch).meta.get("task", "diffusion")), TASKS)
    tokenizer_arch = OmegaConf.select(raw, "tokenizer.arch", default=None)
    if tokenizer_arch is not None:
        _pick(raw, "tokenizer.arch", None, TOKENIZERS)

    cfg = OmegaConf.structured(RunConfig)
    cfg.tokenizer = OmegaConf.structured(_schema(TOKENIZERS, tokenizer_arch or "pixels", "tokenizer.arch"))
    cfg.task = OmegaConf.structured(_schema(TASKS, task, "task.name"))
    cfg.task.name = task
    if arch is not None:
        cfg.model = OmegaConf.structured(_schema(MODELS, arch, "model.arch"))
        cfg.sample = OmegaConf.structured(_schema(FAMILIES, str(MODELS.entry(arch).meta["family"]), "model.arch"))
        cfg.model.arch = arch
    try:
        cfg = OmegaConf.merge(cfg, file_cfg)
    except OmegaConfBaseException as err:
        raise _wrap(err, str(path)) from None
    for item, dotlist in parsed:
        try:
            cfg = OmegaConf.merge(cfg, dotlist)
        except OmegaConfBaseException as err:
            raise _wrap(err, f"override {item!r}") from None
    if OmegaConf.is_missing(cfg, "output_dir"):
        raise ConfigError("key 'output_dir': missing; set it in the YAML or as output_dir=PATH")
    for name in ("data", "tokenizer", "model", "task", "train", "sample") if arch is not None else ("data", "tokenizer", "task", "train"):
        if cfg[name] is None:  # `model:` with every key commented out, or `task: null`
            raise ConfigError(f"key '{name}': null; expected a mapping of its keys (or leave the section out for the defaults)")
    try:
        run = OmegaConf.to_object(cfg)
    except OptionError as err:  # the sampling dataclass checks itself when it is made
        raise ConfigError(f"key 'sample.{err.key}': {err.message}") from None
    for section in (run.data, run.tokenizer, run.model, run.task, run.train):
        if section is not None:
            section.validate()
    return run


def to_yaml(cfg: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: RunConfig) -> dict:
    """The config as plain nested dicts (what config.yaml holds)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg))
