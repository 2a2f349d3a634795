"""Training-mode BatchNorm whose backward reads its output instead of its input.

``batch_norm_inverted(x, weight, bias, running_mean, running_var, momentum, eps)`` returns the five
outputs of the stock ``aten._native_batch_norm_legit_functional`` (training mode, bit for bit)
plus the *fallback*: ``x`` restricted to the channels that cannot be inverted (normally none, an
empty tensor) and their channel numbers. ``batch_norm_inverted_backward`` recovers the normalized
input as ``x_hat = (out - bias) / weight`` and applies the batch-norm gradient formula; for the
fallback channels it uses ``x_hat = (x - mean) * rstd`` from the saved input, so a gradient is
never wrong, only (for inverted channels) rounded differently from stock.

Which channels are inverted: those where ``|weight| >= finfo(dtype).tiny`` and
``|bias| + |mean| * rstd * |weight| <= MAX_SHIFT * |weight|`` (all finite); the others (a zero,
tiny or non-finite weight, or a bias or mean too large against it) are the fallback. For an
inverted channel, ``out`` determines ``x_hat`` to within about ``(|x_hat| + 2 * MAX_SHIFT)``
units of ``eps``, the dtype's machine epsilon (fp32 2^-23, bf16 2^-7, fp16 2^-10, fp64 2^-52), and
each gradient differs from stock's by at most **``TOLERANCE * eps * scale``**, per channel ``c``
with ``G = sum |grad_c|`` and ``X = max |x_hat_c|``: scale ``G`` for the bias gradient,
``G * (1 + X)`` for the weight gradient and ``|rstd_c * weight_c| * max |grad_c| * (2 + X^2)`` for
the input gradient (tests/test_variants_ops.py checks this bound; random inputs stay below 2).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from planner.gpu import _cuda
from planner.gpu._checks import check_float, check_same_device
from planner.gpu._registry import Variant, register_variant, variant_op
from planner.gpu._sites import (
    INT64, SUPPORTED_DTYPES, Rewriter, VariantSite, backward_call, call_arguments, itemsize, numel, ref,
)
from planner.graph import OpInfo, TensorRef, TrainingGraph, VariantCapability

MAX_SHIFT = 8.0
TOLERANCE = 1 + 2 * MAX_SHIFT
_PARTIALS = 512  # per-channel partial sums of the CUDA reduction

SOURCE = r"""
template <typename D>
__device__ __forceinline__ typename D::A normalized(const typename D::T* out, const typename D::T* fallback,
        const typename D::A* weight, const typename D::A* bias, const typename D::A* mean,
        const typename D::A* rstd, const int* position, i64 n, i64 c, i64 s, i64 C, i64 S, i64 K) {
    int k = position[c];
    if (k >= 0 && k < K) return (D::load(fallback[(n * K + k) * S + s]) - mean[c]) * rstd[c];
    return (D::load(out[(n * C + c) * S + s]) - bias[c]) / weight[c];
}

template <typename D>
__device__ void bn_partials(const typename D::T* grad, const typename D::T* out, const typename D::T* fallback,
        const typename D::A* weight, const typename D::A* bias, const typename D::A* mean,
        const typename D::A* rstd, const int* position, typename D::A* sum_grad, typename D::A* sum_dot,
        i64 N, i64 C, i64 S, i64 K, i64 P) {
    i64 t = global_index();
    i64 c = blockIdx.y;
    if (t >= P || c >= C) return;
    typename D::A g_sum = 0, dot = 0;
    for (i64 m = t; m < N * S; m += P) {
        i64 n = m / S;
        i64 s = m - n * S;
        typename D::A g = D::load(grad[(n * C + c) * S + s]);
        g_sum += g;
        dot += g * normalized<D>(out, fallback, weight, bias, mean, rstd, position, n, c, s, C, S, K);
    }
    sum_grad[c * P + t] = g_sum;
    sum_dot[c * P + t] = dot;
}

template <typename D>
__device__ void bn_grad_input(const typename D::T* grad, const typename D::T* out, const typename D::T* fallback,
        const typename D::A* weight, const typename D::A* bias, const typename D::A* mean,
        const typename D::A* rstd, const int* position, const typename D::A* grad_mean,
        const typename D::A* dot_mean, const typename D::A* factor, typename D::T* grad_input,
        i64 N, i64 C, i64 S, i64 K) {
    i64 i = global_index();
    if (i >= N * C * S) return;
    i64 s = i % S;
    i64 c = (i / S) % C;
    i64 n = i / (S * C);
    typename D::A x_hat = normalized<D>(out, fallback, weight, bias, mean, rstd, position, n, c, s, C, S, K);
    grad_input[i] = D::store((D::load(grad[i]) - grad_mean[c] - x_hat * dot_mean[c]) * factor[c]);
}

#define BN(SUFFIX, D) \
extern "C" __global__ void bn_partials_##SUFFIX(const D::T* grad, const D::T* out, const D::T* fallback, \
        const D::A* weight, const D::A* bias, const D::A* mean, const D::A* rstd, const int* position, \
        D::A* sum_grad, D::A* sum_dot, i64 N, i64 C, i64 S, i64 K, i64 P) { \
    bn_partials<D>(grad, out, fallback, weight, bias, mean, rstd, position, sum_grad, sum_dot, N, C, S, K, P); } \
extern "C" __global__ void bn_grad_input_##SUFFIX(const D::T* grad, const D::T* out, const D::T* fallback, \
        const D::A* weight, const D::A* bias, const D::A* mean, const D::A* rstd, const int* position, \
        const D::A* grad_mean, const D::A* dot_mean, const D::A* factor, D::T* grad_input, \
        i64 N, i64 C, i64 S, i64 K) { \
    bn_grad_input<D>(grad, out, fallback, weight, bias, mean, rstd, position, grad_mean, dot_mean, factor, \
                     grad_input, N, C, S, K); }
BN(f32, F32)
BN(f64, F64)
BN(f16, F16)
BN(bf16, BF16)
"""

_aten = torch.ops.aten


def _accumulation(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def invertible_channels(weight: torch.Tensor, bias: Optional[torch.Tensor], mean: torch.Tensor,
                        rstd: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bool per channel: whether ``x_hat`` is recovered from the output (see the module doc)."""
    w = weight.detach().to(torch.float64).abs()
    b = bias.detach().to(torch.float64).abs() if bias is not None else torch.zeros_like(w)
    shift = b + mean.detach().to(torch.float64).abs() * rstd.detach().to(torch.float64) * w
    return (w >= torch.finfo(dtype).tiny) & torch.isfinite(w) & torch.isfinite(shift) & (shift <= MAX_SHIFT * w)


def _check(x: torch.Tensor, weight: torch.Tensor, op: str) -> None:
    check_float(x, op)
    check_float(weight, op, "weight")
    if x.dim() < 2 or weight.dim() != 1 or weight.numel() != x.shape[1]:
        raise ValueError(f"{op}: expects input (N, C, ...) and a weight of C elements, got shapes "
                         f"{tuple(x.shape)} and {tuple(weight.shape)}")


@variant_op("batch_norm_inverted")
def batch_norm_inverted(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                        running_mean: torch.Tensor, running_var: torch.Tensor, momentum: float, eps: float
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                   torch.Tensor, torch.Tensor]:
    """Stock training-mode batch norm, plus the fallback input channels and their numbers."""
    _check(x, weight, "batch_norm_inverted")
    out, mean, rstd, new_mean, new_var = _aten._native_batch_norm_legit_functional.default(
        x, weight, bias, running_mean, running_var, True, momentum, eps)
    channels = torch.nonzero(~invertible_channels(weight, bias, mean, rstd, x.dtype)).view(-1)
    fallback = x.index_select(1, channels.to(x.device)).contiguous()
    return out, mean, rstd, new_mean, new_var, fallback, channels.to(device=x.device, dtype=torch.int64)


@batch_norm_inverted.register_fake
def _(x, weight, bias, running_mean, running_var, momentum, eps):
    out, mean, rstd, new_mean, new_var = _aten._native_batch_norm_legit_functional.default(
        x, weight, bias, running_mean, running_var, True, momentum, eps)
    k = torch.library.get_ctx().new_dynamic_size()
    return (out, mean, rstd, new_mean, new_var, x.new_empty((x.shape[0], k, *x.shape[2:])),
            x.new_empty((k,), dtype=torch.int64))


@variant_op("batch_norm_inverted_backward")
def batch_norm_inverted_backward(grad: torch.Tensor, out: torch.Tensor, weight: torch.Tensor,
                                 bias: Optional[torch.Tensor], save_mean: torch.Tensor,
                                 save_rstd: torch.Tensor, fallback: torch.Tensor, channels: torch.Tensor,
                                 output_mask: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of input, weight and bias (empty where ``output_mask`` is false)."""
    op = "batch_norm_inverted_backward"
    _check(out, weight, op)
    check_float(grad, op, "grad")
    check_same_device(op, grad, out, weight, save_mean, save_rstd, fallback, channels)
    C = out.shape[1]
    K = channels.numel()
    if grad.shape != out.shape or fallback.shape != (out.shape[0], K, *out.shape[2:]) or channels.dtype != torch.int64:
        raise ValueError(f"{op}: grad {tuple(grad.shape)}, output {tuple(out.shape)}, fallback "
                         f"{tuple(fallback.shape)} and {K} fallback channels ({channels.dtype}) do not match")
    if K and (int(channels.min()) < 0 or int(channels.max()) >= C):
        raise ValueError(f"{op}: fallback channel numbers must lie in [0, {C})")
    acc = _accumulation(out.dtype)
    w = weight.detach().to(acc)
    b = bias.detach().to(acc) if bias is not None else torch.zeros_like(w)
    mean, rstd = save_mean.to(acc), save_rstd.to(acc)
    count = out.numel() // C if C else 0
    if _cuda.use_kernels(grad, out) and C <= 65535:
        sum_grad, sum_dot, x_hat = *_kernel_sums(grad, out, fallback, channels, w, b, mean, rstd), None
    else:
        x_hat, grad_acc = _normalized(out, fallback, channels, w, b, mean, rstd), grad.to(acc)
        dims = [d for d in range(out.dim()) if d != 1]
        sum_grad = grad_acc.sum(dims)
        sum_dot = (grad_acc * x_hat).sum(dims)
    grad_mean, dot_mean, factor = sum_grad / max(count, 1), sum_dot / max(count, 1), rstd * w
    empty = out.new_empty(0)
    grad_input = empty
    if output_mask[0]:
        if x_hat is None:
            grad_input = _kernel_grad_input(grad, out, fallback, channels, w, b, mean, rstd, grad_mean, dot_mean, factor)
        else:
            shape = (1, C) + (1,) * (out.dim() - 2)
            grad_input = x_hat.mul_(dot_mean.view(shape)).neg_().add_(grad_acc).sub_(grad_mean.view(shape))
            grad_input = grad_input.mul_(factor.view(shape)).to(out.dtype)
    grad_weight = sum_dot.to(weight.dtype, copy=True) if output_mask[1] else weight.new_empty(0)
    grad_bias = sum_grad.to(bias.dtype if bias is not None else weight.dtype, copy=True) if output_mask[2] else weight.new_empty(0)
    return grad_input, grad_weight, grad_bias


def _normalized(out, fallback, channels, w, b, mean, rstd) -> torch.Tensor:
    """x_hat in the accumulation dtype: from the output, and from the saved input for fallback channels."""
    shape = (1, -1) + (1,) * (out.dim() - 2)
    x_hat = out.to(w.dtype, copy=True).sub_(b.view(shape)).div_(w.view(shape))
    if channels.numel():
        exact = fallback.to(w.dtype, copy=True).sub_(mean[channels].view(shape)).mul_(rstd[channels].view(shape))
        x_hat.index_copy_(1, channels, exact)
    return x_hat


def _positions(channels: torch.Tensor, C: int) -> torch.Tensor:
    position = torch.full((C,), -1, dtype=torch.int32, device=channels.device)
    position[channels] = torch.arange(channels.numel(), dtype=torch.int32, device=channels.device)
    return position


def _geometry(out: torch.Tensor) -> tuple[int, int, int]:
    return out.shape[0], out.shape[1], math.prod(out.shape[2:])


def _kernel_sums(grad, out, fallback, channels, w, b, mean, rstd):
    N, C, S = _geometry(out)
    parts = min(_PARTIALS, max(1, N * S))
    sums = torch.zeros((2, C, parts), dtype=w.dtype, device=out.device)
    _cuda.launch(SOURCE, f"bn_partials_{_cuda.SUFFIX[out.dtype]}", parts,
                 (grad.contiguous(), out.contiguous(), fallback.contiguous(), w, b, mean, rstd,
                  _positions(channels, C), sums[0], sums[1], N, C, S, channels.numel(), parts), out.device, blocks_y=C)
    totals = sums.sum(2)
    return totals[0], totals[1]


def _kernel_grad_input(grad, out, fallback, channels, w, b, mean, rstd, grad_mean, dot_mean, factor):
    N, C, S = _geometry(out)
    grad_input = torch.empty(out.shape, dtype=out.dtype, device=out.device)
    _cuda.launch(SOURCE, f"bn_grad_input_{_cuda.SUFFIX[out.dtype]}", grad_input.numel(),
                 (grad.contiguous(), out.contiguous(), fallback.contiguous(), w, b, mean, rstd,
                  _positions(channels, C), grad_mean, dot_mean, factor, grad_input, N, C, S, channels.numel()),
                 out.device)
    return grad_input


@batch_norm_inverted_backward.register_fake
def _(grad, out, weight, bias, save_mean, save_rstd, fallback, channels, output_mask):
    return (torch.empty_like(out) if output_mask[0] else out.new_empty(0),
            torch.empty_like(weight) if output_mask[1] else weight.new_empty(0),
            (torch.empty_like(bias) if bias is not None else torch.empty_like(weight)) if output_mask[2]
            else weight.new_empty(0))


def _setup_norm(ctx, inputs, output) -> None:
    x, weight, bias, *_ = inputs
    out, mean, rstd, _, _, fallback, channels = output
    ctx.has_bias = bias is not None
    ctx.save_for_backward(out, weight, bias, mean, rstd, fallback, channels)


def _norm_autograd(ctx, grad_out, *_unused):
    out, weight, bias, mean, rstd, fallback, channels = ctx.saved_tensors
    mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
    grad_input, grad_weight, grad_bias = batch_norm_inverted_backward(
        grad_out, out, weight, bias if ctx.has_bias else None, mean, rstd, fallback, channels, mask)
    return (grad_input if mask[0] else None, grad_weight if mask[1] else None,
            grad_bias if mask[2] else None, None, None, None, None)


batch_norm_inverted.register_autograd(_norm_autograd, setup_context=_setup_norm)


def workspace_bytes(numel: int, dtype_bytes: int, channels: int, kernels: bool, input_grad: bool = True
                    ) -> tuple[int, int]:
    """Transient bytes of (forward, backward): the forward needs only per-channel vectors; the
    twin's backward holds the product of the gradient and x_hat, x_hat itself unless it becomes
    the input gradient in place (fp32 and fp64, the input gradient wanted), and the gradient
    in the accumulation dtype unless it is in it already (the fallback channels' exact x_hat,
    at most x_hat's size, is freed before the product is made)."""
    acc_bytes = 8 if dtype_bytes == 8 else 4
    if kernels:
        return 0, 2 * channels * _PARTIALS * acc_bytes
    accumulates_in_place = dtype_bytes == acc_bytes
    copies = 1 + (not (accumulates_in_place and input_grad)) + (not accumulates_in_place)
    return 0, copies * numel * acc_bytes


# ---- the variant: where it applies in a graph, and the rewrite --------------------------------------
_FORWARD, _BACKWARD = torch.ops.remat_planner.batch_norm_inverted.default, torch.ops.remat_planner.batch_norm_inverted_backward.default


def _find(graph: TrainingGraph, op: OpInfo) -> VariantSite | None:
    """A training-mode batch norm with an affine weight, whose one ``native_batch_norm_backward``
    reads its input, its statistics and the same weight and eps.

    Which channels fall back is known only when the step runs (it depends on the weights and the
    batch), so the site saves their bound: the whole input and every channel number. The
    simulator then never predicts less than the step holds, however many fall back."""
    forward = call_arguments(graph.calls[op.id])
    if forward is None or forward["training"] is not True or len(op.outputs) != 5:
        return None
    x, weight, bias = (ref(forward[name]) for name in ("input", "weight", "bias"))
    if None in (x, weight, ref(forward["running_mean"]), ref(forward["running_var"])) or (
            forward["bias"] is not None and bias is None):
        return None
    shape = graph.tensors[x].shape
    if (len(shape) < 2 or graph.tensors[x].dtype not in SUPPORTED_DTYPES
            or graph.tensors[weight].shape != (shape[1],) or graph.tensors[weight].dtype not in SUPPORTED_DTYPES):
        return None
    out, mean, rstd = op.outputs[:3]

    def reads(consumer: int) -> bool:
        stock = backward_call(graph, consumer, "aten.native_batch_norm_backward.default")
        return (stock is not None and (ref(stock["input"]), ref(stock["weight"])) == (x, weight)
                and (ref(stock["save_mean"]), ref(stock["save_invstd"])) == (mean, rstd)
                and stock["train"] is True and stock["eps"] == forward["eps"]
                and ref(stock["grad_out"]) not in (x, out))

    backwards = [c for c in graph.tensors[x].consumers if reads(c)]
    if len(backwards) != 1:
        return None
    fallback_bound = graph.tensors[x].nbytes + 8 * shape[1]  # every channel's input and number
    return VariantSite("batch_norm_inverted", "", op.id, (backwards[0],), (), fallback_bound,
                       graph.tensors[x].nbytes, reads=(out, mean, rstd))


def _workspace(graph: TrainingGraph, site: VariantSite, capability: VariantCapability) -> tuple[int, int]:
    x = ref(call_arguments(graph.calls[site.forward_op])["input"])
    shape = graph.tensors[x].shape
    input_grad = bool(call_arguments(graph.calls[site.backward_ops[0]])["output_mask"][0])
    return workspace_bytes(numel(graph, x), itemsize(graph.tensors[x].dtype), shape[1], capability.cupy_kernels,
                           input_grad)


def _rewrite(rw: Rewriter, site: VariantSite, workspace: tuple[int, int]) -> None:
    graph = rw.graph
    forward = call_arguments(graph.calls[site.forward_op])
    x, weight, bias = forward["input"], forward["weight"], forward["bias"]
    info = graph.tensors[x.id]
    out, mean, rstd, new_mean, new_var = graph.ops[site.forward_op].outputs
    # at most every channel falls back: the fallback's bound, in the shape of the whole input
    fallback = rw.new_tensor(f"{info.name}.fallback", info.shape, info.dtype, info.nbytes, site.forward_op)
    channels = rw.new_tensor(f"{info.name}.fallback_channels", (info.shape[1],), INT64, 8 * info.shape[1],
                             site.forward_op)
    rw.set_call(site.forward_op, _FORWARD,
                (x, weight, bias, forward["running_mean"], forward["running_var"], forward["momentum"], forward["eps"]),
                (out, mean, rstd, new_mean, new_var, fallback, channels), workspace[0])
    (backward,) = site.backward_ops
    stock = call_arguments(graph.calls[backward])
    rw.set_call(backward, _BACKWARD,
                (stock["grad_out"], TensorRef(out), weight, bias, TensorRef(mean), TensorRef(rstd), TensorRef(fallback),
                 TensorRef(channels), list(stock["output_mask"])), graph.calls[backward].output_slots, workspace[1])


VARIANT = register_variant(Variant(
    "batch_norm_inverted", "aten._native_batch_norm_legit_functional.default", bitwise=False,
    backward_reads="the output (x̂ = (out − b) / w), not the input; channels whose weight cannot be inverted "
                   "fall back to their saved input, counted at its bound (every channel)",
    ops=(_FORWARD, _BACKWARD), find=_find, workspace=_workspace, rewrite=_rewrite))
