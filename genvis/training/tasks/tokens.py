"""Token-generator training: cross-entropy over a discrete tokenizer's ids (VAR, MaskGIT).

VAR (FoundationVision/VAR trainer.py): the ids of all scales [B, L] come from the frozen multi-scale
tokenizer (encoded on the fly, or read from `genvis tokenizer extract`'s int64 ids); the model sees
the class (dropped to the null class at `model.class_dropout` for guidance) and the teacher-forcing
input built from the ids, and position i predicts id i. The loss is the cross-entropy (with
`task.label_smoothing`) averaged over tokens (VAR: every token weighs 1 / L), or with
`task.scale_weighting: scale` over scales (each scale weighs 1 / S, its tokens share it).

MaskGIT (1d-tokenizer's ImageBert training, MUSE): the ids [B, N] (TiTok's K tokens, or a VQ grid flattened
row-major) from the frozen tokenizer; per sample a progress u ~ U(0, 1) masks round(N * mask_ratio(u)) tokens
(at least 1; `task.mask_schedule`, arccos as TiTok) chosen by a random permutation, and the model predicts every
token from the masked sequence and the class. The loss is the cross-entropy (with `task.label_smoothing`, 0.1
in TiTok's recipe) weighted 1 on masked and `task.unmasked_weight` (0.1) on visible tokens, normalised by the
global batch's total weight (so 1 and N processes agree).

Per step it draws, for the whole global batch: which labels are dropped; VAR with stochastic depth, each
sample's keep mask per block and branch; MaskGIT, each sample's progress u and permutation keys.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict

import torch
import torch.nn.functional as F

from genvis.errors import ConfigError
from genvis.registry import MODELS, TASKS
from genvis.samplers.tokens import mask_ratio
from genvis.tokenizers import build_tokenizer
from genvis.training.tasks.base import DataInfo, GeneratorTask, OptimizerSpec

WEIGHTINGS = ("token", "scale")
LAYOUTS = {"var": ("scales",), "maskgit": ("sequence", "grid")}  # the token layouts each family trains on


@dataclass
class TokensTaskConfig:
    """The run config's `task:` section for `name: tokens`."""

    name: str = "tokens"
    label_smoothing: float = 0.0  # VAR's --ls; TiTok's MaskGIT 0.1
    scale_weighting: str = "token"  # VAR: token: every token 1 / L (VAR) | scale: every scale 1 / S
    mask_schedule: str = "arccos"  # MaskGIT: the fraction masked at progress u (arccos | cosine | linear)
    unmasked_weight: float = 0.1  # MaskGIT: loss weight of the visible tokens (masked ones weigh 1)

    def validate(self) -> None:
        from genvis.samplers.options import MASK_SCHEDULES

        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"key 'task.label_smoothing': {self.label_smoothing}: expected a value in [0, 1)")
        if self.scale_weighting not in WEIGHTINGS:
            raise ConfigError(f"key 'task.scale_weighting': {self.scale_weighting!r} is not one of {', '.join(WEIGHTINGS)}")
        if self.mask_schedule not in MASK_SCHEDULES:
            raise ConfigError(f"key 'task.mask_schedule': {self.mask_schedule!r} is not one of {', '.join(MASK_SCHEDULES)}")
        if self.unmasked_weight < 0:
            raise ConfigError(f"key 'task.unmasked_weight': must be >= 0, got {self.unmasked_weight}")


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
        self.family = str(entry.meta["family"])
        layouts = LAYOUTS[self.family]
        if tokenizer.kind != "discrete" or getattr(tokenizer, "token_layout", None) not in layouts:
            need = "a multi-scale VQ tokenizer (ids on a list of scales)" if self.family == "var" else \
                "a discrete tokenizer with a sequence or grid of ids (TiTok, VQ)"
            raise ConfigError(f"key 'tokenizer.path': {self.tokenizer_source} is a {type(tokenizer).__name__}; "
                              f"model.arch {cfg.model.arch!r} needs {need}")
        token_shape = tuple(tokenizer.latent_shape(data.image_shape)) if self.encode else tuple(data.image_shape)
        if self.family == "var" and not self.encode and token_shape != (tokenizer.num_tokens,):
            raise ConfigError(f"key 'data.path': {cfg.data.path} holds items of shape {token_shape}, not the "
                              f"{tokenizer.num_tokens} int64 ids per image of its tokenizer")
        if self.family == "maskgit" and getattr(tokenizer, "num_tokens", None) not in (None, math.prod(token_shape)):
            raise ConfigError(f"key 'data.path': {cfg.data.path} holds items of shape {token_shape}, not the "
                              f"{tokenizer.num_tokens} int64 ids per image of its tokenizer")
        self.tokenizer = tokenizer
        if self.family == "var":
            model = entry.factory(cfg.model, vocab_size=tokenizer.vocab_size, token_dim=tokenizer.quantize.dim,
                                  scales=tokenizer.scales, num_classes=data.num_classes)
        else:
            model = entry.factory(cfg.model, vocab_size=tokenizer.vocab_size, token_shape=token_shape,
                                  num_classes=data.num_classes)
        if cfg.model.init_from is not None and not self.resuming:
            from accelerate import PartialState

            from genvis.models import inherit_weights

            PartialState().print(inherit_weights(model, cfg.model.init_from).summary())
        self.null_label = data.num_classes
        self.label_dropout = cfg.model.class_dropout
        self.num_tokens = model.num_tokens
        if self.family == "var":
            self.drop_rates = model.drop_rates()
            self.weights = torch.cat([torch.full((p * p,), 1.0 / (len(model.scales) * p * p)) for p in model.scales]) \
                if cfg.task.scale_weighting == "scale" else torch.full((model.num_tokens,), 1.0 / model.num_tokens)
            self.last = model.scales[-1] ** 2
            self.arch = f"{type(model).__name__}-d{len(model.blocks)} ({model.num_params() / 1e6:.2f}M parameters)"
        else:
            self.mask_id = model.mask_id
            self.arch = (f"{type(model).__name__} ({model.config.depth} blocks, width {model.config.hidden_size}, "
                         f"{model.num_params() / 1e6:.2f}M parameters; {self.num_tokens} tokens)")
        return {"model": model, "tokenizer": tokenizer}

    def optimizers(self):
        return [OptimizerSpec("model", ("model",))]

    def draw(self, num: int, generator: torch.Generator) -> Dict[str, torch.Tensor]:
        out = {"drop": torch.rand(num, generator=generator) < self.label_dropout}
        if self.family == "maskgit":  # each sample's progress u and the random keys that choose its masked tokens
            out["progress"] = torch.rand(num, generator=generator)
            out["order"] = torch.rand(num, self.num_tokens, generator=generator)
        elif float(self.drop_rates.max()) > 0:  # stochastic depth: per sample, block and branch (scaled by 1 / keep)
            u = torch.rand(num, len(self.drop_rates), 2, generator=generator)
            keep_prob = (1 - self.drop_rates)[None, :, None]
            out["keep"] = (u < keep_prob).float() / keep_prob
        return out

    def ids_of(self, batch) -> torch.Tensor:
        """The batch's ids [B, N] (int64, flattened row-major): read, or encoded by the frozen tokenizer in float32."""
        items = batch[0]
        if not self.encode:
            return items.long().flatten(1)
        with torch.autocast(device_type=items.device.type, enabled=False):
            ids = self.tokenizer.encode(items.float())
        return torch.cat(ids, dim=1) if isinstance(ids, (list, tuple)) else ids.flatten(1)

    def losses(self, modules, batch, draws, step):
        ids = self.ids_of(batch)
        labels = batch[1]
        labels = torch.where(draws["drop"].to(labels.device), torch.full_like(labels, self.null_label), labels)
        if self.family == "maskgit":
            return self.maskgit_losses(modules["model"], ids, labels, draws)
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

    def maskgit_losses(self, model, ids: torch.Tensor, labels: torch.Tensor, draws) -> Dict[str, torch.Tensor]:
        t = self.cfg.task
        n = ids.shape[1]
        ratio = mask_ratio(draws["progress"].to(ids.device), t.mask_schedule).clamp(1e-6, 1.0)
        count = (n * ratio).round().clamp(min=1)
        masked = draws["order"].to(ids.device).argsort(dim=1) < count[:, None]  # a random set of `count` tokens
        logits = model(torch.where(masked, torch.full_like(ids, self.mask_id), ids), labels)
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids.reshape(-1), label_smoothing=t.label_smoothing,
                             reduction="none").view(ids.shape)
        weights = torch.where(masked, 1.0, t.unmasked_weight)
        loss = (ce * weights).sum() / self.reduce_mean(weights.sum().detach()).clamp_min(1e-8)
        with torch.no_grad():
            hit = ((logits.argmax(dim=-1) == ids) & masked).float().sum() / masked.float().sum()
        return {"model": loss, "log/accuracy_masked": hit, "log/masked_fraction": masked.float().mean()}

    def describe(self) -> str:
        t = self.cfg.task
        if self.family == "maskgit":
            return (f"{self.arch} on {self.tokenizer_source} (masked-token cross-entropy, {t.mask_schedule} masking, "
                    f"visible tokens weighted {t.unmasked_weight})")
        return f"{self.arch} on {self.tokenizer_source} ({t.scale_weighting}-weighted cross-entropy)"
