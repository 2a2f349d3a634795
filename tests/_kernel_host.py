"""Run the variants' CUDA C kernels on the CPU: compile them as host C++ and emulate the grid.

Each ``extern "C" __global__`` kernel is called once per (block, thread) in sequence, with
``blockIdx``/``threadIdx`` set as CUDA would (the kernels use no shared memory or barriers, so a
sequential loop computes exactly what the device does). ``emulated_kernels()`` swaps
``planner.gpu._cuda.use_kernels``/``launch`` for this emulator, so an op's whole CUDA branch (its
Python side and its kernels) runs on CPU tensors and can be compared with the PyTorch twin.
Needs a C++ compiler (``c++``/``g++``); tests skip without one.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from planner.gpu import _cuda

HOST_PRELUDE = r"""
#include <cstring>
#include <utility>
#define __global__
#define __device__
#define __forceinline__ inline
struct HostDim3 { unsigned x, y, z; };
static HostDim3 blockIdx, threadIdx, blockDim, gridDim;
static inline float __uint_as_float(unsigned int u) { float f; std::memcpy(&f, &u, 4); return f; }
static inline unsigned int __float_as_uint(float f) { unsigned int u; std::memcpy(&u, &f, 4); return u; }
"""

LAUNCHER = r"""
template <typename... A, std::size_t... I>
static void call_kernel(void (*kernel)(A...), void** args, std::index_sequence<I...>) {
    kernel(*static_cast<A*>(args[I])...);
}
template <typename... A>
static void emulate(void (*kernel)(A...), unsigned gx, unsigned gy, unsigned bx, void** args) {
    gridDim = {gx, gy, 1};
    blockDim = {bx, 1, 1};
    for (unsigned y = 0; y < gy; ++y)
        for (unsigned b = 0; b < gx; ++b)
            for (unsigned t = 0; t < bx; ++t) {
                blockIdx = {b, y, 0};
                threadIdx = {t, 0, 0};
                call_kernel(kernel, args, std::index_sequence_for<A...>{});
            }
}
extern "C" int host_launch(const char* name, unsigned gx, unsigned gy, unsigned bx, void** args) {
%s
    return 1;
}
"""

_LIBRARIES: dict[str, ctypes.CDLL] = {}
_BUILD = Path(tempfile.gettempdir()) / "remat_planner_kernel_host"


def compiler() -> str | None:
    return shutil.which("c++") or shutil.which("g++")


def _library(source: str) -> ctypes.CDLL:
    if source not in _LIBRARIES:
        code = HOST_PRELUDE + _cuda.PRELUDE + source
        _BUILD.mkdir(exist_ok=True)
        digest = hashlib.sha256(code.encode()).hexdigest()[:16]
        stem = _BUILD / digest
        Path(f"{stem}.cpp").write_text(code)
        expanded = subprocess.run([compiler(), "-std=c++17", "-E", f"{stem}.cpp"], check=True,
                                  capture_output=True, text=True).stdout
        names = re.findall(r'extern "C"\s+void\s+(\w+)\s*\(', expanded)
        table = "\n".join(f'    if (!std::strcmp(name, "{n}")) {{ emulate({n}, gx, gy, bx, args); return 0; }}'
                          for n in names)
        Path(f"{stem}.cpp").write_text(code + LAUNCHER % table)
        subprocess.run([compiler(), "-std=c++17", "-O1", "-Wall", "-Werror", "-Wno-unused-function",
                        "-shared", "-fPIC", f"{stem}.cpp", "-o", f"{stem}.so"], check=True, capture_output=True,
                       text=True)
        _LIBRARIES[source] = ctypes.CDLL(f"{stem}.so")
    return _LIBRARIES[source]


def _argument(value):
    if isinstance(value, torch.Tensor):
        assert value.device.type == "cpu" and value.is_contiguous(), "kernel arguments are contiguous CPU tensors"
        return ctypes.c_void_p(value.data_ptr())
    assert isinstance(value, int) and not isinstance(value, bool), f"scalar arguments are ints, got {value!r}"
    return ctypes.c_longlong(value)


def launch(source: str, name: str, threads: int, args, device=None, blocks_y: int = 1) -> None:
    """Same contract as ``planner.gpu._cuda.launch``, executed on the CPU."""
    if threads <= 0 or blocks_y <= 0:
        return
    blocks = (threads + _cuda.THREADS - 1) // _cuda.THREADS
    values = [_argument(a) for a in args]
    pointers = (ctypes.c_void_p * len(values))(*[ctypes.cast(ctypes.pointer(v), ctypes.c_void_p) for v in values])
    status = _library(source).host_launch(name.encode(), blocks, blocks_y, _cuda.THREADS, pointers)
    assert status == 0, f"no kernel named {name}"


@contextlib.contextmanager
def emulated_kernels():
    """Within the block, every op takes its CUDA branch on CPU tensors, run by the emulator."""
    saved = _cuda.use_kernels, _cuda.launch
    _cuda.use_kernels = lambda *tensors: bool(tensors)
    _cuda.launch = launch
    try:
        yield
    finally:
        _cuda.use_kernels, _cuda.launch = saved


@contextlib.contextmanager
def twins():
    """Within the block, every op runs its PyTorch twin, whatever the device or the emulator says."""
    saved = _cuda.use_kernels
    _cuda.use_kernels = lambda *tensors: False
    try:
        yield
    finally:
        _cuda.use_kernels = saved
