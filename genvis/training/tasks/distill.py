"""Distillation: a diffusion student supervised by a frozen teacher's predictions (LiT).

Per step, exactly the diffusion task's draws (times, noise, label dropout). The student's loss is its
objective's loss plus `weight` times the mean squared difference between its output and the teacher's
on the same noisy input, time and label:

    loss = objective(student) + weight * mean_flat((student(x_t, t, y) - teacher(x_t, t, y))^2)

over the prediction channels, and the learned-variance channels too when both models have them (LiT
distils noise and variance). The teacher is loaded from its run or model folder, frozen (never
optimised, never checkpointed as trainable state) and recorded in the exported model (teacher.json).
Modules: "student" (trained, EMA, exported), "teacher" and "tokenizer" (frozen).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import torch

from genvis.diffusion.objectives import mean_flat
from genvis.errors import ConfigError
from genvis.registry import TASKS
from genvis.training.tasks.base import DataInfo, OptimizerSpec
from genvis.training.tasks.diffusion import DiffusionTask, DiffusionTaskConfig

# what must agree between teacher and student for the teacher's output to be a target
_MATCHING = ("prediction_type", "schedule", "num_train_timesteps", "beta_start", "beta_end", "num_classes")


@dataclass
class DistillTaskConfig(DiffusionTaskConfig):
    """The run config's `task:` section for `name: distill`: the diffusion task's keys plus the teacher."""

    name: str = "distill"
    teacher: Optional[str] = None  # the teacher's run directory, checkpoint or model folder (required)
    weight: float = 1.0  # weight of the distillation term next to the objective's loss

    def validate(self) -> None:
        super().validate()
        if self.teacher is None:
            raise ConfigError("key 'task.teacher': distillation needs a teacher: a run directory, checkpoint or model folder")
        if self.weight < 0:
            raise ConfigError(f"key 'task.weight': must be >= 0, got {self.weight}")


def _weights_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(folder.glob("*.safetensors")):
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                digest.update(chunk)
    return digest.hexdigest()


@TASKS.register("distill", schema=DistillTaskConfig)
class DistillTask(DiffusionTask):
    ema_modules = ("student",)

    def build(self, data: DataInfo) -> Dict[str, torch.nn.Module]:
        from genvis.models import load_model, resolve_model_dir

        modules = super().build(data)
        student = modules.pop("model")
        source = self.cfg.task.teacher
        teacher = load_model(source)
        self.teacher_folder = resolve_model_dir(source)
        if teacher.family != "diffusion":
            raise ConfigError(f"key 'task.teacher': {source} is a {teacher.family!r} model, not a diffusion one")
        if tuple(teacher.sample_shape) != tuple(student.sample_shape):
            raise ConfigError(f"key 'task.teacher': {source} generates {tuple(teacher.sample_shape)}, the student "
                              f"{tuple(student.sample_shape)}: teacher and student must work in the same space")
        for key in _MATCHING:
            if teacher.config[key] != student.config[key]:
                raise ConfigError(f"key 'task.teacher': {source} has {key} {teacher.config[key]!r}, the student "
                                  f"{student.config[key]!r}: set the task to the teacher's objective and schedule")
        if self.label_dropout > 0 and teacher.y_embedder.embedding_table.num_embeddings <= teacher.num_classes:
            raise ConfigError(f"key 'task.teacher': {source} has no null class, but model.class_dropout "
                              f"{self.label_dropout} drops labels to it; set model.class_dropout=0")
        c = student.in_channels
        both_sigma = student.config.learn_sigma and teacher.config.learn_sigma
        self.channels = 2 * c if both_sigma else c  # prediction, and variance when both have it
        return {"student": student, "teacher": teacher, **modules}

    def optimizers(self):
        return [OptimizerSpec("student", ("student",))]

    def losses(self, modules, batch, draws, step):
        images, labels = batch
        x0 = modules["tokenizer"].encode(images) if self.encode else images
        labels = torch.where(draws["drop"].to(labels.device), torch.full_like(labels, self.null_label), labels)
        outputs = {}

        def student_and_teacher(x_t, t, y):
            outputs["student"] = modules["student"](x_t, t, y)
            with torch.no_grad():
                outputs["teacher"] = modules["teacher"](x_t, t, y)
            return outputs["student"]

        loss = self.objective.loss(student_and_teacher, x0, draws["times"], draws["noise"].to(x0.device), y=labels)
        n = self.channels
        distill = mean_flat((outputs["student"][:, :n].float() - outputs["teacher"][:, :n].float()) ** 2)
        return {"student": (loss + self.cfg.task.weight * distill).mean(),
                "log/objective": loss.mean().detach(), "log/distill": distill.mean().detach()}

    def preview(self, modules, path: Path) -> None:
        super().preview({**modules, "model": modules["student"]}, path)

    def export(self, modules, folder: Path) -> None:
        super().export({**modules, "model": modules["student"]}, folder)
        record = {"teacher": str(self.teacher_folder.resolve()), "class": type(modules["teacher"]).__name__,
                  "weights_sha256": _weights_digest(self.teacher_folder), "weight": self.cfg.task.weight}
        (folder / "teacher.json").write_text(json.dumps(record, indent=2) + "\n")

    def describe(self) -> str:
        return f"{super().describe()}, distilled from {self.cfg.task.teacher} (weight {self.cfg.task.weight})"
