"""Token-generator training: cross-entropy over a discrete tokenizer's ids (VAR; MaskGIT joins later).

VAR (FoundationVision/VAR trainer.py): the ids of all scales [B, L] come from the frozen multi-scale
tokenizer (encoded on the fly, or read from `genvis tokenizer extract`'s int64 ids); the model sees
the class (dropped to the null class at `model.class_dropout` for guidance) and the teacher-forcing
input built from the ids, and position i predicts id i. The loss is the cross-entropy (with
`task.label_smoothing`) averaged over tokens (VAR: every token weighs 1 / L), or with
`task.scale_weighting: scale` over scales (each scale weighs 1 / S, its tokens share it).

Per step it draws, for the whole global batch: which labels are dropped and, when the model has
stochastic depth, each sample's keep mask per block and branch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

import torch
import torch.nn.functional as F

from genvis.errors import ConfigError
from genvis.registry import MODELS, TASKS
from genvis.tokenizers import build_tokenizer
from genvis.training.tasks.base import DataInfo, GeneratorTask, OptimizerSpec

WEIGHTINGS = ("token", "scale")


@dataclass
class TokensTaskConfig:
    """The run config's `task:` section for `name: tokens`."""

    name: str = "tokens"
    label_smoothing: float = 0.0  # VAR's --ls
    scale_weighting: str = "token"  # token: every token 1 / L (VAR) | scale: every scale 1 / S

    def validate(self) -> None:
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"key 'task.label_smoothing': {self.label_smoothing}: expected a value in [0, 1)")
        if self.scale_weighting not in WEIGHTINGS:
            raise ConfigError(f"key 'task.scale_weighting': {self.scale_weighting!r} is not one of {', '.join(WEIGHTINGS)}")


@TASKS.register("tokens", schema=TokensTaskConfig)
class TokensTask(GeneratorTask):
    """Modules: "model" (trained, EMA, exported) and "tokenizer" (frozen, discrete)."""

    def build(self, data: DataInfo) -> Dict[str, torch.nn.Module]:
        cfg = self.cfg
        entry = MODELS.entry(cfg.model.arch)
        if entry.meta.get("task") != "tokens":
            raise ConfigError(f"key 'task.name': tokens training needs a token generator; model.arch {cfg.model.arch!r} "
                              f"trains with task.name={entry.meta.get('task')!r}")
        self.tokenizer_source, self.encode = self.locate_tokenizer(data, "ids")
        if self.tokenizer_source is None:
            raise ConfigError("key 'tokenizer.path': a token generator needs a trained discrete tokenizer (a "
                              "tokenizer folder or run), or data.name=latents with ids from `genvis tokenizer extract`")
        tokenizer = build_tokenizer(self.tokenizer_source)
        if tokenizer.kind != "discrete" or getattr(tokenizer, "token_layout", None) != "scales":
            raise ConfigError(f"key 'tokenizer.path': {self.tokenizer_source} is a {type(tokenizer).__name__}; "
                              f"model.arch {cfg.model.arch!r} needs a multi-scale VQ tokenizer (ids on a list of scales)")
        if not self.encode and tuple(data.image_shape) != (tokenizer.num_tokens,):
            raise ConfigError(f"key 'data.path': {cfg.data.path} holds items of shape {tuple(data.image_shape)}, not the "
                              f"{tokenizer.num_tokens} int64 ids per image of its tokenizer")
        self.tokenizer = tokenizer
        model = entry.factory(cfg.model, vocab_size=tokenizer.vocab_size, token_dim=tokenizer.quantize.dim,
                              scales=tokenizer.scales, num_classes=data.num_classes)
        if cfg.model.init_from is not None and not self.resuming:
            from accelerate import PartialState

            from genvis.models import inherit_weights

            PartialState().print(inherit_weights(model, cfg.model.init_from).summary())
        self.null_label = data.num_classes
        self.label_dropout = cfg.model.class_dropout
        self.drop_rates = model.drop_rates()
        weights = torch.cat([torch.full((p * p,), 1.0 / (len(model.scales) * p * p)) for p in model.scales]) \
            if cfg.task.scale_weighting == "scale" else torch.full((model.num_tokens,), 1.0 / model.num_tokens)
        self.weights = weights
        self.last = model.scales[-1] ** 2
        self.arch = f"{type(model).__name__}-d{len(model.blocks)} ({model.num_params() / 1e6:.2f}M parameters)"
        return {"model": model, "tokenizer": tokenizer}

    def optimizers(self):
        return [OptimizerSpec("model", ("model",))]

    def draw(self, num: int, generator: torch.Generator) -> Dict[str, torch.Tensor]:
        out = {"drop": torch.rand(num, generator=generator) < self.label_dropout}
        if float(self.drop_rates.max()) > 0:  # stochastic depth: per sample, block and branch (scaled by 1 / keep)
            u = torch.rand(num, len(self.drop_rates), 2, generator=generator)
            keep_prob = (1 - self.drop_rates)[None, :, None]
            out["keep"] = (u < keep_prob).float() / keep_prob
        return out

    def ids_of(self, batch) -> torch.Tensor:
        """The batch's ids [B, L] (int64): read, or encoded by the frozen tokenizer in float32."""
        items = batch[0]
        if not self.encode:
            return items.long()
        with torch.autocast(device_type=items.device.type, enabled=False):
            return torch.cat(self.tokenizer.encode(items.float()), dim=1)

    def losses(self, modules, batch, draws, step):
        ids = self.ids_of(batch)
        labels = batch[1]
        labels = torch.where(draws["drop"].to(labels.device), torch.full_like(labels, self.null_label), labels)
        with torch.no_grad(), torch.autocast(device_type=ids.device.type, enabled=False):
            x = self.tokenizer.teacher_forcing_input(ids)
        keep = draws.get("keep")
        logits = modules["model"](labels, x, keep=None if keep is None else keep.to(ids.device))
        vocab = logits.shape[-1]
        ce = F.cross_entropy(logits.reshape(-1, vocab), ids.reshape(-1), label_smoothing=self.cfg.task.label_smoothing,
                             reduction="none").view(ids.shape)
        loss = (ce * self.weights.to(ce.device)).sum(dim=1).mean()
        with torch.no_grad():
            hit = (logits.argmax(dim=-1) == ids).float()
        return {"model": loss, "log/accuracy": hit.mean(), "log/accuracy_last_scale": hit[:, -self.last:].mean(),
                "log/ce_last_scale": ce[:, -self.last:].mean().detach()}

    def describe(self) -> str:
        return f"{self.arch} on {self.tokenizer_source} ({self.cfg.task.scale_weighting}-weighted cross-entropy)"
