"""CuPy glue: when the CUDA kernels can run, compiling them once, launching them on PyTorch's stream.

The kernels run only on CUDA tensors, and only when CuPy is installed *and* reports a usable
device (``cupy.is_available()``); everywhere else each op runs its pure-PyTorch twin. Tensors are
shared with CuPy without copies (DLPack), and every launch goes to PyTorch's current stream
(``cupy.cuda.ExternalStream``), so the kernels are ordered with PyTorch's own work.

``PRELUDE`` is the CUDA C every kernel source starts with: integer types, the thread index, and
per-dtype load/store traits. Half and bfloat16 are handled as raw 16-bit words with conversions
written in plain integer arithmetic (round to nearest even, as CUDA's ``__float2half`` and
``__float2bfloat16``), so the sources need no CUDA headers and also compile as host C++ (the
kernels are checked on the CPU that way by the test suite).
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import numpy
import torch

THREADS = 256  # threads per block of every 1-D launch
_MAX_GRID_X = 2**31 - 1
_MAX_GRID_Y = 65535

PRELUDE = r"""
typedef long long i64;
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

__device__ __forceinline__ i64 global_index() {
    return (i64)blockIdx.x * (i64)blockDim.x + (i64)threadIdx.x;
}

__device__ __forceinline__ float bf16_to_float(u16 h) { return __uint_as_float(((u32)h) << 16); }

__device__ __forceinline__ u16 float_to_bf16(float f) {  // round to nearest even; NaN -> 0x7fff
    u32 x = __float_as_uint(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (u16)0x7fff;
    return (u16)((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

__device__ __forceinline__ float half_to_float(u16 h) {  // exact
    u32 sign = ((u32)(h & 0x8000u)) << 16;
    u32 exponent = (h >> 10) & 0x1fu;
    u32 mantissa = h & 0x3ffu;
    if (exponent == 0x1fu) return __uint_as_float(sign | 0x7f800000u | (mantissa << 13));
    if (exponent == 0u) {  // zero or subnormal: mantissa * 2^-24, exact in float
        float magnitude = (float)mantissa * 5.9604644775390625e-8f;
        return sign ? -magnitude : magnitude;
    }
    return __uint_as_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

__device__ __forceinline__ u16 float_to_half(float f) {  // round to nearest even; NaN -> 0x7fff
    u32 x = __float_as_uint(f);
    u32 sign = (x >> 16) & 0x8000u;
    u32 magnitude = x & 0x7fffffffu;
    if (magnitude > 0x7f800000u) return (u16)0x7fff;
    if (magnitude >= 0x477ff000u) return (u16)(sign | 0x7c00u);  // >= 65520 rounds to infinity
    if (magnitude >= 0x38800000u) {  // normal half: rebias the exponent, round 13 mantissa bits away
        u32 rebiased = magnitude - 0x38000000u;
        return (u16)(sign | ((rebiased + 0xfffu + ((rebiased >> 13) & 1u)) >> 13));
    }
    if (magnitude <= 0x33000000u) return (u16)sign;  // at most 2^-25: rounds to (signed) zero
    // subnormal half: value = m * 2^-24 with m = round(mantissa * 2^(e - 126)), 14 <= 126 - e <= 24
    u32 e = magnitude >> 23;
    u32 mantissa = (magnitude & 0x7fffffu) | 0x800000u;
    u32 shift = 126u - e;
    u32 q = mantissa >> shift;
    u32 rest = mantissa & ((1u << shift) - 1u);
    u32 half_way = 1u << (shift - 1u);
    if (rest > half_way || (rest == half_way && (q & 1u))) q += 1u;
    return (u16)(sign | q);
}

// load/store traits: T is the stored word, A the accumulation type (PyTorch's acc_type on CUDA)
struct F32 { typedef float T; typedef float A;
    static __device__ __forceinline__ A load(T v) { return v; }
    static __device__ __forceinline__ T store(A v) { return v; } };
struct F64 { typedef double T; typedef double A;
    static __device__ __forceinline__ A load(T v) { return v; }
    static __device__ __forceinline__ T store(A v) { return v; } };
struct F16 { typedef u16 T; typedef float A;
    static __device__ __forceinline__ A load(T v) { return half_to_float(v); }
    static __device__ __forceinline__ T store(A v) { return float_to_half(v); } };
struct BF16 { typedef u16 T; typedef float A;
    static __device__ __forceinline__ A load(T v) { return bf16_to_float(v); }
    static __device__ __forceinline__ T store(A v) { return float_to_bf16(v); } };
"""

#: kernel-name suffix per supported dtype, and the integer dtype a tensor is viewed as for CuPy
SUFFIX = {torch.float32: "f32", torch.float64: "f64", torch.float16: "f16", torch.bfloat16: "bf16"}
_WORD = {torch.float16: torch.int16, torch.bfloat16: torch.int16}


@functools.cache
def _cupy():
    """The cupy module when CuPy is installed and sees a usable CUDA device, else ``None``."""
    try:
        import cupy
    except ImportError:
        return None
    try:
        return cupy if cupy.is_available() else None
    except Exception:  # a broken driver or runtime: CuPy unusable, the twins run instead
        return None


def kernels_available() -> bool:
    """Whether the CuPy kernels can run in this process (CuPy installed, a CUDA device usable)."""
    return _cupy() is not None


def use_kernels(*tensors: torch.Tensor) -> bool:
    """True when every tensor is on a CUDA device and CuPy can run kernels there."""
    return bool(tensors) and all(t.is_cuda for t in tensors) and kernels_available()


@functools.lru_cache(maxsize=None)
def _module(source: str):
    """One compiled module per source (CuPy compiles on first use per device and caches it)."""
    cupy = _cupy()
    return cupy.RawModule(code=PRELUDE + source, options=("--std=c++14",))


def _argument(value: Any):
    cupy = _cupy()
    if isinstance(value, torch.Tensor):
        if not value.is_contiguous():
            raise ValueError("internal error: kernel arguments must be contiguous")
        if value.numel() == 0:  # nothing to share; the kernels never dereference it
            return numpy.uint64(0)
        return cupy.from_dlpack(value.view(_WORD.get(value.dtype, value.dtype)).detach())
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"internal error: kernel scalar arguments are int64, got {type(value).__name__}")
    return numpy.int64(value)


def launch(source: str, name: str, threads: int, args: Sequence[Any], device: torch.device,
           blocks_y: int = 1) -> None:
    """Run kernel ``name`` of ``source`` over ``threads`` x-threads (and ``blocks_y`` rows of
    blocks) on PyTorch's current stream of ``device``. Nothing is launched for zero threads."""
    if threads <= 0 or blocks_y <= 0:
        return
    blocks = (threads + THREADS - 1) // THREADS
    if blocks > _MAX_GRID_X or blocks_y > _MAX_GRID_Y:
        raise ValueError(f"tensor too large for one launch of {name} ({threads} threads x {blocks_y})")
    cupy = _cupy()
    with cupy.cuda.Device(device.index if device.index is not None else torch.cuda.current_device()):
        stream = cupy.cuda.ExternalStream(torch.cuda.current_stream(device).cuda_stream)
        with stream:
            kernel = _module(source).get_function(name)
            kernel((blocks, blocks_y), (THREADS,), tuple(_argument(a) for a in args))
