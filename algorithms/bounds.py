"""Lower bounds: no schedule of a graph can peak below these, or recompute less than these.

Both hold for every schedule the simulator accepts (any order, any recomputation), not just for
the class a search explores.
"""
from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np

from planner.cost import CostModel
from planner.graph import TrainingGraph


def memory_lower_bound(graph: TrainingGraph, cost_model: CostModel) -> int:
    """Resident memory plus the largest single op's working set (its inputs' and outputs'
    storages, and workspace): every op must run once with all of them live.

    Complexity: O(ops + edges).
    """
    workspace = cost_model.workspace_bytes(graph)
    largest = 0
    for op in graph.ops:
        storages = {graph.tensors[t].storage for t in op.inputs + op.outputs} - graph.resident_storages
        largest = max(largest, sum(graph.storages[s].nbytes for s in storages) + int(workspace[op.id]))
    return graph.resident_bytes + largest


@dataclass(frozen=True)
class RecomputeBound:
    """No schedule that fits the budget spends less than ``seconds`` recomputing (``inf``: no
    schedule fits at all). ``moment`` is the backward op whose moment gives it (None: every
    moment fits without recomputing). ``floor_bytes``: no schedule peaks below it, whatever the
    budget (the most that some moment holds even with everything recomputed)."""

    seconds: float
    moment: int | None
    floor_bytes: int


def recompute_lower_bound(graph: TrainingGraph, cost_model: CostModel, budget_bytes: int) -> RecomputeBound:
    """A lower bound on the recompute time (step time minus store-all's) of *every* schedule the
    simulator accepts at ``budget_bytes``: any order, any recomputation, staged or not.

    Why it holds. Take a backward op b. Every backward op runs exactly once and every forward op
    at least once, so the extra time is the sum of ``t_p`` over each forward op's runs past the
    first. When b runs, its ancestors (in the data-flow graph) have all run, and its descendants
    are still to run. At that step the simulator counts resident memory, b's inputs and outputs,
    its workspace, and every other live storage, and this is at most the budget. Live for sure:
    each tensor that a backward ancestor of b produced (once: backward ops run once) and b or a
    descendant reads. Live *or paid for*: each storage s a descendant reads whose only allocator
    (the one non-view op that writes s without reading it: only it can bring a dead s back,
    since a view or an aliasing op needs s live) is a forward ancestor p of b. If s is dead
    when b runs, p runs again afterwards: a recomputation costing at least ``t_p``. With y_p =
    "p runs twice", ``sum_s bytes_s (1 - y_p(s)) <= budget - (the sure part)``; minimising
    ``sum t_p y_p`` over y in [0, 1] is a fractional covering knapsack, solved exactly by taking
    the ops in order of time per byte freed (an op that allocates several storages frees them
    all at one cost). Each b gives a bound; the result is the largest. It ignores what a
    recomputation's own inputs cost, and every moment but one at a time, so it can be far below
    the optimum; at a budget at or above store-all's peak it is 0.

    Complexity: O(backward ops x (ops + edges)) compiled, plus a sort per moment that is short.
    """
    arrays = graph.op_arrays
    n_ops = len(graph.ops)
    producer = np.array([-1 if t.producer is None else t.producer for t in graph.tensors], dtype=np.int64)
    consumer_ptr, consumer_idx = _consumers(graph)
    allocator = _allocators(graph)
    resident_storage = np.zeros(len(graph.storages), dtype=np.bool_)
    resident_storage[list(graph.resident_storages)] = True
    times = np.asarray(cost_model.op_times(graph), dtype=np.float64)
    workspace = np.asarray(cost_model.workspace_bytes(graph), dtype=np.int64)
    seconds, moment, floor = _best_moment(
        arrays["in_ptr"], arrays["in_idx"], arrays["out_ptr"], arrays["out_idx"], arrays["is_backward"],
        consumer_ptr, consumer_idx, producer, graph.tensor_storage, graph.storage_bytes, resident_storage,
        allocator, times, workspace, graph.resident_bytes, int(budget_bytes), n_ops)
    return RecomputeBound(float(seconds), None if moment < 0 else int(moment), int(floor))


def step_time_lower_bound(graph: TrainingGraph, cost_model: CostModel, budget_bytes: int) -> float:
    """No schedule of ``graph`` that fits ``budget_bytes`` takes less than this step time (seconds;
    ``inf``: none fits): store-all's step (every op once) plus ``recompute_lower_bound``."""
    base = float(np.asarray(cost_model.op_times(graph), dtype=np.float64).sum())
    return base + recompute_lower_bound(graph, cost_model, budget_bytes).seconds


def _consumers(graph: TrainingGraph) -> tuple[np.ndarray, np.ndarray]:
    """Per op, the ops reading one of its outputs (CSR), each once."""
    lists = [sorted({c for t in op.outputs for c in graph.tensors[t].consumers}) for op in graph.ops]
    pointer = np.zeros(len(lists) + 1, dtype=np.int64)
    pointer[1:] = np.cumsum([len(x) for x in lists])
    return pointer, np.array([c for x in lists for c in x], dtype=np.int64)


def _allocators(graph: TrainingGraph) -> np.ndarray:
    """Per storage, the one non-view op writing it without reading it; -1 for none (resident)
    or several (then nothing is claimed about it)."""
    allocator = np.full(len(graph.storages), -1, dtype=np.int64)
    writers = np.zeros(len(graph.storages), dtype=np.int64)
    for op in graph.ops:
        if op.is_view:
            continue
        read = {graph.tensors[t].storage for t in op.inputs}
        for s in {graph.tensors[t].storage for t in op.outputs} - read:
            writers[s] += 1
            allocator[s] = op.id
    allocator[writers != 1] = -1
    return allocator


@numba.njit(cache=True)
def _best_moment(in_ptr, in_idx, out_ptr, out_idx, is_backward, consumer_ptr, consumer_idx, producer,
                 tensor_storage, storage_bytes, resident_storage, allocator, times, workspace, resident_bytes,
                 budget, n_ops):
    """The largest knapsack bound over every backward op's moment, that op (-1: all zero), and
    the most any moment holds for sure."""
    n_storages = len(storage_bytes)
    ancestor = np.zeros(n_ops, dtype=np.int64)  # == b + 1: an ancestor of moment b
    descendant = np.zeros(n_ops, dtype=np.int64)
    sure = np.zeros(n_storages, dtype=np.int64)  # == b + 1: live for sure at moment b
    wanted = np.zeros(n_storages, dtype=np.int64)
    stack = np.empty(n_ops, dtype=np.int64)
    items = np.empty(n_storages, dtype=np.int64)
    freed = np.zeros(n_ops, dtype=np.int64)  # bytes each allocator frees at this moment
    best, best_moment, floor = 0.0, -1, resident_bytes
    for b in range(n_ops):
        if not is_backward[b]:
            continue
        mark = b + 1
        # ancestors: every op b depends on
        top = 0
        for k in range(in_ptr[b], in_ptr[b + 1]):
            q = producer[in_idx[k]]
            if q >= 0 and ancestor[q] != mark:
                ancestor[q] = mark
                stack[top] = q
                top += 1
        while top > 0:
            top -= 1
            i = stack[top]
            for k in range(in_ptr[i], in_ptr[i + 1]):
                q = producer[in_idx[k]]
                if q >= 0 and ancestor[q] != mark:
                    ancestor[q] = mark
                    stack[top] = q
                    top += 1
        # b's inputs and outputs are live while it runs
        held = resident_bytes + workspace[b]
        for k in range(in_ptr[b], in_ptr[b + 1]):
            s = tensor_storage[in_idx[k]]
            if not resident_storage[s] and sure[s] != mark:
                sure[s] = mark
                held += storage_bytes[s]
        for k in range(out_ptr[b], out_ptr[b + 1]):
            s = tensor_storage[out_idx[k]]
            if not resident_storage[s] and sure[s] != mark:
                sure[s] = mark
                held += storage_bytes[s]
        # descendants: every op that depends on b, and what they read
        top = 0
        for k in range(consumer_ptr[b], consumer_ptr[b + 1]):
            d = consumer_idx[k]
            if descendant[d] != mark:
                descendant[d] = mark
                stack[top] = d
                top += 1
        n_items = 0
        while top > 0:
            top -= 1
            d = stack[top]
            for k in range(consumer_ptr[d], consumer_ptr[d + 1]):
                c = consumer_idx[k]
                if descendant[c] != mark:
                    descendant[c] = mark
                    stack[top] = c
                    top += 1
            for k in range(in_ptr[d], in_ptr[d + 1]):
                t = in_idx[k]
                s = tensor_storage[t]
                if resident_storage[s] or sure[s] == mark:
                    continue
                q = producer[t]
                if q >= 0 and is_backward[q] and ancestor[q] == mark:
                    sure[s] = mark  # made once, before b, read after it
                    held += storage_bytes[s]
                elif wanted[s] != mark:
                    p = allocator[s]
                    if p >= 0 and not is_backward[p] and ancestor[p] == mark:
                        wanted[s] = mark
                        items[n_items] = s
                        n_items += 1
        # live or recomputed: group the wanted storages (not live for sure) by their allocator
        floor = max(floor, held)
        need = held - budget
        ops = np.empty(n_items, dtype=np.int64)
        n_groups = 0
        for j in range(n_items):
            s = items[j]
            if sure[s] == mark or storage_bytes[s] == 0:
                continue
            need += storage_bytes[s]
            p = allocator[s]
            if freed[p] == 0:
                ops[n_groups] = p
                n_groups += 1
            freed[p] += storage_bytes[s]
        value = 0.0
        if need > 0:
            ratio = np.empty(n_groups, dtype=np.float64)
            for j in range(n_groups):
                ratio[j] = times[ops[j]] / freed[ops[j]]
            order = np.argsort(ratio)
            left = need
            for j in order:
                if left <= 0:
                    break
                w = freed[ops[j]]
                value += times[ops[j]] * (left / w if w > left else 1.0)
                left -= w
            if left > 0:
                value = np.inf  # even recomputing everything leaves this moment over the budget
        for j in range(n_groups):
            freed[ops[j]] = 0
        if value > best:
            best, best_moment = value, b
    return best, best_moment, floor
