"""From a set of kept forward ops to a full schedule: the mechanism every checkpointing
algorithm shares.

An algorithm decides which forward ops' outputs to keep for the backward. Everything else is
freed after its last forward use and recomputed in the backward, on demand, right before the
first backward op that needs it (recursively from the nearest kept or already-recomputed
tensors), and then held until its last use, so each op is recomputed at most once.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

from planner.graph import TrainingGraph
from planner.schedule import Schedule


def model_forward_ops(graph: TrainingGraph) -> list[int]:
    """Forward ops of the model itself (the loss is never recomputed), in graph order."""
    return [op for op in graph.forward_ops if not graph.ops[op].in_loss]


def op_output_bytes(graph: TrainingGraph) -> np.ndarray:
    """Bytes each op allocates: its outputs' storages, zero for views."""
    sizes = np.zeros(len(graph.ops), dtype=np.int64)
    for op in graph.ops:
        if not op.is_view:
            sizes[op.id] = sum(int(graph.storage_bytes[graph.tensors[t].storage]) for t in op.outputs)
    return sizes


def close_over_views(graph: TrainingGraph, kept: Iterable[int]) -> set[int]:
    """Keeping a view keeps its storage: add the ops that own the storage of each kept view."""
    closed = set(kept)
    pending = list(closed)
    while pending:
        op = graph.ops[pending.pop()]
        if not op.is_view:
            continue
        for tensor in op.inputs:
            producer = graph.tensors[tensor].producer
            if producer is not None and graph.tensors[tensor].storage in {graph.tensors[o].storage for o in op.outputs}:
                if producer not in closed:
                    closed.add(producer)
                    pending.append(producer)
    return closed


def schedule_keeping(graph: TrainingGraph, kept_ops: Iterable[int]) -> Schedule:
    """The schedule that keeps the outputs of ``kept_ops`` (forward op ids) for the backward and
    recomputes every other forward tensor the backward needs. The model's outputs are always kept:
    the caller's loss holds them (an MSE loss's backward reads them), and a recomputation there
    would put model ops inside the loss, which ``execute.lower`` refuses.

    Complexity: O(ops + edges).
    """
    outputs = (graph.tensors[t].producer for t in graph.model_outputs)
    kept = close_over_views(graph, [*kept_ops, *(op for op in outputs if op is not None)])
    valid: set[int] = set()  # forward tensors usable in the backward without recomputation
    for op in graph.forward_ops:
        if op in kept or graph.ops[op].in_loss:
            valid.update(graph.ops[op].outputs)
    order: list[int] = list(graph.forward_ops)

    def ensure(tensor: int) -> None:
        if tensor in valid or graph.is_resident(tensor):
            return
        producer = graph.tensors[tensor].producer
        for source in graph.ops[producer].inputs:
            ensure(source)
        order.append(producer)
        valid.update(graph.ops[producer].outputs)

    for op in graph.backward_ops:
        for tensor in graph.ops[op].inputs:
            ensure(tensor)
        order.append(op)
        valid.update(graph.ops[op].outputs)
    return Schedule.from_order(graph, order)


def articulation_ops(graph: TrainingGraph) -> list[int]:
    """Model forward ops that cut the forward graph in two: no tensor flows from an op before
    them to an op after them except through them. Their outputs are block boundaries.

    Complexity: O(ops + edges), one sweep with a difference array over spans of edges.
    """
    ops = model_forward_ops(graph)
    position = {op: i for i, op in enumerate(ops)}
    spans = np.zeros(len(ops) + 1, dtype=np.int64)
    for op in ops:
        for tensor in graph.ops[op].inputs:
            producer = graph.tensors[tensor].producer
            if producer in position and position[op] - position[producer] > 1:
                spans[position[producer] + 1] += 1
                spans[position[op]] -= 1
    covered = np.cumsum(spans)[: len(ops)]
    sizes = op_output_bytes(graph)
    return [op for i, op in enumerate(ops) if covered[i] == 0 and sizes[op] > 0]
