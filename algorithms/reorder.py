"""Greedy operator reordering: the same computations in an order with a lower peak.

List scheduling over the compute *instances* of a schedule (a recomputed op is a separate
instance). Each step runs, among the instances whose inputs are ready, the one that changes live
memory the least: the bytes it allocates (outputs someone reads) minus the bytes it frees (storages
of which it is the last remaining reader). What each instance reads is kept exactly as in the
original schedule, and the order of what must not move is pinned:
- the forward and the backward are reordered separately around the loss, which stays in place;
- random ops keep their order (each draws the next numbers from the RNG stream);
- gradients of one parameter keep their order (floating-point accumulation order);
- a recomputation of an op comes after every reader of its previous value, views of it included.
The simulator replays the result; the reordered schedule is returned only if its peak is lower.
``backward_rank`` runs the same list scheduling on store-all's backward, with the ops reading
forward values pinned in graph order too, as the order hierarchical planning's blocks run their
backward in (``blocks``).

Complexity: O((instances + reads) log instances) with a lazily updated heap.
"""
from __future__ import annotations

import heapq
from collections import defaultdict

import numpy as np

from planner.cost import CostModel, default_cost_model
from planner.graph import Phase, TrainingGraph
from planner.schedule import Compute, Schedule
from planner.simulator import simulate


class _InstanceGraph:
    """Compute instances with their exact reads, dependencies and storage instances."""

    def __init__(self, graph: TrainingGraph, computes: list[Compute]):
        self.graph = graph
        self.computes = computes
        n = len(computes)
        self.successors: list[set[int]] = [set() for _ in range(n)]
        self.storage_bytes: list[int] = []
        self.readers: list[set[int]] = []  # storage instance -> instances reading it
        self.allocates: list[list[int]] = [[] for _ in range(n)]  # instance -> storage instances it creates
        self.reads: list[set[int]] = [set() for _ in range(n)]  # instance -> storage instances it reads
        current: dict[int, tuple[int, int | None]] = {}  # tensor -> (producing instance, storage instance)
        previous_instance: dict[int, int] = {}  # op -> its latest instance
        value_readers: dict[int, set[int]] = defaultdict(set)  # instance -> instances reading its outputs
        recomputations: list[tuple[int, int]] = []  # (previous instance, recomputation)
        for i, compute in enumerate(computes):
            op = graph.ops[compute.op]
            input_storage: dict[int, int | None] = {}
            for tensor in op.inputs:
                if graph.is_resident(tensor):
                    continue
                producer, storage = current[tensor]
                self._edge(producer, i)
                value_readers[producer].add(i)
                input_storage[graph.tensors[tensor].storage] = storage
                if storage is not None:
                    self.reads[i].add(storage)
            if compute.op in previous_instance:  # recomputation: after every reader of the old value
                for reader in value_readers[previous_instance[compute.op]]:
                    self._edge(reader, i)
                recomputations.append((previous_instance[compute.op], i))
            previous_instance[compute.op] = i
            for tensor in op.outputs:
                storage_id = graph.tensors[tensor].storage
                if storage_id in graph.resident_storages:
                    current[tensor] = (i, None)
                elif storage_id in input_storage:  # a view: same storage instance as its base
                    current[tensor] = (i, input_storage[storage_id])
                else:
                    current[tensor] = (i, len(self.storage_bytes))
                    self.storage_bytes.append(int(graph.storage_bytes[storage_id]))
                    self.readers.append(set())
                    self.allocates[i].append(current[tensor][1])
        for i, storages in enumerate(self.reads):
            for storage in storages:
                self.readers[storage].add(i)
        # ... and after every reader of a view of it: the old storage must be gone first
        for previous, i in recomputations:
            for storage in self.allocates[previous]:
                for reader in self.readers[storage]:
                    self._edge(reader, i)
        self._pin_order(graph)

    def pin_forward_readers(self, section) -> None:
        """Keep the order, within ``section``, of the instances reading a forward value or a
        view of one (computed in ``section``), as ``computes`` has them."""
        graph = self.graph
        touching: set[int] = set()  # tensors made in the section that stand for forward values
        previous = None
        for i in section:
            op = graph.ops[self.computes[i].op]
            reads_forward = False
            for tensor in op.inputs:
                if graph.tensors[tensor].storage in graph.resident_storages:  # weights and their views
                    continue
                producer = graph.tensors[tensor].producer
                if tensor in touching or (producer is not None and graph.ops[producer].phase is Phase.FORWARD):
                    reads_forward = True
            if reads_forward:
                if op.is_view:
                    touching.update(op.outputs)
                if previous is not None:
                    self._edge(previous, i)
                previous = i

    def _edge(self, before: int, after: int) -> None:
        if before != after:
            self.successors[before].add(after)

    def _pin_order(self, graph: TrainingGraph) -> None:
        seen_ops: set[int] = set()
        last_random = None
        last_gradient_of: dict[int, int] = {}
        for i, compute in enumerate(self.computes):
            op = graph.ops[compute.op]
            first = compute.op not in seen_ops
            seen_ops.add(compute.op)
            if op.is_random and first:
                if last_random is not None:
                    self._edge(last_random, i)
                last_random = i
            for tensor in op.outputs:
                if tensor in graph.gradients:
                    parameter = graph.gradients[tensor]
                    if parameter in last_gradient_of:
                        self._edge(last_gradient_of[parameter], i)
                    last_gradient_of[parameter] = i


def _greedy_order(instances: _InstanceGraph, section: list[int], remaining: list[int]) -> list[int]:
    """List-schedule the instances of one section; ``remaining`` counts unfinished readers per
    storage instance (shared across sections, so later sections' reads keep tensors alive)."""
    members = set(section)
    rank = {i: k for k, i in enumerate(section)}
    waiting = {i: 0 for i in section}
    for i in section:
        for successor in instances.successors[i]:
            if successor in members:
                waiting[successor] += 1

    def delta(i: int) -> int:
        allocated = sum(instances.storage_bytes[s] for s in instances.allocates[i] if instances.readers[s])
        freed = sum(instances.storage_bytes[s] for s in instances.reads[i] if remaining[s] == 1)
        return allocated - freed

    heap = [(delta(i), rank[i], i) for i in section if waiting[i] == 0]
    heapq.heapify(heap)
    stamp = {i: d for d, _, i in heap}
    order, done = [], set()
    while heap:
        d, _, i = heapq.heappop(heap)
        if i in done or stamp.get(i) != d:
            continue
        done.add(i)
        order.append(i)
        touched = set()
        for storage in instances.reads[i]:
            remaining[storage] -= 1
            if remaining[storage] == 1:
                touched.update(r for r in instances.readers[storage] if r in stamp and r not in done)
        for successor in instances.successors[i]:
            if successor in members:
                waiting[successor] -= 1
                if waiting[successor] == 0:
                    touched.add(successor)
        for j in touched:
            if waiting[j] == 0 and j not in done:
                stamp[j] = delta(j)
                heapq.heappush(heap, (stamp[j], rank[j], j))
    if len(order) != len(section):
        raise AssertionError("reorder: dependency cycle")  # cannot happen: the original order is valid
    return order


def _greedy(graph: TrainingGraph, computes: list[Compute], pinned_backward: bool = False) -> list[int] | None:
    """Positions of ``computes`` in the greedy order (forward and backward each list-scheduled,
    the loss in place); None without a loss. With ``pinned_backward``, the backward instances that
    read forward values (or backward views of them) also keep their order."""
    loss_positions = [i for i, c in enumerate(computes) if graph.ops[c.op].in_loss]
    if not loss_positions:
        return None
    instances = _InstanceGraph(graph, computes)
    first, last = loss_positions[0], loss_positions[-1]
    if pinned_backward:
        instances.pin_forward_readers(range(last + 1, len(computes)))
    remaining = [len(r) for r in instances.readers]
    forward = _greedy_order(instances, list(range(first)), remaining)
    for i in range(first, last + 1):
        for storage in instances.reads[i]:
            remaining[storage] -= 1
    backward = _greedy_order(instances, list(range(last + 1, len(computes))), remaining)
    return forward + list(range(first, last + 1)) + backward


def reorder_schedule(graph: TrainingGraph, schedule: Schedule, cost_model: CostModel | None = None) -> Schedule:
    """``schedule`` with its forward and backward reordered greedily for a lower peak; the
    original if the simulator finds no improvement."""
    cost_model = cost_model or default_cost_model(graph)
    computes = schedule.computes
    order = _greedy(graph, computes)
    if order is None:
        return schedule
    candidate = Schedule.from_order(graph, [computes[i] for i in order])
    if simulate(graph, candidate, cost_model).peak_bytes < simulate(graph, schedule, cost_model).peak_bytes:
        return candidate
    return schedule


def backward_rank(graph: TrainingGraph) -> np.ndarray:
    """Per op, its position in the greedy order of store-all's backward (-1 for forward ops, and
    for every op of a graph without a loss), for planners that fix a backward order of their own
    and recompute forward values on demand (``blocks``): an order that frees what the backward
    reads sooner than the graph's (a weight gradient before the input gradient, so that the
    activation it reads goes first). The ops reading forward values (or backward views of them)
    keep the graph's order among themselves, so they ask for recomputations, and retake views of
    recomputed values, in the sequence the graph's order does; only the ops between them move."""
    computes = Schedule.store_all(graph).computes
    rank = np.full(len(graph.ops), -1, dtype=np.int64)
    order = _greedy(graph, computes, pinned_backward=True)
    if order is not None:
        backward = [computes[i].op for i in order if graph.ops[computes[i].op].phase is Phase.BACKWARD]
        rank[backward] = np.arange(len(backward))
    return rank


def reorder(graph: TrainingGraph, cost_model: CostModel, budget_bytes: int) -> Schedule:
    """Reordering alone, applied to the store-all schedule (no recomputation)."""
    return reorder_schedule(graph, Schedule.store_all(graph), cost_model)
