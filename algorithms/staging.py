"""The staged view of a training step that exact mode optimises over.

The forward runs once, in graph order. The backward ops run once each, in a fixed order (the
hierarchy's block order by default, ``block_backward_order``: the order fast mode's plans run
them in); the ones that read forward tensors are *stages*. Before each stage, forward *nodes*
may be recomputed. A node is a group of forward ops treated as one unit:

- a view joins the node that owns its storage (a view costs nothing and allocates nothing);
- an op q joins its producer p when nobody else, forward or backward, reads the storages of p
  that q reads, and q allocates no more than those (ReLU after BatchNorm, the residual add and
  ReLU after a block's last BatchNorm). Holding p's output instead of q's would cost as much
  memory and extra recomputation. The claim this gives up: p's *other* outputs (a BatchNorm's
  saved statistics) can only be recomputed together with q, so "optimal" means optimal over
  schedules that recompute such a pair together. Without this fusion ResNet-50 has ~30k
  binaries instead of ~22k, and HiGHS proves far less in 60 s.

What a node holds for later is split into *groups*: its storages, by the op that makes them and
the ops and stages that read them (a BatchNorm's normalised output and its small saved statistics
are different groups, so keeping the statistics does not keep the activation). All storages of
a group are made, read and freed together, so one set of variables tells their memory exactly.

The recomputations before a stage run as *positions*: every node's ops, nodes in topological
order, ops in graph order. Per position the problem knows which groups it makes and reads and
the bytes the node holds only inside itself (``position_transient``), so the MILP can follow
memory op by op through a recomputation phase, freeing each value after its last reader, as
``Schedule.from_order`` does.

Backward memory that does not depend on the plan (gradients in flight, each op's outputs and
workspace) is read off the simulator's replay of the store-all staged schedule (its
``part_timeline`` over the storages the backward owns): since the backward order is fixed, it is
the same for every staged schedule. The MILP (``milp.py``) adds the plan-dependent part.

Backward views of forward tensors (``detach`` of a saved activation) are emitted right before
their first reader; while such an alias lives, its storage must stay and cannot be recomputed.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Sequence

import numpy as np

from planner.cost import CostModel
from planner.graph import TrainingGraph
from planner.schedule import Compute, Schedule
from planner.simulator import simulate


@dataclass(frozen=True)
class Group:
    node: int
    size: int  # bytes (resident storages count zero)
    storages: tuple[int, ...]
    producer: int  # position of the op that makes its storages
    readers: tuple[int, ...]  # positions of the forward ops that read it (its own node's included)
    forward_readers: tuple[int, ...]  # nodes outside the owner that read it
    stage_readers: tuple[int, ...]  # stages that read it


@dataclass(frozen=True)
class Node:
    ops: tuple[int, ...]  # graph order
    start: int  # position of its first op
    groups: tuple[int, ...]  # group ids
    input_groups: tuple[int, ...]  # groups of other nodes it reads
    time: float  # seconds to (re)compute every op of the node
    recomputable: bool  # the loss is never recomputed


@dataclass(frozen=True)
class StagedProblem:
    """Everything the MILP needs, in bytes and seconds, with no solver in it."""

    graph: TrainingGraph
    nodes: tuple[Node, ...]  # topological order
    groups: tuple[Group, ...]
    positions: tuple[int, ...]  # forward op at each position: the nodes' ops, node after node
    position_node: np.ndarray  # node of each position
    position_is_view: np.ndarray  # a view allocates nothing: no memory row there
    position_transient: np.ndarray  # bytes the node holds only inside itself while this op runs, workspace included
    backward_order: tuple[int, ...]  # the order the backward ops run in
    stage_ops: tuple[int, ...]  # backward op of each stage
    stage_reads: tuple[tuple[int, ...], ...]  # groups each stage op reads
    tails: tuple[tuple[int, ...], ...]  # backward ops after stage k that read no forward group
    prefix: tuple[int, ...]  # backward ops before the first stage (read no forward group)
    lazy_views: dict[int, int]  # backward view of a forward storage -> the op it is emitted before
    stage_fixed_before: np.ndarray  # backward-owned bytes live when stage k starts
    stage_fixed_during: np.ndarray  # ... while the stage op runs (its outputs, workspace)
    tail_fixed: np.ndarray  # max over stage k's tails (index K: the prefix) of backward-owned bytes
    forward_rows: tuple[tuple[int, tuple[int, ...], tuple[int, ...]], ...]
    # per forward op: (fixed bytes, groups certainly live, groups live only if kept after the forward)
    alias_held: tuple[tuple[int, int, int], ...]  # (group, first stage, last stage) an alias pins
    last_useful: np.ndarray  # per group: last stage it can still serve (-1: none)
    node_last_useful: np.ndarray  # per node: last stage a recomputation of it can serve
    base_time: float  # every op computed once
    resident_bytes: int

    @property
    def n_stages(self) -> int:
        return len(self.stage_ops)

    @cached_property
    def node_of_op(self) -> dict[int, int]:
        return {op: n for n, node in enumerate(self.nodes) for op in node.ops}

    def order(self, recompute: np.ndarray) -> list[int]:
        """The op order of the staged schedule that recomputes node f before stage k where
        ``recompute[k, f]``."""
        return staged_order(self.graph, [n.ops for n in self.nodes], self.stage_ops, self.tails, self.prefix,
                            self.lazy_views, recompute)

    def schedule(self, recompute: np.ndarray) -> Schedule:
        return Schedule.from_order(self.graph, self.order(recompute))

    def recomputations(self, schedule: Schedule) -> np.ndarray | None:
        """``recompute[k, f]`` for a schedule whose first ``len(forward_ops)`` computes are the
        forward, each op once (in any order: the staged forward runs them in graph order), and
        that then recomputes between backward ops: node f counts as recomputed before stage k if
        its first op is recomputed after the stage op before k in the schedule's own order (a
        schedule that recomputes only the tail of a node, from the first op's kept output, maps
        to keeping the node, which holds no more and recomputes less). Recomputations that can
        serve no later stage are dropped. None if the schedule does not start with the forward."""
        computes = [s.op for s in schedule.steps if isinstance(s, Compute)]
        n_forward = len(self.graph.forward_ops)
        if sorted(computes[:n_forward]) != list(self.graph.forward_ops):
            return None
        recompute = np.zeros((self.n_stages, len(self.nodes)), dtype=bool)
        stage_of = {op: k for k, op in enumerate(self.stage_ops)}
        pending: list[int] = []
        for op in computes[n_forward:]:
            if op in stage_of:
                k = stage_of[op]
                recompute[k, [f for f in pending if self.node_last_useful[f] >= k]] = True
                pending = []
            elif op in self.node_of_op and self.nodes[self.node_of_op[op]].ops[0] == op:
                pending.append(self.node_of_op[op])
        return recompute

    def minimal_keep(self, recompute: np.ndarray) -> np.ndarray:
        """``keep[k, g]``: group g held when stage k starts (``k = 0``: kept after the forward),
        the least that ``recompute`` needs: held where read, or read by a recomputation, or
        carried to a later stage, unless its node is recomputed there; aliases pin theirs."""
        keep = np.zeros((self.n_stages + 1, len(self.groups)), dtype=bool)
        pinned = np.zeros_like(keep)
        for g, first, last in self.alias_held:
            pinned[first + 1: last + 1, g] = True
        node_of_group = np.array([g.node for g in self.groups], dtype=np.int64)
        for k in reversed(range(self.n_stages)):
            needed = keep[k + 1].copy()
            needed[list(self.stage_reads[k])] = True
            for f in np.flatnonzero(recompute[k]):
                needed[list(self.nodes[f].input_groups)] = True
            keep[k] = (needed & ~recompute[k][node_of_group]) | pinned[k]
        return keep[: self.n_stages]


def staged_order(graph: TrainingGraph, node_ops, stage_ops, tails, prefix, lazy_views: dict[int, int],
                 recompute: np.ndarray) -> list[int]:
    """Forward in graph order; then per stage: recomputed nodes (topological order), the stage
    op with the backward views it reads emitted right before it, then its tails."""
    pending: dict[int, list[int]] = {}
    for view, reader in lazy_views.items():
        pending.setdefault(reader, []).append(view)
    emitted: set[int] = set()
    order = list(graph.forward_ops)

    def emit(op: int) -> None:
        for view in pending.get(op, ()):
            if view not in emitted:
                emit(view)
        emitted.add(op)
        order.append(op)

    for op in prefix:
        emit(op)
    for k, stage_op in enumerate(stage_ops):
        for f in np.flatnonzero(recompute[k]):
            order.extend(node_ops[f])
        emit(stage_op)
        for op in tails[k]:
            emit(op)
    return order


def block_backward_order(graph: TrainingGraph) -> tuple[int, ...]:
    """The backward order of hierarchical plans: the loss's backward, then each block's backward
    ops (in the block's own order, ``blocks._assign_backward``) from the last block to the first
    (``blocks.partition``)."""
    from planner.algorithms.blocks import partition

    blocks = partition(graph).blocks
    return tuple(blocks[-1].backward_ops) + tuple(op for block in reversed(blocks[:-1]) for op in block.backward_ops)


def build_problem(graph: TrainingGraph, cost_model: CostModel,
                  backward_order: Sequence[int] | None = None) -> StagedProblem:
    """Coarsen ``graph`` into nodes and groups, find the stages of ``backward_order`` (graph
    order if None; it must be a topological order of the backward ops), and read the fixed
    memory off the simulator.

    Complexity: O(ops + edges) plus one store-all simulation.
    """
    times = np.asarray(cost_model.op_times(graph), dtype=np.float64)
    workspace = np.asarray(cost_model.workspace_bytes(graph), dtype=np.int64)
    sizes = graph.storage_bytes.copy()
    sizes[list(graph.resident_storages)] = 0  # held by every schedule: no variable's business
    readers = _readers_of_storage(graph)
    forward = _coarsen(graph, sizes, readers)
    stages = _stages(graph, backward_order, forward.storage_node)
    groups, internal = _groups(graph, forward, stages, readers, sizes)
    group_of_storage = {s: g for g, group in enumerate(groups) for s in group.storages}
    nodes = _nodes(graph, forward, groups, group_of_storage, times)
    last_useful, node_last = _usefulness(nodes, groups)
    before, during, tail_fixed = _backward_profile(graph, cost_model, forward, stages)
    return StagedProblem(
        graph=graph, nodes=nodes, groups=groups, positions=tuple(forward.positions),
        position_node=np.repeat(np.arange(len(nodes)), [len(ops) for ops in forward.node_list]),
        position_is_view=forward.position_is_view(graph), position_transient=_transient(graph, forward, workspace, internal),
        backward_order=tuple(stages.backward), stage_ops=tuple(stages.stage_ops),
        stage_reads=tuple(tuple(sorted({group_of_storage[s] for s in _forward_reads(graph, op, forward.storage_node)}))
                          for op in stages.stage_ops),
        tails=tuple(tuple(t) for t in stages.tails), prefix=tuple(stages.prefix), lazy_views=stages.lazy_views,
        stage_fixed_before=before, stage_fixed_during=during, tail_fixed=tail_fixed,
        forward_rows=_forward_rows(graph, list(graph.forward_ops), group_of_storage, forward.storage_node, sizes,
                                   workspace),
        alias_held=_aliases(graph, stages, group_of_storage), last_useful=last_useful, node_last_useful=node_last,
        base_time=float(times.sum()), resident_bytes=graph.resident_bytes)


def _readers_of_storage(graph: TrainingGraph) -> dict[int, list[int]]:
    """Storage -> the ops (forward and backward, graph order) that read a tensor living in it."""
    readers: dict[int, list[int]] = {}
    for op in graph.ops:
        for tensor in op.inputs:
            readers.setdefault(graph.tensors[tensor].storage, []).append(op.id)
    return readers


@dataclass(frozen=True)
class _Forward:
    """The forward coarsened into nodes (topological order, ops in graph order in each)."""

    node_list: list[list[int]]
    owner_op: dict[int, int]  # storage -> forward op that allocated it (or first viewed it)

    @cached_property
    def node_of_op(self) -> dict[int, int]:
        return {op: n for n, ops in enumerate(self.node_list) for op in ops}

    @cached_property
    def storage_node(self) -> dict[int, int]:
        return {s: self.node_of_op[o] for s, o in self.owner_op.items()}

    @cached_property
    def positions(self) -> list[int]:
        return [op for ops in self.node_list for op in ops]

    @cached_property
    def position_of(self) -> dict[int, int]:
        return {op: p for p, op in enumerate(self.positions)}

    def position_is_view(self, graph: TrainingGraph) -> np.ndarray:
        return np.array([graph.ops[op].is_view for op in self.positions], dtype=bool)


class _UnionFind:
    """Forward ops joined into nodes: each root's members, path-halving ``find``."""

    def __init__(self, n_ops: int, forward: Sequence[int]):
        self.parent = list(range(n_ops))
        self.members: dict[int, set[int]] = {op: {op} for op in forward}

    def find(self, x: int) -> int:
        parent = self.parent
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(self, op: int, root: int) -> None:
        old = self.find(op)
        if old != root:
            self.parent[old] = root
            self.members[root] |= self.members.pop(old)


def _coarsen(graph: TrainingGraph, sizes: np.ndarray, readers_of_storage: dict[int, list[int]]) -> _Forward:
    """Nodes: a view joins the node of its storage's owner; an op joins the node of a producer
    whose storages it alone reads (``_join_exclusive_consumers``). Nodes in topological order."""
    forward = list(graph.forward_ops)
    resident = graph.resident_storages
    owner_op: dict[int, int] = {}
    for op_id in forward:
        for tensor in graph.ops[op_id].outputs:
            if graph.tensors[tensor].storage not in resident:
                owner_op.setdefault(graph.tensors[tensor].storage, op_id)
    nodes = _UnionFind(len(graph.ops), forward)
    for op_id in forward:
        op = graph.ops[op_id]
        owner = owner_op.get(graph.tensors[op.outputs[0]].storage)
        if op.is_view and owner is not None:
            nodes.union(op_id, nodes.find(owner))
    _join_exclusive_consumers(graph, nodes, owner_op, sizes, readers_of_storage)
    node_ops: dict[int, list[int]] = {}
    for op_id in forward:
        node_ops.setdefault(nodes.find(op_id), []).append(op_id)
    return _Forward(_topological(graph, list(node_ops.values()), nodes.find), owner_op)


def _join_exclusive_consumers(graph: TrainingGraph, nodes: _UnionFind, owner_op: dict[int, int], sizes: np.ndarray,
                              readers_of_storage: dict[int, list[int]]) -> None:
    """An op joins a producer's node when no one else reads the producer's storages it reads, it
    allocates no more than those, and the merge makes no cycle (module docstring). Graph order."""
    forward = graph.forward_ops
    resident = graph.resident_storages
    find = nodes.find
    allocated = {op_id: [s for s in {graph.tensors[t].storage for t in graph.ops[op_id].outputs}
                         if owner_op.get(s) == op_id and s not in resident] for op_id in forward}
    for op_id in forward:
        op = graph.ops[op_id]
        if op.is_view or op.in_loss:
            continue
        producers = {find(owner_op[graph.tensors[t].storage]) for t in op.inputs
                     if graph.tensors[t].storage in owner_op and graph.tensors[t].storage not in resident}
        for p in sorted(producers):
            if graph.ops[p].in_loss:
                continue
            members = nodes.members[p]
            read = {graph.tensors[t].storage for t in op.inputs} & {s for o in members for s in allocated[o]}
            exclusive = read and all(r in members or r == op_id or graph.ops[r].is_view and find(r) == p
                                     for s in read for r in readers_of_storage[s])
            if exclusive and sizes[allocated[op_id]].sum() <= sizes[list(read)].sum() \
                    and not _reaches(graph, members, producers - {p}, find):
                nodes.union(op_id, p)
                break


@dataclass(frozen=True)
class _Stages:
    """The backward in ``backward`` order: stage ops (they read forward storages), the ops after
    each stage (``tails``) or before the first (``prefix``), and backward views of forward
    storages, emitted lazily right before their first reader (``lazy_views``)."""

    backward: list[int]
    stage_ops: list[int]
    tails: list[list[int]]
    prefix: list[int]
    lazy_views: dict[int, int]  # view -> the op it is emitted before

    @cached_property
    def stage_of(self) -> dict[int, int]:
        return {op: k for k, op in enumerate(self.stage_ops)}


def _forward_reads(graph: TrainingGraph, op_id: int, storage_node: dict[int, int]) -> set[int]:
    """The forward storages op ``op_id`` reads."""
    return {graph.tensors[t].storage for t in graph.ops[op_id].inputs} & storage_node.keys()


def _stages(graph: TrainingGraph, backward_order: Sequence[int] | None, storage_node: dict[int, int]) -> _Stages:
    """Stages, tails and lazy views of the backward in ``backward_order`` (graph order if None)."""
    backward = list(graph.backward_ops) if backward_order is None else [int(op) for op in backward_order]
    if sorted(backward) != list(graph.backward_ops):
        raise ValueError("backward_order must list every backward op once")
    backward_position = {op: i for i, op in enumerate(backward)}
    lazy_views: dict[int, int] = {}
    for op_id in reversed(backward):
        op = graph.ops[op_id]
        if op.is_view and _forward_reads(graph, op_id, storage_node):
            readers = [c for t in op.outputs for c in graph.tensors[t].consumers]
            if readers:
                lazy_views[op_id] = min(readers, key=backward_position.__getitem__)
    stage_ops = [o for o in backward if o not in lazy_views and _forward_reads(graph, o, storage_node)]
    stage_of = {op: k for k, op in enumerate(stage_ops)}
    tails: list[list[int]] = [[] for _ in stage_ops]
    prefix: list[int] = []
    current = -1
    for op_id in backward:
        if op_id in stage_of:
            current = stage_of[op_id]
        elif op_id not in lazy_views:
            (tails[current] if current >= 0 else prefix).append(op_id)
    return _Stages(backward, stage_ops, tails, prefix, lazy_views)


def _groups(graph: TrainingGraph, forward: _Forward, stages: _Stages, readers_of_storage: dict[int, list[int]],
            sizes: np.ndarray) -> tuple[tuple[Group, ...], list[tuple[int, int, int]]]:
    """A node's storages grouped by their maker and their readers (positions and stages), and
    the storages no one outside their node reads: (first position, last position, bytes) held
    inside the node."""
    is_forward = ~graph.op_arrays["is_backward"]
    node_of_op, position_of, stage_of = forward.node_of_op, forward.position_of, stages.stage_of
    group_key: dict[tuple, list[int]] = {}
    internal: list[tuple[int, int, int]] = []
    for storage, n in forward.storage_node.items():
        readers = readers_of_storage.get(storage, ())
        reader_positions = tuple(sorted({position_of[r] for r in readers if is_forward[r]}))
        outside = any(node_of_op[r] != n for r in readers if is_forward[r])
        stage_readers = tuple(sorted({stage_of[r] for r in readers if r in stage_of}))
        made = position_of[forward.owner_op[storage]]
        if outside or stage_readers:
            group_key.setdefault((n, made, reader_positions, stage_readers), []).append(storage)
        else:
            internal.append((made, max((made,) + reader_positions), int(sizes[storage])))
    groups = []
    for (n, made, reader_positions, stage_readers), storages in sorted(group_key.items()):
        outside = sorted({node_of_op[forward.positions[p]] for p in reader_positions} - {n})
        groups.append(Group(node=n, size=int(sizes[storages].sum()), storages=tuple(sorted(storages)),
                            producer=made, readers=reader_positions, forward_readers=tuple(outside),
                            stage_readers=stage_readers))
    return tuple(groups), internal


def _transient(graph: TrainingGraph, forward: _Forward, workspace: np.ndarray,
               internal: list[tuple[int, int, int]]) -> np.ndarray:
    """Per position: the workspace and the node-internal bytes live while that op runs (none at a view)."""
    transient = np.asarray(workspace[forward.positions], dtype=np.int64).copy()
    for first, last, n_bytes in internal:
        transient[first: last + 1] += n_bytes
    transient[forward.position_is_view(graph)] = 0
    return transient


def _nodes(graph: TrainingGraph, forward: _Forward, groups: tuple[Group, ...], group_of_storage: dict[int, int],
           times: np.ndarray) -> tuple[Node, ...]:
    nodes = []
    start = 0
    for n, ops in enumerate(forward.node_list):
        own = tuple(g for g, group in enumerate(groups) if group.node == n)
        inputs = {group_of_storage[graph.tensors[t].storage] for op in ops for t in graph.ops[op].inputs
                  if graph.tensors[t].storage in group_of_storage} - set(own)
        nodes.append(Node(ops=tuple(ops), start=start, groups=own, input_groups=tuple(sorted(inputs)),
                          time=float(times[list(ops)].sum()),
                          recomputable=not any(graph.ops[o].in_loss for o in ops)))
        start += len(ops)
    return tuple(nodes)


def _usefulness(nodes: tuple[Node, ...], groups: tuple[Group, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The last stage a group can serve (read there, or by a recomputation that serves a later
    one), and the last a recomputation of a node can serve; -1 for none. Nodes in reverse
    topological order, so readers are settled first."""
    last_useful = np.full(len(groups), -1, dtype=np.int64)
    node_last = np.full(len(nodes), -1, dtype=np.int64)
    for n in reversed(range(len(nodes))):
        for g in nodes[n].groups:
            group = groups[g]
            reach = [max(group.stage_readers, default=-1)] + [int(node_last[r]) for r in group.forward_readers]
            last_useful[g] = max(reach)
        if nodes[n].recomputable:
            node_last[n] = max((int(last_useful[g]) for g in nodes[n].groups), default=-1)
    return last_useful, node_last


def _aliases(graph: TrainingGraph, stages: _Stages, group_of_storage: dict[int, int]) -> tuple[tuple[int, int, int], ...]:
    """(group, first stage, last stage): a backward view of a forward storage pins its group from
    its first to its last reader (through views of views)."""
    def reader_stages(view: int) -> list[int]:
        readers = [c for t in graph.ops[view].outputs for c in graph.tensors[t].consumers]
        return [k for r in readers for k in (reader_stages(r) if r in stages.lazy_views else [stages.stage_of[r]])]

    held = []
    for view in stages.lazy_views:
        storage = graph.tensors[graph.ops[view].outputs[0]].storage
        found = reader_stages(view)
        if storage in group_of_storage and found:
            held.append((group_of_storage[storage], min(found), max(found)))
    return tuple(held)


def _reaches(graph: TrainingGraph, sources: set[int], targets: set[int], find) -> bool:
    """Whether any op in a node of ``targets`` depends on an op in ``sources`` (a merge would
    then make a cycle)."""
    if not targets:
        return False
    seen, pending = set(sources), list(sources)
    while pending:
        op = graph.ops[pending.pop()]
        for tensor in op.outputs:
            for consumer in graph.tensors[tensor].consumers:
                if graph.ops[consumer].phase is op.phase and consumer not in seen:
                    if find(consumer) in targets:
                        return True
                    seen.add(consumer)
                    pending.append(consumer)
    return False


def _topological(graph: TrainingGraph, node_list: list[list[int]], find) -> list[list[int]]:
    """Nodes in a topological order of the node graph (ties by first op)."""
    import heapq

    root_of = {find(ops[0]): i for i, ops in enumerate(node_list)}
    successors: list[set[int]] = [set() for _ in node_list]
    indegree = [0] * len(node_list)
    for i, ops in enumerate(node_list):
        for op in ops:
            for tensor in graph.ops[op].outputs:
                for consumer in graph.tensors[tensor].consumers:
                    j = root_of.get(find(consumer)) if graph.ops[consumer].phase is graph.ops[op].phase else None
                    if j is not None and j != i and j not in successors[i]:
                        successors[i].add(j)
                        indegree[j] += 1
    ready = [(ops[0], i) for i, ops in enumerate(node_list) if indegree[i] == 0]
    heapq.heapify(ready)
    ordered = []
    while ready:
        _, i = heapq.heappop(ready)
        ordered.append(sorted(node_list[i]))
        for j in successors[i]:
            indegree[j] -= 1
            if indegree[j] == 0:
                heapq.heappush(ready, (node_list[j][0], j))
    if len(ordered) != len(node_list):
        raise AssertionError("node graph has a cycle")  # _reaches prevents this
    return ordered


def _backward_profile(graph: TrainingGraph, cost_model: CostModel, forward: _Forward,
                      stages: _Stages) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Backward-owned bytes (neither forward storages nor resident) around every backward op of
    the store-all staged schedule, the part of backward memory no plan changes, read off the
    simulator (``part_timeline``): (before each stage op, while it runs, the most while a tail
    runs: index K is the prefix). While an op runs means its outputs allocated, workspace on top."""
    order = staged_order(graph, forward.node_list, stages.stage_ops, stages.tails, stages.prefix, stages.lazy_views,
                         np.zeros((len(stages.stage_ops), len(forward.node_list)), dtype=bool))
    schedule = Schedule.from_order(graph, order)
    backward_owned = np.ones(len(graph.storages), dtype=bool)
    backward_owned[list(graph.resident_storages)] = False
    backward_owned[list(forward.storage_node)] = False
    owned = simulate(graph, schedule, cost_model, part=backward_owned).part_timeline
    is_compute, index = schedule.arrays
    steps = np.flatnonzero(is_compute)
    ops = index[steps]
    after = owned[steps]  # after the op's outputs are allocated
    before = np.where(steps > 0, owned[np.maximum(steps - 1, 0)], 0)
    running = after + np.asarray(cost_model.workspace_bytes(graph), dtype=np.int64)[ops]
    n_stages = len(stages.stage_ops)
    step_of_op = dict(zip(ops.tolist(), range(len(ops))))  # backward ops run once: one compute each
    stage_steps = np.array([step_of_op[op] for op in stages.stage_ops], dtype=np.int64)
    tail_fixed = np.zeros(n_stages + 1, dtype=np.int64)
    for k, tail in enumerate([*stages.tails, stages.prefix]):
        if tail:
            tail_fixed[k] = running[[step_of_op[op] for op in tail]].max()
    return before[stage_steps].astype(np.int64), running[stage_steps].astype(np.int64), tail_fixed


def _forward_rows(graph: TrainingGraph, forward: list[int], group_of_storage: dict[int, int],
                  storage_node: dict[int, int], sizes: np.ndarray, workspace: np.ndarray):
    """Memory while each forward op runs, split into bytes every schedule holds there, groups
    still in forward use (held), and groups past their last forward use (held if kept)."""
    position = {op: i for i, op in enumerate(forward)}
    last_forward_use: dict[int, int] = {}
    produced_at: dict[int, int] = {}
    for op in forward:
        for tensor in graph.ops[op].outputs:
            storage = graph.tensors[tensor].storage
            if storage not in storage_node:
                continue
            produced_at.setdefault(storage, position[op])
            uses = [position[c] for c in graph.tensors[tensor].consumers if c in position]
            last_forward_use[storage] = max([last_forward_use.get(storage, position[op])] + uses)
    rows = []
    by_group_last: dict[int, int] = {}
    for storage, g in group_of_storage.items():
        by_group_last[g] = max(by_group_last.get(g, -1), last_forward_use[storage])
    for i, op in enumerate(forward):
        if graph.ops[op].is_view:
            continue
        fixed = int(workspace[op])
        held, kept = set(), set()
        for storage, start in produced_at.items():
            if start > i:
                continue
            g = group_of_storage.get(storage)
            if g is None:
                if last_forward_use[storage] >= i:
                    fixed += int(sizes[storage])
            elif by_group_last[g] >= i:
                held.add(g)
            else:
                kept.add(g)
        rows.append((fixed, tuple(sorted(held)), tuple(sorted(kept))))
    return tuple(rows)
