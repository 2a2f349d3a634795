"""The low-memory ops of planner.gpu against stock PyTorch, on CPU (the PyTorch twins).

ReLU, dropout and max-pooling must match stock bit for bit (outputs, gradients, RNG use);
batch norm within the tolerance its module states, fallback channels included.
"""
from __future__ import annotations

import math

import pytest
import torch

from planner.gpu import batchnorm

aten = torch.ops.aten
ops = torch.ops.remat_planner
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
SHAPES = [(0,), (1,), (13,), (3, 5, 7), (2, 3, 8, 9), (4, 0, 3)]


def same_bits(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Equal dtype, shape and bits, signed zeros included; NaN matches NaN whatever its payload
    (stock kernels themselves return different NaN payloads on vectorized and scalar paths)."""
    if got.dtype != want.dtype or got.shape != want.shape:
        return False
    got, want = got.contiguous().view(-1), want.contiguous().view(-1)
    if got.is_floating_point():
        nan = torch.isnan(got)
        if not torch.equal(nan, torch.isnan(want)):
            return False
        got, want = got[~nan], want[~nan]
    return torch.equal(got.view(torch.uint8), want.view(torch.uint8))


def special(shape, dtype, seed: int = 0) -> torch.Tensor:
    """Random values with NaN, +-0, +-inf mixed in."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)
    flat = x.view(-1)
    for i, value in enumerate([float("nan"), -0.0, 0.0, float("inf"), -float("inf"), -float("nan")][: flat.numel()]):
        flat[i * 7 % flat.numel()] = value
    return x


# ---- ReLU --------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_relu_matches_stock_bitwise(shape, dtype) -> None:
    x, grad = special(shape, dtype, 1), special(shape, dtype, 2)
    y, mask = ops.relu_packed(x)
    assert same_bits(y, torch.relu(x))
    assert mask.dtype == torch.uint8 and mask.shape == (math.ceil(x.numel() / 8),)
    assert same_bits(ops.relu_packed_backward(grad, mask), aten.threshold_backward(grad, torch.relu(x), 0))


def test_relu_non_contiguous_and_channels_last() -> None:
    x = special((6, 4, 5, 3), torch.float32).permute(2, 0, 3, 1)  # non-contiguous
    grad = special((5, 6, 3, 4), torch.float32, 3)
    y, mask = ops.relu_packed(x)
    assert same_bits(y, torch.relu(x)) and y.stride() == torch.relu(x).stride()
    assert same_bits(ops.relu_packed_backward(grad.transpose(0, 2).contiguous().transpose(0, 2), mask),
                     aten.threshold_backward(grad, torch.relu(x), 0))
    cl = special((2, 3, 4, 5), torch.bfloat16).to(memory_format=torch.channels_last)
    y, mask = ops.relu_packed(cl)
    got = ops.relu_packed_backward(cl, mask)
    want = aten.threshold_backward(cl, torch.relu(cl), 0)
    assert same_bits(got, want) and got.stride() == want.stride()


def test_relu_and_max_pool_gradients_take_stocks_layout() -> None:
    """Stock's input gradient takes the layout of the tensor it saved (the ReLU's output, the
    pooling input), not the incoming gradient's; a channels-last network's last ReLU gets a
    contiguous gradient from the global mean. The variants take ``out_stride`` (the planner passes
    stock's), and their autograd passes the saved tensor's layout (it was ``grad``'s)."""
    x = special((2, 6, 8, 8), torch.float32).contiguous(memory_format=torch.channels_last)
    y, mask = ops.relu_packed(x)
    grad = special((2, 6, 8, 8), torch.float32, 4)  # contiguous
    want = aten.threshold_backward(grad, torch.relu(x), 0)
    got = ops.relu_packed_backward(grad, mask, list(want.stride()))
    assert same_bits(got, want) and got.stride() == want.stride() != grad.stride()
    pool = ([2, 2], [2, 2], [0, 0], [1, 1], False)
    pooled, indices = aten.max_pool2d_with_indices(x, *pool)
    grad = special(tuple(pooled.shape), torch.float32, 5)  # contiguous
    want = aten.max_pool2d_with_indices_backward(grad, x, *pool[:4], pool[4], indices)
    _, packed = ops.max_pool2d_packed(x, *pool)
    got = ops.max_pool2d_packed_backward(grad, packed, list(x.shape), *pool, list(want.stride()))
    assert same_bits(got, want) and got.stride() == want.stride() != grad.stride()
    for variant, stock in ((lambda t: ops.relu_packed(t)[0], torch.relu),
                           (lambda t: ops.max_pool2d_packed(t, *pool)[0], lambda t: torch.nn.functional.max_pool2d(t, 2))):
        grads = []
        for function in (variant, stock):
            leaf = x.detach().clone().requires_grad_()
            output = function(leaf)
            output.backward(special(tuple(output.shape), torch.float32, 6))
            grads.append(leaf.grad)
        assert same_bits(*grads) and grads[0].stride() == grads[1].stride()


def test_relu_autograd_in_eager_code() -> None:
    x = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    y, _ = ops.relu_packed(x)
    (y * torch.arange(9.0, dtype=torch.float64)).sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    (torch.relu(x_ref) * torch.arange(9.0, dtype=torch.float64)).sum().backward()
    assert same_bits(x.grad, x_ref.grad)


# ---- dropout -----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_dropout_matches_stock_bitwise_and_draws_the_same(shape, dtype) -> None:
    x, grad = special(shape, dtype, 1), special(shape, dtype, 2)
    torch.manual_seed(7)
    y_ref, keep = aten.native_dropout(x, 0.3, True)
    state_ref = torch.get_rng_state()
    torch.manual_seed(7)
    y, mask = ops.dropout_packed(x, 0.3, True)
    assert torch.equal(torch.get_rng_state(), state_ref), "dropout_packed draws differently from stock"
    assert same_bits(y, y_ref if x.numel() else torch.empty_like(x))
    assert mask.shape == (math.ceil(x.numel() / 8),)
    if x.numel():
        assert same_bits(ops.dropout_packed_backward(grad, mask, 1 / 0.7),
                         aten.native_dropout_backward(grad, keep, 1 / 0.7))


def test_dropout_eval_mode_and_autograd() -> None:
    x = torch.randn(3, 17)
    y, mask = ops.dropout_packed(x, 0.5, False)
    assert torch.equal(y, x) and torch.equal(ops.dropout_packed_backward(x, mask, 1.0), x)
    leaf = torch.randn(5, 11, requires_grad=True)
    torch.manual_seed(3)
    y, _ = ops.dropout_packed(leaf, 0.25, True)
    y.sum().backward()
    ref = leaf.detach().clone().requires_grad_()
    torch.manual_seed(3)
    aten.native_dropout(ref, 0.25, True)[0].sum().backward()
    assert same_bits(leaf.grad, ref.grad)


# ---- max-pooling -------------------------------------------------------------------------------
POOLS = [  # kernel, stride, padding, dilation, ceil_mode
    ([3, 3], [2, 2], [1, 1], [1, 1], False),  # ResNet's stem; 9 positions: 4-bit
    ([2, 2], [], [0, 0], [1], True),  # stride defaults to the kernel
    ([5, 4], [1, 2], [2, 1], [2, 1], False),  # 20 positions: 8-bit
    ([17, 1], [1], [0], [1], False),  # 17 positions: 8-bit, one column
    ([4], [3], [2], [1], True),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pool", POOLS, ids=["3x3s2", "2x2ceil", "5x4dil", "17x1", "4x4pad"])
def test_max_pool_matches_stock_bitwise(pool, dtype) -> None:
    for shape, layout in (((2, 3, 19, 11), torch.contiguous_format), ((2, 5, 18, 9), torch.channels_last),
                          ((3, 17, 8), torch.contiguous_format)):
        x = special(shape, dtype).contiguous(memory_format=layout)
        y_ref, indices = aten.max_pool2d_with_indices(x, *pool)
        grad = special(y_ref.shape, dtype, 5).contiguous(memory_format=layout)
        want = aten.max_pool2d_with_indices_backward(grad, x, *pool[:4], pool[4], indices)
        y, packed = ops.max_pool2d_packed(x, *pool)
        window = math.prod(pool[0]) if len(pool[0]) == 2 else pool[0][0] ** 2
        assert packed.shape == (math.ceil(y.numel() / (2 if window <= 16 else 1)),)
        got = ops.max_pool2d_packed_backward(grad, packed, list(x.shape), *pool)
        assert same_bits(y, y_ref) and same_bits(got, want) and got.stride() == want.stride(), (shape, layout)


def test_max_pool_edge_cases_and_autograd() -> None:
    empty = torch.randn(0, 2, 6, 6)
    y, packed = ops.max_pool2d_packed(empty, [2, 2], [], [0], [1], False)
    assert y.shape == (0, 2, 3, 3) and packed.numel() == 0
    assert ops.max_pool2d_packed_backward(y, packed, [0, 2, 6, 6], [2, 2], [], [0], [1], False).shape == (0, 2, 6, 6)
    ties = torch.zeros(1, 1, 5, 5)  # equal values everywhere: stock's first-position rule decides
    for source in (ties, torch.randn(2, 3, 9, 9, dtype=torch.float64)):
        grad_y = torch.randn_like(torch.nn.functional.max_pool2d(source, 3, 2, 1))
        got = source.clone().requires_grad_()
        ops.max_pool2d_packed(got, [3, 3], [2, 2], [1, 1], [1, 1], False)[0].backward(grad_y)
        want = source.clone().requires_grad_()
        torch.nn.functional.max_pool2d(want, 3, 2, 1).backward(grad_y)
        assert same_bits(got.grad, want.grad)


# ---- batch norm --------------------------------------------------------------------------------
def _norm_case(shape, dtype, seed, weight=None, bias=None):
    generator = torch.Generator().manual_seed(seed)
    C = shape[1]
    spread = (torch.rand(C, generator=generator, dtype=torch.float64) + 0.2).view(1, C, *[1] * (len(shape) - 2))
    x = (torch.randn(shape, generator=generator, dtype=torch.float64) * spread + spread).to(dtype)
    w = weight if weight is not None else (torch.randn(C, generator=generator, dtype=torch.float64) * 2).to(dtype)
    b = bias if bias is not None else (torch.randn(C, generator=generator, dtype=torch.float64) * 3).to(dtype)
    grad = torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)
    return x, w, b, grad


def _check_norm(x, w, b, grad, output_mask=(True, True, True)):
    """Forward bitwise stock; gradients within the bound batchnorm states. Returns fallback channels."""
    C = x.shape[1]
    running = (torch.zeros(C, dtype=w.dtype), torch.ones(C, dtype=w.dtype))
    stock = aten._native_batch_norm_legit_functional(x, w, b, *running, True, 0.1, 1e-5)
    variant = ops.batch_norm_inverted(x, w, b, *running, 0.1, 1e-5)
    assert all(same_bits(v, s) for v, s in zip(variant[:5], stock))
    out, mean, rstd, _, _, fallback, channels = variant
    assert fallback.shape == (x.shape[0], channels.numel(), *x.shape[2:])
    want = aten.native_batch_norm_backward(grad, x, w, *running, mean, rstd, True, 1e-5, list(output_mask))
    got = ops.batch_norm_inverted_backward(grad, out, w, b, mean, rstd, fallback, channels, list(output_mask))
    dims = [d for d in range(x.dim()) if d != 1]
    per_channel = (1, C) + (1,) * (x.dim() - 2)
    g = grad.double()
    x_hat = (x.double() - mean.double().view(per_channel)) * rstd.double().view(per_channel)
    X = x_hat.abs().amax(dims)
    G = g.abs().sum(dims)
    scales = [(rstd.double() * w.double()).abs() * g.abs().amax(dims) * (2 + X ** 2), G * (1 + X), G]
    bound = batchnorm.TOLERANCE * torch.finfo(x.dtype).eps
    for name, wanted, got_, scale, on in zip(("input", "weight", "bias"), want, got, scales, output_mask):
        if not on:
            continue
        error = (got_.double() - wanted.double()).abs()
        scale = scale.view(per_channel) if name == "input" else scale
        assert bool((error <= bound * scale).all()), (
            f"{name} gradient off by {(error / scale).max().item() / torch.finfo(x.dtype).eps:.1f} eps x scale")
    return channels.tolist()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(8, 4, 5, 5), (16, 3), (4, 6, 7), (1, 2, 3, 3)])
def test_batch_norm_within_stated_tolerance(shape, dtype) -> None:
    for seed in range(3):
        _check_norm(*_norm_case(shape, dtype, seed))


@pytest.mark.parametrize("dtype", DTYPES)
def test_batch_norm_zero_tiny_and_large_shift_channels_fall_back(dtype) -> None:
    x, w, b, grad = _norm_case((6, 7, 4, 4), dtype, 11)
    w[0], w[1] = 0.0, torch.finfo(dtype).tiny / 2  # zero and subnormal weights
    w[2], b[2] = 1e-2, 5.0  # |bias| / |weight| = 500
    w[3], b[3] = -0.5, 0.0
    w[4:], b[4:] = 1.5, 0.1  # well conditioned: inverted
    channels = _check_norm(x, w, b, grad)
    assert {0, 1, 2} <= set(channels) and not {4, 5, 6} & set(channels)
    assert _check_norm(x, torch.ones(7, dtype=dtype), None, grad) == []  # no bias, unit weights


def test_batch_norm_masks_empty_input_grad_and_autograd() -> None:
    x, w, b, grad = _norm_case((5, 3, 2, 2), torch.float32, 4)
    _check_norm(x, w, b, grad, output_mask=(False, True, True))
    w.requires_grad_(), b.requires_grad_()
    leaf = x.clone().requires_grad_()
    out = ops.batch_norm_inverted(leaf, w, b, torch.zeros(3), torch.ones(3), 0.1, 1e-5)[0]
    out.backward(grad)
    ref_x, ref_w, ref_b = x.clone().requires_grad_(), w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    torch.nn.functional.batch_norm(ref_x, torch.zeros(3), torch.ones(3), ref_w, ref_b, True, 0.1, 1e-5).backward(grad)
    for got, want in ((leaf.grad, ref_x.grad), (w.grad, ref_w.grad), (b.grad, ref_b.grad)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


# ---- bad input ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8, torch.complex64, torch.bool])
def test_unsupported_dtypes_are_refused_by_name(dtype) -> None:
    x = torch.zeros(2, 3, 4, 4, dtype=dtype)
    calls = [lambda: ops.relu_packed(x), lambda: ops.dropout_packed(x, 0.1, True),
             lambda: ops.max_pool2d_packed(x, [2, 2], [], [0], [1], False),
             lambda: ops.relu_packed_backward(x, torch.zeros(12, dtype=torch.uint8)),
             lambda: ops.batch_norm_inverted(x, torch.ones(3), None, torch.zeros(3), torch.ones(3), 0.1, 1e-5)]
    for call in calls:
        with pytest.raises(TypeError, match=str(dtype).replace(".", r"\.")):
            call()


def test_malformed_masks_are_refused_before_reading() -> None:
    grad = torch.randn(3, 5)
    for mask in (torch.zeros(1, dtype=torch.uint8), torch.zeros(2, dtype=torch.int64), torch.zeros(3, dtype=torch.uint8)):
        with pytest.raises(ValueError):
            ops.relu_packed_backward(grad, mask)
        with pytest.raises(ValueError):
            ops.dropout_packed_backward(grad, mask, 2.0)
    with pytest.raises(ValueError):
        ops.max_pool2d_packed_backward(torch.randn(1, 1, 2, 2), torch.zeros(1, dtype=torch.uint8), [1, 1, 4, 4],
                                       [2, 2], [], [0], [1], False)
    with pytest.raises(ValueError):  # 17 x 17 windows do not fit a byte
        ops.max_pool2d_packed(torch.randn(1, 1, 20, 20), [17, 17], [], [0], [1], False)
