"""Diffusion / flow training of a class-conditional generator (DiT and the other diffusion-family
models), in pixel space or in a frozen tokenizer's latent space.

Per step it draws, for the whole global batch: training times, Gaussian noise, and which labels
are dropped to the null class (classifier-free guidance). The loss is the objective's
(genvis.diffusion.objectives): eps (+ DiT's learned-variance VLB term), v, or rectified flow.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

import torch

from genvis.diffusion.objectives import PREDICTIONS, objective_for
from genvis.diffusion.schedules import schedule_for_model
from genvis.errors import ConfigError
from genvis.registry import MODELS, TASKS
from genvis.tokenizers import build_tokenizer
from genvis.training.tasks.base import DataInfo, GeneratorTask, OptimizerSpec

OBJECTIVES = ("eps", "v", "flow", "score")
# schedule -> the objectives it trains: DiT's discrete VP (eps, v) or a continuous interpolant of SiT's, the
# rectified-flow line ("flow") or GVP, with velocity ("flow"), score or noise ("eps") prediction
SCHEDULE_OBJECTIVES = {"linear": ("eps", "v"), "flow": ("flow", "score", "eps"), "gvp": ("flow", "score", "eps")}


@dataclass
class DiffusionTaskConfig:
    """The run config's `task:` section for `name: diffusion`."""

    name: str = "diffusion"
    objective: str = "eps"  # eps | v | flow (velocity) | score
    schedule: str = "linear"  # linear (DiT's 1000 betas) | flow (rectified flow) | gvp (SiT's GVP)
    num_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    time_sampling: str = "uniform"  # uniform | logit_normal (flow)
    logit_mean: float = 0.0
    logit_std: float = 1.0
    flow_shift: float = 1.0  # flow: resolution shift of the model's default sampling grid
    cosine_weight: float = 0.0  # velocity: LightningDiT's cosine loss on the velocity direction (it uses 1)

    def validate(self) -> None:
        for key, choices in (("objective", OBJECTIVES), ("schedule", tuple(SCHEDULE_OBJECTIVES)),
                             ("time_sampling", ("uniform", "logit_normal"))):
            if getattr(self, key) not in choices:
                raise ConfigError(f"key 'task.{key}': {getattr(self, key)!r} is not one of {', '.join(choices)}")
        if self.objective not in SCHEDULE_OBJECTIVES[self.schedule]:
            raise ConfigError(f"key 'task.objective': {self.objective!r} does not train on schedule {self.schedule!r}; "
                              f"it takes {', '.join(SCHEDULE_OBJECTIVES[self.schedule])}")
        if self.cosine_weight < 0 or (self.cosine_weight and self.objective != "flow"):
            raise ConfigError(f"key 'task.cosine_weight': {self.cosine_weight}: a weight >= 0, and the cosine loss is "
                              "defined on velocity (objective 'flow')")
        if self.flow_shift <= 0:
            raise ConfigError(f"key 'task.flow_shift': must be > 0, got {self.flow_shift}")
        if self.num_timesteps < 2:
            raise ConfigError(f"key 'task.num_timesteps': must be >= 2, got {self.num_timesteps}")
        if self.logit_std <= 0:
            raise ConfigError(f"key 'task.logit_std': must be > 0, got {self.logit_std}")


@TASKS.register("diffusion", schema=DiffusionTaskConfig)
class DiffusionTask(GeneratorTask):
    """Modules: "model" (trained, EMA, exported) and "tokenizer" (frozen; the identity for pixels)."""

    def build(self, data: DataInfo) -> Dict[str, torch.nn.Module]:
        cfg, t = self.cfg, self.cfg.task
        entry = MODELS.entry(cfg.model.arch)
        if entry.meta.get("family") != "diffusion":
            raise ConfigError(f"key 'task.name': diffusion training needs a diffusion-family model; "
                              f"model.arch {cfg.model.arch!r} is {entry.meta.get('family')!r}")
        self.tokenizer_source, self.encode = self.locate_tokenizer(data, "latents")
        self.tokenizer = build_tokenizer(self.tokenizer_source)
        self.sample_shape = tuple(self.tokenizer.latent_shape(data.image_shape) if self.encode else data.image_shape)
        if self.tokenizer.kind != "continuous":
            raise ConfigError(f"key 'tokenizer.path': {self.tokenizer_source} is a discrete tokenizer "
                              f"({type(self.tokenizer).__name__}: token ids); a diffusion model trains on pixels or "
                              "continuous latents")
        model = entry.factory(
            cfg.model, sample_shape=self.sample_shape, num_classes=data.num_classes,
            learn_sigma=cfg.model.learn_sigma and t.objective == "eps", prediction_type=PREDICTIONS[t.objective],
            schedule=t.schedule, num_train_timesteps=t.num_timesteps, beta_start=t.beta_start, beta_end=t.beta_end,
            flow_shift=t.flow_shift,
        )
        if cfg.model.init_from is not None and not self.resuming:  # a checkpoint's weights replace them anyway
            from accelerate import PartialState

            from genvis.models import inherit_weights

            PartialState().print(inherit_weights(model, cfg.model.init_from).summary())
        self.objective = objective_for(schedule_for_model(model), t.objective, model.config.learn_sigma,
                                       time_sampling=t.time_sampling, logit_mean=t.logit_mean, logit_std=t.logit_std,
                                       cosine_weight=t.cosine_weight)
        self.null_label = data.num_classes
        self.label_dropout = cfg.model.class_dropout
        self.arch = type(model).__name__
        return {"model": model, "tokenizer": self.tokenizer}

    def optimizers(self):
        return [OptimizerSpec("model", ("model",))]

    def draw(self, num: int, generator: torch.Generator) -> Dict[str, torch.Tensor]:
        times = self.objective.sample_time(num, generator)
        noise = torch.randn((num, *self.sample_shape), generator=generator)
        drop = torch.rand(num, generator=generator) < self.label_dropout
        return {"times": times, "noise": noise, "drop": drop}

    def losses(self, modules, batch, draws, step):
        images, labels = batch
        x0 = modules["tokenizer"].encode(images) if self.encode else images
        labels = torch.where(draws["drop"].to(labels.device), torch.full_like(labels, self.null_label), labels)
        loss = self.objective.loss(modules["model"], x0, draws["times"], draws["noise"].to(x0.device), y=labels)
        return {"model": loss.mean()}

    def describe(self) -> str:
        return f"{self.arch} ({self.cfg.task.objective} objective, {self.cfg.task.schedule} schedule)"
