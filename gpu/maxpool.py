"""2-D max-pooling that saves window-relative argmax positions instead of int64 indices.

``max_pool2d_packed(x, kernel_size, stride, padding, dilation, ceil_mode) -> (y, packed)``: ``y``
is the stock ``aten.max_pool2d_with_indices`` output, bit for bit; ``packed`` holds, per output
element in row-major order, the argmax's position inside its window (``kh * kW + kw``): 4 bits
(two per byte, low nibble first) for windows of at most 16 positions, else one byte (windows up
to 256). ``max_pool2d_packed_backward(grad, packed, input_size, ...)`` needs neither the input nor
int64 indices and equals ``aten.max_pool2d_with_indices_backward`` bit for bit: the CUDA kernel
gathers per input element in the order of PyTorch's NCHW kernel, accumulating in float (double
for fp64); the PyTorch twin rebuilds the indices transiently and runs the stock kernel.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from planner.gpu import _cuda
from planner.gpu._checks import check_float, check_packed, check_same_device
from planner.gpu._registry import Variant, register_variant, variant_op
from planner.gpu._sites import (
    SUPPORTED_DTYPES, UINT8, Rewriter, VariantSite, backward_call, call_arguments, exclusive_storage,
    is_contiguous, numel, only_reader, ref, stock_layout,
)
from planner.graph import OpCall, OpInfo, TensorRef, TrainingGraph, VariantCapability

MAX_WINDOW = 256
NIBBLE_WINDOW = 16

SOURCE = r"""
__device__ __forceinline__ i64 first_window(i64 i, i64 pad, i64 kernel, i64 dilation, i64 stride) {
    i64 extent = (kernel - 1) * dilation + 1;
    return (i + pad < extent) ? 0 : (i + pad - extent) / stride + 1;
}

__device__ __forceinline__ i64 end_window(i64 i, i64 pad, i64 pooled, i64 stride) {
    i64 end = (i + pad) / stride + 1;
    return end < pooled ? end : pooled;
}

extern "C" __global__ void maxpool_pack(const i64* indices, u8* packed, i64 n, i64 OH, i64 OW, i64 W,
                                        i64 kW, i64 sH, i64 sW, i64 pH, i64 pW, i64 dH, i64 dW,
                                        i64 per_byte) {
    i64 byte = global_index();
    if (byte >= (n + per_byte - 1) / per_byte) return;
    u32 value = 0;
    for (i64 k = 0; k < per_byte; ++k) {
        i64 o = byte * per_byte + k;
        if (o < n) {
            i64 ow = o % OW;
            i64 oh = (o / OW) % OH;
            i64 h = indices[o] / W;
            i64 w = indices[o] % W;
            i64 relative = ((h - (oh * sH - pH)) / dH) * kW + (w - (ow * sW - pW)) / dW;
            value |= ((u32)relative & (per_byte == 2 ? 0xfu : 0xffu)) << (4 * k);
        }
    }
    packed[byte] = (u8)value;
}

template <typename D>
__device__ void maxpool_gather(const typename D::T* grad, const u8* packed, typename D::T* out, i64 total,
                               i64 H, i64 W, i64 OH, i64 OW, i64 kH, i64 kW, i64 sH, i64 sW,
                               i64 pH, i64 pW, i64 dH, i64 dW, i64 per_byte) {
    i64 i = global_index();
    if (i >= total) return;
    i64 w = i % W;
    i64 h = (i / W) % H;
    i64 plane = i / (W * H);
    i64 ph_end = end_window(h, pH, OH, sH);
    i64 pw_start = first_window(w, pW, kW, dW, sW);
    i64 pw_end = end_window(w, pW, OW, sW);
    typename D::A gradient = 0;
    for (i64 ph = first_window(h, pH, kH, dH, sH); ph < ph_end; ++ph) {
        for (i64 pw = pw_start; pw < pw_end; ++pw) {
            i64 o = (plane * OH + ph) * OW + pw;
            u32 relative = per_byte == 2 ? (packed[o >> 1] >> (4 * (o & 1))) & 0xfu : packed[o];
            i64 kh = relative / kW;
            i64 kw = relative % kW;
            if (ph * sH - pH + kh * dH == h && pw * sW - pW + kw * dW == w) gradient += D::load(grad[o]);
        }
    }
    out[i] = D::store(gradient);
}

#define GATHER(NAME, D) extern "C" __global__ void NAME(const D::T* grad, const u8* packed, D::T* out, \
    i64 total, i64 H, i64 W, i64 OH, i64 OW, i64 kH, i64 kW, i64 sH, i64 sW, i64 pH, i64 pW, i64 dH, \
    i64 dW, i64 per_byte) { \
    maxpool_gather<D>(grad, packed, out, total, H, W, OH, OW, kH, kW, sH, sW, pH, pW, dH, dW, per_byte); }
GATHER(maxpool_backward_f32, F32)
GATHER(maxpool_backward_f64, F64)
GATHER(maxpool_backward_f16, F16)
GATHER(maxpool_backward_bf16, BF16)
"""

_aten = torch.ops.aten


@dataclass(frozen=True)
class Window:
    """Pooling geometry normalized as ATen does (empty stride = kernel size, 1 value = both)."""

    kH: int
    kW: int
    sH: int
    sW: int
    pH: int
    pW: int
    dH: int
    dW: int

    @classmethod
    def of(cls, kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int],
           dilation: Sequence[int]) -> "Window":
        def pair(values, default, what):
            values = list(values) if values else list(default)
            if len(values) not in (1, 2) or any(int(v) != v for v in values):
                raise ValueError(f"max_pool2d_packed: {what} must be one or two ints, got {values}")
            return int(values[0]), int(values[-1])

        kH, kW = pair(kernel_size, (), "kernel_size")
        sH, sW = pair(stride, (kH, kW), "stride")
        pH, pW = pair(padding, (0,), "padding")
        dH, dW = pair(dilation, (1,), "dilation")
        if min(kH, kW, sH, sW, dH, dW) < 1 or min(pH, pW) < 0:
            raise ValueError("max_pool2d_packed: kernel, stride and dilation must be positive, padding non-negative")
        if kH * kW > MAX_WINDOW:
            raise ValueError(f"max_pool2d_packed: windows of at most {MAX_WINDOW} positions are supported, "
                             f"got {kH}x{kW}")
        return cls(kH, kW, sH, sW, pH, pW, dH, dW)

    @property
    def per_byte(self) -> int:
        return 2 if self.kH * self.kW <= NIBBLE_WINDOW else 1


def packed_bytes(output_numel: int, window: Window) -> int:
    """Bytes of the packed positions of ``output_numel`` pooled elements."""
    return -(-output_numel // window.per_byte)


def _layout(tensor: torch.Tensor) -> torch.memory_format:
    """Channels-last when ``tensor`` is."""
    if tensor.dim() == 4 and not tensor.is_contiguous() and tensor.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _check_spatial(shape: Sequence[int], what: str) -> None:
    if len(shape) not in (3, 4):
        raise ValueError(f"max_pool2d_packed: {what} must be 3-D (C, H, W) or 4-D (N, C, H, W), got shape {tuple(shape)}")


@variant_op("max_pool2d_packed")
def max_pool2d_packed(x: torch.Tensor, kernel_size: list[int], stride: list[int], padding: list[int],
                      dilation: list[int], ceil_mode: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``aten.max_pool2d_with_indices`` whose indices come back packed window-relative."""
    check_float(x, "max_pool2d_packed")
    _check_spatial(x.shape, "the input")
    window = Window.of(kernel_size, stride, padding, dilation)
    y, indices = _aten.max_pool2d_with_indices.default(x, kernel_size, stride, padding, dilation, ceil_mode)
    numel, (OH, OW), W = y.numel(), y.shape[-2:], x.shape[-1]
    if _cuda.use_kernels(x):
        packed = torch.empty(packed_bytes(numel, window), dtype=torch.uint8, device=x.device)
        _cuda.launch(SOURCE, "maxpool_pack", packed.numel(),
                     (indices.contiguous(), packed, numel, OH, OW, W, window.kW, window.sH, window.sW,
                      window.pH, window.pW, window.dH, window.dW, window.per_byte), x.device)
        return y, packed
    return y, _pack(_relative(indices, window, W), window)


def _relative(indices: torch.Tensor, window: Window, W: int) -> torch.Tensor:
    """Window-relative positions (uint8, row-major) from absolute int64 indices (overwritten);
    only the byte-sized result is made row-major, where the pooling ran channels-last."""
    OH, OW = indices.shape[-2:]
    device = indices.device
    row_start = (torch.arange(OH, device=device) * window.sH - window.pH).view(OH, 1)
    column_start = torch.arange(OW, device=device) * window.sW - window.pW
    rows = torch.div(indices, W, rounding_mode="floor")
    columns = indices.remainder_(W)
    rows.sub_(row_start).div_(window.dH, rounding_mode="floor")
    columns.sub_(column_start).div_(window.dW, rounding_mode="floor")
    return rows.mul_(window.kW).add_(columns).to(torch.uint8).contiguous().view(-1)


def _pack(relative: torch.Tensor, window: Window) -> torch.Tensor:
    if window.per_byte == 1:
        return relative
    padded = torch.zeros(2 * packed_bytes(relative.numel(), window), dtype=torch.uint8, device=relative.device)
    padded[: relative.numel()] = relative
    pairs = padded.view(-1, 2)
    return pairs[:, 0].bitwise_or(pairs[:, 1].bitwise_left_shift(4))


def _unpack(packed: torch.Tensor, numel: int, window: Window) -> torch.Tensor:
    if window.per_byte == 1:
        return packed
    return torch.stack((packed.bitwise_and(0xF), packed.bitwise_right_shift(4)), dim=1).view(-1)[:numel]


@max_pool2d_packed.register_fake
def _(x, kernel_size, stride, padding, dilation, ceil_mode):
    y, _ = _aten.max_pool2d_with_indices.default(x, kernel_size, stride, padding, dilation, ceil_mode)
    window = Window.of(kernel_size, stride, padding, dilation)
    return y, x.new_empty(packed_bytes(y.numel(), window), dtype=torch.uint8)


@variant_op("max_pool2d_packed_backward")
def max_pool2d_packed_backward(grad: torch.Tensor, packed: torch.Tensor, input_size: list[int],
                               kernel_size: list[int], stride: list[int], padding: list[int], dilation: list[int],
                               ceil_mode: bool, out_stride: list[int] | None = None) -> torch.Tensor:
    """The gradient of ``max_pool2d_packed``'s input, of shape ``input_size`` and strides
    ``out_stride``: stock's takes the pooling input's memory format, not ``grad``'s, and the kernels
    that read it round differently in another layout (default: ``grad``'s memory format)."""
    check_float(grad, "max_pool2d_packed_backward", "grad")
    check_same_device("max_pool2d_packed_backward", grad, packed)
    _check_spatial(input_size, "input_size")
    if len(input_size) != grad.dim() or list(input_size[:-2]) != list(grad.shape[:-2]):
        raise ValueError(f"max_pool2d_packed_backward: grad of shape {tuple(grad.shape)} does not "
                         f"match input_size {list(input_size)}")
    window = Window.of(kernel_size, stride, padding, dilation)
    numel = grad.numel()
    check_packed(packed, packed_bytes(numel, window), "max_pool2d_packed_backward: packed")
    H, W = input_size[-2:]
    OH, OW = grad.shape[-2:]
    if _cuda.use_kernels(grad):
        out = torch.empty(input_size, dtype=grad.dtype, device=grad.device)
        _cuda.launch(SOURCE, f"maxpool_backward_{_cuda.SUFFIX[grad.dtype]}", out.numel(),
                     (grad.contiguous(), packed.contiguous(), out, out.numel(), H, W, OH, OW, window.kH,
                      window.kW, window.sH, window.sW, window.pH, window.pW, window.dH, window.dW,
                      window.per_byte), grad.device)
        return _gradient_like(grad, input_size, out_stride).copy_(out)
    relative = _unpack(packed, numel, window).view(grad.shape)
    rows = torch.div(relative, window.kW, rounding_mode="floor")
    columns = relative - rows * window.kW
    row_start = (torch.arange(OH, device=grad.device) * window.sH - window.pH).view(OH, 1)
    column_start = torch.arange(OW, device=grad.device) * window.sW - window.pW
    indices = rows.to(torch.int64).mul_(window.dH).add_(row_start).mul_(W)
    indices.add_(columns, alpha=window.dW).add_(column_start)
    # the stock kernel reads only the shape and layout of its ``self`` argument: pass the output
    out = _gradient_like(grad, input_size, out_stride)
    return _aten.max_pool2d_with_indices_backward.grad_input(
        grad, out, kernel_size, stride, padding, dilation, ceil_mode, indices, grad_input=out)


@max_pool2d_packed_backward.register_fake
def _(grad, packed, input_size, kernel_size, stride, padding, dilation, ceil_mode, out_stride=None):
    return _gradient_like(grad, input_size, out_stride)


def _gradient_like(grad: torch.Tensor, input_size: list[int], stride: list[int] | None) -> torch.Tensor:
    if stride is None:
        return torch.empty(input_size, dtype=grad.dtype, device=grad.device, memory_format=_layout(grad))
    return torch.empty_strided(input_size, stride, dtype=grad.dtype, device=grad.device)


def _setup_pool(ctx, inputs, output) -> None:
    x, *ctx.arguments = inputs
    ctx.input_size = list(x.shape)
    # stock's gradient takes the input's memory format
    ctx.out_stride = list(torch.empty(x.shape, device="meta", memory_format=_layout(x)).stride())
    ctx.save_for_backward(output[1])


def _pool_autograd(ctx, grad_y, _grad_packed):
    (packed,) = ctx.saved_tensors
    return (max_pool2d_packed_backward(grad_y, packed, ctx.input_size, *ctx.arguments, ctx.out_stride),) + (None,) * 5


max_pool2d_packed.register_autograd(_pool_autograd, setup_context=_setup_pool)


def workspace_bytes(output_numel: int, window: Window, kernels: bool, contiguous: bool = True) -> tuple[int, int]:
    """Transient bytes of (forward, backward): the stock int64 indices in the forward, with a
    row-major copy of them for the kernel when the pooling runs channels-last, or for the twin
    its int64 row numbers and byte-sized positions (made row-major once more when channels-last);
    in the backward, none for the kernel, and for the twin the rebuilt int64 indices and the
    byte-sized positions it derives them from."""
    int64 = 8 * output_numel
    if kernels:
        return int64 + (0 if contiguous else int64), 0
    return int64 + int64 + 2 * output_numel + (0 if contiguous else output_numel), int64 + 3 * output_numel


# ---- the variant: where it applies in a graph, and the rewrite --------------------------------------
_FORWARD, _BACKWARD = torch.ops.remat_planner.max_pool2d_packed.default, torch.ops.remat_planner.max_pool2d_packed_backward.default


_GEOMETRY = ("kernel_size", "stride", "padding", "dilation")
#: ATen's defaults in their shortest spelling, for the arguments a trace leaves out (the packed
#: ops take them all; the form the fingerprints of plans saved so far hash)
_OMITTED = {"stride": [], "padding": [0], "dilation": [1], "ceil_mode": False}


def _window(arguments: dict) -> Window | None:
    try:
        return Window.of(*(arguments[name] for name in _GEOMETRY))
    except (ValueError, TypeError):
        return None


def _find(graph: TrainingGraph, op: OpInfo) -> VariantSite | None:
    """A 2-D max-pooling (window of at most ``MAX_WINDOW`` positions) whose int64 indices only
    its ``max_pool2d_with_indices_backward`` reads, with the same input and window."""
    arguments = call_arguments(graph.calls[op.id])
    x = ref(arguments["self"]) if arguments is not None else None
    window = _window(arguments) if x is not None else None
    if window is None or len(op.outputs) != 2:
        return None
    _, indices = op.outputs
    if graph.tensors[x].dtype not in SUPPORTED_DTYPES or len(graph.tensors[x].shape) not in (3, 4):
        return None

    def reads(consumer: int, tensor: int) -> bool:
        stock = backward_call(graph, consumer, "aten.max_pool2d_with_indices_backward.default")
        return (stock is not None and ref(stock["indices"]) == tensor and ref(stock["self"]) == x
                and ref(stock["grad_output"]) not in (x, tensor) and _window(stock) == window
                and bool(stock["ceil_mode"]) == bool(arguments["ceil_mode"]))

    found = only_reader(graph, indices, reads)
    if found is None or not exclusive_storage(graph, indices, found[0]):
        return None
    views, backward = found
    return VariantSite("max_pool2d_packed", "", op.id, (backward,), views, packed_bytes(numel(graph, indices), window),
                       graph.tensors[x].nbytes + graph.tensors[indices].nbytes)


def _packed_arguments(call: OpCall) -> list:
    """kernel_size, stride, padding, dilation and ceil_mode for the packed ops: as traced, and
    ``_OMITTED`` for those the trace left out."""
    arguments = call_arguments(call)
    given = set(list(arguments)[: len(call.args)]) | set(call.kwargs)
    *geometry, ceil_mode = (arguments[name] if name in given else _OMITTED[name] for name in (*_GEOMETRY, "ceil_mode"))
    return [*(list(values) for values in geometry), bool(ceil_mode)]


def _workspace(graph: TrainingGraph, site: VariantSite, capability: VariantCapability) -> tuple[int, int]:
    _, indices = graph.ops[site.forward_op].outputs
    window = _window(call_arguments(graph.calls[site.forward_op]))
    return workspace_bytes(numel(graph, indices), window, capability.cupy_kernels, is_contiguous(graph, indices))


def _rewrite(rw: Rewriter, site: VariantSite, workspace: tuple[int, int]) -> None:
    graph = rw.graph
    call = graph.calls[site.forward_op]
    x, arguments = call_arguments(call)["self"], _packed_arguments(call)
    _, indices = graph.ops[site.forward_op].outputs
    rw.retype(indices, (site.saved_bytes,), UINT8, site.saved_bytes)
    rw.set_call(site.forward_op, _FORWARD, (x, *arguments),
                call.output_slots, workspace[0])
    read = rw.repoint_views(site.view_ops, indices)
    (backward,) = site.backward_ops
    grad = call_arguments(graph.calls[backward])["grad_output"]
    input_size = list(graph.tensors[x.id].shape)
    rw.set_call(backward, _BACKWARD,
                (grad, TensorRef(read), input_size, *arguments, stock_layout(graph, backward)),
                graph.calls[backward].output_slots, workspace[1])


VARIANT = register_variant(Variant(
    "max_pool2d_packed", "aten.max_pool2d_with_indices.default", bitwise=True,
    backward_reads="4/8-bit window positions, not the input and int64 indices",
    ops=(_FORWARD, _BACKWARD), find=_find, workspace=_workspace, rewrite=_rewrite))
