"""ReLU that saves a 1-bit mask for its backward instead of its output.

``relu_packed(x) -> (y, mask)``: ``y`` is ``torch.relu(x)`` (the stock kernel, bit for bit) and
``mask`` holds one bit per element (``gpu._bits`` layout), set where the gradient passes.
``relu_packed_backward(grad, mask, out_stride)`` equals ``aten.threshold_backward(grad, y, 0)`` bit
for bit: the gradient where ``not (y <= 0)`` (so NaN outputs pass it, as stock does) and +0.0
elsewhere, laid out with ``out_stride``: stock's output takes ``y``'s layout, not ``grad``'s, and the
kernels that read it (a convolution's backward) round differently in another layout. The mask is
1/32 of an fp32 output.
"""
from __future__ import annotations

import torch

from planner.gpu import _bits, _cuda
from planner.gpu._checks import check_float, check_packed, check_same_device
from planner.gpu._registry import Variant, register_variant, variant_op
from planner.gpu._sites import (
    SUPPORTED_DTYPES, UINT8, Rewriter, VariantSite, backward_call, call_arguments, numel, reads_through_views, ref,
    stock_layout,
)
from planner.graph import OpInfo, TensorRef, TrainingGraph, VariantCapability

# Stock's condition on the raw bits of y: the gradient passes where y is not <= 0, i.e. where
# |y| != 0 and (y has no sign bit, or y is NaN: |y| above the infinity pattern).
SOURCE = r"""
template <typename U>
__device__ void pack_passing(const U* y, u8* mask, i64 n, U magnitude_bits, U infinity) {
    i64 byte = global_index();
    if (byte >= (n + 7) / 8) return;
    u32 bits = 0;
    for (int k = 0; k < 8; ++k) {
        i64 i = byte * 8 + k;
        if (i < n) {
            U value = y[i];
            U magnitude = value & magnitude_bits;
            if (magnitude != 0 && (magnitude == value || magnitude > infinity)) bits |= 1u << k;
        }
    }
    mask[byte] = (u8)bits;
}

template <typename U>
__device__ void select_passing(const U* grad, const u8* mask, U* out, i64 n) {
    i64 i = global_index();
    if (i >= n) return;
    out[i] = ((mask[i >> 3] >> (i & 7)) & 1) ? grad[i] : (U)0;
}

extern "C" __global__ void relu_pack_f32(const u32* y, u8* mask, i64 n) {
    pack_passing<u32>(y, mask, n, 0x7fffffffu, 0x7f800000u); }
extern "C" __global__ void relu_pack_f64(const u64* y, u8* mask, i64 n) {
    pack_passing<u64>(y, mask, n, 0x7fffffffffffffffull, 0x7ff0000000000000ull); }
extern "C" __global__ void relu_pack_f16(const u16* y, u8* mask, i64 n) {
    pack_passing<u16>(y, mask, n, (u16)0x7fff, (u16)0x7c00); }
extern "C" __global__ void relu_pack_bf16(const u16* y, u8* mask, i64 n) {
    pack_passing<u16>(y, mask, n, (u16)0x7fff, (u16)0x7f80); }

extern "C" __global__ void relu_select_32(const u32* grad, const u8* mask, u32* out, i64 n) {
    select_passing<u32>(grad, mask, out, n); }
extern "C" __global__ void relu_select_64(const u64* grad, const u8* mask, u64* out, i64 n) {
    select_passing<u64>(grad, mask, out, n); }
extern "C" __global__ void relu_select_16(const u16* grad, const u8* mask, u16* out, i64 n) {
    select_passing<u16>(grad, mask, out, n); }
"""

_INT_WORD = {2: torch.int16, 4: torch.int32, 8: torch.int64}


@variant_op("relu_packed")
def relu_packed(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(torch.relu(x), mask)`` with a 1-bit mask of where the gradient passes."""
    check_float(x, "relu_packed")
    y = torch.relu(x)
    numel = y.numel()
    if _cuda.use_kernels(y):
        mask = torch.empty(_bits.packed_bytes(numel), dtype=torch.uint8, device=y.device)
        _cuda.launch(SOURCE, f"relu_pack_{_cuda.SUFFIX[y.dtype]}", mask.numel(), (y.contiguous(), mask, numel), y.device)
        return y, mask
    buffer = _bits.flag_buffer(numel, y.device)
    passing = buffer[:numel].view(y.shape)
    torch.le(y, 0, out=passing)
    passing.logical_not_()
    return y, _bits.pack_flag_buffer(buffer)


@relu_packed.register_fake
def _(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(x), x.new_empty(_bits.packed_bytes(x.numel()), dtype=torch.uint8)


@variant_op("relu_packed_backward")
def relu_packed_backward(grad: torch.Tensor, mask: torch.Tensor, out_stride: list[int] | None = None) -> torch.Tensor:
    """The gradient of ``relu_packed``'s input: ``grad`` where the mask bit is set, else +0.0, with
    strides ``out_stride`` (those of the ReLU's output, as stock's; default: ``grad``'s layout)."""
    check_float(grad, "relu_packed_backward", "grad")
    check_same_device("relu_packed_backward", grad, mask)
    numel = grad.numel()
    check_packed(mask, _bits.packed_bytes(numel), "relu_packed_backward: mask")
    out = _like(grad, out_stride)
    if _cuda.use_kernels(grad):
        target = out if out.is_contiguous() else torch.empty(grad.shape, dtype=grad.dtype, device=grad.device)
        _cuda.launch(SOURCE, f"relu_select_{8 * grad.element_size()}", numel,
                     (grad.contiguous(), mask.contiguous(), target, numel), grad.device)
        return out if target is out else out.copy_(target)
    passing = _bits.unpack_flags(mask, numel).view(grad.shape)
    word = _INT_WORD[grad.dtype.itemsize]  # select raw bits: no float path, NaN payloads kept
    torch.where(passing, grad.view(word), torch.zeros((), dtype=word, device=grad.device), out=out.view(word))
    return out


@relu_packed_backward.register_fake
def _(grad: torch.Tensor, mask: torch.Tensor, out_stride: list[int] | None = None) -> torch.Tensor:
    return _like(grad, out_stride)


def _like(grad: torch.Tensor, stride: list[int] | None) -> torch.Tensor:
    if stride is None:
        return torch.empty_like(grad)
    return torch.empty_strided(grad.shape, stride, dtype=grad.dtype, device=grad.device)


def _setup_relu(ctx, inputs, output) -> None:
    ctx.save_for_backward(output[1])
    ctx.out_stride = list(output[0].stride())


def _relu_autograd(ctx, grad_y, _grad_mask):
    (mask,) = ctx.saved_tensors
    return relu_packed_backward(grad_y, mask, ctx.out_stride)


def _setup_select(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[1])


def _select_autograd(ctx, grad_out):
    (mask,) = ctx.saved_tensors
    return relu_packed_backward(grad_out, mask), None, None


relu_packed.register_autograd(_relu_autograd, setup_context=_setup_relu)
relu_packed_backward.register_autograd(_select_autograd, setup_context=_setup_select)


def workspace_bytes(numel: int, kernels: bool) -> tuple[int, int]:
    """Transient bytes of (forward, backward) beyond their outputs: the PyTorch twin expands the
    mask to one byte per element; the kernels need nothing (contiguous tensors)."""
    expanded = 0 if kernels else 8 * _bits.packed_bytes(numel)
    return expanded, expanded


# ---- the variant: where it applies in a graph, and the rewrite --------------------------------------
_FORWARD, _BACKWARD = torch.ops.remat_planner.relu_packed.default, torch.ops.remat_planner.relu_packed_backward.default


def _find(graph: TrainingGraph, op: OpInfo) -> VariantSite | None:
    """A ReLU whose output one ``threshold_backward(grad, y, 0)`` reads (through detach/alias ops
    nothing else reads); other readers of the output are fine: the variant still writes it."""
    (y,) = op.outputs
    if graph.tensors[y].dtype not in SUPPORTED_DTYPES or call_arguments(graph.calls[op.id]) is None:
        return None

    def reads(consumer: int, tensor: int) -> bool:
        arguments = backward_call(graph, consumer, "aten.threshold_backward.default")
        return (arguments is not None and ref(arguments["self"]) == tensor
                and ref(arguments["grad_output"]) != tensor and arguments["threshold"] == 0)

    chains = [c for c in (reads_through_views(graph, y, start, reads) for start in graph.tensors[y].consumers) if c]
    if len(chains) != 1:
        return None
    views, backward = chains[0]
    return VariantSite("relu_packed", "", op.id, (backward,), views, _bits.packed_bytes(numel(graph, y)),
                       graph.tensors[y].nbytes)


def _workspace(graph: TrainingGraph, site: VariantSite, capability: VariantCapability) -> tuple[int, int]:
    (y,) = graph.ops[site.forward_op].outputs
    return workspace_bytes(numel(graph, y), capability.cupy_kernels)


def _rewrite(rw: Rewriter, site: VariantSite, workspace: tuple[int, int]) -> None:
    graph = rw.graph
    (y,) = graph.ops[site.forward_op].outputs
    mask_bytes = site.saved_bytes
    mask = rw.new_tensor(f"{graph.tensors[y].name}.mask", (mask_bytes,), UINT8, mask_bytes, site.forward_op)
    x = call_arguments(graph.calls[site.forward_op])["self"]
    rw.set_call(site.forward_op, _FORWARD, (x,), (y, mask), workspace[0])
    read = rw.repoint_views(site.view_ops, mask)
    (backward,) = site.backward_ops
    grad = call_arguments(graph.calls[backward])["grad_output"]
    rw.set_call(backward, _BACKWARD,
                (grad, TensorRef(read), stock_layout(graph, backward)), graph.calls[backward].output_slots, workspace[1])


VARIANT = register_variant(Variant(
    "relu_packed", "aten.relu.default", bitwise=True, backward_reads="a 1-bit mask, not the ReLU output",
    ops=(_FORWARD, _BACKWARD), find=_find, workspace=_workspace, rewrite=_rewrite))
