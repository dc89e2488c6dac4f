"""A dataset of latents stored once by a frozen tokenizer (`genvis.tokenizers.extract.extract_latents`),
so that a latent generator trains without running the encoder every step (fast-DiT's extract_features).

    data.name=latents data.path=DIR

DIR holds `latents.json` (what was encoded, by which tokenizer, and the shard layout) and
`shards/shard_000012.safetensors`, one file per `shard_size` consecutive dataset indices:

    latents          float32 [n, C, h, w]   the tokenizer's normalised latents (posterior mode)
                     or int64 [n, h, w]     a discrete tokenizer's ids: a grid (VQ), or [n, L] all scales
                                            concatenated coarse to fine (multi-scale VQ); latents.json's
                                            "ids" then holds {"vocab_size", "layout", "scales"}
    labels           int64   [n]
    indices          int64   [n]            the dataset indices start..stop-1
    latents_flipped  float32 [n, C, h, w]   the latents of the horizontally flipped images (flip=True only)

This module owns the format; the extractor imports its names.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import torch
from torch.utils.data import Dataset

from genvis.errors import DataError, first_line
from genvis.shards import shard_ranges

FORMAT_VERSION = 1
RECORD = "latents.json"
RECORD_KEYS = ("format_version", "tokenizer", "tokenizer_class", "data", "split", "num_items", "num_classes",
               "latent_shape", "flip", "shard_size", "num_shards")


def shard_path(folder: Path, k: int) -> Path:
    return Path(folder) / "shards" / f"shard_{k:06d}.safetensors"


class LatentsDataset(Dataset):
    """The latents and labels of a folder made by `extract_latents`, read into memory once.

    In memory rather than lazily: random access then costs an index, not a file read, in every
    DataLoader worker alike, and every shard is fully checked once, up front, so a bad file fails at
    start-up and not hours into training. The price is N * C * h * w * 4 bytes (twice that with flips):
    1.5 MB for the digits, about 21 GB (42 GB with flips) for ImageNet-256 through SD-VAE, which would
    need a lazy reader (safetensors' safe_open per shard) instead.

    Args:
        path: the folder (latents.json + shards/).

    Attributes:
        latents: float32 [N, C, h, w]; latents_flipped: the same for the flipped images, or None.
        labels: int64 [N].
        num_classes: from latents.json. item_shape: (C, h, w) of one latent.
        encoded_by: the tokenizer folder (absolute path) the latents came from, to decode them with.
        flip: whether flipped latents are stored. record: latents.json as a dict.

    `dataset[i]` or `dataset[(i, flip)]` returns `(latent [C, h, w] float32, label int)`; flip=True returns
    the stored encoding of the mirrored image (flipping a latent is not the latent of the flipped image).
    """

    def __init__(self, path: Union[str, Path]):
        self.path = Path(path)
        self.record = read_record(self.path)
        r = self.record
        num, size, shape = r["num_items"], r["shard_size"], tuple(r["latent_shape"])
        self.num_classes: int = r["num_classes"]
        self.item_shape: Tuple[int, int, int] = shape
        self.encoded_by: Optional[str] = r["tokenizer"]
        self.flip: bool = r["flip"]
        self.ids: Optional[Dict] = r.get("ids")  # the vocabulary and layout of token ids; None for latents
        dtype = torch.int64 if self.ids else torch.float32
        self.latents = torch.empty((num,) + shape, dtype=dtype)
        self.latents_flipped = torch.empty((num,) + shape, dtype=dtype) if self.flip else None
        self.labels = torch.empty(num, dtype=torch.int64)
        for k, start, stop in shard_ranges(num, size):
            tensors = read_shard(shard_path(self.path, k), stop - start, shape, self.flip, dtype)
            if not torch.equal(tensors["indices"], torch.arange(start, stop)):
                raise DataError(f"{shard_path(self.path, k)}: holds other indices than shard {k} ({start}..{stop - 1}); "
                                "remove it and rerun the extraction")
            self.latents[start:stop] = tensors["latents"]
            self.labels[start:stop] = tensors["labels"]
            if self.flip:
                self.latents_flipped[start:stop] = tensors["latents_flipped"]

    def __len__(self) -> int:
        return self.latents.shape[0]

    def __getitem__(self, index: Union[int, Tuple[int, bool]]) -> Tuple[torch.Tensor, int]:
        index, flip = index if isinstance(index, tuple) else (index, False)
        if not flip:
            return self.latents[index], int(self.labels[index])
        if self.latents_flipped is None:
            raise DataError(f"{self.path}: extracted without flipped latents; re-extract with --flip or set "
                            "data.random_flip=false")
        return self.latents_flipped[index], int(self.labels[index])


def read_record(folder: Path) -> Dict:
    """latents.json of `folder`, checked for the keys and format version this reader knows."""
    path = Path(folder) / RECORD
    if not path.is_file():
        raise DataError(f"{path}: not found; data.path must be a folder made by extract_latents")
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: not readable JSON ({first_line(err)})") from None
    missing = [k for k in RECORD_KEYS if k not in record] if isinstance(record, dict) else list(RECORD_KEYS)
    if missing:
        raise DataError(f"{path}: missing {', '.join(missing)}; not a latents record made by extract_latents")
    if record["format_version"] != FORMAT_VERSION:
        raise DataError(f"{path}: format_version {record['format_version']!r}; this genvis reads {FORMAT_VERSION}")
    if record["num_shards"] != len(shard_ranges(record["num_items"], record["shard_size"])):
        raise DataError(f"{path}: num_shards {record['num_shards']} does not fit num_items {record['num_items']} "
                        f"in shards of {record['shard_size']}")
    return record


def read_shard(path: Path, n: int, latent_shape: Tuple[int, ...], flip: bool,
               dtype: torch.dtype = torch.float32) -> Dict[str, torch.Tensor]:
    """The tensors of one shard file, checked against what latents.json says it holds (n items of `dtype`:
    float32 latents or int64 ids)."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise DataError(f"{path}: shard missing; rerun the extraction to finish it")
    try:
        tensors = load_file(str(path))
    except Exception as err:  # SafetensorError for a truncated or foreign file
        raise DataError(f"{path}: not a readable safetensors shard ({first_line(err)}); remove it and rerun the extraction") from None
    expected = {"latents": (dtype, (n,) + tuple(latent_shape)), "labels": (torch.int64, (n,)),
                "indices": (torch.int64, (n,))}
    if flip:
        expected["latents_flipped"] = expected["latents"]
    for key, (dtype, shape) in expected.items():
        if key not in tensors:
            raise DataError(f"{path}: no {key!r} tensor; remove it and rerun the extraction")
        if tensors[key].dtype != dtype or tuple(tensors[key].shape) != shape:
            raise DataError(f"{path}: {key!r} is {str(tensors[key].dtype).removeprefix('torch.')} "
                            f"{list(tensors[key].shape)}, expected {str(dtype).removeprefix('torch.')} {list(shape)}")
    return tensors
