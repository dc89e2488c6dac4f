"""Noise drawing and step iteration shared by the solvers."""
from __future__ import annotations

from typing import Sequence, Union

import torch
from tqdm.auto import tqdm

Generator = Union[None, torch.Generator, Sequence[torch.Generator]]


def randn_like(x: torch.Tensor, generator: Generator = None) -> torch.Tensor:
    """Standard normal noise shaped like x. A list of generators gives sample i its own stream,
    so a sample's noise does not depend on which batch it is drawn in."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    if len(generator) != x.shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {x.shape[0]}")
    return torch.stack([torch.randn(x.shape[1:], generator=g, dtype=x.dtype, device=x.device) for g in generator])


def steps_of(grid: torch.Tensor, progress: bool, desc: str):
    """(i, t, t_next) over consecutive grid points, with an optional progress bar."""
    pairs = list(zip(range(len(grid) - 1), grid[:-1].tolist(), grid[1:].tolist()))
    return tqdm(pairs, desc=desc, leave=False) if progress else pairs
