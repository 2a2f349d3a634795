"""Dropout that saves its keep-mask as bits instead of bools.

``dropout_packed(x, p, train) -> (y, mask)`` calls the stock ``aten.native_dropout`` (same output
and same draws from the RNG, bit for bit) and packs its bool mask into one bit per element
(``gpu._bits`` layout; with a CuPy kernel on CUDA). The bool mask exists only while the op runs:
count it as the op's workspace. ``dropout_packed_backward(grad, mask, scale)`` unpacks the bits
and calls the stock ``aten.native_dropout_backward``, so gradients are bitwise stock.
"""
from __future__ import annotations

from typing import Optional

import torch

from planner.gpu import _bits
from planner.gpu._checks import check_float, check_same_device
from planner.gpu._registry import Variant, register_variant, variant_op
from planner.gpu._sites import (
    SUPPORTED_DTYPES, UINT8, Rewriter, VariantSite, backward_call, call_arguments, exclusive_storage, numel,
    only_reader, ref,
)
from planner.graph import OpInfo, TensorRef, TrainingGraph, VariantCapability

_aten = torch.ops.aten


@variant_op("dropout_packed")
def dropout_packed(x: torch.Tensor, p: float, train: Optional[bool]) -> tuple[torch.Tensor, torch.Tensor]:
    """``aten.native_dropout(x, p, train)`` with the mask packed to bits."""
    check_float(x, "dropout_packed")
    if x.numel() == 0:  # stock returns the input itself and a float mask, drawing nothing
        return torch.empty_like(x), x.new_empty(0, dtype=torch.uint8)
    y, keep = _aten.native_dropout.default(x, p, train)
    return y, _bits.pack_flags(keep)


@dropout_packed.register_fake
def _(x: torch.Tensor, p: float, train: Optional[bool]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(x), x.new_empty(_bits.packed_bytes(x.numel()), dtype=torch.uint8)


@variant_op("dropout_packed_backward")
def dropout_packed_backward(grad: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """``aten.native_dropout_backward(grad, unpacked mask, scale)``."""
    check_float(grad, "dropout_packed_backward", "grad")
    check_same_device("dropout_packed_backward", grad, mask)
    keep = _bits.unpack_flags(mask, grad.numel()).view(grad.shape)
    return _aten.native_dropout_backward.default(grad, keep, scale)


@dropout_packed_backward.register_fake
def _(grad: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.empty_like(grad)


def _setup_dropout(ctx, inputs, output) -> None:
    _, p, train = inputs  # the scale stock's derivative of native_dropout uses (1 for train=None too)
    ctx.scale = 1.0 if not train else (0.0 if p == 1 else 1.0 / (1.0 - p))
    ctx.save_for_backward(output[1])


def _dropout_autograd(ctx, grad_y, _grad_mask):
    (mask,) = ctx.saved_tensors
    return dropout_packed_backward(grad_y, mask, ctx.scale), None, None


def _setup_backward(ctx, inputs, output) -> None:
    ctx.scale = inputs[2]
    ctx.save_for_backward(inputs[1])


def _backward_autograd(ctx, grad_out):
    (mask,) = ctx.saved_tensors
    return dropout_packed_backward(grad_out, mask, ctx.scale), None, None


dropout_packed.register_autograd(_dropout_autograd, setup_context=_setup_dropout)
dropout_packed_backward.register_autograd(_backward_autograd, setup_context=_setup_backward)


def workspace_bytes(numel: int, kernels: bool) -> tuple[int, int]:
    """Transient bytes of (forward, backward): the stock bool mask in the forward (plus the
    twin's padded copy), the unpacked bool mask in the backward."""
    padded = 8 * _bits.packed_bytes(numel)
    return (numel if kernels else numel + padded), (numel if kernels else padded)


# ---- the variant: where it applies in a graph, and the rewrite --------------------------------------
_FORWARD, _BACKWARD = torch.ops.remat_planner.dropout_packed.default, torch.ops.remat_planner.dropout_packed_backward.default


def _find(graph: TrainingGraph, op: OpInfo) -> VariantSite | None:
    """A training-mode dropout whose bool mask only its ``native_dropout_backward`` reads, alone
    in its storage (it is retyped to the packed bits)."""
    arguments = call_arguments(graph.calls[op.id])
    if arguments is None or arguments["train"] is not True or len(op.outputs) != 2:
        return None
    y, keep = op.outputs
    if graph.tensors[y].dtype not in SUPPORTED_DTYPES or graph.tensors[keep].dtype != torch.bool:
        return None

    def reads(consumer: int, tensor: int) -> bool:
        backward = backward_call(graph, consumer, "aten.native_dropout_backward.default")
        return backward is not None and ref(backward["mask"]) == tensor and ref(backward["grad_output"]) != tensor

    found = only_reader(graph, keep, reads)
    if found is None or not exclusive_storage(graph, keep, found[0]):
        return None
    views, backward = found
    return VariantSite("dropout_packed", "", op.id, (backward,), views, _bits.packed_bytes(numel(graph, keep)),
                       graph.tensors[keep].nbytes)


def _workspace(graph: TrainingGraph, site: VariantSite, capability: VariantCapability) -> tuple[int, int]:
    _, keep = graph.ops[site.forward_op].outputs
    return workspace_bytes(numel(graph, keep), capability.cupy_kernels)


def _rewrite(rw: Rewriter, site: VariantSite, workspace: tuple[int, int]) -> None:
    graph = rw.graph
    _, keep = graph.ops[site.forward_op].outputs
    rw.retype(keep, (site.saved_bytes,), UINT8, site.saved_bytes)
    call, arguments = graph.calls[site.forward_op], call_arguments(graph.calls[site.forward_op])
    rw.set_call(site.forward_op, _FORWARD,
                (arguments["input"], arguments["p"], arguments["train"]), call.output_slots, workspace[0])
    read = rw.repoint_views(site.view_ops, keep)
    (backward,) = site.backward_ops
    stock = call_arguments(graph.calls[backward])
    rw.set_call(backward, _BACKWARD,
                (stock["grad_output"], TensorRef(read), stock["scale"]), graph.calls[backward].output_slots,
                workspace[1])


VARIANT = register_variant(Variant(
    "dropout_packed", "aten.native_dropout.default", bitwise=True,
    backward_reads="a 1-bit mask, not the bool mask (stock forward and RNG use)",
    ops=(_FORWARD, _BACKWARD), find=_find, workspace=_workspace, rewrite=_rewrite))
