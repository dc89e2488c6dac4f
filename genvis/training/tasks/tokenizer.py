"""Tokenizer training, the taming / LDM recipe: reconstruction (L1 or L2) + perceptual + the tokenizer's own
term (KL for a KL-VAE, the quantizer's codebook / commitment / entropy loss for VQ) + a hinge PatchGAN whose
weight adapts to the decoder's last layer, ||grad rec|| / (||grad gan|| + 1e-4), from a delayed start, with
optional LeCam regularisation. Two optimizers: the tokenizer, then the discriminator.

Per step it draws the random numbers the tokenizer asks for (`draw_shape`) for the whole global batch: the
posterior noise of a KL-VAE (the decoder trains on posterior samples mean + std * noise, as LDM), the
dead-code restart keys of a quantizer. The tokenizer's forward gets the global batch's collectives (mean,
gather), so quantizer statistics and codebook restarts are the same on every process. The discriminator judges reconstructions through its unwrapped module for the
tokenizer's loss (only the tokenizer's parameters receive that gradient) and real + fake images in one
batch through its (DDP) module for its own loss, so each module has one forward and one backward per
step under several processes.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import torch

from genvis.errors import ConfigError
from genvis.registry import TASKS, TOKENIZERS
from genvis.tokenizers.losses import (
    ALIGN_FEATURES,
    FoundationAlignment,
    LeCam,
    PatchDiscriminator,
    adaptive_weight,
    build_perceptual,
    hinge_d_loss,
    hinge_g_loss,
    reconstruction_loss,
)
from genvis.tokenizers.vq import Collectives
from genvis.training.tasks.base import DataInfo, OptimizerSpec, Task


@dataclass
class TokenizerTaskConfig:
    """The run config's `task:` section for `name: tokenizer` (the architecture is the `tokenizer:` section)."""

    name: str = "tokenizer"
    reconstruction: str = "l1"  # l1 | l2
    perceptual: str = "auto"  # auto (LPIPS when lpips_weights exists, else digits) | lpips | digits | none
    perceptual_weight: float = 1.0
    lpips_weights: Optional[str] = None  # a local torchvision VGG16 state dict (nothing here downloads one)
    lpips_heads: Optional[str] = None  # LPIPS's linear heads, when the lpips package is not installed
    kl_weight: float = 1e-6  # LDM's KL-f8 (KL tokenizers; a quantizer's loss weights are in tokenizer:)
    disc_weight: float = 0.5  # times the adaptive weight (or alone, adaptive_weight: false)
    adaptive_weight: bool = True  # taming / LDM; LlamaGen's VQ recipe uses disc_weight alone
    disc_start: int = 0  # step from which the GAN term counts (before it, its weight is 0, as taming)
    disc_layers: int = 3
    disc_channels: int = 64
    disc_lr_scale: float = 1.0  # the discriminator's learning rate, relative to train.lr
    lecam_weight: float = 0.0  # LeCam regularisation of the discriminator (0 = off)
    sample_posterior: bool = True  # KL: decode posterior samples (LDM) rather than the mean
    # VA-VAE: align the latents with a frozen feature network (digits: the digits classifier's first block)
    align: str = "none"  # none | digits | dinov2 (a local weights file in align_weights)
    align_weight: float = 0.1  # VA-VAE's vf_weight, times the adaptive weight (or alone, align_adaptive: false)
    align_adaptive: bool = True  # ||grad nll|| / (||grad align|| + 1e-4) at the encoder's last layer
    align_distmat_margin: float = 0.25
    align_cos_margin: float = 0.5
    align_distmat_weight: float = 1.0
    align_cos_weight: float = 1.0
    align_weights: Optional[str] = None  # the feature network's weights file (digits: default the shipped classifier)
    preview_num: int = 16  # training images in the reconstruction preview

    def validate(self) -> None:
        for key, choices in (("reconstruction", ("l1", "l2")), ("perceptual", ("auto", "lpips", "digits", "none"))):
            if getattr(self, key) not in choices:
                raise ConfigError(f"key 'task.{key}': {getattr(self, key)!r} is not one of {', '.join(choices)}")
        if self.align not in ("none",) + ALIGN_FEATURES:
            raise ConfigError(f"key 'task.align': {self.align!r} is not one of none, {', '.join(ALIGN_FEATURES)}")
        for key in ("perceptual_weight", "kl_weight", "disc_weight", "disc_start", "lecam_weight", "disc_lr_scale",
                    "align_weight", "align_distmat_margin", "align_cos_margin", "align_distmat_weight", "align_cos_weight"):
            if getattr(self, key) < 0:
                raise ConfigError(f"key 'task.{key}': must be >= 0, got {getattr(self, key)}")
        for key in ("disc_layers", "disc_channels", "preview_num"):
            if getattr(self, key) < 1:
                raise ConfigError(f"key 'task.{key}': must be >= 1, got {getattr(self, key)}")


def _module(m):
    """The module under a DDP wrapper (or the module itself)."""
    return getattr(m, "module", m)


@TASKS.register("tokenizer", schema=TokenizerTaskConfig, model=False)
class TokenizerTask(Task):
    """Modules: "tokenizer" (trained, EMA, exported with its measured normalisation), "disc" (trained) and
    "perceptual" (frozen, when used)."""

    ema_modules = ("tokenizer",)

    def build(self, data: DataInfo) -> Dict[str, torch.nn.Module]:
        cfg, t = self.cfg, self.cfg.task
        if cfg.tokenizer.arch is None:
            raise ConfigError("key 'tokenizer.arch': tokenizer training needs an architecture to train, e.g. tokenizer.arch=kl")
        if data.encoded_by is not None:
            raise ConfigError(f"key 'data.name': tokenizer training needs images, not latents ({cfg.data.name})")
        tokenizer = TOKENIZERS.get(cfg.tokenizer.arch).from_section(cfg.tokenizer, data.image_shape)
        if not hasattr(tokenizer, "last_layer"):
            raise ConfigError(f"key 'tokenizer.arch': {cfg.tokenizer.arch!r} is not trainable")
        self.latent_shape = tuple(tokenizer.latent_shape(data.image_shape))
        self.draw_shapes = dict(tokenizer.draw_shape(data.image_shape))
        self.kind, self.vocab_size = tokenizer.kind, getattr(tokenizer, "vocab_size", None)
        disc = PatchDiscriminator(data.image_shape[0], ndf=t.disc_channels, n_layers=t.disc_layers)
        perceptual, self.perceptual_name = build_perceptual(t.perceptual, weights=t.lpips_weights, heads=t.lpips_heads)
        self.lecam = LeCam() if t.lecam_weight > 0 else None
        modules = {"tokenizer": tokenizer, "disc": disc}
        if t.align != "none":
            if tokenizer.kind != "continuous" or not hasattr(tokenizer, "encoder_last_layer"):
                raise ConfigError(f"key 'task.align': the alignment loss is VA-VAE's, for a KL tokenizer's latents; "
                                  f"tokenizer.arch {cfg.tokenizer.arch!r} has none")
            modules["align"] = FoundationAlignment(
                self.latent_shape[0], t.align, t.align_weights, distmat_margin=t.align_distmat_margin,
                cos_margin=t.align_cos_margin, distmat_weight=t.align_distmat_weight, cos_weight=t.align_cos_weight)
        if self.lecam is not None:
            disc.lecam = self.lecam  # its EMA buffers are checkpointed with the discriminator
        if perceptual is not None:
            modules["perceptual"] = perceptual
        return modules

    def optimizers(self):
        trained = ("tokenizer", "align") if self.cfg.task.align != "none" else ("tokenizer",)  # align: its projection
        return [OptimizerSpec("tokenizer", trained), OptimizerSpec("disc", ("disc",), lr_scale=self.cfg.task.disc_lr_scale)]

    def draw(self, num: int, generator: torch.Generator) -> Dict[str, torch.Tensor]:
        """Gaussian posterior noise ("noise"), uniform restart keys ("keys"), as the tokenizer asks."""
        return {name: (torch.randn if name == "noise" else torch.rand)((num, *shape), generator=generator)
                for name, shape in self.draw_shapes.items()}

    def losses(self, modules, batch, draws, step):
        t = self.cfg.task
        images = batch[0]
        inputs = {name: value.to(images.device) for name, value in draws.items() if name != "noise" or t.sample_posterior}
        out = modules["tokenizer"](images, **inputs, sync=Collectives(mean=self.reduce_mean, gather=self.gather))
        rec = out["reconstruction"]
        nll = reconstruction_loss(images, rec, t.reconstruction)
        if "perceptual" in modules:
            nll = nll + t.perceptual_weight * modules["perceptual"](images, rec)
        nll = nll.mean()
        own = {}  # the tokenizer's own term: KL, or the quantizer's loss
        if "kl" in out:
            own["kl"] = t.kl_weight * out["kl"]
        if "quantizer_loss" in out:
            own["quantizer"] = out["quantizer_loss"]
        if "align" in modules:  # VA-VAE: weight adapted at the encoder's last layer (clamped to 1e8, as VA-VAE)
            align = modules["align"](images, out["latents"])
            align_weight = torch.full((), t.align_weight, device=images.device)
            if t.align_adaptive:
                align_weight = align_weight * adaptive_weight(
                    nll, align, _module(modules["tokenizer"]).encoder_last_layer, max_weight=1e8, reduce=self.reduce_mean)
            own["align"] = align_weight * align

        # the tokenizer's adversarial term, through the unwrapped discriminator
        factor = 1.0 if step >= t.disc_start else 0.0
        g_loss = hinge_g_loss(_module(modules["disc"])(rec))
        if factor and not t.adaptive_weight:
            weight = torch.full((), t.disc_weight, device=images.device)
        elif factor:  # computed from the global batch's gradients under several processes (1 process equals N)
            weight = adaptive_weight(nll, g_loss, _module(modules["tokenizer"]).last_layer, reduce=self.reduce_mean)
            weight = weight * t.disc_weight
        else:  # before the discriminator starts: taming multiplies the term by 0; skip the two gradients
            weight = torch.zeros((), device=images.device)
        tokenizer_loss = nll + sum(own.values()) + factor * weight * g_loss

        # the discriminator's own loss: real and (detached) fake in one batch through its module
        logits = modules["disc"](torch.cat([images, rec.detach()]))
        real, fake = logits.chunk(2)
        disc_loss = hinge_d_loss(real, fake)
        if self.lecam is not None:
            disc_loss = disc_loss + t.lecam_weight * self.lecam.penalty(real, fake)
            self.lecam.update(self.reduce_mean(real.detach().mean()), self.reduce_mean(fake.detach().mean()))
        logs = {key: value.detach() for key, value in out.items() if key.startswith("log/")}
        if "kl" in out:
            logs["log/kl"] = out["kl"].detach()
        if "quantizer_loss" in out:
            logs["log/quantizer"] = out["quantizer_loss"].detach()
        if "align" in own:
            logs["log/align"], logs["log/align_weight"] = align.detach(), align_weight.detach()
        return {"tokenizer": tokenizer_loss, "disc": factor * disc_loss,
                "log/reconstruction": nll.detach(), "log/g_loss": g_loss.detach(),
                "log/d_weight": weight.detach(), "log/d_loss": disc_loss.detach(), **logs}

    def preview(self, modules, path: Path) -> None:
        """Originals (top row) above their reconstructions (bottom row), the first preview_num training images."""
        from genvis.data import build_dataset
        from genvis.generate import save_grid, to_uint8

        dataset = build_dataset(self.cfg.data, split="train")
        images = torch.stack([dataset[i][0] for i in range(min(self.cfg.task.preview_num, len(dataset)))])
        tokenizer = modules["tokenizer"]
        device = next(tokenizer.parameters()).device
        with torch.no_grad():
            rec = tokenizer(images.to(device))["reconstruction"].float().cpu()
        save_grid(to_uint8(torch.cat([images, rec.clamp(-1, 1)])), path, nrow=len(images))

    def export(self, modules, folder: Path) -> None:
        """The EMA tokenizer; a continuous one with its latent normalisation measured on (up to stats_images)
        training images."""
        from genvis.data import build_dataset

        tokenizer = modules["tokenizer"]
        if tokenizer.kind != "continuous":
            tokenizer.save_pretrained(folder)
            return
        section = self.cfg.tokenizer
        dataset = build_dataset(self.cfg.data, split="train")
        count = min(section.stats_images, len(dataset))
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(self.cfg.seed))[:count].tolist()
        device = next(tokenizer.parameters()).device

        def batches(size=64):
            for start in range(0, count, size):
                yield torch.stack([dataset[i][0] for i in order[start : start + size]]).to(device)

        tokenizer.measure_normalisation(batches(), section.normalisation)
        tokenizer.save_pretrained(folder)

    def describe(self) -> str:
        t = self.cfg.task
        made = (f"latents {'x'.join(map(str, self.latent_shape))}" if self.kind == "continuous"
                else f"{'x'.join(map(str, self.latent_shape))} ids of a {self.vocab_size}-code vocabulary")
        own = "KL" if self.kind == "continuous" else "quantizer loss"
        if t.align != "none":
            own += f" + VA-VAE alignment with the {t.align} features"
        return (f"{self.cfg.tokenizer.arch} tokenizer ({made}; {t.reconstruction} + perceptual: {self.perceptual_name} "
                f"+ {own} + PatchGAN from step {t.disc_start})")
