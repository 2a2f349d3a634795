"""Packed flags: one bit per element, eight elements per byte, in row-major (logical) order.

Bit ``i % 8`` of byte ``i // 8`` holds element ``i``; the bits past the last element are zero.
``pack_flags`` / ``unpack_flags`` take and return logical order whatever the memory layout, on
CUDA with a kernel when CuPy can run one, elsewhere with PyTorch ops.
"""
from __future__ import annotations

import torch

from planner.gpu import _cuda
from planner.gpu._checks import check_packed

SOURCE = r"""
extern "C" __global__ void pack_flags(const u8* flags, u8* packed, i64 n) {
    i64 byte = global_index();
    if (byte >= (n + 7) / 8) return;
    u32 bits = 0;
    for (int k = 0; k < 8; ++k) {
        i64 i = byte * 8 + k;
        if (i < n && flags[i] != 0) bits |= 1u << k;
    }
    packed[byte] = (u8)bits;
}

extern "C" __global__ void unpack_flags(const u8* packed, u8* flags, i64 n) {
    i64 i = global_index();
    if (i >= n) return;
    flags[i] = (u8)((packed[i >> 3] >> (i & 7)) & 1);
}
"""

_SHIFTS: dict[torch.device, torch.Tensor] = {}


def packed_bytes(numel: int) -> int:
    """Bytes of the packed flags of ``numel`` elements."""
    return (numel + 7) // 8


def _shifts(device: torch.device) -> torch.Tensor:
    if device not in _SHIFTS:
        _SHIFTS[device] = torch.arange(8, dtype=torch.uint8, device=device)
    return _SHIFTS[device]


def flag_buffer(numel: int, device: torch.device) -> torch.Tensor:
    """Zeroed bool buffer padded to a multiple of 8 elements, for ``pack_flag_buffer``."""
    return torch.zeros(packed_bytes(numel) * 8, dtype=torch.bool, device=device)


def pack_flag_buffer(buffer: torch.Tensor) -> torch.Tensor:
    """Pack a ``flag_buffer`` (overwritten) into bytes, PyTorch ops only."""
    bits = buffer.view(torch.uint8).view(-1, 8)
    return torch.sum(bits.bitwise_left_shift_(_shifts(buffer.device)), dim=1, dtype=torch.uint8)


def pack_flags(flags: torch.Tensor) -> torch.Tensor:
    """Bool (or 0/1 uint8) tensor of any shape and layout -> uint8 of ``packed_bytes(numel)``."""
    if flags.dtype not in (torch.bool, torch.uint8):
        raise TypeError(f"pack_flags takes bool or uint8 flags, got {flags.dtype}")
    numel = flags.numel()
    if _cuda.use_kernels(flags):
        contiguous = flags.contiguous()
        packed = torch.empty(packed_bytes(numel), dtype=torch.uint8, device=flags.device)
        _cuda.launch(SOURCE, "pack_flags", packed.numel(), (contiguous.view(torch.uint8), packed, numel), flags.device)
        return packed
    buffer = flag_buffer(numel, flags.device)
    buffer[:numel].view(flags.shape).copy_(flags)
    return pack_flag_buffer(buffer)


def unpack_flags(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """uint8 of ``packed_bytes(numel)`` -> contiguous bool tensor of ``numel`` elements."""
    check_packed(packed, packed_bytes(numel), "packed flags")
    if _cuda.use_kernels(packed):
        flags = torch.empty(numel, dtype=torch.uint8, device=packed.device)
        _cuda.launch(SOURCE, "unpack_flags", numel, (packed.contiguous(), flags, numel), packed.device)
        return flags.view(torch.bool)
    bits = packed.reshape(-1, 1).bitwise_right_shift(_shifts(packed.device)).bitwise_and_(1)
    return bits.view(-1)[:numel].view(torch.bool)

