"""Sharded, resumable sampling for evaluation (`genvis eval sample-fid`).

The work is a fixed list of N samples: sample i has label `labels[i]` (one list for the whole run,
"balanced" i % C or "uniform" from a seeded generator) and is drawn from seed (base, i) alone
(genvis.generate), so the image set does not depend on the process count or the batch size.
Samples are grouped into shards of `shard_size` consecutive indices; process p of W takes the
shards k with k % W == p. A finished shard is one file, `shards/shard_000012.npz` (arr_0 uint8 NHWC,
labels, indices), written under a temporary name and renamed, so a killed run leaves only complete
shards and a rerun samples the missing ones only. The settings of the run are recorded in
`run.json`; a rerun with other settings stops instead of mixing two sample sets.

With a reference, each process also runs the feature extractor on its own shards and writes
`shards/features_<extractor>_000012.npz` (atomically; kept on a rerun only if it was made by the same
extractor, feature names and weights, see `extractor_tag`); the main process gathers
them in shard order into one float64 accumulator, so the metric is the same for any process count.
When every shard exists, the main process assembles `samples.npz` (ADM style: arr_0 + labels) shard by
shard through a memory-mapped array, so memory stays bounded by one shard, not by N.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from genvis.errors import GenvisError
from genvis.shards import record_settings, shard_ranges

LABEL_MODES = ("balanced", "uniform")


def label_list(num: int, num_classes: int, mode: str, seed: int) -> np.ndarray:
    """The label of every sample index: balanced i % C, or uniform draws from a generator seeded by seed."""
    if mode == "balanced":
        from genvis.generate import class_labels

        return class_labels(num, num_classes).numpy()
    if mode == "uniform":
        return np.random.default_rng([int(seed), 7]).integers(0, num_classes, size=num, dtype=np.int64)
    raise GenvisError(f"--labels {mode!r}: expected one of: {', '.join(LABEL_MODES)}")


def shard_path(out: Path, k: int) -> Path:
    return out / "shards" / f"shard_{k:06d}.npz"


def features_path(out: Path, k: int, features: str) -> Path:
    return out / "shards" / f"features_{features}_{k:06d}.npz"


def missing_shards(out: Path, num: int, shard_size: int, rank: int, world: int) -> List[Tuple[int, int, int]]:
    """(k, start, stop) of this process's shards that have no finished file yet."""
    return [s for s in shard_ranges(num, shard_size) if s[0] % world == rank and not shard_path(out, s[0]).is_file()]


def sample_shards(model, tokenizer, out: Path, labels: np.ndarray, *, seed: int, shard_size: int, rank: int, world: int,
                  batch_size: int, sampling, precision: str = "auto", progress: bool = False, log: bool = False,
                  compile: bool = False) -> List[int]:
    """Sample this process's missing shards; returns the shard numbers it wrote. A shard sampled anew
    drops any features extracted from an earlier file of that shard. log: a line per shard; progress: bars."""
    import torch

    from genvis.generate import generate, to_uint8
    from genvis.io import write_npz_atomic

    written = []
    for k, start, stop in missing_shards(out, len(labels), shard_size, rank, world):
        path = shard_path(out, k)
        for stale in (out / "shards").glob(f"features_*_{k:06d}.npz"):
            stale.unlink()
        (out / "samples.npz").unlink(missing_ok=True)  # assembled from the shards before this one was redone
        if log:
            print(f"[process {rank}] shard {k}: samples {start}..{stop - 1}", flush=True)
        images = generate(model, tokenizer, torch.from_numpy(labels[start:stop]), seed=seed, start_index=start,
                          sampling=sampling, batch_size=batch_size, precision=precision, progress=progress,
                          compile=compile)
        write_npz_atomic(path, arr_0=to_uint8(images), labels=labels[start:stop], indices=np.arange(start, stop))
        written.append(k)
    return written


def extractor_tag(extractor) -> str:
    """What a feature file was made with: the extractor and its feature names, plus a digest of its
    weights, so features from other weights or for other metrics are never reused."""
    digest = hashlib.sha256()
    for name, tensor in sorted(extractor.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return f"{extractor.name}:{','.join(extractor.features_list)}:{digest.hexdigest()[:16]}"


def _features_match(path: Path, tag: str) -> bool:
    if not path.is_file():
        return False
    with np.load(path) as f:
        return "tag" in f.files and str(f["tag"]) == tag


def shard_features(out: Path, num: int, shard_size: int, extractor, tag: str, *, rank: int, world: int,
                   batch_size: int = 64, progress: bool = False) -> None:
    """Extract `extractor`'s features from this process's shards, unless a file with the same
    `extractor_tag` (extractor, feature names, weights) is already there."""
    from genvis.evaluation.features import extract
    from genvis.evaluation.reference import NpzSource
    from genvis.io import write_npz_atomic

    layers = list(extractor.features_list)
    for k, _, _ in shard_ranges(num, shard_size):
        path = features_path(out, k, extractor.name)
        if k % world != rank or _features_match(path, tag):
            continue
        source = NpzSource(shard_path(out, k))
        acc = extract(extractor, source.batches(batch_size), keep=layers, progress=progress, total=len(source),
                      desc=f"features, shard {k}")
        write_npz_atomic(path, tag=np.array(tag), **{name: acc.kept(name).numpy() for name in layers})


def gather_features(out: Path, num: int, shard_size: int, extractor, tag: str, metrics, features: str):
    """One accumulator over every shard's features (made by `extractor`, `tag`), added in shard order."""
    import torch

    from genvis.evaluation.reference import accumulator_for

    acc = accumulator_for(metrics, features)
    for k, _, _ in shard_ranges(num, shard_size):
        path = features_path(out, k, extractor.name)
        if not _features_match(path, tag):
            raise GenvisError(f"{path}: missing or made by another extractor; rerun to extract it again")
        with np.load(path) as f:
            acc.update({name: torch.from_numpy(f[name]) for name in acc.names})
    return acc


def _assembled(target: Path, labels: np.ndarray, shards: List[Path]) -> bool:
    """Whether `target` is a finished samples.npz of this run: written (atomically) after every shard,
    with N images and the run's labels. A shard sampled again also removes it (sample_shards)."""
    from genvis.evaluation.reference import NpzSource

    if not target.is_file() or target.stat().st_mtime_ns < max(s.stat().st_mtime_ns for s in shards):
        return False
    try:
        with np.load(target) as f:
            same_labels = "labels" in f.files and np.array_equal(f["labels"], labels)
        return same_labels and len(NpzSource(target)) == len(labels)
    except Exception:  # unreadable or truncated (BadZipFile, EOFError, ...): assemble it again
        return False


def assemble(out: Path, labels: np.ndarray, shard_size: int) -> Path:
    """Concatenate the shards into out/samples.npz (arr_0 uint8 NHWC RGB, labels) with bounded memory:
    arr_0 is filled shard by shard in a scratch memory-mapped .npy, then written out chunk by chunk.
    Every shard's indices and labels are checked against the run's list."""
    from genvis.io import scratch_file, write_npz_atomic

    ranges = shard_ranges(len(labels), shard_size)
    missing = [k for k, _, _ in ranges if not shard_path(out, k).is_file()]
    if missing:
        raise GenvisError(f"{out}: shards {missing[:5]}{'...' if len(missing) > 5 else ''} are missing; rerun to finish them")
    for k, start, stop in ranges:  # reads only the small members
        with np.load(shard_path(out, k)) as shard:
            if not (np.array_equal(shard["indices"], np.arange(start, stop)) and np.array_equal(shard["labels"], labels[start:stop])):
                raise GenvisError(f"{shard_path(out, k)}: holds other samples than the run's shard {k}; remove it and rerun")
    target = out / "samples.npz"
    if _assembled(target, labels, [shard_path(out, k) for k, _, _ in ranges]):  # a rerun, e.g. for other metrics
        return target
    with scratch_file(out, ".arr_0.npy") as scratch:
        arr = None
        for k, start, stop in ranges:
            with np.load(shard_path(out, k)) as shard:
                images = shard["arr_0"]
            if arr is None:  # ADM files hold RGB: a greyscale channel is broadcast to 3
                arr = np.lib.format.open_memmap(scratch, mode="w+", dtype=np.uint8, shape=(len(labels),) + images.shape[1:-1] + (3,))
            arr[start:stop] = images
        arr.flush()
        del arr
        write_npz_atomic(target, arr_0=np.load(scratch, mmap_mode="r"), labels=labels)
    return target


def run_sample_fid(model_path, out, *, num: int, ref: Optional[str], label_mode: str = "balanced", seed: int = 0,
                   shard_size: int = 1000, batch_size: int = 64, metrics=("fid",), features: str = "inception",
                   weights: Optional[str] = None, device: Optional[str] = None, tokenizer: Optional[str] = None,
                   sampling=None, precision: str = "auto", progress: bool = True, compile: bool = False) -> Optional[Dict]:
    """Sample N images over all Accelerate processes, resumably, then (main process) assemble samples.npz
    and compute the metrics against `ref`. Returns the metrics on the main process (None elsewhere).

    sampling: the model family's options (e.g. DiffusionSampling; default: its defaults); tokenizer: a
    tokenizer folder to decode with instead of the one the model records."""
    import dataclasses

    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    from genvis.models import load_model, model_class, read_model_config
    from genvis.registry import FAMILIES

    if num < 1 or shard_size < 1 or batch_size < 1:
        raise GenvisError("--num-samples, --shard-size and --batch-size must be >= 1")
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    out = Path(out)
    device = device or str(state.device)
    num_classes = read_model_config(model_path).get("num_classes")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise GenvisError(f"{model_path}: config.json has no num_classes (a class-conditional generator is needed)")
    labels = label_list(num, num_classes, label_mode, seed)
    if sampling is None:
        sampling = FAMILIES.schema(model_class(model_path).family)()
    sampling_record = {k: v for k, v in dataclasses.asdict(sampling).items() if k != "num"}
    settings = {"model": str(Path(model_path).resolve()), "num": num, "labels": label_mode, "seed": seed,
                "shard_size": shard_size, "tokenizer": tokenizer, "precision": precision, **sampling_record}
    settings = json.loads(json.dumps(settings, default=str))
    hint = "use a new --out or the same settings"
    if state.is_main_process:
        record_settings(out / "run.json", settings, True, hint)
    state.wait_for_everyone()
    if not state.is_main_process:
        record_settings(out / "run.json", settings, False, hint)
    extractor = None
    if ref is not None:  # built before sampling, so a bad metric, feature set or weights file fails first
        from genvis.evaluation.features import build_extractor
        from genvis.evaluation.reference import check_metrics, feature_layers

        metrics = check_metrics(metrics)
        extractor = build_extractor(features, weights=weights, device=device, features=feature_layers(metrics, features))
    rank, world = state.process_index, state.num_processes
    bars = progress and state.is_local_main_process  # one set of progress bars per machine
    if missing_shards(out, num, shard_size, rank, world):  # a finished run's rerun loads no generator
        from genvis.generate import load_model_fields
        from genvis.tokenizers import load_tokenizer

        model = load_model(model_path, device=device)
        decoder = load_tokenizer(tokenizer or model_path, device=device)
        sample_shards(model, decoder, out, labels, seed=seed, shard_size=shard_size, rank=rank, world=world,
                      batch_size=batch_size, sampling=load_model_fields(sampling, device),  # once, not per shard
                      precision=precision, progress=bars, log=progress, compile=compile)
    if extractor is not None:
        tag = extractor_tag(extractor)
        shard_features(out, num, shard_size, extractor, tag, rank=rank, world=world, batch_size=batch_size,
                       progress=bars)
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    samples = assemble(out, labels, shard_size)
    if ref is None:
        return {"samples": str(samples), "num_samples": num}
    from genvis.evaluation.reference import compute_metrics
    from genvis.io import write_json_atomic

    gathered = gather_features(out, num, shard_size, extractor, tag, metrics, features)
    result = compute_metrics(None, ref, metrics=metrics, features=features, batch_size=batch_size,
                             sample_features=gathered, extractor=extractor)
    result = {**result, "samples": str(samples)}
    write_json_atomic(out / "metrics.json", result)
    return result
