"""Argument checks shared by the ops: clear errors before any kernel touches memory."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_float(tensor: torch.Tensor, op: str, what: str = "input") -> None:
    """Refuse dtypes the variants do not implement, naming the dtype."""
    if tensor.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {what} has dtype {tensor.dtype}; supported dtypes are "
                        "torch.float32, torch.float16, torch.bfloat16 and torch.float64")


def check_packed(packed: torch.Tensor, nbytes: int, what: str) -> None:
    """Refuse a packed tensor of the wrong type or size before any kernel reads it."""
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != nbytes:
        raise ValueError(f"{what} must be a 1-D uint8 tensor of {nbytes} bytes, "
                         f"got {packed.dtype} of shape {tuple(packed.shape)}")


def check_same_device(op: str, *tensors: torch.Tensor) -> None:
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"{op}: tensors are on different devices {sorted(map(str, devices))}")
