"""A folder of images, one sub-folder per class (torchvision ImageFolder layout), ADM preprocessing."""
from __future__ import annotations

from pathlib import Path
from typing import List, Tuple, Union

import torch
from PIL import Image
from torch.utils.data import Dataset

from genvis.data.transforms import center_crop_arr, uint8_to_tensor
from genvis.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def _image_files(folder: Path) -> List[Path]:
    """Image files anywhere under `folder`, sorted by path (extension match is case-insensitive)."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


class ImageFolderDataset(Dataset):
    """Class-labelled images from `root/<class name>/**/<image>`.

    Args:
        root: folder whose sorted sub-folder names are the classes (label = index in that order).
            Each class's images are found recursively and sorted by path.
        resolution: output side length R; images go through ADM's `center_crop_arr`.
        channels: 3 (convert to RGB) or 1 (convert to L). Default 3.

    Attributes:
        classes: sorted class names; num_classes: len(classes).
        samples: list of (path, label), in dataset order.
        item_shape: (C, R, R) of one image; encoded_by: None (pixels; a LatentsDataset names its tokenizer).

    `dataset[i]` or `dataset[(i, flip)]` returns `(image [C, R, R] float32 in [-1, 1], label int)`;
    flip=True mirrors horizontally (the caller's RNG decides, for reproducible training).
    Images are decoded lazily; an unreadable file raises DataError naming its path.
    """

    encoded_by = None

    def __init__(self, root: Union[str, Path], resolution: int, channels: int = 3):
        if channels not in (1, 3):
            raise DataError(f"image folder channels {channels!r}: expected 1 or 3")
        if not isinstance(resolution, int) or resolution < 1:
            raise DataError(f"image folder resolution {resolution!r}: expected a positive integer")
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"{self.root}: image folder not found")
        self.classes = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        self.samples: List[Tuple[Path, int]] = [
            (path, label) for label, name in enumerate(self.classes) for path in _image_files(self.root / name)
        ]
        if not self.samples:
            raise DataError(
                f"{self.root}: no images found; expected class sub-folders holding {'/'.join(IMAGE_EXTENSIONS)} files"
            )
        self.num_classes = len(self.classes)
        self.resolution = resolution
        self.channels = channels
        self.item_shape = (channels, resolution, resolution)

    def __len__(self) -> int:
        return len(self.samples)

    def load_image(self, path: Path):
        """The file at `path` as uint8 [R, R] (channels=1) or [R, R, 3], ADM-cropped."""
        try:
            with Image.open(path) as image:
                image.load()
                image = image.convert("RGB" if self.channels == 3 else "L")
        except Exception as err:  # PIL raises OSError, SyntaxError, ValueError... for bad files
            raise DataError(f"{path}: cannot read image ({err})") from None
        return center_crop_arr(image, self.resolution)

    def __getitem__(self, index: Union[int, Tuple[int, bool]]) -> Tuple[torch.Tensor, int]:
        index, flip = index if isinstance(index, tuple) else (index, False)
        path, label = self.samples[index]
        image = uint8_to_tensor(self.load_image(path))  # C, R, R in [-1, 1]
        if flip:
            image = torch.flip(image, dims=[-1])
        return image, label
