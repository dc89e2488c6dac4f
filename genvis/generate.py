"""Model + tokenizer + labels + seeds -> images, and writing them out (grid PNG, PNG folder, ADM .npz).

`generate` keeps what every family shares: seeding, batching, precision and decoding. Each batch
goes to the model family's sampler (genvis.registry.FAMILIES: the ODE/SDE solvers for diffusion
models, genvis.samplers.tokens for VAR), with the family's own options dataclass (e.g.
genvis.samplers.options.DiffusionSampling) and the tokenizer; it returns what `tokenizer.decode` takes.

Sample i is drawn from its own generator seeded by (seed, i): its initial noise and every
stochastic step come from that stream alone, so an image does not depend on the batch size,
on which batch it falls in, or on how many processes share the work.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch

from genvis.errors import GenvisError
from genvis.io import atomic_dir, atomic_path, check_writable_target, write_npz_atomic
from genvis.precision import autocast, resolve_precision
from genvis.registry import FAMILIES


def sample_seed(base: int, index: int) -> int:
    """A 63-bit seed for sample `index` of a run seeded `base` (numpy SeedSequence hashing)."""
    return int(np.random.SeedSequence([int(base), int(index)]).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def sample_generators(base: int, indices: Sequence[int], device="cpu") -> List[torch.Generator]:
    return [torch.Generator(device).manual_seed(sample_seed(base, i)) for i in indices]


def class_labels(num: int, num_classes: int, classes: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Label of sample i: classes[i % len(classes)], or i % num_classes (balanced) when classes is None."""
    if classes is None:
        classes = list(range(num_classes))
    if len(classes) == 0:
        raise GenvisError("classes: empty list; give one class (3) or a comma-separated list (0,1,2)")
    for c in classes:
        if not 0 <= c < num_classes:
            raise GenvisError(f"class {c} is out of range: the model has classes 0..{num_classes - 1}")
    return torch.tensor([classes[i % len(classes)] for i in range(num)], dtype=torch.long)


def sampling_options(model, sampling=None, **fields):
    """The family options for `model`: `sampling` (an instance of its family's dataclass), or the
    dataclass built from `fields` (e.g. sampler="unipc", steps=10), or its defaults. Validated once,
    when the dataclass is made."""
    schema = FAMILIES.schema(model.family)
    if sampling is not None and fields:
        raise GenvisError(f"pass either sampling= or the option fields ({', '.join(fields)}), not both")
    if sampling is None:
        names = {f.name for f in dataclasses.fields(schema)}
        unknown = sorted(set(fields) - names)
        if unknown:
            raise GenvisError(f"unknown sampling option(s) {', '.join(unknown)} for {model.family} models; "
                              f"expected: {', '.join(sorted(names))}")
        return schema(**fields)
    if not isinstance(sampling, schema):
        raise GenvisError(f"sampling options of type {type(sampling).__name__}: {model.family} models take {schema.__name__}")
    return sampling


def load_model_fields(options, device):
    """Options whose fields name another model (field metadata "model", e.g. T-Stitch's small model)
    with that model loaded from its path (a copy; the options were validated when they were made)."""
    from genvis.models import load_model

    paths = [f.name for f in dataclasses.fields(options)
             if f.metadata.get("model") and isinstance(getattr(options, f.name), (str, Path))]
    if not paths:
        return options
    loaded = copy.copy(options)
    for name in paths:
        setattr(loaded, name, load_model(getattr(options, name), device=device))
    return loaded


def compile_decoder(decode: Callable, device: torch.device) -> Callable:
    """torch.compile a tokenizer's decode for sampling (no gradients). On the CPU with inductor's freezing: the
    weights become constants of the graph, so the convolutions run on prepacked oneDNN weights with their
    activations fused; the SD-VAE f8 decoder in float32 (as `generate` decodes) ran 1.15x eager that way in
    benchmarks/speed.py (1.20x in a separate run, where unfrozen gave 1.10x). Freezing is inductor's global config,
    read while compiling (torch.compile's `options` do not reach it), which happens at
    the first call and at any recompile, hence the patch around every call. The weights must not change after
    the first call."""
    import torch._inductor.config as inductor_config

    compiled = torch.compile(decode)
    if device.type != "cpu":
        return compiled

    def frozen(*args, **kwargs):
        with inductor_config.patch(freezing=True):
            return compiled(*args, **kwargs)

    return frozen


@torch.no_grad()
def generate(model, tokenizer, labels: torch.Tensor, *, seed: int = 0, start_index: int = 0, sampling=None,
             batch_size: int = 64, precision: str = "auto", progress: bool = False, compile: bool = False,
             **sampling_fields) -> torch.Tensor:
    """Images [N, C, H, W] in [-1, 1] for `labels` [N]; sample j uses seed (seed, start_index + j).

    model: a genvis generator (it declares its `family`); tokenizer: what decodes its output
    (genvis.load_tokenizer), or None for the raw generator output (latents). sampling: the family's
    options (DiffusionSampling for diffusion models), or give its fields as keywords
    (`generate(model, tok, labels, sampler="unipc", steps=10, cfg=2.0)`). precision: auto | fp32 |
    bf16 | fp16 for the network calls. progress: a bar counting sampling steps (on a terminal). compile:
    torch.compile (inductor) the family's network calls, in place on `model` (later calls reuse the compiled
    code), and the tokenizer's decode (`compile_decoder`); the first batch pays the compilation.
    """
    if batch_size < 1:
        raise GenvisError(f"batch_size {batch_size}: expected >= 1")
    device = next(model.parameters()).device
    precision = resolve_precision(precision, device)
    options = load_model_fields(sampling_options(model, sampling, **sampling_fields), device)
    family_sampler = FAMILIES.get(model.family)(model, options, tokenizer)
    decode = None if tokenizer is None else tokenizer.decode
    if compile:
        family_sampler.compile()
        if decode is not None:
            decode = compile_decoder(decode, device)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        per_batch = family_sampler.steps_per_batch
        batches = math.ceil(len(labels) / batch_size)
        bar = tqdm(total=per_batch * batches if per_batch else None, unit="step", disable=None,  # terminals only
                   desc=f"sampling {len(labels)} ({batches} batch{'es' if batches > 1 else ''})")
    out = []
    try:
        for start in range(0, len(labels), batch_size):
            y = labels[start : start + batch_size].to(device)
            gens = sample_generators(seed, range(start_index + start, start_index + start + len(y)), device="cpu")
            x0 = family_sampler(y, gens, autocast=lambda: autocast(device, precision),
                                callback=(lambda info: bar.update(1)) if bar is not None else None)
            if decode is not None:
                x0 = decode(x0)
            out.append(x0.float().cpu())
    finally:
        if bar is not None:
            bar.close()
    return torch.cat(out)


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


MANIFEST = "samples.json"  # in a PNG folder written by save_samples: labels and provenance


def output_kind(out) -> str:
    """"grid" (OUT.png), "npz" (OUT.npz) or "folder" (a path without a suffix). Any other suffix (x.jpg,
    x.png.bak) is refused rather than silently becoming a folder."""
    suffix = Path(out).suffix.lower()
    if suffix == ".png":
        return "grid"
    if suffix == ".npz":
        return "npz"
    if suffix:
        raise GenvisError(f"{out}: genvis does not write {suffix} files; use OUT.png (a grid), OUT.npz (ADM arr_0 + "
                          "labels) or a folder path without a suffix (one PNG per sample)")
    return "folder"


def _earlier_output(folder: Path, source: Optional[str]) -> bool:
    """Whether `folder` holds exactly what save_samples wrote there for `source` (and nothing else)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    present = {p.name for p in folder.iterdir()} - {MANIFEST}
    return source is not None and manifest.get("source") == source and set(manifest.get("files", [])) == present


def check_output(out, source: Optional[str] = None) -> str:
    """Check, before any sampling, that `out` can be written; returns its kind (see output_kind).

    A folder must be new, empty, or hold exactly the earlier output of the same `source` (which is
    then replaced whole); anything else in it is never mixed with new images."""
    out = Path(out)
    kind = output_kind(out)
    check_writable_target(out, "samples")
    if kind != "folder" and out.is_dir():
        raise GenvisError(f"{out}: is a folder; a {kind} output needs a file path")
    if kind == "folder" and out.exists():
        if not out.is_dir():
            raise GenvisError(f"{out}: exists and is not a folder; use a .png (grid), .npz or folder path")
        if any(out.iterdir()) and not _earlier_output(out, source):
            raise GenvisError(f"{out}: folder is not empty; genvis writes PNG folders into a new or empty folder, or over "
                              "its own earlier output of the same model; remove the files or choose another folder")
    return kind


def save_samples(images_u8: np.ndarray, labels: np.ndarray, out, nrow: Optional[int] = None,
                 source: Optional[str] = None) -> str:
    """OUT.png: a grid; OUT.npz: ADM-style (`arr_0` uint8 NHWC, 3 channels, plus `labels`); anything else:
    a folder with one PNG per sample (000000.png, ...) and samples.json (labels, files, `source`),
    written whole under a temporary name and renamed. Call check_output first."""
    from PIL import Image

    out = Path(out)
    kind = output_kind(out)
    if kind == "grid":
        save_grid(images_u8, out, nrow=nrow)
        return kind
    if kind == "npz":
        arr = np.repeat(images_u8, 3, axis=-1) if images_u8.shape[-1] == 1 else images_u8
        write_npz_atomic(out, arr_0=arr, labels=np.asarray(labels, dtype=np.int64))
        return kind
    files = [f"{i:06d}.png" for i in range(len(images_u8))]
    with atomic_dir(out) as tmp:
        for name, img in zip(files, images_u8):
            Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(tmp / name, format="PNG")
        manifest = {"source": source, "num": len(files), "labels": [int(v) for v in labels], "files": files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return kind
