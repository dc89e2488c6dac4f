"""Image sources streamed in batches, ADM-format reference statistics, and FID/IS/KID/PRC.

    source = open_source("samples/")          # PNG/JPEG folder, ADM .npz (arr_0), or dataset YAML
    for batch in source.batches(64): ...      # uint8 [B, 3, H, W]
    write_reference(open_source("data.yaml"), "ref.npz", build_extractor("digits"), 64)
    compute_metrics("samples.npz", "ref.npz", metrics=("fid",), features="digits")

Sources never hold all N images in memory: folders decode one batch of files at a time, .npz
members are read batch by batch from the zip stream, datasets are indexed batch by batch.
A statistics file is an .npz with `mu` [D] and `sigma` [D, D] (float64), as ADM's
evaluator writes them, optionally with the images as `arr_0` (uint8 NHWC).
"""
from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Iterator, Sequence, Tuple, Union

import numpy as np
import torch

from genvis.errors import GenvisError
from genvis.evaluation import METRICS
from genvis.evaluation.features import (
    LOGITS_LAYER,
    SPATIAL_LAYER,
    STATS_LAYER,
    FeatureAccumulator,
    build_extractor,
    check_feature_set,
    extract,
)
from genvis.evaluation.fid import frechet_distance
from genvis.io import scratch_file, write_npz_atomic

FOLDER_EXTENSIONS = (".png", ".jpg", ".jpeg")
CONFIG_EXTENSIONS = (".yaml", ".yml")
# Frechet-distance metrics: their keys in an ADM reference file and in the result.
FD_KEYS = {"fid": ("mu", "sigma"), "sfid": ("mu_s", "sigma_s")}
FD_RESULT = {"fid": "frechet_inception_distance", "sfid": "spatial_frechet_inception_distance"}


def _to_nchw3(images_nhwc: np.ndarray, what: str) -> torch.Tensor:
    """uint8 NHWC (C = 1 or 3) -> uint8 [N, 3, H, W] tensor."""
    if images_nhwc.dtype != np.uint8 or images_nhwc.ndim != 4 or images_nhwc.shape[-1] not in (1, 3):
        raise GenvisError(f"{what}: images are {images_nhwc.dtype} {images_nhwc.shape}; expected uint8 [N, H, W, C], C = 1 or 3")
    x = torch.from_numpy(np.require(images_nhwc, requirements=["C", "W"])).permute(0, 3, 1, 2)  # copies read-only buffers
    return (x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x).contiguous()


class FolderSource:
    """PNG/JPEG files directly in a folder (not recursive), sorted by file name, as RGB uint8.

    An empty folder, an image of another size than the first, or a file PIL cannot decode raise
    GenvisError naming the folder or file, when that file is reached. Pixels are decoded batch by batch.
    """

    def __init__(self, path: Union[str, Path]):
        from PIL import Image

        self.path = Path(path)
        self.name = str(self.path)
        if not self.path.is_dir():
            raise GenvisError(f"{self.path}: image folder not found")
        with os.scandir(self.path) as entries:  # DirEntry.is_file needs no stat call on most file systems
            self.files = sorted(self.path / e.name for e in entries
                                if e.name.lower().endswith(FOLDER_EXTENSIONS) and e.is_file())
        if not self.files:
            raise GenvisError(f"{self.path}: no images found; expected {'/'.join(FOLDER_EXTENSIONS)} files in the folder")
        try:  # the first file's header gives the size every other image must have (checked as decoded)
            with Image.open(self.files[0]) as image:
                self.width, self.height = image.size
        except Exception as err:  # PIL raises OSError, SyntaxError, ValueError... for bad files
            raise GenvisError(f"{self.files[0]}: cannot read image ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None

    def __len__(self) -> int:
        return len(self.files)

    def _load(self, file: Path, out: np.ndarray) -> None:
        """Decode `file` into `out`, a uint8 [3, H, W] view."""
        from PIL import Image

        try:
            with Image.open(file) as image:
                array = np.asarray(image.convert("RGB"))  # torch-fidelity's conversion
        except Exception as err:
            raise GenvisError(f"{file}: cannot read image ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
        if array.shape[:2] != (self.height, self.width):
            raise GenvisError(f"{self.path}: images of different sizes ({self.width}x{self.height} ({self.files[0].name}); "
                              f"{array.shape[1]}x{array.shape[0]} ({file.name})); all must share one size")
        out[...] = array.transpose(2, 0, 1)

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """uint8 [B, 3, H, W] batches in file-name order. Files are decoded by a small thread pool (PIL
        releases the GIL while inflating) straight into the batch tensor, one batch ahead of the
        consumer, so decoding overlaps the feature extractor; at most two batches are in memory."""
        from concurrent.futures import ThreadPoolExecutor

        starts = list(range(0, len(self.files), batch_size))
        pool = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1))
        try:
            def submit(i):
                if i >= len(starts):
                    return None, []
                files = self.files[starts[i] : starts[i] + batch_size]
                batch = torch.empty(len(files), 3, self.height, self.width, dtype=torch.uint8)
                array = batch.numpy()
                return batch, [pool.submit(self._load, f, array[j]) for j, f in enumerate(files)]

            pending = submit(0)
            for i in range(len(starts)):
                (batch, futures), pending = pending, submit(i + 1)  # the next batch decodes while this one is used
                for future in futures:
                    future.result()
                yield batch
        finally:  # an error or an early close: the next batch's decoding is dropped, not awaited
            pool.shutdown(wait=True, cancel_futures=True)


class NpzSource:
    """ADM-style images: `arr_0` uint8 [N, H, W, C] (C = 1 or 3) in an .npz, or a bare .npy.

    .npz members are read from the zip stream one batch at a time (compressed or not); a .npy is
    memory-mapped.
    """

    def __init__(self, path: Union[str, Path], key: str = "arr_0"):
        self.path = Path(path)
        self.name = str(self.path)
        self.key = key
        if not self.path.is_file():
            raise GenvisError(f"{self.path}: file not found")
        if self.path.suffix.lower() == ".npy":
            try:
                array = np.load(self.path, mmap_mode="r", allow_pickle=False)
            except Exception as err:
                raise GenvisError(f"{self.path}: cannot read as .npy ({err})") from None
            self.shape, self.dtype, self._fortran = array.shape, array.dtype, False
        else:
            self.shape, self.dtype, self._fortran = self._member_header()
        if self.dtype != np.uint8 or len(self.shape) != 4 or self.shape[-1] not in (1, 3):
            raise GenvisError(f"{self.path}: key '{key}' is {self.dtype} {self.shape}; expected uint8 [N, H, W, C] with C = 1 or 3")
        if self.shape[0] == 0:
            raise GenvisError(f"{self.path}: key '{key}' holds no images")

    def _open_member(self):
        """(zip file, member stream positioned after the .npy header, (shape, fortran, dtype))."""
        try:
            archive = zipfile.ZipFile(self.path)
        except (zipfile.BadZipFile, OSError) as err:
            raise GenvisError(f"{self.path}: cannot read as .npz ({err})") from None
        member = f"{self.key}.npy"
        if member not in archive.namelist():
            keys = [n[:-4] for n in archive.namelist() if n.endswith(".npy")]
            archive.close()
            raise GenvisError(f"{self.path}: key '{self.key}' missing; expected uint8 images [N, H, W, C] "
                              f"(found keys: {', '.join(keys) or 'none'})")
        stream = archive.open(member)
        try:
            version = np.lib.format.read_magic(stream)
            if version == (1, 0):
                header = np.lib.format.read_array_header_1_0(stream)
            elif version == (2, 0):
                header = np.lib.format.read_array_header_2_0(stream)
            else:  # format 3.0 (utf-8 header): no public reader; load that member whole instead
                header = None
        except Exception as err:
            stream.close()
            archive.close()
            raise GenvisError(f"{self.path}: key '{self.key}' is not a readable array ({err})") from None
        return archive, stream, header

    def _member_header(self):
        """(shape, dtype, whole) of the member; whole=True when it cannot be streamed (Fortran order,
        or a .npy format version without a public header reader)."""
        archive, stream, header = self._open_member()
        stream.close()
        archive.close()
        if header is None:
            with np.load(self.path, mmap_mode="r", allow_pickle=False) as data:
                array = data[self.key]
            return array.shape, array.dtype, True
        shape, fortran, dtype = header
        return shape, dtype, fortran

    def __len__(self) -> int:
        return int(self.shape[0])

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """uint8 [B, 3, H, W] batches in array order (1-channel images repeated to 3)."""
        n, per_image = self.shape[0], int(np.prod(self.shape[1:]))
        if self.path.suffix.lower() == ".npy":
            array = np.load(self.path, mmap_mode="r", allow_pickle=False)
            for start in range(0, n, batch_size):
                yield _to_nchw3(np.asarray(array[start : start + batch_size]), self.name)
            return
        if self._fortran:  # rare (Fortran order, .npy format 3.0): not streamed row by row
            with np.load(self.path, allow_pickle=False) as data:
                array = data[self.key]
            for start in range(0, n, batch_size):
                yield _to_nchw3(array[start : start + batch_size], self.name)
            return
        archive, stream, _ = self._open_member()
        try:
            for start in range(0, n, batch_size):
                count = min(batch_size, n - start)
                raw = stream.read(count * per_image)
                if len(raw) != count * per_image:
                    raise GenvisError(f"{self.path}: key '{self.key}' is truncated (image {start + len(raw) // per_image} of {n})")
                chunk = np.frombuffer(raw, dtype=np.uint8).reshape(count, *self.shape[1:])
                yield _to_nchw3(chunk, self.name)
        finally:
            stream.close()
            archive.close()


class DatasetSource:
    """A genvis dataset from a run/data config YAML (`data:` section), as uint8 with
    genvis.generate.to_uint8's conversion clamp(127.5 x + 128, 0, 255)."""

    def __init__(self, path: Union[str, Path], split: str = "train"):
        from genvis.config import load_config
        from genvis.data import build_dataset

        self.path = Path(path)
        self.name = f"{self.path}:{split}"
        # A data-only YAML need not name an output directory; nothing is written there.
        cfg = load_config(str(self.path), overrides=("output_dir=unused",))
        self.dataset = build_dataset(cfg.data, split=split)

    def __len__(self) -> int:
        return len(self.dataset)

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """uint8 [B, 3, H, W] batches in dataset order (1-channel images repeated to 3)."""
        from genvis.generate import to_uint8

        for start in range(0, len(self.dataset), batch_size):
            stop = min(start + batch_size, len(self.dataset))
            images = torch.stack([self.dataset[i][0] for i in range(start, stop)])
            yield _to_nchw3(to_uint8(images), self.name)


def _npz_keys(path: Path) -> Sequence[str]:
    try:
        with zipfile.ZipFile(path) as archive:
            return [n[:-4] for n in archive.namelist() if n.endswith(".npy")]
    except (zipfile.BadZipFile, OSError) as err:
        raise GenvisError(f"{path}: cannot read as .npz ({err})") from None


def _length(source):
    """The number of images of a source, or None when it does not say (an open source without __len__)."""
    return len(source) if hasattr(source, "__len__") else None


def open_source(path, split: str = "train"):
    """An image source for `path`: a folder, an .npz/.npy with `arr_0`, or a dataset config YAML.

    Sources (and anything with `__len__`, `batches(batch_size)` and `name`) are returned as is.
    `split` picks the dataset split of a YAML config (ignored otherwise).
    """
    if hasattr(path, "batches"):
        return path
    path = Path(path)
    if path.is_dir():
        return FolderSource(path)
    if not path.exists():
        raise GenvisError(f"{path}: not found; expected an image folder, an .npz with arr_0, or a dataset config .yaml")
    suffix = path.suffix.lower()
    if suffix in (".npz", ".npy"):
        return NpzSource(path)
    if suffix in CONFIG_EXTENSIONS:
        return DatasetSource(path, split=split)
    raise GenvisError(f"{path}: unsupported input; expected an image folder, an .npz with arr_0, or a dataset config .yaml")


def read_statistics(path: Union[str, Path], metric: str = "fid") -> Tuple[np.ndarray, np.ndarray]:
    """(mu float64 [D], sigma float64 [D, D]) of `metric` ("fid": keys mu/sigma; "sfid": mu_s/sigma_s)
    from an ADM-format statistics .npz."""
    path = Path(path)
    if not path.is_file():
        raise GenvisError(f"{path}: statistics file not found")
    mu_key, sigma_key = FD_KEYS[metric]
    keys = _npz_keys(path)
    for key in (mu_key, sigma_key):
        if key not in keys:
            raise GenvisError(f"{path}: key '{key}' missing; {metric} needs {mu_key} [D] and {sigma_key} [D, D] "
                              f"(`genvis ref` writes them) or the reference images (found keys: {', '.join(keys) or 'none'})")
    try:
        with np.load(path, allow_pickle=False) as data:
            mu, sigma = data[mu_key].astype(np.float64), data[sigma_key].astype(np.float64)
    except (ValueError, TypeError, OSError, EOFError, zipfile.BadZipFile) as err:  # object arrays, strings, truncation
        raise GenvisError(f"{path}: {mu_key}/{sigma_key} are not readable float arrays ({str(err).splitlines()[0]})") from None
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise GenvisError(f"{path}: {mu_key} {mu.shape} and {sigma_key} {sigma.shape}; expected [D] and [D, D]")
    return mu, sigma


def write_reference(source, out, extractor, batch_size: int = 64, include_images: bool = False,
                    progress: bool = False) -> dict:
    """Write ADM-format reference statistics of `source` to `out` (.npz), atomically.

    Args:
        source: a path or an open source (see `open_source`).
        out: the .npz to write: `mu` float64 [D], `sigma` float64 [D, D] of the extractor's first
            feature other than "spatial"; `mu_s`, `sigma_s` of "spatial" (sFID) when the extractor
            computes it; and with include_images also `arr_0` uint8 [N, H, W, 3].
        extractor: from `build_extractor`.
        batch_size: images per extractor call.
        progress: a progress bar of the feature extraction on stderr (see `extract`).

    The file appears only complete: it is written to a temporary file in the same folder and
    renamed; on any error the temporary file is removed and `out` is left as it was.

    Returns:
        {"out": str, "num_images": N, "feature_dim": D}.
    """
    source = open_source(source)
    out = Path(out)
    if out.suffix.lower() != ".npz":
        raise GenvisError(f"{out}: the reference file must end in .npz")
    if not out.parent.is_dir():
        raise GenvisError(f"{out.parent}: output folder not found")
    pooled = [layer for layer in extractor.features_list if layer != "spatial"]
    if not pooled:
        raise GenvisError(f"extractor features {list(extractor.features_list)}: a reference needs a pooled feature for mu/sigma")
    layers = {"fid": pooled[0], **({"sfid": "spatial"} if "spatial" in extractor.features_list else {})}
    if len(source) < 2:
        raise GenvisError(f"{source.name}: {len(source)} image(s); statistics need at least 2")

    def statistics(batches) -> dict:
        acc = extract(extractor, batches, FeatureAccumulator(stats=tuple(layers.values())), progress=progress,
                      total=len(source), desc="reference")
        stats = {}
        for metric, layer in layers.items():
            mu_key, sigma_key = FD_KEYS[metric]
            stats[mu_key], stats[sigma_key] = acc.mu_sigma(layer)
        return stats

    if not include_images:
        stats = statistics(source.batches(batch_size))
        write_npz_atomic(out, **stats)
    else:
        # the images go to a scratch .npy memmap as they stream past, so they never sit in memory at once
        with scratch_file(out.parent, ".arr_0.npy") as images_path:
            images = None

            def batches():
                nonlocal images
                start = 0
                for batch in source.batches(batch_size):
                    if images is None:
                        shape = (len(source), batch.shape[2], batch.shape[3], 3)
                        images = np.lib.format.open_memmap(images_path, mode="w+", dtype=np.uint8, shape=shape)
                    images[start : start + batch.shape[0]] = batch.permute(0, 2, 3, 1).numpy()
                    start += batch.shape[0]
                    yield batch

            stats = statistics(batches())
            images.flush()
            del images
            write_npz_atomic(out, **stats, arr_0=np.load(images_path, mmap_mode="r"))
    info = {"out": str(out), "num_images": len(source), "feature_dim": int(stats["mu"].shape[0])}
    if "mu_s" in stats:
        info["spatial_dim"] = int(stats["mu_s"].shape[0])
    return info


def _statistics_keys(path):
    """The keys of `path` when it is a statistics .npz (mu/sigma or mu_s/sigma_s, with or without arr_0,
    or any .npz without arr_0), else None (an image folder, image .npz, dataset config or open source)."""
    if hasattr(path, "batches"):
        return None
    path = Path(path)
    if not (path.is_file() and path.suffix.lower() == ".npz"):
        return None
    keys = _npz_keys(path)
    return keys if ("arr_0" not in keys or any(FD_KEYS[m][0] in keys for m in FD_KEYS)) else None


def check_metrics(metrics: Sequence[str]) -> Tuple[str, ...]:
    """Metric names must come from METRICS; returns them without repeats, in the given order."""
    metrics = tuple(dict.fromkeys(m.strip() for m in metrics if m.strip()))
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise GenvisError(f"metrics {','.join(unknown) or '(none)'}: expected a comma-separated list of {', '.join(METRICS)}")
    return metrics


def feature_layers(metrics: Sequence[str], features: str) -> list:
    """The extractor outputs the metrics need: pooled features (fid, kid, prc), logits (isc), spatial (sfid)."""
    layers = [STATS_LAYER[features]] if any(m in ("fid", "kid", "prc") for m in metrics) else []
    layers += [LOGITS_LAYER[features]] if "isc" in metrics else []
    layers += [SPATIAL_LAYER[features]] if "sfid" in metrics else []
    return layers


def fd_layer(metric: str, features: str) -> str:
    """The feature layer of a Frechet-distance metric ("fid" or "sfid")."""
    return STATS_LAYER[features] if metric == "fid" else SPATIAL_LAYER[features]


def accumulator_for(metrics: Sequence[str], features: str) -> FeatureAccumulator:
    """What to keep of the samples' features: statistics for FID/sFID, every feature for KID/PRC, logits for IS."""
    stats_layer, logits_layer = STATS_LAYER[features], LOGITS_LAYER[features]
    image_metrics = any(m in ("kid", "prc") for m in metrics)
    return FeatureAccumulator(stats=tuple(fd_layer(m, features) for m in FD_KEYS if m in metrics),
                              keep=((stats_layer,) if image_metrics else ()) + ((logits_layer,) if "isc" in metrics else ()))


def compute_metrics(samples, ref=None, *, metrics: Sequence[str] = ("fid",), features: str = "inception",
                    weights=None, batch_size: int = 64, device="cpu", split: str = "train",
                    kid_subsets: int = 100, kid_subset_size: int = 1000, isc_splits: int = 10,
                    prc_neighborhood: int = 3, rng_seed: int = 2020, sample_features=None, extractor=None,
                    progress: bool = False) -> dict:
    """FID / sFID / IS / KID / precision-recall of `samples` against `ref`, torch-fidelity's conventions
    (sFID: ADM's evaluator's).

    Args:
        samples: a folder, an .npz with arr_0, a dataset YAML, or an open source.
        ref: the same kinds, or an ADM statistics .npz (`mu`, `sigma`, for sFID `mu_s`, `sigma_s`;
            Frechet distances only unless it also holds `arr_0`). Stored statistics are used when
            present; the images (arr_0) otherwise. Not needed when only "isc" is asked for.
        metrics: any of "fid", "isc", "kid", "prc", "sfid".
        features: "inception" (2048-d pool features / logits / 2023-d spatial) or "digits"
            (128-d / 10 logits / 448-d spatial).
        weights: extractor weights file (see `build_extractor`).
        kid_subsets, kid_subset_size (capped at the smaller N), isc_splits (capped at N),
        prc_neighborhood, rng_seed: as torch-fidelity's kwargs of the same names and defaults.
        sample_features: the samples' features already extracted (a FeatureAccumulator holding what
            `accumulator_for(metrics, features)` asks for, e.g. gathered from the shards of a sharded
            run); `samples` is then not read.
        extractor: an extractor from `build_extractor` to reuse (it must produce `feature_layers(metrics,
            features)`); by default one is built from features / weights / device when images are read.
        progress: progress bars of the feature extraction on stderr (see `extract`).

    Returns:
        {"frechet_inception_distance", "spatial_frechet_inception_distance", "inception_score_mean",
         "inception_score_std", "kernel_inception_distance_mean", "kernel_inception_distance_std",
         "precision", "recall", "f_score"} (those asked for), plus "num_samples", "num_ref" (when
        reference images were read) and "features".
    """
    metrics = check_metrics(metrics)
    check_feature_set(features)
    needs_ref = [m for m in metrics if m != "isc"]
    if needs_ref and ref is None:
        raise GenvisError(f"metrics {','.join(needs_ref)} need a reference (--ref)")
    stats_layer, logits_layer = STATS_LAYER[features], LOGITS_LAYER[features]
    fd_metrics = [m for m in metrics if m in FD_KEYS]
    image_metrics = [m for m in metrics if m in ("kid", "prc")]

    ref_stats = {}  # fd metric -> (mu, sigma) stored in the reference file
    ref_source = None
    if needs_ref:
        keys = _statistics_keys(ref)
        if keys is None:
            ref_source = open_source(ref, split=split)
        else:
            has_images = "arr_0" in keys
            if image_metrics and not has_images:
                raise GenvisError(f"{ref}: a statistics file without images; metrics {','.join(image_metrics)} need "
                                  "the reference images (a folder, an .npz with arr_0, or `genvis ref --with-images`)")
            for m in fd_metrics:
                if FD_KEYS[m][0] in keys or not has_images:  # stored statistics win; without images they must be there
                    ref_stats[m] = read_statistics(ref, m)
            if image_metrics or len(ref_stats) < len(fd_metrics):
                ref_source = open_source(ref)
    if extractor is None and (sample_features is None or ref_source is not None):
        extractor = build_extractor(features, weights=weights, device=device, features=feature_layers(metrics, features))
    if sample_features is None:
        sample_source = open_source(samples, split=split)
        sample_acc = extract(extractor, sample_source.batches(batch_size), accumulator_for(metrics, features),
                             progress=progress, total=_length(sample_source), desc="samples")
    else:
        sample_acc = sample_features
    result = {}
    if ref_source is not None:
        computed = [m for m in fd_metrics if m not in ref_stats]
        ref_acc = extract(extractor, ref_source.batches(batch_size), FeatureAccumulator(
            stats=tuple(fd_layer(m, features) for m in computed), keep=(stats_layer,) if image_metrics else ()),
            progress=progress, total=_length(ref_source), desc="reference")
        ref_stats.update({m: ref_acc.mu_sigma(fd_layer(m, features)) for m in computed})

    for m in fd_metrics:
        mu, sigma = sample_acc.mu_sigma(fd_layer(m, features))
        if ref_stats[m][0].shape != mu.shape:
            raise GenvisError(f"{ref}: reference {m} statistics of dim {ref_stats[m][0].shape[0]}, but {features} "
                              f"features have dim {mu.shape[0]}; use the --features the reference was made with")
        result[FD_RESULT[m]] = frechet_distance(mu, sigma, *ref_stats[m])
    if "isc" in metrics:
        from torch_fidelity.metric_isc import isc_features_to_metric

        logits = sample_acc.kept(logits_layer)
        result.update(isc_features_to_metric(logits, splits=min(isc_splits, logits.shape[0]), shuffle=True,
                                             rng_seed=rng_seed))
    if image_metrics:
        f1, f2 = sample_acc.kept(stats_layer), ref_acc.kept(stats_layer)
        if "kid" in metrics:
            from torch_fidelity.metric_kid import kid_features_to_metric

            size = min(kid_subset_size, f1.shape[0], f2.shape[0])
            result.update(kid_features_to_metric(f1, f2, kid_subsets=kid_subsets, kid_subset_size=size,
                                                 rng_seed=rng_seed, verbose=False))
        if "prc" in metrics:
            from torch_fidelity.metric_prc import prc_features_to_metric

            if min(f1.shape[0], f2.shape[0]) <= prc_neighborhood:
                raise GenvisError(f"precision/recall with neighborhood {prc_neighborhood} needs more than "
                                  f"{prc_neighborhood} images on each side ({f1.shape[0]} samples, {f2.shape[0]} reference)")
            result.update(prc_features_to_metric(f1, f2, prc_neighborhood=prc_neighborhood, verbose=False))
    result["num_samples"] = sample_acc.num
    if ref_source is not None:
        result["num_ref"] = ref_acc.num
    result["features"] = features
    return result
