"""One Accelerate training loop for every task (genvis.training.tasks).

The loop knows Accelerate, gradient accumulation, one or more optimizers stepped in the task's
declared order, clipping, the non-finite guard, EMA, checkpoints, logging, previews and export;
the task knows what to build, draw and minimise (see genvis/training/tasks/base.py).

Determinism: every random draw of step s (which images, flips, and the task's draws: times, noise,
label dropout, masks) comes from generators seeded by (seed, s), drawn for the whole global batch;
process r takes its contiguous slice. So a resumed run is bit-identical to an uninterrupted one
(CPU, one process), and N processes with the same global batch reach the same weights as one (to
float tolerance). The learning rate is a pure function of the step, so no scheduler state needs
restoring either.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn

from genvis.config import RunConfig, to_dict, to_yaml
from genvis.data import build_dataset
from genvis.io import atomic_dir
from genvis.precision import resolve_precision
from genvis.registry import TASKS
from genvis.training.checkpoint import (
    TrainingError,
    check_rerun,
    clean_partial,
    latest_checkpoint,
    load_ema_folders,
    read_trainer_state,
    record_config,
    step_dir_name,
    write_checkpoint,
)
from genvis.training.ema import EMA
from genvis.training.tasks import DataInfo

STREAM_DATA, STREAM_NOISE, STREAM_PERM = 0, 1, 2

__all__ = ["train", "TrainingError", "step_generator", "StepBatchSampler", "lr_at"]


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
    """Linear warmup over warmup_steps, then constant, or a linear / cosine decay reaching lr * lr_end_ratio at
    the last step."""
    t = cfg.train
    warm = t.warmup_steps
    if warm and step < warm:
        return t.lr * (step + 1) / warm
    if t.lr_schedule == "constant":
        return t.lr
    done = (step - warm) / max(t.steps - 1 - warm, 1)  # 0 after warmup .. 1 at the last step
    shape = 1 - done if t.lr_schedule == "linear" else 0.5 * (1 + math.cos(math.pi * done))
    return t.lr * (t.lr_end_ratio + (1 - t.lr_end_ratio) * shape)


def param_groups(modules: Dict[str, nn.Module], names, weight_decay: float) -> List[dict]:
    """AdamW groups over the trainable parameters of `names`: those a module lists in its `no_weight_decay()`
    (e.g. VAR's biases and embeddings) train without weight decay."""
    decay, plain = [], []
    for name in names:
        module = modules[name]
        skip = set(module.no_weight_decay()) if hasattr(module, "no_weight_decay") else set()
        for key, p in module.named_parameters():
            if p.requires_grad:
                (plain if key in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}] + ([{"params": plain, "weight_decay": 0.0}] if plain else [])


def check_finite(value: Optional[torch.Tensor], what: str, step: int, out: Path) -> None:
    """The non-finite guard: stop before anything is saved, naming the last good checkpoint."""
    if value is not None and not torch.isfinite(value):
        last = latest_checkpoint(out)
        raise TrainingError(
            f"non-finite {what} ({value.item()}) at step {step + 1}; stopped without saving. "
            f"Last good checkpoint: {last if last else 'none'}. Lower train.lr or check the data."
        )


def _rows(tensors: Dict[str, torch.Tensor], rows: slice) -> Dict[str, torch.Tensor]:
    return {k: v[rows] for k, v in tensors.items()}


def compile_module(module: nn.Module, device: torch.device) -> None:
    """train.compile: torch.compile (inductor) `module` in place (nn.Module.compile: its state dict keeps its keys,
    so checkpoints and resume are unchanged). On the CPU its random ops (dropout) stay ATen's (inductor's
    fallback_random): inductor's CPU kernels build a Philox generator per element, which made a compiled MaskGIT
    bf16 step 1.2x slower than with ATen's draws (3.07 vs 2.51 s, batch 32), and ATen's draws are eager's, so a
    compiled step with dropout computes what the eager step computes."""
    module.compile(options={"fallback_random": True} if device.type == "cpu" else None)


@torch.enable_grad()  # a caller's torch.no_grad() / set_grad_enabled(False) would leave the loss without a graph
def train(cfg: RunConfig) -> Path:
    """Train (or resume) the run in cfg.output_dir; returns the exported folder."""
    from accelerate import Accelerator, PartialState
    from accelerate.utils import ProjectConfiguration, parse_flag_from_env

    out = Path(cfg.output_dir)
    # The device decides the 'auto' precision, which Accelerator needs up front. PartialState must see
    # ACCELERATE_USE_CPU as Accelerator would, or torchrun CPU workers each start a 1-process run.
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    precision = resolve_precision(cfg.train.mixed_precision, state.device)
    t = cfg.train
    world = state.num_processes
    if t.batch_size % (world * t.grad_accum):
        raise TrainingError(
            f"key 'train.batch_size': {t.batch_size} is not divisible by processes x grad_accum = {world} x {t.grad_accum}"
        )
    # A rerun may change only what does not alter the run so far (checked on every process, before
    # anything is written; config.yaml is untouched when it is refused).
    ckpt = latest_checkpoint(out)
    start_step = read_trainer_state(ckpt)["step"] if ckpt is not None else 0
    fresh = ckpt is None  # nothing trained yet: any config may (re)start the run
    changes = {} if fresh else check_rerun(out, to_dict(cfg))
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        clean_partial(out)
        record_config(out, to_yaml(cfg), changes, start_step, fresh)
        for key, (old, new) in changes.items():
            print(f"config change on rerun: {key}: {old!r} -> {new!r} (recorded in config_changes.jsonl)")
    state.wait_for_everyone()
    accelerator = Accelerator(
        mixed_precision=precision,
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
    )
    rank = accelerator.process_index
    micro = t.batch_size // (world * t.grad_accum)
    device = accelerator.device

    task = TASKS.get(cfg.task.name)(cfg)
    task.resuming = ckpt is not None
    if world > 1:
        task.reduce_mean = lambda tensor: accelerator.reduce(tensor, reduction="mean")
        task.gather = accelerator.gather
    dataset = build_dataset(cfg.data, split="train")
    info = DataInfo(num_classes=dataset.num_classes, image_shape=tuple(dataset.item_shape), encoded_by=dataset.encoded_by)
    torch.manual_seed(cfg.seed)  # identical initial weights on every process
    modules = task.build(info)
    specs = task.optimizers()
    trainable = list(dict.fromkeys(name for spec in specs for name in spec.modules))
    for name in modules:
        if name not in trainable:  # frozen: a tokenizer, a teacher
            modules[name].to(device).eval().requires_grad_(False)
    emas = {name: EMA(modules[name], decay=t.ema_decay, warmup=t.ema_warmup) for name in task.ema_modules}
    params = {spec.name: [p for m in spec.modules for p in modules[m].parameters() if p.requires_grad] for spec in specs}
    optimizers = {spec.name: torch.optim.AdamW(param_groups(modules, spec.modules, t.weight_decay), lr=t.lr * spec.lr_scale,
                                               weight_decay=t.weight_decay, betas=tuple(t.betas)) for spec in specs}
    if t.compile:
        for name in trainable:
            compile_module(modules[name], device)
    prepared = accelerator.prepare(*[modules[n] for n in trainable], *optimizers.values())
    prepared = prepared if isinstance(prepared, tuple) else (prepared,)
    modules.update(zip(trainable, prepared[: len(trainable)]))
    optimizers = dict(zip(optimizers, prepared[len(trainable):]))
    for ema in emas.values():
        ema.model.to(device)

    if ckpt is not None:
        try:
            load_ema_folders(ckpt, emas)
            accelerator.load_state(str(ckpt))
        except RuntimeError as err:  # e.g. latents of another shape under the same data.path: a size mismatch
            lines = [line.strip() for line in str(err).splitlines() if line.strip()]
            raise TrainingError(f"{ckpt} does not fit the modules this config and data build "
                                f"({lines[-1] if lines else type(err).__name__}); use a new output_dir") from None
        accelerator.print(f"resuming from {ckpt} (step {start_step})")

    accelerator.init_trackers("genvis", config=_flat_hparams(cfg))
    accelerator.print(
        f"training {task.describe()} on {world} process(es), device {device}, precision {precision}, "
        f"global batch {t.batch_size} = {world} x {t.grad_accum} x {micro}, steps {start_step}->{t.steps}"
    )
    sampler = StepBatchSampler(len(dataset), t.batch_size, rank, world, cfg.seed, start_step, t.steps, cfg.data.random_flip)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.data.num_workers)
    progress = None
    if accelerator.is_local_main_process:
        from tqdm.auto import tqdm

        progress = tqdm(total=t.steps, initial=start_step, desc="train", dynamic_ncols=True, disable=None)  # terminals only

    for name in trainable:
        modules[name].train()
    ddp = [modules[name] for name in trainable]
    local = slice(rank * (t.batch_size // world), (rank + 1) * (t.batch_size // world))
    clock = {"start": time.perf_counter(), "first": None, "last_log": None, "logged_step": None}  # compile vs steady state
    for step, batch in enumerate(loader, start=start_step):
        draws = _rows(task.draw(t.batch_size, step_generator(cfg.seed, step, STREAM_NOISE)), local)
        batch = [x.to(device) for x in batch]
        for spec in specs:
            for group in optimizers[spec.name].param_groups:
                group["lr"] = lr_at(cfg, step) * spec.lr_scale
        sums = {spec.name: torch.zeros((), device=device) for spec in specs}
        extra: Dict[str, torch.Tensor] = {}  # the task's "log/..." scalars, averaged over micro-batches
        for a in range(t.grad_accum):
            mb = slice(a * micro, (a + 1) * micro)
            with contextlib.ExitStack() as stack:
                if a < t.grad_accum - 1 and world > 1:  # gradients are all-reduced on the last micro-batch only
                    for module in ddp:
                        stack.enter_context(accelerator.no_sync(module))
                stack.enter_context(accelerator.autocast())
                result = task.losses(modules, [x[mb] for x in batch], _rows(draws, mb), step)
                for i, spec in enumerate(specs):
                    loss = result[spec.name]
                    # each loss reaches only its own optimizer's parameters (a GAN's generator loss leaves
                    # the discriminator's gradients alone)
                    only = {"inputs": params[spec.name], "retain_graph": i < len(specs) - 1} if len(specs) > 1 else {}
                    accelerator.backward(loss / t.grad_accum, **only)
                    sums[spec.name] += loss.detach() / t.grad_accum
            for key, value in result.items():
                if key.startswith("log/"):
                    extra[key[4:]] = extra.get(key[4:], 0.0) + value.detach().float() / t.grad_accum
        means = {name: accelerator.reduce(total, reduction="mean") for name, total in sums.items()}
        for name, value in means.items():
            check_finite(value, "loss" if len(specs) == 1 else f"loss '{name}'", step, out)
        norms = {spec.name: accelerator.clip_grad_norm_(params[spec.name], t.grad_clip) if t.grad_clip > 0 else None
                 for spec in specs}
        for name, norm in norms.items():
            check_finite(norm, "gradient norm" if len(specs) == 1 else f"gradient norm '{name}'", step, out)
        for spec in specs:
            optimizers[spec.name].step()
            optimizers[spec.name].zero_grad(set_to_none=True)
        for name, ema in emas.items():
            ema.update(accelerator.unwrap_model(modules[name]), step)
        done = step + 1
        now = time.perf_counter()
        if clock["first"] is None:  # the first step holds the compilation (train.compile) and the warm-up
            clock["first"] = clock["last_log"] = now
            clock["logged_step"] = done
            accelerator.print(f"first step: {now - clock['start']:.1f} s{' (compiling)' if t.compile else ''}")

        if progress is not None:
            progress.update(1)
            progress.set_postfix({f"loss_{n}" if len(specs) > 1 else "loss": f"{v.item():.4f}" for n, v in means.items()})
        if t.log_every and done % t.log_every == 0:
            logs = {"train/lr": lr_at(cfg, step)}
            if done > clock["logged_step"]:  # images/s over the steps since the last log, the first step left out
                logs["train/images_per_second"] = ((done - clock["logged_step"]) * t.batch_size
                                                   / max(now - clock["last_log"], 1e-9))
                clock["last_log"], clock["logged_step"] = now, done
            if extra:  # the global batch's values, as for the losses (every process takes part)
                reduced = accelerator.reduce(torch.stack(list(extra.values())), reduction="mean")
                logs.update({f"train/{key}": float(v) for key, v in zip(extra, reduced)})
            for name, value in means.items():
                logs[f"train/loss_{name}"] = value.item()
                if norms[name] is not None:
                    logs[f"train/grad_norm_{name}"] = float(norms[name])
            accelerator.log(logs, step=done)
        if t.checkpoint_every and (done % t.checkpoint_every == 0 or done == t.steps):
            write_checkpoint(accelerator, emas, done, out, t.keep_checkpoints)
        if t.sample_every and done % t.sample_every == 0:
            if accelerator.is_main_process:
                task.preview({**modules, **{n: e.model for n, e in emas.items()}}, out / "samples" / f"{step_dir_name(done)}.png")
            accelerator.wait_for_everyone()

    if progress is not None:
        progress.close()
    if clock["first"] is not None and done > start_step + 1:
        steady = time.perf_counter() - clock["first"]
        accelerator.print(f"steady state: {(done - start_step - 1) * t.batch_size / steady:.1f} images/s over "
                          f"{done - start_step - 1} steps after the first (checkpoints and logging included)")
    if t.checkpoint_every == 0 and start_step < t.steps:
        write_checkpoint(accelerator, emas, t.steps, out, t.keep_checkpoints)
    export_dir = out / "model"
    if accelerator.is_main_process:
        with atomic_dir(export_dir) as tmp:
            task.export({**modules, **{n: e.model for n, e in emas.items()}}, tmp)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return export_dir
