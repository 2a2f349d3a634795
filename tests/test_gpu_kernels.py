"""The CuPy kernels of planner.gpu on a real GPU: against the PyTorch twins and stock CUDA ops.

Skipped unless CUDA is available to PyTorch and CuPy is installed with a usable device.
"""
from __future__ import annotations

import pytest
import torch

from planner.gpu import _bits, _cuda, batchnorm

from _kernel_host import twins
from test_variants_ops import DTYPES, POOLS, _norm_case, same_bits, special

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (torch.cuda.is_available() and _cuda.kernels_available()),
                       reason="needs a CUDA device and CuPy (pip install -e '.[gpu]')"),
]
ops = torch.ops.remat_planner
aten = torch.ops.aten


@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_and_dropout_kernels(dtype) -> None:
    for shape in [(0,), (1,), (13,), (3, 5, 7), (64, 257, 33)]:
        x, grad = special(shape, dtype, 1).cuda(), special(shape, dtype, 2).cuda()
        y, mask = ops.relu_packed(x)
        with twins():
            y_twin, mask_twin = ops.relu_packed(x)
        assert same_bits(y, torch.relu(x)) and torch.equal(mask, mask_twin)
        assert same_bits(ops.relu_packed_backward(grad, mask), aten.threshold_backward(grad, torch.relu(x), 0))
        torch.manual_seed(3)
        drop, keep = ops.dropout_packed(x, 0.2, True)
        state = torch.cuda.get_rng_state()
        torch.manual_seed(3)
        stock, bool_mask = aten.native_dropout(x, 0.2, True)
        assert torch.equal(state, torch.cuda.get_rng_state())
        if x.numel():
            assert same_bits(drop, stock)
            with twins():
                assert torch.equal(keep, _bits.pack_flags(bool_mask))
            assert same_bits(ops.dropout_packed_backward(grad, keep, 1.25), aten.native_dropout_backward(grad, bool_mask, 1.25))


@pytest.mark.parametrize("dtype", DTYPES)
def test_max_pool_kernels(dtype) -> None:
    for pool in POOLS:
        for layout in (torch.contiguous_format, torch.channels_last):
            x = special((4, 8, 37, 29), dtype).cuda().contiguous(memory_format=layout)
            y_ref, indices = aten.max_pool2d_with_indices(x, *pool)
            grad = special(y_ref.shape, dtype, 4).cuda().contiguous(memory_format=layout)
            y, packed = ops.max_pool2d_packed(x, *pool)
            with twins():
                _, packed_twin = ops.max_pool2d_packed(x, *pool)
            assert same_bits(y, y_ref) and torch.equal(packed, packed_twin)
            want = aten.max_pool2d_with_indices_backward(grad, x, *pool[:4], pool[4], indices)
            assert same_bits(ops.max_pool2d_packed_backward(grad, packed, list(x.shape), *pool), want), (pool, layout)


@pytest.mark.parametrize("dtype", DTYPES)
def test_batch_norm_kernels(dtype) -> None:
    x, w, b, grad = (t.cuda() for t in _norm_case((16, 32, 9, 9), dtype, 0))
    w[0], b[1] = 0.0, 1e3
    running = (torch.zeros(32, dtype=dtype, device="cuda"), torch.ones(32, dtype=dtype, device="cuda"))
    stock = aten._native_batch_norm_legit_functional(x, w, b, *running, True, 0.1, 1e-5)
    out, mean, rstd, _, _, fallback, channels = ops.batch_norm_inverted(x, w, b, *running, 0.1, 1e-5)
    assert all(same_bits(v, s) for v, s in zip((out, mean, rstd), stock[:3]))
    assert {0, 1} <= set(channels.tolist())
    want = aten.native_batch_norm_backward(grad, x, w, *running, mean, rstd, True, 1e-5, [True] * 3)
    got = ops.batch_norm_inverted_backward(grad, out, w, b, mean, rstd, fallback, channels, [True] * 3)
    bound = batchnorm.TOLERANCE * torch.finfo(dtype).eps
    for g, s in zip(got, want):
        assert g.dtype == s.dtype and g.shape == s.shape
        scale = s.double().abs().max().item() * 32  # the channel scales of the CPU test, bounded
        assert (g.double() - s.double()).abs().max().item() <= bound * scale


def test_kernels_run_on_the_current_stream() -> None:
    x = torch.randn(1 << 20, device="cuda")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        y, mask = ops.relu_packed(x)
        grad = ops.relu_packed_backward(torch.ones_like(x), mask)
    stream.synchronize()
    assert torch.equal(grad, (x > 0).float())
