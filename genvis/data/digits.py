"""scikit-learn's bundled handwritten digits: 1,797 real 8x8 greyscale images of 0-9, offline.

The split is fixed once and for all (seed 0) so that the evaluation classifier, its reference
statistics and every generator agree on which 360 images are held out.
"""
from __future__ import annotations

from pathlib import Path
from typing import Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from genvis.errors import DataError

NUM_DIGITS = 1797
NUM_TEST = 360
SPLITS = ("train", "test", "all")


def digits_file() -> Path:
    """scikit-learn's digits.csv.gz, the file `sklearn.datasets.load_digits` reads, found without importing
    scikit-learn (its import costs seconds on every command that touches the digits)."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz" if spec else None
    if path is None or not path.is_file():
        raise DataError("the digits need scikit-learn's bundled digits.csv.gz (sklearn/datasets/data/); "
                        "pip install scikit-learn")
    return path


def load_digits_arrays(split: str) -> Tuple[np.ndarray, np.ndarray]:
    """One split of the digits as numpy arrays.

    Args:
        split: "train" (1,437 images), "test" (360) or "all" (1,797). The split is
            `perm = np.random.RandomState(0).permutation(1797)`, test = perm[:360],
            train = perm[360:], each sorted ascending (so images keep sklearn's order).

    Returns:
        images: float32 [N, 8, 8], values 0..16 (sklearn's integer intensities).
        labels: int64 [N], 0..9.
    """
    if split not in SPLITS:
        raise DataError(f"digits split {split!r}: expected one of {', '.join(SPLITS)}")
    table = np.loadtxt(digits_file(), delimiter=",")  # 1,797 rows: 64 pixels, then the label
    images = table[:, :-1].reshape(-1, 8, 8).astype(np.float32)
    labels = table[:, -1].astype(np.int64)
    if split == "all":
        return images, labels
    perm = np.random.RandomState(0).permutation(NUM_DIGITS)
    index = np.sort(perm[:NUM_TEST] if split == "test" else perm[NUM_TEST:])
    return images[index], labels[index]


class DigitsDataset(Dataset):
    """The digits as float tensors in [-1, 1], upsampled to `resolution`.

    Args:
        split: "train", "test" or "all" (see `load_digits_arrays`). Default "train".
        resolution: output side length R. Default 16. R == 8 gives the raw x / 8 - 1 values;
            otherwise bilinear interpolation (align_corners=False, no antialias), clamped to [-1, 1].
        channels: 1 (grey) or 3 (grey repeated to RGB). Default 1.

    Attributes:
        images: float32 [N, C, R, R] in [-1, 1], precomputed.
        labels: int64 [N].
        num_classes: 10.
        item_shape: (C, R, R) of one image; encoded_by: None (pixels; a LatentsDataset names its tokenizer).

    `dataset[i]` or `dataset[(i, flip)]` returns `(image [C, R, R] float32, label int)`; flip=True
    mirrors the image horizontally. The caller draws `flip` so that its own seeded RNG, not a
    worker's, decides the augmentation and training stays reproducible.
    """

    num_classes = 10
    encoded_by = None

    def __init__(self, split: str = "train", resolution: int = 16, channels: int = 1):
        if channels not in (1, 3):
            raise DataError(f"digits channels {channels!r}: expected 1 or 3")
        if not isinstance(resolution, int) or resolution < 1:
            raise DataError(f"digits resolution {resolution!r}: expected a positive integer")
        images, labels = load_digits_arrays(split)
        x = torch.from_numpy(images)[:, None] / 8.0 - 1.0  # N, 1, 8, 8 in [-1, 1]
        if resolution != 8:
            x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=False)
            x = x.clamp(-1.0, 1.0)
        if channels == 3:
            x = x.repeat(1, 3, 1, 1)  # N, 3, R, R
        self.split = split
        self.resolution = resolution
        self.channels = channels
        self.item_shape = (channels, resolution, resolution)
        self.images = x.contiguous()
        self.labels = torch.from_numpy(labels)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: Union[int, Tuple[int, bool]]) -> Tuple[torch.Tensor, int]:
        index, flip = index if isinstance(index, tuple) else (index, False)
        image = self.images[index]
        if flip:
            image = torch.flip(image, dims=[-1])
        return image, int(self.labels[index])
