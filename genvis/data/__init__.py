"""Datasets: the offline digits and class-labelled image folders, built from a DataConfig.

    dataset = build_dataset(cfg.data, split="train")
    image_CHW, label = dataset[(index, flip)]
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from genvis.data.digits import DigitsDataset, load_digits_arrays
from genvis.data.folder import ImageFolderDataset
from genvis.data.latents import LatentsDataset
from genvis.errors import ConfigError, DataError
from genvis.registry import DATASETS

__all__ = ["DataConfig", "build_dataset", "DigitsDataset", "ImageFolderDataset", "LatentsDataset", "load_digits_arrays"]


@dataclass
class DataConfig:
    """The run config's `data:` section."""

    name: str = "digits"  # digits | folder
    path: Optional[str] = None  # image-folder root (class sub-folders) for name=folder
    resolution: int = 16
    channels: int = 1
    random_flip: bool = False
    num_workers: int = 0

    def validate(self) -> None:
        if self.name not in DATASETS:
            raise ConfigError(f"key 'data.name': {self.name!r} is not one of {', '.join(DATASETS.names())}")
        if self.channels not in (1, 3):
            raise ConfigError(f"key 'data.channels': {self.channels} is not one of 1, 3")
        if self.resolution < 1:
            raise ConfigError(f"key 'data.resolution': must be >= 1, got {self.resolution}")
        if self.num_workers < 0:
            raise ConfigError(f"key 'data.num_workers': must be >= 0, got {self.num_workers}")
        if self.name == "folder" and not self.path:
            raise ConfigError("key 'data.path': data.name=folder needs the image-folder root")


@DATASETS.register("digits")
def _build_digits(cfg: DataConfig, split: str = "train") -> DigitsDataset:
    return DigitsDataset(split=split, resolution=cfg.resolution, channels=cfg.channels)


@DATASETS.register("folder")
def _build_folder(cfg: DataConfig, split: str = "train") -> ImageFolderDataset:
    # An image folder has no built-in split: point data.path at the folder you want.
    if not cfg.path:
        raise DataError("data.path: the folder dataset needs the image-folder root")
    return ImageFolderDataset(cfg.path, resolution=cfg.resolution, channels=cfg.channels)


@DATASETS.register("latents")
def _build_latents(cfg: DataConfig, split: str = "train") -> LatentsDataset:
    # Latents stored by extract_latents: the folder fixes the split, resolution and channels it was made from.
    if not cfg.path:
        raise DataError("data.path: the latents dataset needs the folder made by extract_latents")
    return LatentsDataset(cfg.path)


def build_dataset(cfg: DataConfig, split: str = "train"):
    """The dataset named by `cfg.name` ("digits" or "folder"); `split` only matters for digits."""
    try:
        factory = DATASETS.get(cfg.name)
    except KeyError as err:
        raise DataError(f"data.name: {err.args[0]}") from None
    return factory(cfg, split=split)
