"""Mixed precision: which one to use on this device, and the autocast context for it."""
from __future__ import annotations

import contextlib

import torch


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        # oneDNN's bf16 kernels need AVX-512 BF16 / AMX; without them bf16 is emulated and slow.
        probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
        return bool(probe()) if probe is not None else False
    return False


def resolve_precision(name: str, device: torch.device) -> str:
    """'auto' -> 'bf16' where the hardware runs it natively, else 'no'. Returns no | bf16 | fp16."""
    aliases = {"fp32": "no", "float32": "no", "bfloat16": "bf16", "float16": "fp16"}
    name = aliases.get(name, name)
    if name == "auto":
        return "bf16" if bf16_supported(device) else "no"
    if name not in ("no", "bf16", "fp16"):
        raise ValueError(f"unknown precision {name!r}; expected one of: auto, no (fp32), bf16, fp16")
    return name


def autocast(device: torch.device, precision: str):
    if precision == "no":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)
