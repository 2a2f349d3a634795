"""Lower bounds: no schedule of a graph can peak below these, or recompute less than these.

Both hold for every schedule the simulator accepts (any order, any recomputation), not just for
the class a search explores.
"""
from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
from scipy import sparse

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


#: how many moments (those of the largest knapsack bounds) also get the LP with recomputations' inputs
LP_MOMENTS = 4
#: the LP's optimum is taken this much lower (relative), for HiGHS's feasibility tolerances
LP_MARGIN = 1e-6


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
    at least once, so the extra time is at least the sum of ``t_p`` over the forward ancestors p
    of b that run again after b (y_p = 1): each ran before b, since b reads what they make. At
    b's step the simulator counts resident memory, b's inputs and outputs, its workspace and
    every other live storage, and that is at most the budget. Live for sure: each tensor that a
    backward ancestor of b made (once: backward ops run once) and b or a descendant reads. For a
    storage s whose only allocator (the one non-view op that writes s without reading it: only it
    can bring a dead s back, a view or an aliasing op needing s live) is a forward ancestor a of
    b, let z_s = "s live at b". If a descendant reads s, it is live then, so ``z_s + y_a >= 1``;
    if a forward ancestor q reads s and runs again after b (y_q), s is live then too, so
    ``z_s + y_a >= y_q``. And ``sum_s bytes_s z_s <= budget - (the sure part)``. The least
    ``sum t_p y_p`` over y, z in [0, 1] is a bound per moment (an LP relaxation of what any
    schedule satisfies); the result is the largest over the moments tried.

    Every backward op's moment gets the LP without the ``y_q`` rows, a fractional covering
    knapsack solved exactly by taking the ops in order of time per byte freed (an op allocating
    several storages frees them all at one cost; its inputs' cost ignored). The ``LP_MOMENTS``
    moments of the largest knapsack bounds get the whole LP (SciPy's HiGHS), which charges a
    recomputation for the inputs it needs (a ReLU's output freed costs the BatchNorm before it
    too, unless its output is kept). At a budget at or above store-all's peak both are 0.

    Complexity: O(backward ops x (ops + edges)) compiled for the knapsacks (a sort each), plus
    ``LP_MOMENTS`` LPs of O(ops + storages) columns and O(edges) rows.
    """
    problem = _MomentProblem.of(graph, cost_model, int(budget_bytes))
    values, floor = _knapsacks(*problem.arrays)
    best = int(np.argmax(values))
    if values[best] <= 0 or not np.isfinite(values[best]):
        return RecomputeBound(float(max(values[best], 0.0)), best if values[best] > 0 else None, int(floor))
    seconds, moment = float(values[best]), best
    for b in np.argsort(-values, kind="stable")[:LP_MOMENTS]:
        if values[b] > 0:
            found = problem.lp(int(b))
            if found > seconds:
                seconds, moment = found, int(b)
    return RecomputeBound(seconds, moment, int(floor))


def step_time_lower_bound(graph: TrainingGraph, cost_model: CostModel, budget_bytes: int) -> float:
    """No schedule of ``graph`` that fits ``budget_bytes`` takes less than this step time (seconds;
    ``inf``: none fits): store-all's step (every op once) plus ``recompute_lower_bound``."""
    base = float(np.asarray(cost_model.op_times(graph), dtype=np.float64).sum())
    return base + recompute_lower_bound(graph, cost_model, budget_bytes).seconds


@dataclass(frozen=True)
class _MomentProblem:
    """The graph as the arrays the compiled moment code reads."""

    arrays: tuple

    @staticmethod
    def of(graph: TrainingGraph, cost_model: CostModel, budget_bytes: int) -> "_MomentProblem":
        ops = graph.op_arrays
        producer = np.array([-1 if t.producer is None else t.producer for t in graph.tensors], dtype=np.int64)
        consumer_ptr, consumer_idx = _consumers(graph)
        resident_storage = np.zeros(len(graph.storages), dtype=np.bool_)
        resident_storage[list(graph.resident_storages)] = True
        return _MomentProblem((
            ops["in_ptr"], ops["in_idx"], ops["out_ptr"], ops["out_idx"], ops["is_backward"], consumer_ptr,
            consumer_idx, producer, graph.tensor_storage, graph.storage_bytes, resident_storage, _allocators(graph),
            np.asarray(cost_model.op_times(graph), dtype=np.float64),
            np.asarray(cost_model.workspace_bytes(graph), dtype=np.int64), graph.resident_bytes, budget_bytes))

    def lp(self, b: int) -> float:
        """The whole LP at b's moment (seconds; ``inf`` if infeasible). Times are scaled to their
        largest and bytes to the room left, so that HiGHS's tolerances are relative."""
        from scipy.optimize import linprog

        cost, rows, cols, values, upper, room = _moment_lp(b, *self.arrays)
        if room < 0:
            return np.inf
        if not len(cost):
            return 0.0  # nothing to recompute, and the sure part fits
        scale = max(float(cost.max(initial=0.0)), 1e-300)
        values = values.astype(np.float64)
        memory = rows == 0
        values[memory] /= max(room, 1)
        upper = upper.astype(np.float64)
        upper[0] = room / max(room, 1)
        matrix = sparse.csr_matrix((values, (rows, cols)), shape=(len(upper), len(cost)))
        result = linprog(cost / scale, A_ub=matrix, b_ub=upper, bounds=(0, 1), method="highs")
        if result.status == 2:
            return np.inf
        # any other status (an iteration limit) proves nothing: the knapsack's bound stands
        return float(result.fun) * scale * (1 - LP_MARGIN) if result.status == 0 else 0.0


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
def _mark_moment(b, ancestor, descendant, sure, wanted, stack, items, in_ptr, in_idx, out_ptr, out_idx, is_backward,
                 consumer_ptr, consumer_idx, producer, tensor_storage, storage_bytes, resident_storage, allocator):
    """Marks (with ``b + 1``) b's ancestors and descendants, the storages live for sure at its step and those a
    descendant reads whose allocator is a forward ancestor (``wanted``; listed in ``items``, a
    storage maybe sure as well). Returns the bytes live for sure beyond resident memory and the
    workspace, and how many items. O(ops + edges)."""
    mark = b + 1
    stack[0], top = b, 1  # ancestors: every op b depends on (b itself unmarked: the graph is a DAG)
    while top > 0:
        top -= 1
        i = stack[top]
        for k in range(in_ptr[i], in_ptr[i + 1]):
            q = producer[in_idx[k]]
            if q >= 0 and ancestor[q] != mark:
                ancestor[q] = mark
                stack[top] = q
                top += 1
    held = 0  # b's inputs and outputs are live while it runs
    for k in range(in_ptr[b], in_ptr[b + 1]):
        held += _claim(tensor_storage[in_idx[k]], mark, sure, storage_bytes, resident_storage)
    for k in range(out_ptr[b], out_ptr[b + 1]):
        held += _claim(tensor_storage[out_idx[k]], mark, sure, storage_bytes, resident_storage)
    # descendants: every op that depends on b, and what they read (from b: its reads are sure already)
    stack[0], top = b, 1
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
    return held, n_items


@numba.njit(cache=True)
def _claim(s, mark, sure, storage_bytes, resident_storage):
    """Mark storage s live for sure; the bytes that adds (0 if resident or marked already)."""
    if resident_storage[s] or sure[s] == mark:
        return 0
    sure[s] = mark
    return storage_bytes[s]


@numba.njit(cache=True)
def _scratch(n_ops, n_storages):
    """The mark arrays and stacks ``_mark_moment`` fills."""
    return (np.zeros(n_ops, dtype=np.int64), np.zeros(n_ops, dtype=np.int64), np.zeros(n_storages, dtype=np.int64),
            np.zeros(n_storages, dtype=np.int64), np.empty(n_ops, dtype=np.int64), np.empty(n_storages, dtype=np.int64))


@numba.njit(cache=True)
def _knapsacks(in_ptr, in_idx, out_ptr, out_idx, is_backward, consumer_ptr, consumer_idx, producer, tensor_storage,
               storage_bytes, resident_storage, allocator, times, workspace, resident_bytes, budget):
    """The knapsack bound of every backward op's moment (seconds; 0 for forward ops), and the
    most any moment holds for sure (resident memory included)."""
    n_ops = len(in_ptr) - 1
    ancestor, descendant, sure, wanted, stack, items = _scratch(n_ops, len(storage_bytes))
    freed = np.zeros(n_ops, dtype=np.int64)  # bytes each allocator frees at this moment
    values = np.zeros(n_ops, dtype=np.float64)
    floor = resident_bytes
    for b in range(n_ops):
        if not is_backward[b]:
            continue
        mark = b + 1
        held, n_items = _mark_moment(b, ancestor, descendant, sure, wanted, stack, items, in_ptr, in_idx, out_ptr,
                                     out_idx, is_backward, consumer_ptr, consumer_idx, producer, tensor_storage,
                                     storage_bytes, resident_storage, allocator)
        held += resident_bytes + workspace[b]
        floor = max(floor, held)
        need = held - budget
        ops = np.empty(n_items, dtype=np.int64)
        n_groups = 0
        for j in range(n_items):  # group what is wanted, not live for sure, by its allocator
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
            left = need
            for j in np.argsort(ratio):
                if left <= 0:
                    break
                w = freed[ops[j]]
                value += times[ops[j]] * (left / w if w > left else 1.0)
                left -= w
            if left > 0:
                value = np.inf  # even recomputing everything leaves this moment over the budget
        for j in range(n_groups):
            freed[ops[j]] = 0
        values[b] = value
    return values, floor


@numba.njit(cache=True)
def _moment_lp(b, in_ptr, in_idx, out_ptr, out_idx, is_backward, consumer_ptr, consumer_idx, producer,
               tensor_storage, storage_bytes, resident_storage, allocator, times, workspace, resident_bytes, budget):
    """The LP of b's moment as ``min cost.x, A x <= upper`` in COO form, with columns y (forward
    ancestors) then z (storages a forward ancestor allocates, not live for sure, not empty); row
    0 is memory, its right side ``room`` (bytes; negative: the sure part alone is over)."""
    n_ops = len(in_ptr) - 1
    n_storages = len(storage_bytes)
    ancestor, descendant, sure, wanted, stack, items = _scratch(n_ops, n_storages)
    mark = b + 1
    held, n_items = _mark_moment(b, ancestor, descendant, sure, wanted, stack, items, in_ptr, in_idx, out_ptr,
                                 out_idx, is_backward, consumer_ptr, consumer_idx, producer, tensor_storage,
                                 storage_bytes, resident_storage, allocator)
    room = budget - held - resident_bytes - workspace[b]
    column = np.full(n_ops + n_storages, -1, dtype=np.int64)  # ops, then storages
    cost = []
    for p in range(n_ops):
        if ancestor[p] == mark and not is_backward[p]:
            column[p] = len(cost)
            cost.append(times[p])
    for s in range(n_storages):
        p = allocator[s]
        if p >= 0 and column[p] >= 0 and sure[s] != mark and not resident_storage[s] and storage_bytes[s] > 0:
            column[n_ops + s] = len(cost)
            cost.append(0.0)
    rows, cols, values, upper = [0], [0], [0], [room]  # a zero entry keeps the memory row's shape
    for s in range(n_storages):
        if column[n_ops + s] >= 0:
            rows.append(0)
            cols.append(column[n_ops + s])
            values.append(storage_bytes[s])
    for j in range(n_items):  # a descendant reads s: live at b, or its allocator runs again
        s = items[j]
        if column[n_ops + s] >= 0:
            row = len(upper)
            rows.extend([row, row])
            cols.extend([column[n_ops + s], column[allocator[s]]])
            values.extend([-1, -1])
            upper.append(-1)
    for q in range(n_ops):  # q runs again after b: what it reads is live at b, or made again
        if column[q] < 0:
            continue
        for k in range(in_ptr[q], in_ptr[q + 1]):
            s = tensor_storage[in_idx[k]]
            if column[n_ops + s] >= 0:
                row = len(upper)
                rows.extend([row, row, row])
                cols.extend([column[n_ops + s], column[allocator[s]], column[q]])
                values.extend([-1, -1, 1])
                upper.append(0)
    return (np.array(cost), np.array(rows), np.array(cols), np.array(values, dtype=np.int64),
            np.array(upper, dtype=np.int64), room)
