"""Datasets: the offline digits and class-labelled image folders, built from a DataConfig.

    dataset = build_dataset(cfg.data, split="train")
    image_CHW, label = dataset[(index, flip)]
"""
from __future__ import annotations

from genvis.config import DataConfig
from genvis.data.digits import DigitsDataset, load_digits_arrays
from genvis.data.folder import ImageFolderDataset
from genvis.errors import DataError
from genvis.registry import DATASETS

__all__ = ["build_dataset", "DigitsDataset", "ImageFolderDataset", "load_digits_arrays"]


@DATASETS.register("digits")
def _build_digits(cfg: DataConfig, split: str = "train") -> DigitsDataset:
    return DigitsDataset(split=split, resolution=cfg.resolution, channels=cfg.channels)


@DATASETS.register("folder")
def _build_folder(cfg: DataConfig, split: str = "train") -> ImageFolderDataset:
    # An image folder has no built-in split: point data.path at the folder you want.
    if not cfg.path:
        raise DataError("data.path: the folder dataset needs the image-folder root")
    return ImageFolderDataset(cfg.path, resolution=cfg.resolution, channels=cfg.channels)


def build_dataset(cfg: DataConfig, split: str = "train"):
    """The dataset named by `cfg.name` ("digits" or "folder"); `split` only matters for digits."""
    try:
        factory = DATASETS.get(cfg.name)
    except KeyError as err:
        raise DataError(f"data.name: {err.args[0]}") from None
    return factory(cfg, split=split)
