"""One Accelerate training loop for the generators.

Determinism: every random draw of step s (which images, flips, timesteps, noise, label dropout)
comes from generators seeded by (seed, s), drawn for the whole global batch; process r takes its
contiguous slice. So a resumed run is bit-identical to an uninterrupted one (CPU, one process),
and N processes with the same global batch reach the same weights as one (to float tolerance).
The learning rate is a pure function of the step, so no scheduler state needs restoring either.
"""
from __future__ import annotations

import contextlib
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from genvis.config import RunConfig, to_yaml
from genvis.data import build_dataset
from genvis.diffusion.objectives import objective_for
from genvis.diffusion.schedules import schedule_for_model
from genvis.errors import GenvisError
from genvis.io import finalize_dir, write_json_atomic, write_text_atomic
from genvis.models.dit import build_dit
from genvis.precision import resolve_precision
from genvis.training.checkpoint import (
    clean_partial,
    export_model,
    latest_checkpoint,
    prune_checkpoints,
    read_trainer_state,
    step_dir_name,
)
from genvis.training.ema import EMA

STREAM_DATA, STREAM_NOISE, STREAM_PERM = 0, 1, 2


class TrainingError(GenvisError):
    pass


def step_generator(seed: int, step: int, stream: int) -> torch.Generator:
    state = np.random.SeedSequence([int(seed), int(step), int(stream)]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state >> np.uint64(1)))


class StepBatchSampler:
    """Yields, for each step from `start_step`, this process's slice of the global batch as
    (dataset index, flip) pairs. Indices walk through per-epoch permutations seeded by (seed, epoch),
    so every image is seen once per epoch whatever the batch size."""

    def __init__(self, num_items: int, global_batch: int, rank: int, world: int, seed: int, start_step: int, end_step: int, random_flip: bool):
        self.n = num_items
        self.batch = global_batch
        self.local = global_batch // world
        self.rank = rank
        self.seed = seed
        self.start, self.end = start_step, end_step
        self.random_flip = random_flip
        self._perm_epoch, self._perm = -1, None

    def _perm_for(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            self._perm = torch.randperm(self.n, generator=step_generator(self.seed, epoch, STREAM_PERM))
            self._perm_epoch = epoch
        return self._perm

    def global_indices(self, step: int) -> List[int]:
        out = []
        for p in range(step * self.batch, (step + 1) * self.batch):
            out.append(int(self._perm_for(p // self.n)[p % self.n]))
        return out

    def __iter__(self) -> Iterator[List[Tuple[int, bool]]]:
        for step in range(self.start, self.end):
            idx = self.global_indices(step)
            flips = torch.rand(self.batch, generator=step_generator(self.seed, step, STREAM_DATA)) < 0.5
            sl = slice(self.rank * self.local, (self.rank + 1) * self.local)
            yield [(i, bool(f) and self.random_flip) for i, f in zip(idx[sl], flips[sl].tolist())]

    def __len__(self) -> int:
        return self.end - self.start


def build_generator(cfg: RunConfig, num_classes: int):
    """The generator a run config describes (the model declares its prediction type and schedule)."""
    d = cfg.diffusion
    prediction = {"eps": "eps", "v": "v", "flow": "velocity"}[d.objective]
    m = cfg.model
    sizes = {k: getattr(m, k) for k in ("depth", "hidden_size", "num_heads") if getattr(m, k) is not None}
    return build_dit(
        m.size,
        m.patch_size,
        **sizes,
        input_size=cfg.data.resolution,
        in_channels=cfg.data.channels,
        num_classes=num_classes,
        class_dropout_prob=cfg.model.class_dropout,
        learn_sigma=cfg.model.learn_sigma and d.objective == "eps",
        prediction_type=prediction,
        schedule=d.schedule,
        num_train_timesteps=d.num_timesteps,
        beta_start=d.beta_start,
        beta_end=d.beta_end,
        flow_shift=d.flow_shift,
        tokenizer="pixels",
    )


def _flat_hparams(cfg: RunConfig) -> Dict[str, object]:
    out = {}

    def walk(prefix, obj):
        for k, v in obj.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict):
                walk(key + ".", v)
            elif isinstance(v, (int, float, str, bool)):
                out[key] = v
            else:
                out[key] = str(v)

    walk("", asdict(cfg))
    return out


def lr_at(cfg: RunConfig, step: int) -> float:
    warm = cfg.train.warmup_steps
    return cfg.train.lr * (min(1.0, (step + 1) / warm) if warm else 1.0)


def train(cfg: RunConfig) -> Path:
    """Train (or resume) the run in cfg.output_dir; returns the exported model folder."""
    from accelerate import Accelerator, PartialState
    from accelerate.utils import ProjectConfiguration, parse_flag_from_env

    out = Path(cfg.output_dir)
    # The device decides the 'auto' precision, which Accelerator needs up front. PartialState must see
    # ACCELERATE_USE_CPU as Accelerator would, or torchrun CPU workers each start a 1-process run.
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    precision = resolve_precision(cfg.train.mixed_precision, state.device)
    accelerator = Accelerator(
        mixed_precision=precision,
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
    )
    world, rank = accelerator.num_processes, accelerator.process_index
    t = cfg.train
    if t.batch_size % (world * t.grad_accum):
        raise TrainingError(
            f"key 'train.batch_size': {t.batch_size} is not divisible by processes x grad_accum = {world} x {t.grad_accum}"
        )
    micro = t.batch_size // (world * t.grad_accum)

    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        clean_partial(out)
        write_text_atomic(out / "config.yaml", to_yaml(cfg))
    accelerator.wait_for_everyone()

    dataset = build_dataset(cfg.data, split="train")
    torch.manual_seed(cfg.seed)  # identical initial weights on every process
    model = build_generator(cfg, dataset.num_classes)
    objective = objective_for(
        schedule_for_model(model), cfg.diffusion.objective, model.config.learn_sigma,
        time_sampling=cfg.diffusion.time_sampling, logit_mean=cfg.diffusion.logit_mean, logit_std=cfg.diffusion.logit_std,
    )
    ema = EMA(model, decay=t.ema_decay, warmup=t.ema_warmup)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay, betas=tuple(t.betas))
    model, optimizer = accelerator.prepare(model, optimizer)
    ema.model.to(accelerator.device)

    start_step = 0
    ckpt = latest_checkpoint(out)
    if ckpt is not None:
        accelerator.load_state(str(ckpt))
        ema.load_state_dict(load_file(str(ckpt / "ema.safetensors"), device=str(accelerator.device)))
        start_step = read_trainer_state(ckpt)["step"]
        accelerator.print(f"resuming from {ckpt} (step {start_step})")

    accelerator.init_trackers("genvis", config=_flat_hparams(cfg))
    accelerator.print(
        f"training DiT on {world} process(es), device {accelerator.device}, precision {precision}, "
        f"global batch {t.batch_size} = {world} x {t.grad_accum} x {micro}, steps {start_step}->{t.steps}"
    )
    sampler = StepBatchSampler(len(dataset), t.batch_size, rank, world, cfg.seed, start_step, t.steps, cfg.data.random_flip)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.data.num_workers)
    null_label = dataset.num_classes
    progress = None
    if accelerator.is_local_main_process:
        from tqdm.auto import tqdm

        progress = tqdm(total=t.steps, initial=start_step, desc="train", dynamic_ncols=True)

    model.train()
    local = slice(rank * (t.batch_size // world), (rank + 1) * (t.batch_size // world))
    step = start_step
    for step, (images, labels) in enumerate(loader, start=start_step):
        g = step_generator(cfg.seed, step, STREAM_NOISE)
        times = objective.sample_time(t.batch_size, g)[local]
        noise = torch.randn((t.batch_size, *images.shape[1:]), generator=g)[local]
        drop = (torch.rand(t.batch_size, generator=g) < cfg.model.class_dropout)[local]
        labels = torch.where(drop, torch.full_like(labels, null_label), labels)
        images, labels, noise = images.to(accelerator.device), labels.to(accelerator.device), noise.to(accelerator.device)

        for group in optimizer.param_groups:
            group["lr"] = lr_at(cfg, step)
        loss_sum = torch.zeros((), device=accelerator.device)
        for a in range(t.grad_accum):
            mb = slice(a * micro, (a + 1) * micro)
            sync = a == t.grad_accum - 1
            ctx = accelerator.no_sync(model) if not sync and world > 1 else contextlib.nullcontext()
            with ctx, accelerator.autocast():
                loss = objective.loss(model, images[mb], times[mb], noise[mb], y=labels[mb]).mean()
                accelerator.backward(loss / t.grad_accum)
            loss_sum += loss.detach() / t.grad_accum
        loss_mean = accelerator.reduce(loss_sum, reduction="mean")
        if not torch.isfinite(loss_mean):
            last = latest_checkpoint(out)
            raise TrainingError(
                f"non-finite loss ({loss_mean.item()}) at step {step + 1}; stopped without saving. "
                f"Last good checkpoint: {last if last else 'none'}. Lower train.lr or check the data."
            )
        grad_norm = accelerator.clip_grad_norm_(params, t.grad_clip) if t.grad_clip > 0 else None
        if grad_norm is not None and not torch.isfinite(grad_norm):
            last = latest_checkpoint(out)
            raise TrainingError(
                f"non-finite gradient norm at step {step + 1}; stopped without saving. "
                f"Last good checkpoint: {last if last else 'none'}. Lower train.lr or check the data."
            )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update(accelerator.unwrap_model(model), step)
        done = step + 1

        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{loss_mean.item():.4f}")
        if t.log_every and done % t.log_every == 0:
            logs = {"train/loss": loss_mean.item(), "train/lr": lr_at(cfg, step)}
            if grad_norm is not None:
                logs["train/grad_norm"] = float(grad_norm)
            accelerator.log(logs, step=done)
        if t.checkpoint_every and (done % t.checkpoint_every == 0 or done == t.steps):
            save_checkpoint(accelerator, ema, done, out, t.keep_checkpoints)
        if t.sample_every and done % t.sample_every == 0:
            if accelerator.is_main_process:
                write_sample_grid(cfg, ema.model, out / "samples" / f"{step_dir_name(done)}.png")
            accelerator.wait_for_everyone()

    if progress is not None:
        progress.close()
    if t.checkpoint_every == 0 and start_step < t.steps:
        save_checkpoint(accelerator, ema, t.steps, out, t.keep_checkpoints)
    export_dir = out / "model"
    if accelerator.is_main_process:
        export_model(ema.model, export_dir)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return export_dir


def save_checkpoint(accelerator, ema: EMA, step: int, out: Path, keep: int) -> Path:
    root = out / "checkpoints"
    final = root / step_dir_name(step)
    tmp = root / f"{step_dir_name(step)}.tmp"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    if accelerator.is_main_process:
        save_file(ema.state_dict(), str(tmp / "ema.safetensors"))
        write_json_atomic(tmp / "trainer_state.json", {"step": step})
        finalize_dir(tmp, final)
        prune_checkpoints(out, keep)
    accelerator.wait_for_everyone()
    return final


def write_sample_grid(cfg: RunConfig, model, path: Path) -> None:
    from genvis.generate import class_labels, generate, save_grid, to_uint8

    was_training = model.training
    model.eval()
    num_classes = model.num_classes
    labels = class_labels(cfg.sample.num, num_classes)
    images = generate(
        model, labels, seed=cfg.seed, sampler=cfg.sample.sampler, steps=cfg.sample.steps, grid=cfg.sample.grid, cfg=cfg.sample.cfg,
        precision=cfg.train.mixed_precision,
    )
    save_grid(to_uint8(images), path, nrow=min(num_classes, len(labels)))
    model.train(was_training)
