"""The Task interface the training loop drives.

One training step, as the loop runs it:

    draws = task.draw(global_batch, generator)        # every random number of the step, whole batch
    for each micro-batch (gradient accumulation):
        out = task.losses(modules, batch, draws, step)  # under autocast
        for spec in task.optimizers():                  # in the declared order
            backward(out[spec.name]) into spec's modules only
    clip, non-finite guard, then each optimizer steps (declared order); EMA of task.ema_modules

Randomness: `draw` must take every random number of the step (times, noise, masks, label dropout)
from the given generator, for the whole global batch; the loop gives each process and each
micro-batch its slice. That is what makes resume bit-exact and 1 vs N processes equal.
Modules that no optimizer names (a tokenizer, a teacher) are frozen: moved to the device, put in
eval mode, never optimised and never checkpointed as trainable state.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from genvis.errors import ConfigError


@dataclass(frozen=True)
class DataInfo:
    """What a task may know about the data before building its modules."""

    num_classes: int
    image_shape: Tuple[int, int, int]  # C, H, W of what the loader yields: images in [-1, 1], or latents
    encoded_by: Optional[str] = None  # the tokenizer folder that made the latents, when the data are latents


@dataclass(frozen=True)
class OptimizerSpec:
    """An AdamW optimizer over `modules`, stepping with train.lr * lr_scale (betas, weight decay from train)."""

    name: str
    modules: Tuple[str, ...]
    lr_scale: float = 1.0


class Task:
    """Subclass, register with `@TASKS.register(name, schema=YourTaskConfig)`, and implement the methods.

    `cfg` is the whole RunConfig; `cfg.task` is an instance of the registered schema.
    """

    # kept as EMA copies (checkpointed as ema/<name>/, previewed and exported); `genvis sample CKPT` loads
    # ema/model/ (or the only EMA folder), so a generator task names its generator "model"
    ema_modules: Tuple[str, ...] = ("model",)

    def __init__(self, cfg):
        self.cfg = cfg
        # set by the loop before build(): the run continues from a checkpoint, whose weights replace whatever
        # initial weights build() would load (a task may skip loading them)
        self.resuming = False

    @staticmethod
    def reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
        """The mean of `tensor` over all processes (the loop replaces this identity when there are several);
        for statistics a task needs from the global batch (e.g. an adaptive loss weight)."""
        return tensor

    @staticmethod
    def gather(tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` of every process concatenated along dim 0 in process order (the loop replaces this identity
        when there are several); every process must call it with the same shape."""
        return tensor

    def build(self, data: DataInfo) -> Dict[str, nn.Module]:
        """Every module of the task by name, trainable and frozen (the global RNG is seeded before)."""
        raise NotImplementedError

    def optimizers(self) -> List[OptimizerSpec]:
        """The optimizers, in the order they step (a GAN tokenizer: generator, then discriminator)."""
        raise NotImplementedError

    def draw(self, num: int, generator: torch.Generator) -> Dict[str, torch.Tensor]:
        """Every random number of one step for a global batch of `num`, as tensors with `num` rows (CPU)."""
        raise NotImplementedError

    def losses(self, modules: Dict[str, nn.Module], batch, draws: Dict[str, torch.Tensor], step: int) -> Dict[str, torch.Tensor]:
        """{optimizer name: scalar loss} for this micro-batch, plus optional {"log/<name>": scalar} to log.
        `batch` is (images [B, C, H, W] in [-1, 1], labels [B]) on the device, `draws` this micro-batch's
        rows of `draw`'s tensors (still on the CPU). Trainable modules may be wrapped (DDP)."""
        raise NotImplementedError

    def preview(self, modules: Dict[str, nn.Module], path: Path) -> None:
        """Write a preview image (a sample grid, a reconstruction side-by-side) from the EMA modules."""

    def export(self, modules: Dict[str, nn.Module], folder: Path) -> None:
        """Write the run's product into `folder` (an empty temporary folder the loop renames into place)."""
        raise NotImplementedError

    def describe(self) -> str:
        """A few words for the run's first log line."""
        return self.cfg.task.name


class GeneratorTask(Task):
    """A task training a class-conditional generator "model" over `self.tokenizer` (set by `build`, with
    `self.tokenizer_source` its folder or None): previews sample it, the export records the tokenizer."""

    def locate_tokenizer(self, data: DataInfo, what: str) -> Tuple[Optional[str], bool]:
        """(the tokenizer folder to load, or None for pixels; whether batches are images to encode): the folder
        that made pre-extracted `what` (latents, ids) when the data are such, else tokenizer.path."""
        cfg = self.cfg
        if cfg.tokenizer.arch is not None:
            raise ConfigError(f"key 'tokenizer.arch': a generator trains on a trained tokenizer's {what}: set "
                              "tokenizer.path (tokenizer.arch builds a new tokenizer, for task.name=tokenizer)")
        if data.encoded_by is None:
            return cfg.tokenizer.path, True
        if cfg.tokenizer.path is not None and Path(cfg.tokenizer.path).resolve() != Path(data.encoded_by).resolve():
            raise ConfigError(f"key 'tokenizer.path': the {what} in {cfg.data.path} were made by {data.encoded_by}, "
                              f"not {cfg.tokenizer.path}; leave tokenizer.path unset for extracted {what}")
        return data.encoded_by, False

    def preview(self, modules: Dict[str, nn.Module], path: Path) -> None:
        from genvis.generate import class_labels, generate, save_grid, to_uint8

        model = modules["model"]
        labels = class_labels(self.cfg.sample.num, model.num_classes)
        images = generate(model, self.tokenizer, labels, seed=self.cfg.seed, sampling=self.cfg.sample,
                          precision=self.cfg.train.mixed_precision)
        save_grid(to_uint8(images), path, nrow=min(model.num_classes, len(labels)))

    def export(self, modules: Dict[str, nn.Module], folder: Path) -> None:
        from genvis.tokenizers import record_tokenizer

        modules["model"].save_pretrained(str(folder), safe_serialization=True)
        record_tokenizer(folder, self.tokenizer, self.tokenizer_source, self.cfg.tokenizer.embed)
