"""DP checkpoint search on arbitrary graphs: the cheapest recomputation that fits the budget.

The model's forward ops, in topological order, are cut into consecutive segments (any prefix of a
topological order is a lower set, so a cut may fall anywhere: inside a residual block, between two
branches; no segment is frozen). Tensors that cross a cut are kept; the last segment is kept
whole; inside every other segment, the backward recomputes exactly the ops whose outputs it needs
(the on-demand mechanism of ``keepset.schedule_keeping``). Among all segmentations, the DP finds
the one of least recompute time whose modelled memory fits.

Memory model, per segment (b, e]: while its backward runs, the tensors kept at earlier cuts are
held (``A``, accumulated along the segmentation) plus the segment's local peak: the backward
visits the segment from its end, so at op p the saved tensors of positions up to p are held and
p's gradients are in flight (output, input, and the parameters it reads). The model is an estimate; the
returned schedule is always replayed by the simulator, and the DP's memory limit is bisected
against simulated peaks until the best schedule found fits the real budget.

Complexity: tables O(n^2 + n*E) for n forward ops and E edges; DP O(n^2 * Q) with Q memory
buckets; a few DP runs per plan. ResNet-50 (231 forward ops): well under a second.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numba
import numpy as np

from planner.cost import CostModel
from planner.graph import TrainingGraph
from planner.schedule import Schedule
from planner.simulator import simulate
from planner.algorithms.keepset import model_forward_ops, schedule_keeping
from planner.algorithms.reorder import reorder_schedule
from planner.algorithms.result import rank

MEMORY_BUCKETS = 256
LIMIT_SEARCH_STEPS = 10
_INF = np.inf


@dataclass(frozen=True)
class SegmentTables:
    """Per-segment quantities of the DP, indexed [b, e] for the segment of positions (b, e]."""

    ops: np.ndarray  # op id at each position 1..n (index 0 unused)
    recompute_time: np.ndarray  # float64 [n+1, n+1]
    local_bytes: np.ndarray  # int64 [n+1, n+1]: held while the segment is recomputed and differentiated
    carry_bytes: np.ndarray  # int64 [n+1, n+1]: held by the segment during every later segment's backward
    last_local_bytes: np.ndarray  # int64 [n+1]: local bytes when (b, n] is the kept last segment
    crosses_to: np.ndarray  # int64 [n+1]: last position consuming each position's outputs


def segment_tables(graph: TrainingGraph, cost_model: CostModel) -> SegmentTables:
    """Positional arrays of the forward ops, then the O(n^2) tables (numba).

    Bytes are counted per output tensor: an op's output read only by the next forward op (a
    BatchNorm's normalized output) is not held for the backward, while its small saved
    statistics are.
    """
    ops = model_forward_ops(graph)
    n = len(ops)
    position = {op: i + 1 for i, op in enumerate(ops)}
    times = cost_model.op_times(graph)
    pos_time = np.zeros(n + 2, dtype=np.float64)
    backward_bytes = np.zeros(n + 2, dtype=np.int64)  # outputs the backward reads
    forward_bytes = np.zeros(n + 2, dtype=np.int64)  # outputs later forward ops read
    transient = np.zeros(n + 2, dtype=np.int64)  # largest output (its gradient, and its input's)
    parameter_grads = np.zeros(n + 2, dtype=np.int64)  # bytes of the parameter gradients its backward makes
    crosses_to = np.zeros(n + 2, dtype=np.int64)
    read_by_backward = np.zeros(n + 2, dtype=np.bool_)
    consumers: list[list[int]] = [[] for _ in range(n + 2)]
    gets_gradient = {param for param in graph.gradients.values()}
    for op, p in position.items():
        pos_time[p] = times[op]
        # the backward of this op produces the gradients of the parameters it reads
        parameter_grads[p] = sum(int(graph.storage_bytes[graph.tensors[t].storage]) for t in graph.ops[op].inputs
                         if t in gets_gradient)
        if graph.ops[op].is_view:
            continue  # views own no bytes; their storage is counted with its owner
        for tensor in graph.ops[op].outputs:
            nbytes = int(graph.storage_bytes[graph.tensors[tensor].storage])
            transient[p] = max(transient[p], nbytes)
            read_forward = read_backward = False
            for consumer in _consumers_through_views(graph, tensor):
                if consumer in position:
                    read_forward = True
                    consumers[p].append(position[consumer])
                    crosses_to[p] = max(crosses_to[p], position[consumer])
                elif graph.ops[consumer].phase.value == "forward":  # the loss reads it after the model
                    read_forward = True
                    crosses_to[p] = n + 1
                else:
                    read_backward = True
            backward_bytes[p] += nbytes if read_backward else 0
            forward_bytes[p] += nbytes if read_forward else 0
            read_by_backward[p] |= read_backward
    pointer = np.zeros(n + 3, dtype=np.int64)
    pointer[1:] = np.cumsum([len(c) for c in consumers])
    flat = np.array([c for cs in consumers for c in cs], dtype=np.int64)
    in_flight = 2 * transient + parameter_grads  # backward transients at each position
    recompute, local, carry, last_local = _tables(
        n, backward_bytes, forward_bytes, in_flight, pos_time, crosses_to, read_by_backward, pointer, flat)
    return SegmentTables(np.array([-1] + ops, dtype=np.int64), recompute, local, carry, last_local, crosses_to)


def _consumers_through_views(graph: TrainingGraph, tensor: int) -> list[int]:
    """Ops reading ``tensor`` directly or through a chain of views of it."""
    found, pending = [], [tensor]
    while pending:
        for consumer in graph.tensors[pending.pop()].consumers:
            op = graph.ops[consumer]
            if op.is_view:
                pending.extend(op.outputs)
            else:
                found.append(consumer)
    return found


@numba.njit(cache=True)
def _tables(n, backward_bytes, forward_bytes, in_flight, pos_time, crosses_to, read_by_backward, pointer, flat):
    """For every segment end e, passes over positions p <= e:

    1. (descending, consumers first) which ops the backward must recompute: those read by a
       backward op, or by an op it recomputes, unless their outputs cross e (then they are kept);
    2. what the recomputation reads from before the segment (``inputs``: held from the forward
       until the segment is recomputed), via a difference array over the segment start b;
    3. the local peak: the backward visits the segment from its end, so at op p the saved
       tensors of positions up to p are held, and p's gradients are in flight (``in_flight``:
       twice its largest output, for its output's and input's gradients, plus the gradients of
       the parameters it reads).

    ``carry[b, e]`` is what the segment adds to the memory held during the backward of every
    later segment: its recomputation inputs and its kept tensors that the backward reads.
    """
    recompute = np.zeros((n + 1, n + 1), dtype=np.float64)
    local = np.zeros((n + 1, n + 1), dtype=np.int64)
    carry = np.zeros((n + 1, n + 1), dtype=np.int64)
    last_local = np.zeros(n + 1, dtype=np.int64)
    needed = np.zeros(n + 2, dtype=np.bool_)
    held = np.zeros(n + 2, dtype=np.int64)
    prefix = np.zeros(n + 2, dtype=np.int64)
    reach = np.zeros(n + 2, dtype=np.int64)  # last needed consumer position of each producer
    inputs = np.zeros(n + 2, dtype=np.int64)
    for e in range(1, n + 1):
        time_sum = 0.0
        kept_read = 0
        reach[:] = 0
        for p in range(e, 0, -1):
            crossing = crosses_to[p] > e
            need = False
            if not crossing:
                need = read_by_backward[p]
                k = pointer[p]
                while not need and k < pointer[p + 1]:
                    c = flat[k]
                    need = c <= e and needed[c]
                    k += 1
            needed[p] = need
            held[p] = backward_bytes[p] if (crossing or need) else 0
            if crossing:
                kept_read += backward_bytes[p]
                if e == n:  # read by the loss: held from the forward until the loss runs
                    held[p] = max(backward_bytes[p], forward_bytes[p])
            elif need:
                time_sum += pos_time[p]
            recompute[p - 1, e] = time_sum
            carry[p - 1, e] = kept_read
        # producers q feeding a recomputed op (q < c <= e): held while the segment start b is in [q, c)
        for q in range(1, e + 1):
            k = pointer[q]
            while k < pointer[q + 1]:
                c = flat[k]
                if c <= e and needed[c] and c > reach[q]:
                    reach[q] = c
                k += 1
        inputs[:] = 0
        for q in range(1, e + 1):
            if reach[q] > q:
                inputs[q] += forward_bytes[q]
                inputs[reach[q]] -= forward_bytes[q]
        running = 0
        for b in range(0, e):
            running += inputs[b]
            carry[b, e] += running
            local[b, e] = running
        for p in range(1, e + 1):
            prefix[p] = prefix[p - 1] + held[p]
        top = -1
        for p in range(e, 0, -1):
            top = max(top, prefix[p] + in_flight[p])
            local[p - 1, e] += top - prefix[p - 1]
        if e == n:  # the last segment is kept from the forward: everything the backward reads
            for p in range(1, n + 1):
                prefix[p] = prefix[p - 1] + max(held[p], backward_bytes[p])
            top = -1
            for p in range(n, 0, -1):
                top = max(top, prefix[p] + in_flight[p])
                last_local[p - 1] = top - prefix[p - 1]
    return recompute, local, carry, last_local


@numba.njit(cache=True)
def _best_segmentation(n, recompute, local, carry_buckets, last_local, limit, bucket):
    """Cuts of least recompute time such that, for every segment, (bytes carried by earlier
    segments) + (its local bytes) <= limit. Returns the cut positions (ending with n), or an
    empty array. State: (last cut, carried bytes in buckets)."""
    levels = int(limit // bucket) + 1
    cost = np.full((n + 1, levels), np.inf)
    parent_b = np.full((n + 1, levels), -1, dtype=np.int64)
    parent_a = np.full((n + 1, levels), -1, dtype=np.int64)
    cost[0, 0] = 0.0
    best, best_b, best_a = np.inf, -1, -1
    for b in range(n):
        for a in range(levels):
            c = cost[b, a]
            if c == np.inf:
                continue
            held = a * bucket
            if held + last_local[b] <= limit and c < best:
                best, best_b, best_a = c, b, a
            for e in range(b + 1, n):
                if held + local[b, e] > limit:
                    continue
                na = a + carry_buckets[b, e]
                if na >= levels:
                    continue
                nc = c + recompute[b, e]
                if nc < cost[e, na]:
                    cost[e, na] = nc
                    parent_b[e, na] = b
                    parent_a[e, na] = a
    if best_b < 0:
        return np.zeros(0, dtype=np.int64)
    cuts = [n]
    b, a = best_b, best_a
    while b > 0:
        cuts.append(b)
        b, a = parent_b[b, a], parent_a[b, a]
    return np.array(cuts[::-1], dtype=np.int64)


def kept_ops_for_cuts(tables: SegmentTables, cuts: np.ndarray) -> list[int]:
    """Ops kept by a segmentation: those whose outputs cross a cut, and the whole last segment."""
    kept, start = [], 0
    for end in cuts:
        for p in range(start + 1, end + 1):
            if end == cuts[-1] or tables.crosses_to[p] > end:
                kept.append(int(tables.ops[p]))
        start = end
    return kept


def bucket_size(activation_limit: float) -> float:
    """The DP's memory unit at a limit: carried bytes are rounded up to whole buckets."""
    return max(activation_limit / MEMORY_BUCKETS, 1.0)


def evaluate_cuts(tables: SegmentTables, cuts, activation_limit: float) -> tuple[float, bool]:
    """The DP's objective for one segmentation, computed directly: (recompute time, fits the
    limit under the DP's memory model and rounding). For checking the DP against brute force."""
    bucket = bucket_size(activation_limit)
    n = len(tables.ops) - 1
    carried, start, time, fits = 0, 0, 0.0, True
    for end in cuts:
        held = carried * bucket
        if end == n:
            fits &= held + tables.last_local_bytes[start] <= activation_limit
        else:
            fits &= held + tables.local_bytes[start, end] <= activation_limit
            carried += int(np.ceil(tables.carry_bytes[start, end] / bucket))
            fits &= carried < int(activation_limit // bucket) + 1
            time += tables.recompute_time[start, end]
        start = end
    return time, bool(fits)


def best_cuts(tables: SegmentTables, activation_limit: float) -> np.ndarray | None:
    """The DP at one memory limit (bytes beyond resident memory); None if nothing fits."""
    n = len(tables.ops) - 1
    if activation_limit <= 0:
        return None
    bucket = bucket_size(activation_limit)
    carry_buckets = np.ceil(tables.carry_bytes / bucket).astype(np.int64)
    cuts = _best_segmentation(n, tables.recompute_time, tables.local_bytes, carry_buckets,
                              tables.last_local_bytes, float(activation_limit), float(bucket))
    return cuts if len(cuts) else None


def search(graph: TrainingGraph, cost_model: CostModel, budget_bytes: int,
           polish: Callable[[TrainingGraph, Schedule, CostModel], Schedule] | None = None) -> Schedule:
    """Least-recompute segmentation whose simulated peak fits ``budget_bytes``.

    The DP's memory model is an estimate, so its limit is searched: bisection on the limit, each
    step one DP run plus one simulation (of the schedule after ``polish``, e.g. reordering),
    keeping the fastest schedule whose simulated peak fits. If none fits, the lowest-peak schedule
    found is returned (``plan`` then reports the budget infeasible with that peak).
    """
    tables = segment_tables(graph, cost_model)
    activation_budget = float(budget_bytes - graph.resident_bytes)
    low, high = 0.0, max(2.0 * activation_budget, float(tables.last_local_bytes[0]))
    limit = activation_budget
    best, best_key, seen = None, None, {}
    for _ in range(LIMIT_SEARCH_STEPS):
        cuts = best_cuts(tables, limit) if limit > 0 else None
        if cuts is None:
            low, limit = limit, (limit + high) / 2
            continue
        key_cuts = tuple(int(c) for c in cuts)
        if key_cuts not in seen:
            schedule = schedule_keeping(graph, kept_ops_for_cuts(tables, cuts))
            if polish is not None:
                schedule = polish(graph, schedule, cost_model)
            seen[key_cuts] = (schedule, simulate(graph, schedule, cost_model))
        schedule, result = seen[key_cuts]
        key = rank(result, budget_bytes)
        if best_key is None or key < best_key:
            best, best_key = schedule, key
        if key[0] == 0:
            low = limit
        else:
            high = limit
        limit = (low + high) / 2
    return best if best is not None else schedule_keeping(graph, [])


def dp(graph: TrainingGraph, cost_model: CostModel, budget_bytes: int) -> Schedule:
    """The DP checkpoint search alone (graph order, no reordering)."""
    return search(graph, cost_model, budget_bytes)


def dp_reorder(graph: TrainingGraph, cost_model: CostModel, budget_bytes: int) -> Schedule:
    """The DP checkpoint search, judging each candidate after greedy reordering: fast mode's core."""
    return search(graph, cost_model, budget_bytes, polish=reorder_schedule)


def dp_memory(graph: TrainingGraph, cost_model: CostModel, budget_bytes: int) -> Schedule:
    """Memory-only DP, in the spirit of Feng & Huang's optimal gradient checkpointing: the
    segmentation of least simulated peak, whatever its recompute time (``budget_bytes`` unused).

    Bisects the DP's limit down to the smallest one it can meet; the schedule with the lowest
    simulated peak seen wins. A comparison point for ``dp``, which spends memory to save time.
    """
    tables = segment_tables(graph, cost_model)
    low, high = 0.0, float(tables.last_local_bytes[0])
    best, best_key = None, None
    for _ in range(LIMIT_SEARCH_STEPS + 4):
        limit = (low + high) / 2
        cuts = best_cuts(tables, limit)
        if cuts is None:
            low = limit
            continue
        high = limit
        schedule = schedule_keeping(graph, kept_ops_for_cuts(tables, cuts))
        key = rank(simulate(graph, schedule, cost_model), 0)  # fitting nothing: by peak, then time
        if best_key is None or key < best_key:
            best, best_key = schedule, key
    return best if best is not None else schedule_keeping(graph, [])
