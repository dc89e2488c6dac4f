"""Mixed precision: which one to use on this device, and the autocast context for it.

torch is imported inside the functions, so the CLI can list the choices without loading it.
"""
from __future__ import annotations

import contextlib

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_ACCELERATE_NAME = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


def bf16_supported(device) -> bool:
    import torch

    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        # oneDNN's bf16 kernels need AVX-512 BF16 / AMX; without them bf16 is emulated and slow.
        probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
        return bool(probe()) if probe is not None else False
    return False


def resolve_precision(name: str, device) -> str:
    """One of PRECISIONS -> Accelerate's name: 'auto' is bf16 where the hardware runs it natively, else
    fp32 ('no'). Returns no | bf16 | fp16."""
    if name == "auto":
        return "bf16" if bf16_supported(device) else "no"
    if name not in _ACCELERATE_NAME:
        raise ValueError(f"precision {name!r}: expected one of: {', '.join(PRECISIONS)}")
    return _ACCELERATE_NAME[name]


def autocast(device, precision: str):
    """The autocast context for an Accelerate precision name (no | bf16 | fp16)."""
    import torch

    if precision == "no":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)
