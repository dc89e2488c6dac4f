"""Model + labels + seeds -> images, and writing them out (grid PNG, PNG folder, ADM .npz).

Sample i is drawn from its own generator seeded by (seed, i): its initial noise and every
stochastic step come from that stream alone, so an image does not depend on the batch size,
on which batch it falls in, or on how many processes share the work.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from genvis.diffusion.schedules import schedule_for_model
from genvis.errors import GenvisError
from genvis.io import atomic_path, write_npz_atomic
from genvis.precision import autocast, resolve_precision
from genvis.samplers import check_options, get_sampler, resolve_grid, sample
from genvis.samplers.common import randn_like
from genvis.samplers.guidance import CFG


def sample_seed(base: int, index: int) -> int:
    """A 63-bit seed for sample `index` of a run seeded `base` (numpy SeedSequence hashing)."""
    return int(np.random.SeedSequence([int(base), int(index)]).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def sample_generators(base: int, indices: Sequence[int], device="cpu") -> List[torch.Generator]:
    return [torch.Generator(device).manual_seed(sample_seed(base, i)) for i in indices]


def class_labels(num: int, num_classes: int, classes: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Label of sample i: classes[i % len(classes)], or i % num_classes (balanced) when classes is None."""
    if classes is None:
        classes = list(range(num_classes))
    for c in classes:
        if not 0 <= c < num_classes:
            raise GenvisError(f"class {c} is out of range: the model has classes 0..{num_classes - 1}")
    return torch.tensor([classes[i % len(classes)] for i in range(num)], dtype=torch.long)


@torch.no_grad()
def generate(
    model,
    labels: torch.Tensor,
    *,
    seed: int = 0,
    start_index: int = 0,
    sampler: str = "ddpm",
    steps: int = 250,
    grid="default",
    grid_options: Optional[dict] = None,
    cfg: float = 1.0,
    cfg_channels: Optional[int] = None,
    cfg_interval: Optional[Tuple[float, float]] = None,
    cfg_schedule: str = "constant",
    batch_size: int = 64,
    precision: str = "auto",
    tokenizer=None,
    stitch_small=None,
    stitch_fraction: float = 0.4,
    cache_refresh: int = 1,
    cache_keep_blocks: int = 2,
    progress: bool = False,
    **sampler_options,
) -> torch.Tensor:
    """Images [N, C, H, W] in [-1, 1] for `labels` [N]; sample j uses seed (seed, start_index + j).

    Acceleration (genvis.samplers.accel): `stitch_small`, a smaller model of the same latent space,
    runs the first `stitch_fraction` of the steps (T-Stitch); `cache_refresh` > 1 reuses the deep
    DiT blocks' residual between refreshes (of the model that is running), keeping the first
    `cache_keep_blocks` blocks fresh on every call.
    """
    device = next(model.parameters()).device
    precision = resolve_precision(precision, device)
    c = model.config
    schedule = schedule_for_model(model)
    # fail on bad names and values before any work
    fn = get_sampler(sampler)
    check_options(sampler, fn, sampler_options)
    timesteps = resolve_grid(grid, schedule, fn, steps, grid_options)
    guidance = CFG(cfg, interval=cfg_interval, schedule=cfg_schedule, channels=cfg_channels)
    if stitch_small is not None:
        check_stitch(model, stitch_small)

    shape = (c.in_channels, c.input_size, c.input_size)
    out = []
    batches = range(0, len(labels), batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc=f"sampling ({sampler}, {steps} steps)")
    for start in batches:
        y = labels[start : start + batch_size].to(device)
        gens = sample_generators(seed, range(start_index + start, start_index + start + len(y)), device="cpu")
        x = randn_like(torch.empty(len(y), *shape), gens).to(device)
        # a fresh wrapper per batch: a step cache must not carry a residual from the previous batch
        network = accelerated(model, timesteps, stitch_small, stitch_fraction, cache_refresh, cache_keep_blocks)

        def call(x, t, y):
            with autocast(device, precision):
                return network(x, t, y).float()

        x0 = sample(call, x, sampler=sampler, steps=steps, schedule=schedule, prediction=c.prediction_type, grid=timesteps,
                    cfg=guidance, null_label=model.null_class, learn_sigma=c.learn_sigma, cond={"y": y}, generator=gens,
                    **sampler_options)
        if tokenizer is not None:
            x0 = tokenizer.decode(x0)
        out.append(x0.float().cpu())
    return torch.cat(out)


STITCH_SHARED = ("in_channels", "input_size", "prediction_type", "schedule", "learn_sigma", "num_classes",
                 "num_train_timesteps", "beta_start", "beta_end", "flow_shift", "tokenizer", "latent_scale")


def check_stitch(model, small) -> None:
    """T-Stitch needs two models of one latent space, schedule and prediction type."""
    for key in STITCH_SHARED:
        if getattr(small.config, key) != getattr(model.config, key):
            raise GenvisError(f"T-Stitch: the small model's {key} is {getattr(small.config, key)!r}, "
                              f"the large model's {getattr(model.config, key)!r}; both must share it")


def accelerated(model, grid, stitch_small=None, stitch_fraction: float = 0.4, cache_refresh: int = 1,
                cache_keep_blocks: int = 2) -> Callable:
    """The network call with T-Stitch and/or DiT step caching applied (the plain model without either);
    build one per sampling run (a step cache holds state)."""
    from genvis.samplers.accel import DiTStepCache, tstitch

    def cached(m):
        return DiTStepCache(m, refresh=cache_refresh, keep_blocks=cache_keep_blocks) if cache_refresh > 1 else m

    if stitch_small is None:
        return cached(model)
    return tstitch(cached(stitch_small), cached(model), grid, stitch_fraction)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] NCHW float -> uint8 NHWC with DiT's conversion clamp(127.5 x + 128, 0, 255)."""
    x = torch.clamp(127.5 * images.float() + 128.0, 0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def save_grid(images_u8: np.ndarray, path, nrow: Optional[int] = None) -> None:
    """uint8 NHWC -> one PNG grid (2-px black padding), written atomically."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n, h, w, ch = images_u8.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    pad = 2
    canvas = np.zeros((rows * (h + pad) + pad, nrow * (w + pad) + pad, ch), dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, nrow)
        canvas[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = images_u8[i]
    img = Image.fromarray(canvas[..., 0] if ch == 1 else canvas)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


def save_samples(images_u8: np.ndarray, labels: np.ndarray, out, nrow: Optional[int] = None) -> str:
    """OUT.png: a grid; OUT.npz: ADM-style (`arr_0` uint8 NHWC, 3 channels, plus `labels`);
    anything else: a folder with one PNG per sample (000000.png, ...). Every file is written atomically."""
    from PIL import Image

    out = Path(out)
    if out.suffix.lower() == ".png":
        save_grid(images_u8, out, nrow=nrow)
        return "grid"
    if out.suffix.lower() == ".npz":
        arr = np.repeat(images_u8, 3, axis=-1) if images_u8.shape[-1] == 1 else images_u8
        write_npz_atomic(out, arr_0=arr, labels=np.asarray(labels, dtype=np.int64))
        return "npz"
    if out.exists() and not out.is_dir():
        raise GenvisError(f"{out}: exists and is not a directory; use a .png (grid), .npz or folder path")
    out.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images_u8):
        with atomic_path(out / f"{i:06d}.png") as tmp:
            Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(tmp, format="PNG")
    return "folder"
