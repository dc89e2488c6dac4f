"""Latent extraction: a dataset encoded once by a frozen tokenizer, so that a latent generator trains on
stored latents (`data.name=latents`) instead of running the encoder every step, as fast-DiT's
extract_features.py does (it too stores the encoding of each image and of its mirror image).

    extract_latents("vae/", cfg.data, "latents/", flip=True)

Every image is encoded with the posterior mode in fp32 (no autocast), so the latents are a function of
the image and the tokenizer alone. A discrete tokenizer's ids are stored as int64: a grid [h, w] per image
(VQ), or every scale's ids concatenated coarse to fine [L] (multi-scale VQ), for token generators. The dataset indices are grouped into shards of `shard_size`
consecutive indices; Accelerate process p of W encodes the shards k with k % W == p, in batches that
start at the shard's start, so the files do not depend on the process count. A finished shard is one
file, `shards/shard_000012.safetensors` (layout: genvis.data.latents), written under a temporary name
and renamed, so a killed run leaves only complete shards and a rerun encodes the missing ones only.
`latents.json`, written by the main process first, records what the folder holds; a rerun with other
settings stops instead of mixing two encodings. This is evaluation.distributed's scheme for sampling.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple

import torch

from genvis.data.latents import FORMAT_VERSION, RECORD, shard_path
from genvis.errors import GenvisError
from genvis.io import atomic_path
from genvis.shards import record_settings, shard_ranges
from genvis.registry import TOKENIZERS


def extract_latents(tokenizer_path, data_cfg, out, *, flip: bool = False, batch_size: int = 64, shard_size: int = 1000,
                    device: Optional[str] = None, split: str = "train", progress: bool = False) -> Path:
    """Encode every image of `genvis.data.build_dataset(data_cfg, split)` with the tokenizer, over all
    Accelerate processes, resumably; returns `out`.

    Args:
        tokenizer_path: a tokenizer folder (genvis, or any diffusers AutoencoderKL folder), or anything
            `genvis.load_tokenizer` accepts.
        data_cfg: a DataConfig (name, path, resolution, channels pick the images; random_flip is ignored).
        out: the output folder: latents.json + shards/.
        flip: also store the latents of the horizontally flipped images ("latents_flipped"), so that
            training with data.random_flip=true can use them. Default False.
        batch_size: images per encoder call. Default 64.
        shard_size: dataset indices per shard file. Default 1000.
        device: where to encode; default the Accelerate process's device.
        split: the dataset split ("train", "test", "all" for the digits). Default "train".
        progress: a tqdm bar of images on stderr (local main process, when stderr is a terminal).
    """
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env
    from safetensors.torch import save_file

    from genvis.data import build_dataset
    from genvis.tokenizers import load_tokenizer

    if batch_size < 1 or shard_size < 1:
        raise GenvisError(f"batch_size {batch_size}, shard_size {shard_size}: both must be >= 1")
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    out = Path(out)
    device = device or str(state.device)
    dataset = build_dataset(data_cfg, split)
    if getattr(dataset, "encoded_by", None) is not None:
        raise GenvisError(f"data.name={data_cfg.name}: already latents (encoded by {dataset.encoded_by}); "
                          "extract from an image dataset")
    tokenizer = load_tokenizer(tokenizer_path, device=device)
    record = _record(tokenizer_path, tokenizer, data_cfg, dataset, split, flip, shard_size)
    # Every process checks (so a refused rerun stops them all, none waits at the barrier); the main one writes.
    record_settings(out / RECORD, record, state.is_main_process, "use a new output folder or the same settings")
    if state.is_main_process:
        for stale in (out / "shards").glob(".shard_*.safetensors.*.tmp"):  # left by a SIGKILL during a write;
            stale.unlink()  # removed before any process starts writing this run's files
    state.wait_for_everyone()
    rank, world = state.process_index, state.num_processes
    ranges = [(k, start, stop) for k, start, stop in shard_ranges(len(dataset), shard_size)
              if k % world == rank and not shard_path(out, k).is_file()]
    bar = _bar(sum(stop - start for _, start, stop in ranges), progress and state.is_local_main_process)
    for k, start, stop in ranges:
        tensors = _encode_range(tokenizer, dataset, start, stop, batch_size, flip, tuple(record["latent_shape"]), device, bar)
        with atomic_path(shard_path(out, k)) as tmp:
            save_file(tensors, str(tmp))
    bar.close()
    state.wait_for_everyone()
    return out


def _record(tokenizer_path, tokenizer, data_cfg, dataset, split: str, flip: bool, shard_size: int) -> Dict:
    """latents.json: what was encoded, by what, and the shard layout (genvis.data.latents reads it)."""
    class_name = next((TOKENIZERS.entry(n).meta.get("class_name") for n in TOKENIZERS.names()
                       if TOKENIZERS.entry(n).factory is type(tokenizer)), type(tokenizer).__name__)
    data_path = getattr(data_cfg, "path", None)
    num = len(dataset)
    record = {
        "format_version": FORMAT_VERSION,
        "tokenizer": getattr(tokenizer, "source", None) or str(Path(tokenizer_path).resolve()),  # the folder itself
        "tokenizer_class": class_name,
        "data": {"name": data_cfg.name, "path": str(Path(data_path).resolve()) if data_path else None,
                 "resolution": data_cfg.resolution, "channels": data_cfg.channels},
        "split": split,
        "num_items": num,
        "num_classes": int(dataset.num_classes),
        "latent_shape": list(tokenizer.latent_shape(tuple(dataset.item_shape))),
        "flip": bool(flip),
        "shard_size": shard_size,
        "num_shards": len(shard_ranges(num, shard_size)),
    }
    if tokenizer.kind == "discrete":  # ids, for token generators (absent for latents, as before)
        record["ids"] = {"vocab_size": int(tokenizer.vocab_size), "layout": tokenizer.token_layout,
                         "scales": list(tokenizer.scales) if tokenizer.token_layout == "scales" else None}
    return record


def _batches(start: int, stop: int, batch_size: int) -> Iterator[Tuple[int, int]]:
    for a in range(start, stop, batch_size):
        yield a, min(a + batch_size, stop)


def _encode_range(tokenizer, dataset, start: int, stop: int, batch_size: int, flip: bool, latent_shape, device,
                  bar) -> Dict[str, torch.Tensor]:
    """The shard's tensors for dataset indices start..stop-1 (see genvis.data.latents for the layout)."""
    latents, flipped, labels = [], [], []
    with torch.inference_mode():
        for a, b in _batches(start, stop, batch_size):
            items = [dataset[i] for i in range(a, b)]
            images_BCHW = torch.stack([image for image, _ in items]).to(device)
            labels += [label for _, label in items]
            # Two calls, not one of 2B: the plain latents are then the same bits with or without flip.
            latents.append(_stored(tokenizer, tokenizer.encode(images_BCHW)))
            if flip:
                flipped.append(_stored(tokenizer, tokenizer.encode(torch.flip(images_BCHW, dims=[-1]))))
            bar.update(b - a)
    # .contiguous(): a conv may hand back channels-last strides, which safetensors will not write
    tensors = {"latents": torch.cat(latents).contiguous(), "labels": torch.tensor(labels, dtype=torch.int64),
               "indices": torch.arange(start, stop, dtype=torch.int64)}
    if flip:
        tensors["latents_flipped"] = torch.cat(flipped).contiguous()
    if tuple(tensors["latents"].shape[1:]) != tuple(latent_shape):
        raise GenvisError(f"the tokenizer gave latents of shape {list(tensors['latents'].shape[1:])}, but its latent_shape "
                          f"says {list(latent_shape)}")
    return tensors


def _stored(tokenizer, encoded) -> torch.Tensor:
    """What a shard stores of one batch's encoding: float32 latents, or int64 ids (scales concatenated)."""
    if tokenizer.kind == "continuous":
        return encoded.float().cpu()
    if isinstance(encoded, (list, tuple)):
        encoded = torch.cat([ids.reshape(ids.shape[0], -1) for ids in encoded], dim=1)
    return encoded.long().cpu()


def _bar(total: int, show: bool):
    from tqdm.auto import tqdm

    # disable=None: tqdm turns itself off when stderr is not a terminal
    return tqdm(total=total, desc="encoding", unit="img", dynamic_ncols=True, disable=None if show else True)
