"""Image preprocessing shared by the datasets: ADM centre crop and uint8 -> [-1, 1] tensors."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """ADM's centre crop, exactly as guided-diffusion's `image_datasets.center_crop_arr`.

    Halve the image with BOX filtering while its short side is at least 2 * image_size,
    BICUBIC-resize so the short side is image_size (long side rounded), then crop the
    central image_size x image_size window (offsets floored).

    Args:
        pil_image: any PIL image; its mode is kept (convert to RGB / L before calling).
        image_size: output side length in pixels.

    Returns:
        uint8 array [image_size, image_size] for mode L or [image_size, image_size, C] otherwise.
    """
    # Repeated BOX halving first, as ADM does, because a single large BICUBIC downscale aliases;
    # FID reference statistics computed with ADM's pipeline depend on this exact sequence.
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)

    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)

    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size]


def uint8_to_tensor(arr: np.ndarray) -> torch.Tensor:
    """uint8 [H, W] or [H, W, C] in 0..255 -> float32 CHW tensor in [-1, 1] (u / 127.5 - 1)."""
    if arr.ndim == 2:
        arr = arr[:, :, None]
    x = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))).float()  # C, H, W
    return x / 127.5 - 1.0
