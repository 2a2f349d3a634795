"""The CUDA C of planner.gpu, checked without a GPU.

- NVRTC (the compiler CuPy uses) compiles every kernel source, when its library is installed
  (PyTorch's CUDA wheels ship it);
- the kernels, compiled as host C++ and run thread by thread (tests/_kernel_host.py), compute
  exactly what the PyTorch twins compute, with write canaries around every output;
- the 16-bit float conversions in the prelude are exact / round to nearest even.
"""
from __future__ import annotations

import ctypes
import glob
import os
import site

import numpy as np
import pytest
import torch

from planner.gpu import _bits, _cuda, batchnorm, maxpool, relu

from _kernel_host import compiler, emulated_kernels, launch, twins
from test_variants_ops import DTYPES, POOLS, _norm_case, same_bits, special

ops = torch.ops.remat_planner
aten = torch.ops.aten
SOURCES = {"bits": _bits.SOURCE, "relu": relu.SOURCE, "maxpool": maxpool.SOURCE, "batchnorm": batchnorm.SOURCE}
needs_compiler = pytest.mark.skipif(compiler() is None, reason="no C++ compiler to run the kernels on the host")


def _nvrtc():
    roots = site.getsitepackages() + [site.getusersitepackages()]
    candidates = [p for root in roots for p in glob.glob(os.path.join(root, "nvidia", "*", "lib", "libnvrtc.so*"))]
    candidates += glob.glob("/usr/local/cuda/lib64/libnvrtc.so*")
    for path in sorted(c for c in candidates if "builtins" not in c and ".alt." not in c):
        try:
            return ctypes.CDLL(path)
        except OSError:
            continue
    return None


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_kernel_sources_compile_with_nvrtc(name: str) -> None:
    library = _nvrtc()
    if library is None:
        pytest.skip("libnvrtc not installed")
    program = ctypes.c_void_p()
    code = (_cuda.PRELUDE + SOURCES[name]).encode()
    assert library.nvrtcCreateProgram(ctypes.byref(program), code, b"kernels.cu", 0, None, None) == 0
    options = [b"--std=c++14", b"--gpu-architecture=compute_80"]
    status = library.nvrtcCompileProgram(program, len(options), (ctypes.c_char_p * len(options))(*options))
    size = ctypes.c_size_t()
    library.nvrtcGetProgramLogSize(program, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    library.nvrtcGetProgramLog(program, log)
    library.nvrtcDestroyProgram(ctypes.byref(program))
    assert status == 0, log.value.decode()


@pytest.fixture
def canaries():
    """Launch every emulated kernel on copies of its tensor arguments placed between guard bytes,
    and fail if a kernel writes outside its tensors."""
    def guarded_launch(source, name, threads, args, device=None, blocks_y=1):
        guarded, copies = [], []
        for arg in args:
            if isinstance(arg, torch.Tensor):
                raw = arg.contiguous().view(-1).view(torch.uint8)
                padded = torch.full((raw.numel() + 128,), 0xA5, dtype=torch.uint8)
                padded[64:64 + raw.numel()] = raw
                inner = padded[64:64 + raw.numel()].view(arg.dtype).view(arg.shape)
                guarded.append(inner)
                copies.append((arg, padded, inner))
            else:
                guarded.append(arg)
        launch(source, name, threads, guarded, device, blocks_y)
        for original, padded, inner in copies:
            assert bool((padded[:64] == 0xA5).all() and (padded[-64:] == 0xA5).all()), f"{name} wrote out of bounds"
            original.copy_(inner)

    with emulated_kernels():  # restores the real use_kernels and launch when the test ends
        _cuda.launch = guarded_launch
        yield


@needs_compiler
@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_and_dropout_kernels_match_the_twins(dtype, canaries) -> None:
    for shape in [(0,), (1,), (13,), (3, 5, 7), (2, 3, 8, 9)]:
        x, grad = special(shape, dtype, 1), special(shape, dtype, 2)
        with twins():
            y_twin, mask_twin = ops.relu_packed(x)
            grad_twin = ops.relu_packed_backward(grad, mask_twin)
            torch.manual_seed(5)
            drop_twin, keep_twin = ops.dropout_packed(x, 0.4, True)
            drop_grad_twin = ops.dropout_packed_backward(grad, keep_twin, 1 / 0.6)
        y, mask = ops.relu_packed(x)
        assert same_bits(y, y_twin) and torch.equal(mask, mask_twin)
        assert same_bits(ops.relu_packed_backward(grad, mask), grad_twin)
        torch.manual_seed(5)
        drop, keep = ops.dropout_packed(x, 0.4, True)
        assert same_bits(drop, drop_twin) and torch.equal(keep, keep_twin)
        assert same_bits(ops.dropout_packed_backward(grad, keep, 1 / 0.6), drop_grad_twin)


@needs_compiler
@pytest.mark.parametrize("dtype", DTYPES)
def test_max_pool_kernels_match_the_cuda_semantics(dtype, canaries) -> None:
    """Packing matches the twin bit for bit; the gather backward equals PyTorch's CUDA kernel:
    gradients summed in float (double for fp64) in window order and rounded once."""
    accumulate = torch.float64 if dtype == torch.float64 else torch.float32
    for pool in POOLS:
        x = special((2, 3, 19, 11), dtype)
        with twins():
            y_twin, packed_twin = ops.max_pool2d_packed(x, *pool)
        y, packed = ops.max_pool2d_packed(x, *pool)
        assert same_bits(y, y_twin) and torch.equal(packed, packed_twin), pool
        _, indices = aten.max_pool2d_with_indices(x, *pool)
        grad = special(y.shape, dtype, 4)
        want = aten.max_pool2d_with_indices_backward(grad.to(accumulate), x.to(accumulate), *pool[:4], pool[4],
                                                     indices).to(dtype)
        assert same_bits(ops.max_pool2d_packed_backward(grad, packed, list(x.shape), *pool), want), pool


@needs_compiler
@pytest.mark.parametrize("dtype", DTYPES)
def test_batch_norm_kernels_match_the_twin(dtype, canaries) -> None:
    x, w, b, grad = _norm_case((5, 6, 3, 4), dtype, 2)
    w[2:], b[2:] = 1.2, 0.3
    w[0], b[1] = 0.0, 100.0  # two fallback channels
    running = (torch.zeros(6, dtype=dtype), torch.ones(6, dtype=dtype))
    out, mean, rstd, _, _, fallback, channels = ops.batch_norm_inverted(x, w, b, *running, 0.1, 1e-5)
    assert channels.tolist() == [0, 1]
    args = (grad, out, w, b, mean, rstd, fallback, channels, [True, True, True])
    with twins():
        want = ops.batch_norm_inverted_backward(*args)
    got = ops.batch_norm_inverted_backward(*args)
    eps = torch.finfo(dtype).eps
    for g, t in zip(got, want):  # the same formula, summed in another order
        assert g.dtype == t.dtype and g.shape == t.shape
        assert torch.allclose(g.double(), t.double(), rtol=8 * eps, atol=64 * eps * t.double().abs().max().item())


@needs_compiler
def test_sixteen_bit_conversions_are_exact_and_round_to_nearest_even() -> None:
    source = r"""
    extern "C" __global__ void convert(const u16* halves, float* wide, const float* values, u16* to_half,
                                       u16* to_bf16, i64 n, i64 m) {
        i64 i = global_index();
        if (i < n) wide[i] = half_to_float(halves[i]);
        if (i < m) { to_half[i] = float_to_half(values[i]); to_bf16[i] = float_to_bf16(values[i]); }
    }
    """
    halves = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16)
    wide = torch.empty(2**16, dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    bits = torch.randint(-2**31, 2**31 - 1, (200_000,), generator=generator, dtype=torch.int64).to(torch.int32)
    edges = torch.tensor([0.0, -0.0, 65504.0, 65519.99, 65520.0, 2.0**-24, 2.0**-25, 2.0**-25 * 1.0001, 2.0**-14,
                          2.0**-14 * (1 - 2.0**-11), 1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11, float("inf"), -float("inf")])
    values = torch.cat([bits.view(torch.float32), edges, torch.randn(10_000, generator=generator) * 1e-6])
    to_half = torch.empty(values.numel(), dtype=torch.int16)
    to_bf16 = torch.empty(values.numel(), dtype=torch.int16)
    launch(source, "convert", max(2**16, values.numel()),
           (halves, wide, values, to_half, to_bf16, 2**16, values.numel()))
    as_numpy = halves.numpy().view(np.float16).astype(np.float32)
    assert np.array_equal(wide.numpy(), as_numpy, equal_nan=True)
    finite = ~torch.isnan(values)
    with np.errstate(over="ignore"):  # overflow to infinity is what is being checked
        want_half = torch.from_numpy(values.numpy().astype(np.float16).view(np.int16))
    assert torch.equal(to_half[finite], want_half[finite])
    assert torch.equal(to_bf16[finite], values.to(torch.bfloat16).view(torch.int16)[finite])
    assert bool((to_half[~finite] == 0x7FFF).all() and (to_bf16[~finite] == 0x7FFF).all())
