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
workspace) is read off one replay of the store-all schedule: since the backward order is fixed,
it is the same for every staged schedule. The MILP (``milp.py``) adds the plan-dependent part.

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
    ops (graph order inside a block) from the last block to the first (``blocks.partition``)."""
    from planner.algorithms.blocks import partition

    blocks = partition(graph).blocks
    return tuple(blocks[-1].backward_ops) + tuple(op for block in reversed(blocks[:-1]) for op in block.backward_ops)


def build_problem(graph: TrainingGraph, cost_model: CostModel,
                  backward_order: Sequence[int] | None = None) -> StagedProblem:
    """Coarsen ``graph`` into nodes and groups, find the stages of ``backward_order`` (graph
    order if None; it must be a topological order of the backward ops), and replay the fixed
    memory.

    Complexity: O(ops + edges) plus one store-all replay.
    """
    times = np.asarray(cost_model.op_times(graph), dtype=np.float64)
    workspace = np.asarray(cost_model.workspace_bytes(graph), dtype=np.int64)
    storage_bytes = graph.storage_bytes
    resident = graph.resident_storages

    def size(storage: int) -> int:
        return 0 if storage in resident else int(storage_bytes[storage])

    forward = list(graph.forward_ops)
    is_forward = np.zeros(len(graph.ops), dtype=bool)
    is_forward[forward] = True
    readers_of_storage: dict[int, list[int]] = {}
    for op in graph.ops:
        for tensor in op.inputs:
            readers_of_storage.setdefault(graph.tensors[tensor].storage, []).append(op.id)

    # ---- nodes: views join their storage's owner; exclusive consumers join their producer ----
    owner_op: dict[int, int] = {}  # storage -> forward op that allocated it (or first viewed it)
    for op_id in forward:
        op = graph.ops[op_id]
        for tensor in op.outputs:
            if graph.tensors[tensor].storage not in resident:
                owner_op.setdefault(graph.tensors[tensor].storage, op_id)
    parent = list(range(len(graph.ops)))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    members_of: dict[int, set[int]] = {op: {op} for op in forward}

    def union(op: int, root: int) -> None:
        old = find(op)
        if old != root:
            parent[old] = root
            members_of[root] |= members_of.pop(old)

    for op_id in forward:
        op = graph.ops[op_id]
        owner = owner_op.get(graph.tensors[op.outputs[0]].storage)
        if op.is_view and owner is not None:
            union(op_id, find(owner))
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
            members = members_of[p]
            read = {graph.tensors[t].storage for t in op.inputs} & {s for o in members for s in allocated[o]}
            exclusive = read and all(r in members or r == op_id or graph.ops[r].is_view and find(r) == p
                                     for s in read for r in readers_of_storage[s])
            others = producers - {p}
            if exclusive and sum(size(s) for s in allocated[op_id]) <= sum(size(s) for s in read) \
                    and not _reaches(graph, members, others, find):
                union(op_id, p)
                break

    node_ops: dict[int, list[int]] = {}
    for op_id in forward:
        node_ops.setdefault(find(op_id), []).append(op_id)
    node_list = _topological(graph, list(node_ops.values()), find)
    node_index = {find(ops[0]): i for i, ops in enumerate(node_list)}
    node_of_op = {op: node_index[find(op)] for op in forward}
    storage_node = {s: node_of_op[o] for s, o in owner_op.items()}
    positions = [op for ops in node_list for op in ops]
    position_of = {op: p for p, op in enumerate(positions)}
    starts = np.cumsum([0] + [len(ops) for ops in node_list])[:-1]

    # ---- stages: backward ops reading forward storages; views of them are emitted lazily ----
    backward = list(graph.backward_ops) if backward_order is None else [int(op) for op in backward_order]
    if sorted(backward) != list(graph.backward_ops):
        raise ValueError("backward_order must list every backward op once")
    backward_position = {op: i for i, op in enumerate(backward)}

    def forward_storages(op_id: int) -> set[int]:
        return {graph.tensors[t].storage for t in graph.ops[op_id].inputs} & storage_node.keys()

    lazy_views: dict[int, int] = {}
    for op_id in reversed(backward):
        op = graph.ops[op_id]
        if op.is_view and forward_storages(op_id):
            readers = [c for t in op.outputs for c in graph.tensors[t].consumers]
            if readers:
                lazy_views[op_id] = min(readers, key=backward_position.__getitem__)
    stage_ops = [o for o in backward if o not in lazy_views and forward_storages(o)]
    stage_of = {op: k for k, op in enumerate(stage_ops)}
    tails: list[list[int]] = [[] for _ in stage_ops]
    prefix: list[int] = []
    current = -1
    for op_id in backward:
        if op_id in stage_of:
            current = stage_of[op_id]
        elif op_id not in lazy_views:
            (tails[current] if current >= 0 else prefix).append(op_id)

    # ---- groups: a node's storages by their maker and their readers ----
    group_key: dict[tuple, list[int]] = {}
    internal: list[tuple[int, int, int]] = []  # (first position, last position, bytes) held inside a node
    for storage, n in storage_node.items():
        readers = readers_of_storage.get(storage, ())
        reader_positions = tuple(sorted({position_of[r] for r in readers if is_forward[r]}))
        outside = any(node_of_op[r] != n for r in readers if is_forward[r])
        stage_readers = tuple(sorted({stage_of[r] for r in readers if r in stage_of}))
        made = position_of[owner_op[storage]]
        if outside or stage_readers:
            group_key.setdefault((n, made, reader_positions, stage_readers), []).append(storage)
        else:
            internal.append((made, max((made,) + reader_positions), size(storage)))
    groups = []
    for (n, made, reader_positions, stage_readers), storages in sorted(group_key.items()):
        outside = sorted({node_of_op[positions[p]] for p in reader_positions} - {n})
        groups.append(Group(node=n, size=sum(size(s) for s in storages), storages=tuple(sorted(storages)),
                            producer=made, readers=reader_positions, forward_readers=tuple(outside),
                            stage_readers=stage_readers))
    group_of_storage = {s: g for g, group in enumerate(groups) for s in group.storages}
    stage_reads = tuple(tuple(sorted({group_of_storage[s] for s in forward_storages(op)})) for op in stage_ops)

    position_is_view = np.array([graph.ops[op].is_view for op in positions], dtype=bool)
    transient = np.asarray(workspace[positions], dtype=np.int64).copy()
    for first, last, n_bytes in internal:
        transient[first: last + 1] += n_bytes
    transient[position_is_view] = 0

    nodes = []
    for n, ops in enumerate(node_list):
        own = tuple(g for g, gr in enumerate(groups) if gr.node == n)
        inputs = {group_of_storage[graph.tensors[t].storage] for op in ops for t in graph.ops[op].inputs
                  if graph.tensors[t].storage in group_of_storage} - set(own)
        nodes.append(Node(ops=tuple(ops), start=int(starts[n]), groups=own, input_groups=tuple(sorted(inputs)),
                          time=float(times[list(ops)].sum()),
                          recomputable=not any(graph.ops[o].in_loss for o in ops)))

    # ---- usefulness: the last stage a group (or a recomputation of a node) can serve ----
    last_useful = np.full(len(groups), -1, dtype=np.int64)
    node_last = np.full(len(nodes), -1, dtype=np.int64)
    for n in reversed(range(len(nodes))):
        for g in nodes[n].groups:
            group = groups[g]
            reach = [max(group.stage_readers, default=-1)] + [int(node_last[r]) for r in group.forward_readers]
            last_useful[g] = max(reach)
        if nodes[n].recomputable:
            node_last[n] = max((int(last_useful[g]) for g in nodes[n].groups), default=-1)

    # ---- aliases: a backward view of a forward storage pins it from its first to its last reader ----
    def view_reader_stages(view: int) -> list[int]:
        readers = [c for t in graph.ops[view].outputs for c in graph.tensors[t].consumers]
        return [k for r in readers for k in (view_reader_stages(r) if r in lazy_views else [stage_of[r]])]

    alias_held = []
    for view in lazy_views:
        storage = graph.tensors[graph.ops[view].outputs[0]].storage
        reader_stages = view_reader_stages(view)
        if storage in group_of_storage and reader_stages:
            alias_held.append((group_of_storage[storage], min(reader_stages), max(reader_stages)))

    store_all_order = staged_order(graph, node_list, stage_ops, tails, prefix, lazy_views,
                                   np.zeros((len(stage_ops), len(node_list)), dtype=bool))
    before, during, tail_fixed = _backward_profile(graph, store_all_order, storage_node, workspace, stage_of,
                                                   tails, prefix)
    forward_rows = _forward_rows(graph, forward, group_of_storage, storage_node, size, workspace)
    return StagedProblem(
        graph=graph, nodes=tuple(nodes), groups=tuple(groups), positions=tuple(positions),
        position_node=np.repeat(np.arange(len(nodes)), [len(ops) for ops in node_list]),
        position_is_view=position_is_view, position_transient=transient, backward_order=tuple(backward),
        stage_ops=tuple(stage_ops), stage_reads=stage_reads, tails=tuple(tuple(t) for t in tails),
        prefix=tuple(prefix), lazy_views=lazy_views, stage_fixed_before=before, stage_fixed_during=during,
        tail_fixed=tail_fixed, forward_rows=forward_rows, alias_held=tuple(alias_held), last_useful=last_useful,
        node_last_useful=node_last, base_time=float(times.sum()), resident_bytes=graph.resident_bytes)


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


def _backward_profile(graph: TrainingGraph, order: list[int], storage_node: dict[int, int],
                      workspace: np.ndarray, stage_of: dict[int, int], tails, prefix):
    """Backward-owned bytes (not forward storages, not resident) around every backward op of
    the store-all staged schedule: the part of backward memory no plan changes."""
    schedule = Schedule.from_order(graph, order)
    resident = graph.resident_storages
    refs: dict[int, int] = {}
    memory = 0
    n_stages = len(stage_of)
    before = np.zeros(n_stages, dtype=np.int64)
    during = np.zeros(n_stages, dtype=np.int64)
    tail_fixed = np.zeros(n_stages + 1, dtype=np.int64)
    tail_stage = {op: k for k, ops in enumerate(tails) for op in ops}
    tail_stage.update({op: n_stages for op in prefix})
    counted = lambda s: s not in resident and s not in storage_node  # noqa: E731
    for step in schedule.steps:
        if isinstance(step, Compute):
            op = graph.ops[step.op]
            if op.phase.value != "backward":
                continue
            if step.op in stage_of:
                before[stage_of[step.op]] = memory
            for tensor in op.outputs:
                storage = graph.tensors[tensor].storage
                if counted(storage):
                    refs[storage] = refs.get(storage, 0) + 1
                    if refs[storage] == 1:
                        memory += int(graph.storage_bytes[storage])
            running = memory + int(workspace[step.op])
            if step.op in stage_of:
                during[stage_of[step.op]] = running
            elif step.op in tail_stage:
                k = tail_stage[step.op]
                tail_fixed[k] = max(tail_fixed[k], running)
        else:
            storage = graph.tensors[step.tensor].storage
            if counted(storage):
                refs[storage] -= 1
                if refs[storage] == 0:
                    memory -= int(graph.storage_bytes[storage])
    return before, during, tail_fixed


def _forward_rows(graph: TrainingGraph, forward: list[int], group_of_storage: dict[int, int],
                  storage_node: dict[int, int], size, workspace: np.ndarray):
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
                    fixed += size(storage)
            elif by_group_last[g] >= i:
                held.add(g)
            else:
                kept.add(g)
        rows.append((fixed, tuple(sorted(held)), tuple(sorted(kept))))
    return tuple(rows)
