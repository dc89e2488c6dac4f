"""Offline digits metrics: a small CNN classifier gives the feature space for a Frechet distance
and the class accuracy of conditional samples.

    metrics = digits_metrics(images_NCHW, labels)   # {"fd": ..., "num": ..., "class_accuracy": ...}
    metrics = evaluate_npz("samples.npz")           # ADM-style arr_0 uint8 NHWC (+ labels)

The classifier is trained by scripts/train_digits_classifier.py on the fixed digits train split
and shipped as genvis/evaluation/assets/digits_classifier.safetensors. The reference is the
held-out test split rendered at the samples' resolution, so both sides go through exactly the
same resizing before the classifier sees them.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Optional, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from genvis.errors import GenvisError
from genvis.evaluation.fid import feature_statistics, frechet_distance

ASSETS = Path(__file__).resolve().parent / "assets"
CLASSIFIER_PATH = ASSETS / "digits_classifier.safetensors"
RESOLUTION = 16  # the classifier's input side
FEATURE_DIM = 128


class DigitsClassifier(nn.Module):
    """VGG-style CNN for 16x16 greyscale digits.

    conv3x3(32)-conv3x3(32)-maxpool-conv3x3(64)-conv3x3(64)-maxpool -> fc 128 -> fc 10, ReLU
    throughout, dropout before the head in training only. No BatchNorm, so eval-mode outputs
    depend on nothing but the weights and the input.
    """

    def __init__(self, num_classes: int = 10, dropout: float = 0.3):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),  # 16 -> 8
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),  # 8 -> 4
        )
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
def _classify(model: DigitsClassifier, images, batch_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(features [N, 128] float32, predicted class [N] int64) in batches of `batch_size`."""
    x = prepare_images(images)
    feats, preds = [], []
    for start in range(0, x.shape[0], batch_size):
        f = model.features(x[start : start + batch_size])
        feats.append(f)
        preds.append(model.head(f).argmax(dim=1))
    return torch.cat(feats), torch.cat(preds)


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


def digits_metrics(images, labels=None, *, batch_size: int = 256) -> dict:
    """Frechet distance in digits-classifier feature space, and class accuracy.

    Args:
        images: N >= 2 square images in any form `prepare_images` accepts (float NCHW in [-1, 1]
            or uint8 NHWC), at resolution R.
        labels: optional [N] intended classes (numpy or torch ints), e.g. the conditioning labels.
        batch_size: classifier batch size (memory only; results do not depend on it).

    Returns:
        {"fd": float, Frechet distance of the images' features vs the digits test split rendered
         at resolution R; "num": N; "class_accuracy": float, fraction whose argmax == label
         (only when labels are given)}.
    """
    if not hasattr(images, "shape") or len(images.shape) != 4:
        raise GenvisError(f"images of shape {getattr(images, 'shape', None)}: expected 4 dims, NCHW float or NHWC uint8")
    height, width = _image_size(images)
    if height != width:
        raise GenvisError(f"images of size {height}x{width}: expected square images (the reference is square)")
    feats, preds = _classify(_shared_classifier(), images, batch_size)
    mu_ref, sigma_ref = _reference_statistics(int(height))
    mu, sigma = feature_statistics(feats)
    metrics = {"fd": frechet_distance(mu, sigma, mu_ref, sigma_ref), "num": int(feats.shape[0])}
    if labels is not None:
        labels = torch.as_tensor(np.asarray(labels)).long().flatten()
        if labels.shape[0] != preds.shape[0]:
            raise GenvisError(f"labels of length {labels.shape[0]}: expected one per image ({preds.shape[0]})")
        metrics["class_accuracy"] = float((preds == labels).double().mean())
    return metrics


def evaluate_npz(path: Union[str, Path]) -> dict:
    """digits_metrics of an ADM-style sample file, plus "path".

    The file holds `arr_0`: uint8 [N, H, W, C] with C = 1 or 3, and optionally `labels`: int [N].
    """
    path = Path(path)
    if not path.is_file():
        raise GenvisError(f"{path}: sample file not found")
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as err:  # not a zip / not an npz
        raise GenvisError(f"{path}: cannot read as .npz ({err})") from None
    if not hasattr(data, "files"):  # a bare .npy array loads as an ndarray
        raise GenvisError(f"{path}: not an .npz archive; expected key 'arr_0' with uint8 images [N, H, W, C]")
    with data:
        if "arr_0" not in data.files:
            raise GenvisError(f"{path}: key 'arr_0' missing; expected uint8 images [N, H, W, C] (found keys: {', '.join(data.files) or 'none'})")
        images = data["arr_0"]
        labels = data["labels"] if "labels" in data.files else None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise GenvisError(f"{path}: key 'arr_0' is {images.dtype} {images.shape}; expected uint8 [N, H, W, C] with C = 1 or 3")
    if labels is not None and (labels.shape != (images.shape[0],) or not np.issubdtype(labels.dtype, np.integer)):
        raise GenvisError(f"{path}: key 'labels' is {labels.dtype} {labels.shape}; expected integers [{images.shape[0]}]")
    return {**digits_metrics(images, labels), "path": str(path)}
