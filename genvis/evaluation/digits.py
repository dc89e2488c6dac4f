"""Offline digits metrics: a small CNN classifier gives the feature space for a Frechet distance
and the class accuracy of conditional samples.

    metrics = digits_metrics(images_NCHW, labels)   # {"fd": ..., "num": ..., "class_accuracy": ...}
    metrics = evaluate_samples("samples.npz")       # ADM-style arr_0 uint8 NHWC (+ labels)
    metrics = evaluate_samples("samples/")          # PNG folder (+ labels from samples/samples.json)

The classifier is trained by scripts/train_digits_classifier.py on the fixed digits train split
and shipped as genvis/evaluation/assets/digits_classifier.safetensors. The reference is the
held-out test split rendered at the samples' resolution, so both sides go through exactly the
same resizing before the classifier sees them. Samples must be square and at least 8x8, the
digits' native size: rendered smaller, the reference digits are destroyed and the distance
means nothing (1x1 noise would score better than real digits).
"""
from __future__ import annotations

import functools
import json
import zipfile
import zlib
from pathlib import Path
from typing import Iterable, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from genvis.errors import GenvisError, first_line
from genvis.evaluation.fid import feature_statistics, frechet_distance
from genvis.generate import MANIFEST  # a PNG folder's samples.json: {"labels": [...], "files": [...]}
from genvis.tokenizers.losses import digits_conv

ASSETS = Path(__file__).resolve().parent / "assets"
CLASSIFIER_PATH = ASSETS / "digits_classifier.safetensors"
RESOLUTION = 16  # the classifier's input side
FEATURE_DIM = 128
NUM_CLASSES = 10
MIN_RESOLUTION = 8  # the digits' native size: the smallest the reference can be rendered at
NPZ_EXPECTED = "expected ADM-style arr_0 uint8 [N, H, W, C] plus optional labels [N], or a folder of PNG images"


class DigitsClassifier(nn.Module):
    """VGG-style CNN for 16x16 greyscale digits.

    conv3x3(32)-conv3x3(32)-maxpool-conv3x3(64)-conv3x3(64)-maxpool -> fc 128 -> fc 10, ReLU
    throughout, dropout before the head in training only. No BatchNorm, so eval-mode outputs
    depend on nothing but the weights and the input.
    """

    def __init__(self, num_classes: int = 10, dropout: float = 0.3):
        super().__init__()
        self.conv = digits_conv()
        self.fc = nn.Linear(64 * 4 * 4, FEATURE_DIM)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(FEATURE_DIM, num_classes)

    def features(self, x_N1HW: torch.Tensor) -> torch.Tensor:
        """x [N, 1, 16, 16] in [-1, 1] -> penultimate features [N, 128] (after ReLU)."""
        return self.feature_maps(x_N1HW)[1]

    def feature_maps(self, x_N1HW: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """x [N, 1, 16, 16] -> (the first block's pooled maps [N, 32, 8, 8], penultimate features [N, 128])."""
        maps = self.conv[:5](x_N1HW)  # conv-relu-conv-relu-maxpool: N, 32, 8, 8
        h = self.conv[5:](maps)  # N, 64, 4, 4
        return maps, F.relu(self.fc(h.flatten(1)))

    def forward(self, x_N1HW: torch.Tensor) -> torch.Tensor:
        """x [N, 1, 16, 16] in [-1, 1] -> logits [N, 10]."""
        return self.head(self.dropout(self.features(x_N1HW)))


def load_digits_classifier(path: Optional[Union[str, Path]] = None) -> DigitsClassifier:
    """A fresh DigitsClassifier in eval mode with weights from `path` (default: the shipped asset)."""
    from safetensors.torch import load_file

    path = Path(path) if path is not None else CLASSIFIER_PATH
    if not path.is_file():
        raise GenvisError(f"{path}: digits classifier weights not found; run scripts/train_digits_classifier.py to create them")
    model = DigitsClassifier()
    model.load_state_dict(load_file(str(path)))
    return model.eval()


@functools.lru_cache(maxsize=None)
def _shared_classifier() -> DigitsClassifier:
    # Private and never handed out, so no caller can switch it to train mode or edit its weights.
    return load_digits_classifier()


def prepare_images(images) -> torch.Tensor:
    """Any supported image batch -> the classifier's input, float32 [N, 1, 16, 16] in [-1, 1], on the
    input's device.

    Accepts
        - float torch tensors (or float numpy arrays) NCHW in [-1, 1], C = 1 or 3, any H x W;
        - uint8 numpy arrays or torch tensors NHWC, C = 1 or 3 (u -> u / 127.5 - 1), e.g. ADM arr_0.
    Colour is reduced to grey by the channel mean; other sizes are resized to 16 x 16 with
    bilinear interpolation with antialiasing (align_corners=False).
    """
    x = torch.from_numpy(np.asarray(images)) if isinstance(images, np.ndarray) else images
    if not isinstance(x, torch.Tensor):
        raise GenvisError(f"images of type {type(images).__name__}: expected a torch tensor or numpy array")
    if x.ndim != 4:
        raise GenvisError(f"images of shape {tuple(x.shape)}: expected 4 dims, NCHW float or NHWC uint8")
    x = x.detach()
    if x.dtype == torch.uint8:
        x = x.permute(0, 3, 1, 2).float() / 127.5 - 1.0  # NHWC -> NCHW in [-1, 1]
        layout = "NHWC uint8"
    elif x.is_floating_point():
        x = x.float()
        layout = "NCHW float"
    else:
        raise GenvisError(f"images of dtype {x.dtype}: expected float NCHW in [-1, 1] or uint8 NHWC")
    if x.shape[1] not in (1, 3):
        raise GenvisError(f"images of shape {tuple(images.shape)} ({layout}): expected 1 or 3 channels")
    x = x.mean(dim=1, keepdim=True)  # N, 1, H, W
    if x.shape[-2:] != (RESOLUTION, RESOLUTION):
        x = F.interpolate(x, size=(RESOLUTION, RESOLUTION), mode="bilinear", antialias=True, align_corners=False)
    return x.contiguous()


@torch.no_grad()
def _classify_batches(model: DigitsClassifier, batches: Iterable, *, total: Optional[int] = None,
                      progress: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """(features [N, 128] float32, predicted class [N] int64) of image batches in any form
    `prepare_images` accepts; `progress` shows a tqdm bar of `total` images on stderr (when it is a terminal)."""
    from tqdm.auto import tqdm

    feats, preds = [], []
    # disable=None: tqdm turns itself off when stderr is not a terminal
    with tqdm(total=total, desc="digits classifier", unit="img", dynamic_ncols=True,
              disable=None if progress else True) as bar:
        for batch in batches:
            f = model.features(prepare_images(batch))
            feats.append(f)
            preds.append(model.head(f).argmax(dim=1))
            bar.update(int(f.shape[0]))
    return torch.cat(feats), torch.cat(preds)


def _classify(model: DigitsClassifier, images, batch_size: int, *,
              progress: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """(features [N, 128] float32, predicted class [N] int64) of an image batch, in batches of `batch_size`."""
    n = images.shape[0]
    return _classify_batches(model, (images[start : start + batch_size] for start in range(0, n, batch_size)),
                             total=n, progress=progress)


@functools.lru_cache(maxsize=None)
def _reference_statistics(resolution: int) -> Tuple[np.ndarray, np.ndarray]:
    """Feature mean/covariance of the held-out digits test split rendered at `resolution`."""
    from genvis.data.digits import DigitsDataset

    reference = DigitsDataset(split="test", resolution=resolution, channels=1)
    feats, _ = _classify(_shared_classifier(), reference.images, batch_size=512)
    return feature_statistics(feats)


def _image_size(images) -> Tuple[int, int]:
    """(H, W) of a float NCHW or uint8 NHWC batch."""
    uint8 = images.dtype == torch.uint8 if isinstance(images, torch.Tensor) else np.asarray(images).dtype == np.uint8
    return tuple(images.shape[1:3]) if uint8 else tuple(images.shape[2:4])


def _check_count(num: int, prefix: str = "") -> None:
    """At least 2 images: the Frechet distance needs a feature covariance."""
    if num < 2:
        raise GenvisError(f"{prefix}{num} image(s); expected at least 2 (the Frechet distance needs a feature covariance)")


def _check_size(height: int, width: int, what: str) -> None:
    """Square images of at least MIN_RESOLUTION: the reference is the test split rendered at that size."""
    if height != width:
        raise GenvisError(f"{what} of size {height}x{width}: expected square images (the reference is square)")
    if height < MIN_RESOLUTION:
        raise GenvisError(f"{what} of size {height}x{width}: expected square images of at least "
                          f"{MIN_RESOLUTION}x{MIN_RESOLUTION} (the digits' native size; smaller renderings destroy "
                          "the digits)")


def _check_labels(labels: np.ndarray, num: int, what: str) -> torch.Tensor:
    """Integer labels [num] in 0..NUM_CLASSES-1 -> int64 tensor."""
    if labels.ndim != 1 or labels.shape[0] != num or not np.issubdtype(labels.dtype, np.integer):
        raise GenvisError(f"{what} is {labels.dtype} {labels.shape}: expected integers [{num}], one class per image")
    bad = np.flatnonzero((labels < 0) | (labels >= NUM_CLASSES))
    if bad.size:
        i = int(bad[0])
        raise GenvisError(f"{what} value {labels[i]} at index {i}: expected digit classes 0..{NUM_CLASSES - 1} "
                          f"(the classifier's)")
    return torch.from_numpy(labels.astype(np.int64))


def _metrics(feats: torch.Tensor, preds: torch.Tensor, labels: Optional[torch.Tensor], resolution: int) -> dict:
    """{"fd", "num", "class_accuracy" (with labels)} from the classifier's features and predictions."""
    mu_ref, sigma_ref = _reference_statistics(int(resolution))
    mu, sigma = feature_statistics(feats)
    metrics = {"fd": frechet_distance(mu, sigma, mu_ref, sigma_ref), "num": int(feats.shape[0])}
    if labels is not None:
        metrics["class_accuracy"] = float((preds == labels.to(preds.device)).double().mean())
    return metrics


def digits_metrics(images, labels=None, *, batch_size: int = 256, progress: bool = False) -> dict:
    """Frechet distance in digits-classifier feature space, and class accuracy.

    Args:
        images: N >= 2 square images in any form `prepare_images` accepts (float NCHW in [-1, 1]
            or uint8 NHWC), at resolution R >= 8 (the digits' native size).
        labels: optional [N] intended classes 0..9 (numpy or torch ints), e.g. the conditioning labels.
        batch_size: classifier batch size (memory only; results do not depend on it).
        progress: a tqdm bar of the classifier batches on stderr (default False).

    Returns:
        {"fd": float, Frechet distance of the images' features vs the digits test split rendered
         at resolution R; "num": N; "class_accuracy": float, fraction whose argmax == label
         (only when labels are given)}.
    """
    if not hasattr(images, "shape") or len(images.shape) != 4:
        raise GenvisError(f"images of shape {getattr(images, 'shape', None)}: expected 4 dims, NCHW float or NHWC uint8")
    _check_count(int(images.shape[0]))
    height, width = _image_size(images)
    _check_size(int(height), int(width), "images")
    if labels is not None:
        array = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
        labels = _check_labels(array.reshape(-1) if array.ndim > 1 else array, int(images.shape[0]), "labels")
    feats, preds = _classify(_shared_classifier(), images, batch_size, progress=progress)
    return _metrics(feats, preds, labels, height)


def evaluate_npz(path: Union[str, Path], *, batch_size: int = 256, progress: bool = False) -> dict:
    """digits_metrics of an ADM-style sample file, plus "path".

    The file holds `arr_0`: uint8 [N, H, W, C] with C = 1 or 3, N >= 2, H = W >= 8, and optionally
    `labels`: int [N] in 0..9.
    """
    path = Path(path)
    if not path.is_file():
        raise GenvisError(f"{path}: not found; {NPZ_EXPECTED}")
    try:
        with open(path, "rb") as f:
            magic = f.read(8)
    except OSError as err:
        raise GenvisError(f"{path}: cannot read ({err.strerror})") from None
    if not magic.startswith((b"PK\x03\x04", b"PK\x05\x06")):  # an .npz is a zip archive (an empty one: end record only)
        kind = (" (it is a PNG image)" if magic.startswith(b"\x89PNG\r\n\x1a\n") else
                " (it is a bare .npy array)" if magic.startswith(b"\x93NUMPY") else "")
        raise GenvisError(f"{path}: not an .npz archive{kind}; {NPZ_EXPECTED}")
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as err:  # a damaged zip
        raise GenvisError(f"{path}: cannot read as .npz ({first_line(err)}); {NPZ_EXPECTED}") from None
    with data:
        if "arr_0" not in data.files:
            raise GenvisError(f"{path}: key 'arr_0' missing; expected uint8 images [N, H, W, C] (found keys: {', '.join(data.files) or 'none'})")
        images = _read_member(data, "arr_0", path, "uint8 [N, H, W, C]")
        labels = _read_member(data, "labels", path, "integers [N]") if "labels" in data.files else None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise GenvisError(f"{path}: key 'arr_0' is {images.dtype} {images.shape}; expected uint8 [N, H, W, C] with C = 1 or 3")
    _check_count(images.shape[0], f"{path}: key 'arr_0' holds ")
    _check_size(images.shape[1], images.shape[2], f"{path}: images")
    if labels is not None:
        labels = _check_labels(labels, images.shape[0], f"{path}: key 'labels'")
    feats, preds = _classify(_shared_classifier(), images, batch_size, progress=progress)
    return {**_metrics(feats, preds, labels, images.shape[1]), "path": str(path)}


def _read_member(data, key: str, path: Path, expected: str) -> np.ndarray:
    """data[key] of an open .npz, or one line naming the key when it cannot be read (object arrays, truncation)."""
    try:
        return data[key]
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        raise GenvisError(f"{path}: key '{key}' is not a readable numeric array ({first_line(err)}); "
                          f"expected {expected}") from None


def read_manifest_labels(folder: Union[str, Path], files) -> Optional[np.ndarray]:
    """Labels of the images `files` (paths in `folder`, in that order) from `folder`/samples.json, or None
    without a manifest.

    The manifest (written by `genvis sample` for PNG-folder outputs) is a JSON object
    {"labels": [int, ...], "files": ["000000.png", ...], ...}: labels[i] is the class of files[i].
    It must list every image of the folder exactly once and nothing else.
    """
    manifest = Path(folder) / MANIFEST
    if not manifest.is_file():
        return None
    form = '{"labels": [int, ...], "files": ["000000.png", ...]}'
    try:
        content = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise GenvisError(f"{manifest}: not readable as JSON ({first_line(err)}); expected {form}") from None
    if not isinstance(content, dict):
        raise GenvisError(f"{manifest}: a JSON {type(content).__name__}; expected an object {form}")
    for key in ("labels", "files"):
        if not isinstance(content.get(key), list):
            found = "missing" if key not in content else f"is a JSON {type(content[key]).__name__}"
            raise GenvisError(f"{manifest}: key '{key}' {found}; expected {form}")
    labels, listed = content["labels"], content["files"]
    bad = next((i for i, v in enumerate(labels) if type(v) is not int), None)  # bool is not a class
    if bad is not None:
        raise GenvisError(f"{manifest}: 'labels' value {labels[bad]!r} at index {bad}: expected integer classes "
                          f"0..{NUM_CLASSES - 1}")
    bad = next((i for i, v in enumerate(listed) if not isinstance(v, str)), None)
    if bad is not None:
        raise GenvisError(f"{manifest}: 'files' entry {listed[bad]!r} at index {bad}: expected image file names")
    if len(labels) != len(listed):
        raise GenvisError(f"{manifest}: {len(labels)} labels for {len(listed)} files; expected one label per file")
    position = {}
    for i, name in enumerate(listed):
        if name in position:
            raise GenvisError(f"{manifest}: 'files' lists {name} twice (index {position[name]} and {i}); "
                              "expected each image once")
        position[name] = i
    names = [Path(f).name for f in files]
    missing = next((name for name in names if name not in position), None)
    if missing is not None:
        raise GenvisError(f"{manifest}: image {missing} of the folder is not in 'files' ({len(listed)} files listed, "
                          f"{len(names)} images in the folder); expected one label per image")
    if len(listed) != len(names):
        in_folder = set(names)
        extra = next(name for name in listed if name not in in_folder)
        raise GenvisError(f"{manifest}: 'files' lists {extra}, which is not an image of the folder ({len(listed)} files "
                          f"listed, {len(names)} images in the folder); expected one label per image")
    bad = next((i for i, v in enumerate(labels) if not 0 <= v < NUM_CLASSES), None)  # before int64: no overflow
    if bad is not None:
        raise GenvisError(f"{manifest}: 'labels' value {labels[bad]} at index {bad} ({listed[bad]}): expected digit "
                          f"classes 0..{NUM_CLASSES - 1} (the classifier's)")
    return np.asarray([labels[position[name]] for name in names], dtype=np.int64)


def evaluate_folder(path: Union[str, Path], *, batch_size: int = 256, progress: bool = False) -> dict:
    """digits_metrics of a folder of PNG images (read as `genvis eval fid` reads them: sorted by name,
    RGB, one size), plus "path"; class_accuracy only when the folder has a samples.json (see
    `read_manifest_labels`). Images are decoded batch by batch as the classifier goes."""
    from genvis.evaluation.reference import FolderSource  # reference -> features -> digits: imported here

    path = Path(path)
    source = FolderSource(path)
    _check_count(len(source), f"{path}: ")
    _check_size(source.height, source.width, f"{path}: images")
    labels = read_manifest_labels(path, source.files)
    batches = (batch.permute(0, 2, 3, 1) for batch in source.batches(batch_size))  # uint8 NHWC, as arr_0
    feats, preds = _classify_batches(_shared_classifier(), batches, total=len(source), progress=progress)
    labels = torch.from_numpy(labels) if labels is not None else None
    return {**_metrics(feats, preds, labels, source.height), "path": str(path)}


def evaluate_samples(path: Union[str, Path], *, batch_size: int = 256, progress: bool = False) -> dict:
    """digits_metrics of samples on disk, plus "path": a folder of PNG images (`evaluate_folder`) or an
    ADM-style .npz (`evaluate_npz`)."""
    path = Path(path)
    if path.is_dir():
        return evaluate_folder(path, batch_size=batch_size, progress=progress)
    return evaluate_npz(path, batch_size=batch_size, progress=progress)
