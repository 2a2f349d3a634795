"""What every variant's graph side shares: the site it finds, the rewrite interface it edits a
graph through, and the pattern-matching helpers its finder uses.

A finder reads a forward op's call by its schema's argument names (``call_arguments``), never by
position, and follows the saved tensor to the backward op that reads it (``reads_through_views``).
A rewrite edits the graph only through a ``Rewriter`` (``planner.variants`` provides it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import torch

from planner._torch import bind_arguments
from planner.gpu._checks import FLOAT_DTYPES
from planner.graph import OpCall, Phase, TensorRef, TrainingGraph

SUPPORTED_DTYPES = frozenset(FLOAT_DTYPES)
UINT8, INT64 = torch.uint8, torch.int64
_VIEW_TARGETS = frozenset({"aten.detach.default", "aten.alias.default"})


@dataclass(frozen=True)
class VariantSite:
    """One place a variant applies.

    ``backward_ops`` switch to the variant's backward; ``view_ops`` (detach/alias ops between the
    forward's saved tensor and its backward) are re-pointed at the new saved tensor.
    ``saved_bytes``: what the rewritten backward newly needs from the forward (the mask or packed
    positions; for batch norm the bound on its fallback input channels); ``reads``: forward tensors
    the graph has already that the rewritten backward reads (batch norm's output and statistics).
    ``released_bytes``: the forward tensors these backward ops no longer read (the ReLU output,
    the bool mask, the pooling input and int64 indices, the batch-norm input); they are freed
    earlier unless another op still needs them.
    """

    variant: str
    name: str  # "<variant>@<forward op name>": stable across captures of the same model
    forward_op: int
    backward_ops: tuple[int, ...]
    view_ops: tuple[int, ...]
    saved_bytes: int
    released_bytes: int
    reads: tuple[int, ...] = ()


class Rewriter(Protocol):
    """The edits a variant's rewrite makes (``planner.variants`` implements them)."""

    graph: TrainingGraph

    def new_tensor(self, name: str, shape: tuple[int, ...], dtype: str, nbytes: int, producer: int) -> int:
        """A tensor in a storage of its own, produced by ``producer``."""

    def retype(self, tensor: int, shape: tuple[int, ...], dtype: str, nbytes: int) -> None:
        """``tensor`` (alone in its storage, save views) now holds a smaller tensor."""

    def repoint_views(self, views: Sequence[int], source: int) -> int:
        """The detach/alias chain ``views`` reads ``source``; returns the chain's last tensor."""

    def set_call(self, op: int, target, args: tuple, output_slots: tuple[int | None, ...], workspace: int) -> None:
        """``op`` now calls ``target(*args)`` and allocates ``workspace`` scratch bytes."""


# ---- matching ---------------------------------------------------------------------------------
def call_arguments(call: OpCall) -> dict[str, Any] | None:
    """The call's arguments by its schema's names, defaults filled in; None when they do not fit."""
    try:
        return bind_arguments(call.target, call.args, call.kwargs)
    except (TypeError, AttributeError):
        return None


def ref(value: Any) -> int | None:
    """The tensor id a call argument stands for, None for a non-tensor."""
    return value.id if isinstance(value, TensorRef) else None


def itemsize(dtype: torch.dtype) -> int:
    """Bytes per element of a supported float dtype."""
    return dtype.itemsize


def numel(graph: TrainingGraph, tensor: int) -> int:
    return math.prod(graph.tensors[tensor].shape)


def backward_call(graph: TrainingGraph, op: int, target: str) -> dict[str, Any] | None:
    """The named arguments of ``op`` when it is a backward op calling ``target``, else None."""
    if graph.ops[op].phase is not Phase.BACKWARD or graph.ops[op].target != target:
        return None
    return call_arguments(graph.calls[op])


def reads_through_views(graph: TrainingGraph, tensor: int, start: int, reads: Callable[[int, int], bool],
                        ) -> tuple[tuple[int, ...], int] | None:
    """From consumer ``start`` of ``tensor``: the detach/alias ops leading to one op that
    ``reads(op, tensor)``, each view's output read by the next op alone. (views, reader) or None."""
    views: list[int] = []
    op, current = start, tensor
    while graph.ops[op].target in _VIEW_TARGETS and len(graph.ops[op].inputs) == 1:
        views.append(op)
        (current,) = graph.ops[op].outputs
        consumers = graph.tensors[current].consumers
        if len(consumers) != 1:
            return None
        op = consumers[0]
    return (tuple(views), op) if reads(op, current) else None


def only_reader(graph: TrainingGraph, tensor: int, reads: Callable[[int, int], bool]):
    """The single chain from ``tensor`` to a reader, when every consumer of ``tensor`` is on it."""
    consumers = graph.tensors[tensor].consumers
    if len(consumers) != 1:
        return None
    return reads_through_views(graph, tensor, consumers[0], reads)


def exclusive_storage(graph: TrainingGraph, tensor: int, views: Sequence[int]) -> bool:
    """``tensor``'s storage holds only it and the outputs of ``views`` (so it can be retyped)."""
    storage = graph.tensors[tensor].storage
    allowed = {tensor, *(graph.ops[v].outputs[0] for v in views)}
    return all(t.id in allowed for t in graph.tensors if t.storage == storage)


# ---- rewriting --------------------------------------------------------------------------------
def stock_layout(graph: TrainingGraph, backward: int) -> list[int] | None:
    """The strides of the stock backward op's output, for its variant to give its own: stock
    takes the saved tensor's layout (which the variant no longer reads), and the ops downstream
    round differently in another layout (a channels-last convolution's weight gradient)."""
    (output,) = graph.ops[backward].outputs
    return list(graph.tensors[output].strides) or None


def is_contiguous(graph: TrainingGraph, tensor: int) -> bool:
    """Whether a traced tensor is row-major (True where its strides were not recorded)."""
    info = graph.tensors[tensor]
    if not info.strides:
        return True
    expected, running = [], 1
    for size in reversed(info.shape):
        expected.append(running)
        running *= max(size, 1)
    return all(size == 1 or stride == want for size, stride, want in zip(info.shape, info.strides, reversed(expected)))
