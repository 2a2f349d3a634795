"""Per-block options: what a block's forward keeps, what its backward recomputes, and their cost.

A block's backward reads some of its forward's storages. Each non-view forward op that makes
such a storage is a *candidate*: kept (its saved tensors stay from the forward to the backward)
or recomputed in the backward, on demand, from the block's input and whatever is kept (the
mechanism of ``keepset.schedule_keeping``, inside one block). A subset of candidates is an
option, and a few numbers say all the chain DP needs to know about it, measured by replaying
the block alone (``_replay``, the simulator's storage accounting on the block's ops):

- ``forward_peak``: the peak of the block's own storages while its forward runs;
- ``kept``: what stays when the forward ends (kept saved tensors and the block's output);
- ``backward_peak``: the peak while its backward runs, from the kept tensors and the incoming
  gradients to the outgoing ones;
- ``time``: its forward (the ops the kept set and the output need) plus its backward and the
  recomputation in it; ``leaf_forward_peak`` and ``leaf_time`` the same for a leaf pass, whose
  forward skips the output (the blocks after it are done).

A block's output is its checkpoint and its spanning storages (``blocks.SPANNING``, read beyond
the next block); a soft pass drops and recomputes the checkpoint only.

Candidate sets are enumerated exhaustively up to ``EXHAUSTIVE_CANDIDATES`` candidates (4096
options, each a compiled replay of the block's ops); larger blocks get a greedy family (drop
the candidate whose recomputation costs least time per byte freed, one at a time, and its
mirror from nothing kept). Only options no other option beats on all four numbers are kept
(the Pareto set), at most ``MAX_OPTIONS`` of them.

Every memory figure excludes what the chain accounts for outside the block: resident memory,
the block's input checkpoint, long-lived storages and gradients merely passing through.

Complexity per distinct block: O(2^c x (ops + edges)) for c <= 12 candidates, else
O(c^2 x (ops + edges)).
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numba
import numpy as np

from planner.algorithms.blocks import (
    BACKWARD_LOCAL, CHECKPOINT, FRONTIER, INTERNAL, SPANNING, Block, BlockChain,
)
from planner.graph import TrainingGraph

EXHAUSTIVE_CANDIDATES = 13
COMPOSITE_CANDIDATES = 8  # a joined block with more candidates combines its parts' options
PART_OPTIONS = 8  # of each part's trade-off between kept memory and time, spread over it
MAX_OPTIONS = 32
TINY_SHARE = 100  # a candidate under 1/100 of the block's keepable bytes is always kept
SHORTCUT_RATIO = 2.0

# storage roles inside one block's replay
EXTERNAL, LOCAL, OUTPUT, INCOMING, OUTGOING = range(5)


@dataclass(frozen=True)
class LocalBlock:
    """One block's ops, tensors and storages as arrays over local ids (forward ops first)."""

    ops: np.ndarray  # global op id per local op
    n_forward: int
    in_ptr: np.ndarray
    in_idx: np.ndarray  # local tensor ids
    out_ptr: np.ndarray
    out_idx: np.ndarray
    op_time: np.ndarray
    op_workspace: np.ndarray
    op_is_view: np.ndarray
    tensor_storage: np.ndarray  # local storage ids
    tensor_producer: np.ndarray  # local forward op, or -1 (made outside, or a backward tensor)
    tensor_valid: np.ndarray  # readable without computing anything: made outside the block or pinned
    tensor_output: np.ndarray  # part of the block's output: its checkpoint and spanning storages
    tensor_spanning: np.ndarray  # part of a spanning storage (read beyond the next block)
    storage_bytes: np.ndarray  # counted bytes (0 for what the chain accounts for)
    storage_role: np.ndarray
    storage_tensor_ptr: np.ndarray  # storage -> its tensors (CSR), to drop views of a recomputed base
    storage_tensor_idx: np.ndarray
    candidates: np.ndarray  # local forward ops
    candidate_ptr: np.ndarray  # candidate -> tensors it keeps (CSR)
    candidate_idx: np.ndarray
    candidate_bytes: np.ndarray
    n_free: int  # candidates[:n_free] are chosen by the options; the rest are always kept
    forward_all: bool  # the loss: its forward runs whole, nothing in it is recomputed
    key: str

    @property
    def n_candidates(self) -> int:
        return len(self.candidates)


@dataclass(frozen=True)
class BlockOptions:
    """The Pareto set of one block's options (rows) and its checkpoint-only forward."""

    masks: np.ndarray  # int64 bit masks over the block's candidates
    forward_peak: np.ndarray  # int64 bytes
    kept: np.ndarray
    backward_peak: np.ndarray
    time: np.ndarray  # float64 seconds: the forward part plus the backward and its recomputation
    first_forward_peak: np.ndarray  # int64: forward peak in the first forward, where every op runs
    backward_time: np.ndarray  # float64: the backward and its recomputation alone
    output_time: np.ndarray  # float64: recomputing the block's output from the kept tensors and input
    # (inf where the option keeps the output)
    checkpoint_forward_peak: int  # forward computing only the block's output from its input
    checkpoint_forward_time: float
    first_forward_time: float  # every forward op of the block, as the first forward runs them
    first_checkpoint_peak: int  # the first forward's peak keeping only the output
    leaf_forward_peak: np.ndarray  # int64: forward peak of a leaf pass, which skips the output
    leaf_time: np.ndarray  # float64: ``time`` of a leaf pass


def local_block(graph: TrainingGraph, chain: BlockChain, block: Block, times: np.ndarray,
                workspace: np.ndarray) -> LocalBlock:
    """The arrays the replay kernels read, for one block. O(ops + edges of the block)."""
    ops = list(block.forward_ops) + list(block.backward_ops)
    n_forward = len(block.forward_ops)
    tensor_ids: dict[int, int] = {}
    storage_ids: dict[int, int] = {}

    def tensor(t: int) -> int:
        if t not in tensor_ids:
            tensor_ids[t] = len(tensor_ids)
            storage = graph.tensors[t].storage
            storage_ids.setdefault(storage, len(storage_ids))
        return tensor_ids[t]

    in_lists = [[tensor(t) for t in graph.ops[op].inputs] for op in ops]
    out_lists = [[tensor(t) for t in graph.ops[op].outputs] for op in ops]
    globals_of_tensor = np.array(list(tensor_ids), dtype=np.int64)
    globals_of_storage = np.array(list(storage_ids), dtype=np.int64)
    n_tensors, n_storages = len(tensor_ids), len(storage_ids)
    tensor_storage = np.array([storage_ids[graph.tensors[t].storage] for t in globals_of_tensor], dtype=np.int64)
    tensor_producer = np.full(n_tensors, -1, dtype=np.int64)
    for i in range(n_forward):
        for t in out_lists[i]:
            tensor_producer[t] = i
    role = np.full(n_storages, EXTERNAL, dtype=np.int8)
    storage_bytes = np.zeros(n_storages, dtype=np.int64)
    b = block.index
    for local, s in enumerate(globals_of_storage):
        cls, owner = chain.storage_class[s], chain.storage_owner_block[s]
        if owner != b:
            if cls == FRONTIER and owner > b and chain.storage_low_block[s] == b:
                role[local] = INCOMING
        elif cls in (INTERNAL, BACKWARD_LOCAL):
            role[local] = LOCAL
        elif cls in (CHECKPOINT, SPANNING):
            role[local] = OUTPUT
        elif cls == FRONTIER:
            role[local] = OUTGOING
        if role[local] != EXTERNAL:
            storage_bytes[local] = graph.storage_bytes[s]
    # valid from the start: what other blocks make, and what pinned (and loss) ops made in the
    # first forward; a view the block takes of another block's storage is taken again from the
    # value at hand (it stands for one value of its base); backward tensors once their op runs
    tensor_valid = tensor_producer < 0
    for i in range(n_forward):
        if ops[i] in chain.pinned_ops or block.is_loss:
            tensor_valid[out_lists[i]] = True
    # views of resident storages (a weight's transpose) are held from the first forward: free to
    # hold, and never taken again
    tensor_valid |= np.isin(globals_of_storage[tensor_storage], list(graph.resident_storages))
    for i in range(n_forward, len(ops)):
        tensor_valid[out_lists[i]] = False
    tensor_output = (role[tensor_storage] == OUTPUT) & (tensor_producer >= 0)
    tensor_spanning = tensor_output & (chain.storage_class[globals_of_storage[tensor_storage]] == SPANNING)
    # candidates: forward ops making local storages the block's backward reads
    read_by_backward = np.zeros(n_tensors, dtype=np.bool_)
    for i in range(n_forward, len(ops)):
        read_by_backward[in_lists[i]] = True
    owner_of_storage: dict[int, int] = {}  # the first local forward op making it (a view's base)
    for i in range(n_forward):
        for t in out_lists[i]:
            owner_of_storage.setdefault(int(tensor_storage[t]), i)
    # a kept storage keeps every tensor the forward made in it (the base and its views)
    saved = np.unique(tensor_storage[read_by_backward & ~tensor_valid & (tensor_producer >= 0)
                                     & (role[tensor_storage] != EXTERNAL)])
    keepable = np.isin(tensor_storage, np.concatenate((saved, _shortcuts(
        ops, n_forward, in_lists, out_lists, tensor_storage, tensor_valid, role, saved, times, graph))))
    keeps: dict[int, list[int]] = {}
    for t in np.flatnonzero(keepable & (tensor_producer >= 0)):
        keeps.setdefault(owner_of_storage[int(tensor_storage[t])], []).append(int(t))
    # tiny ones (BatchNorm and LayerNorm statistics) are always kept: candidates after n_free
    sizes = {c: int(storage_bytes[np.unique(tensor_storage[keeps[c]])].sum()) for c in keeps}
    total = sum(sizes.values())
    tiny = {c for c in keeps if sizes[c] * TINY_SHARE < total}
    candidates = sorted(set(keeps) - tiny) + sorted(tiny)
    candidate_ptr = np.zeros(len(candidates) + 1, dtype=np.int64)
    candidate_ptr[1:] = np.cumsum([len(keeps[c]) for c in candidates])
    candidate_idx = np.array([t for c in candidates for t in sorted(keeps[c])], dtype=np.int64)
    candidate_bytes = np.array([storage_bytes[np.unique(tensor_storage[keeps[c]])].sum() for c in candidates],
                               dtype=np.int64)
    order = np.argsort(tensor_storage, kind="stable")
    storage_tensor_ptr = np.zeros(n_storages + 1, dtype=np.int64)
    storage_tensor_ptr[1:] = np.cumsum(np.bincount(tensor_storage, minlength=n_storages))
    arrays = dict(
        ops=np.array(ops, dtype=np.int64), in_ptr=_pointer(in_lists), in_idx=_flat(in_lists),
        out_ptr=_pointer(out_lists), out_idx=_flat(out_lists),
        op_time=np.asarray(times, dtype=np.float64)[ops], op_workspace=np.asarray(workspace, dtype=np.int64)[ops],
        op_is_view=np.array([graph.ops[op].is_view for op in ops], dtype=np.bool_),
        tensor_storage=tensor_storage, tensor_producer=tensor_producer, tensor_valid=tensor_valid,
        tensor_output=tensor_output, tensor_spanning=tensor_spanning, storage_bytes=storage_bytes, storage_role=role,
        storage_tensor_ptr=storage_tensor_ptr, storage_tensor_idx=order.astype(np.int64),
        candidates=np.array(candidates, dtype=np.int64), candidate_ptr=candidate_ptr, candidate_idx=candidate_idx,
        candidate_bytes=candidate_bytes,
    )
    digest = hashlib.sha256(repr((n_forward, [graph.ops[op].target for op in ops])).encode())
    for name, value in arrays.items():
        if name != "ops":
            digest.update(name.encode())
            digest.update(np.ascontiguousarray(value).tobytes())
    return LocalBlock(n_forward=n_forward, n_free=len(candidates) - len(tiny), forward_all=block.is_loss,
                      key=digest.hexdigest(), **arrays)


def _shortcuts(ops, n_forward, in_lists, out_lists, tensor_storage, tensor_valid, role, saved, times,
               graph) -> np.ndarray:
    """Storages the backward does not read that are still worth keeping: the outputs of
    compute-bound ops (a linear layer's output before its dropout and residual add, attention
    scores before the softmax, a DenseNet layer's new features before the concatenations that
    read them). Keeping one lets the memory-bound ops after it be recomputed without it.

    An op is compute-bound when its time per byte it moves is at least ``SHORTCUT_RATIO`` times
    the block's least (the memory-bound floor: an elementwise op's); the cost model's own times
    decide, so the choice follows the device."""
    def intensity(i: int) -> float:
        op = graph.ops[ops[i]]
        return float(times[ops[i]]) / max(op.bytes_read + op.bytes_written, 1)

    moving = [i for i in range(n_forward) if not graph.ops[ops[i]].is_view
              and graph.ops[ops[i]].bytes_read + graph.ops[ops[i]].bytes_written > 0]
    if not moving:
        return np.zeros(0, dtype=np.int64)
    floor = min(intensity(i) for i in moving)
    saved_set = set(int(x) for x in saved)
    found: list[int] = []
    for i in moving:
        storages = {int(tensor_storage[t]) for t in out_lists[i]}
        if storages & saved_set or any(role[s] not in (LOCAL, OUTPUT) for s in storages) \
                or all(tensor_valid[t] for t in out_lists[i]):
            continue
        if intensity(i) >= SHORTCUT_RATIO * floor:
            found.extend(storages)
    return np.array(sorted(found), dtype=np.int64)


def _pointer(lists) -> np.ndarray:
    pointer = np.zeros(len(lists) + 1, dtype=np.int64)
    pointer[1:] = np.cumsum([len(x) for x in lists])
    return pointer


def _flat(lists) -> np.ndarray:
    return np.array([v for x in lists for v in x], dtype=np.int64)


# ---- the replay kernels ------------------------------------------------------------------------
@numba.njit(cache=True)
def _kept_tensors(mask, candidate_ptr, candidate_idx, n_tensors):
    kept = np.zeros(n_tensors, dtype=np.bool_)
    for c in range(len(candidate_ptr) - 1):
        if mask >> c & 1:
            for k in range(candidate_ptr[c], candidate_ptr[c + 1]):
                kept[candidate_idx[k]] = True
    return kept


@numba.njit(cache=True)
def _forward_order(targets, n_forward, in_ptr, in_idx, tensor_producer, tensor_valid):
    """Forward ops (local ids, graph order) needed to compute ``targets`` from valid tensors."""
    needed = np.zeros(n_forward, dtype=np.bool_)
    stack = np.empty(len(tensor_producer) + 1, dtype=np.int64)
    top = 0
    for t in np.flatnonzero(targets):
        if not tensor_valid[t] and tensor_producer[t] >= 0 and not needed[tensor_producer[t]]:
            needed[tensor_producer[t]] = True
            stack[top] = tensor_producer[t]
            top += 1
    while top > 0:
        top -= 1
        op = stack[top]
        for k in range(in_ptr[op], in_ptr[op + 1]):
            t = in_idx[k]
            p = tensor_producer[t]
            if not tensor_valid[t] and p >= 0 and not needed[p]:
                needed[p] = True
                stack[top] = p
                top += 1
    return np.flatnonzero(needed)


@numba.njit(cache=True)
def _backward_order(valid_at_start, n_forward, n_ops, in_ptr, in_idx, out_ptr, out_idx, op_is_view,
                    tensor_storage, tensor_producer, storage_tensor_ptr, storage_tensor_idx):
    """The block's backward ops in the block's order, each preceded by the forward ops it needs that
    are not valid (recomputed on demand, post-order); a recomputed op's outputs stay valid, and
    views of a recomputed base are dropped (they must be taken again from the new value).
    Returns (order, ok): ok is false if a tensor is missing that nothing here can compute."""
    valid = valid_at_start.copy()
    order = np.empty(n_ops + n_forward * (n_ops - n_forward) + 1, dtype=np.int64)
    length = 0
    on_stack = np.zeros(n_forward, dtype=np.bool_)
    stack = np.empty(n_forward + 1, dtype=np.int64)
    for b in range(n_forward, n_ops):
        for k in range(in_ptr[b], in_ptr[b + 1]):
            t = in_idx[k]
            if valid[t]:
                continue
            p = tensor_producer[t]
            if p < 0:
                return order[:length], False
            top = 0
            stack[0] = p
            on_stack[p] = True
            top = 1
            while top > 0:
                op = stack[top - 1]
                pending = -1
                for j in range(in_ptr[op], in_ptr[op + 1]):
                    u = in_idx[j]
                    if not valid[u]:
                        q = tensor_producer[u]
                        if q < 0:
                            return order[:length], False
                        if not on_stack[q]:
                            pending = q
                            break
                if pending >= 0:
                    stack[top] = pending
                    on_stack[pending] = True
                    top += 1
                    continue
                top -= 1
                on_stack[op] = False
                if length >= len(order):
                    return order[:length], False
                order[length] = op
                length += 1
                for j in range(out_ptr[op], out_ptr[op + 1]):
                    if not op_is_view[op]:  # views of the old value are gone
                        s = tensor_storage[out_idx[j]]
                        for m in range(storage_tensor_ptr[s], storage_tensor_ptr[s + 1]):
                            valid[storage_tensor_idx[m]] = False
                for j in range(out_ptr[op], out_ptr[op + 1]):
                    valid[out_idx[j]] = True
        if length >= len(order):
            return order[:length], False
        order[length] = b
        length += 1
        for j in range(out_ptr[b], out_ptr[b + 1]):
            valid[out_idx[j]] = True
    return order[:length], True


@numba.njit(cache=True)
def _replay(order, n_first, in_ptr, in_idx, out_ptr, out_idx, op_time, op_workspace, tensor_storage,
            held_to_boundary, storage_bytes, storage_role):
    """Memory of running ``order`` (local ops; the first ``n_first`` are the forward part) with
    every tensor instance freed after its last read, as ``Schedule.from_order`` does.

    ``held_to_boundary`` tensors (the block's output, and what an option keeps: the output may be
    recomputed from it later, outside the block's backward) live at least to the end of the
    forward part; incoming gradients exist from the start of the backward part; outgoing ones are
    never freed. Returns (forward peak, kept after the forward part, backward peak, forward time,
    backward time).
    """
    tensor_output = held_to_boundary
    n_tensors = len(tensor_storage)
    n = len(order)
    later = np.zeros(n_tensors, dtype=np.bool_)  # the current instance is read later
    for t in range(n_tensors):
        later[t] = storage_role[tensor_storage[t]] == 4  # OUTGOING
    free_step = np.empty(2 * (len(in_idx) + len(out_idx)) * 2 + n_tensors + 4, dtype=np.int64)
    free_tensor = np.empty_like(free_step)
    count = 0
    boundary_frees = np.empty(n_tensors, dtype=np.int64)
    n_boundary = 0
    incoming_read = np.zeros(n_tensors, dtype=np.bool_)
    for j in range(n - 1, -2, -1):
        if j == n_first - 1:  # the forward/backward boundary: the output is read here
            for t in range(n_tensors):
                if tensor_output[t] and not later[t]:
                    later[t] = True
                    boundary_frees[n_boundary] = t
                    n_boundary += 1
            for t in range(n_tensors):
                if storage_role[tensor_storage[t]] == 3:  # INCOMING: first instance starts here
                    incoming_read[t] = later[t]
        if j < 0:
            break
        op = order[j]
        for k in range(out_ptr[op], out_ptr[op + 1]):
            t = out_idx[k]
            if not later[t]:
                free_step[count] = j
                free_tensor[count] = t
                count += 1
            later[t] = storage_role[tensor_storage[t]] == 4
        for k in range(in_ptr[op], in_ptr[op + 1]):
            t = in_idx[k]
            if not later[t]:
                later[t] = True
                free_step[count] = j
                free_tensor[count] = t
                count += 1
    refs = np.zeros(len(storage_bytes), dtype=np.int64)
    memory = 0
    forward_peak = 0
    backward_peak = 0
    forward_time = 0.0
    backward_time = 0.0
    kept = 0
    cursor = count - 1  # frees were recorded by decreasing step
    for j in range(-1, n):
        if j >= 0:
            op = order[j]
            for k in range(out_ptr[op], out_ptr[op + 1]):
                s = tensor_storage[out_idx[k]]
                refs[s] += 1
                if refs[s] == 1:
                    memory += storage_bytes[s]
            running = memory + op_workspace[op]
            if j < n_first:
                forward_peak = max(forward_peak, running)
                forward_time += op_time[op]
            else:
                backward_peak = max(backward_peak, running)
                backward_time += op_time[op]
            while cursor >= 0 and free_step[cursor] == j:
                s = tensor_storage[free_tensor[cursor]]
                refs[s] -= 1
                if refs[s] == 0:
                    memory -= storage_bytes[s]
                cursor -= 1
        if j == n_first - 1:  # kept: what the forward leaves, its output included
            kept = memory
            for i in range(n_boundary):
                s = tensor_storage[boundary_frees[i]]
                refs[s] -= 1
                if refs[s] == 0:
                    memory -= storage_bytes[s]
            for t in range(n_tensors):
                if incoming_read[t]:
                    s = tensor_storage[t]
                    refs[s] += 1
                    if refs[s] == 1:
                        memory += storage_bytes[s]
            backward_peak = max(backward_peak, memory)
    return forward_peak, kept, backward_peak, forward_time, backward_time


# ---- evaluating options --------------------------------------------------------------------------
@numba.njit(cache=True)
def _option_orders(mask, leaf, forward_all, n_forward, n_ops, in_ptr, in_idx, out_ptr, out_idx, op_is_view,
                   tensor_storage, tensor_producer, tensor_valid, tensor_output, storage_tensor_ptr,
                   storage_tensor_idx, candidate_ptr, candidate_idx):
    """(forward, backward, ok) of option ``mask``; a ``leaf`` forward does not compute the block's
    output (the blocks after it have run their backward)."""
    kept = _kept_tensors(mask, candidate_ptr, candidate_idx, len(tensor_storage))
    if forward_all:
        forward = np.arange(n_forward)
    else:
        targets = kept if leaf else kept | tensor_output
        forward = _forward_order(targets, n_forward, in_ptr, in_idx, tensor_producer, tensor_valid)
    backward, ok = _backward_order(tensor_valid | kept, n_forward, n_ops, in_ptr, in_idx, out_ptr, out_idx,
                                   op_is_view, tensor_storage, tensor_producer, storage_tensor_ptr,
                                   storage_tensor_idx)
    return forward, backward, ok


@numba.njit(cache=True)
def _evaluate_masks(masks, forward_all, n_forward, n_ops, in_ptr, in_idx, out_ptr, out_idx, op_is_view,
                    op_time, op_workspace, tensor_storage, tensor_producer, tensor_valid, tensor_output,
                    tensor_spanning, storage_bytes, storage_role, storage_tensor_ptr, storage_tensor_idx,
                    candidate_ptr, candidate_idx):
    """Per mask: forward peak, kept, backward peak, first-forward peak, leaf forward peak (int64
    [n, 5]) and time, backward time, output recompute time (inf where the mask keeps the
    checkpoint, or where recomputing it would make a spanning storage again), leaf time (float64
    [n, 4]); ok is false if some mask's backward cannot be computed."""
    ints = np.zeros((len(masks), 5), dtype=np.int64)
    floats = np.zeros((len(masks), 4))
    everything = np.arange(n_forward)
    for i in range(len(masks)):
        forward, backward, ok = _option_orders(
            masks[i], False, forward_all, n_forward, n_ops, in_ptr, in_idx, out_ptr, out_idx, op_is_view,
            tensor_storage, tensor_producer, tensor_valid, tensor_output, storage_tensor_ptr, storage_tensor_idx,
            candidate_ptr, candidate_idx)
        if not ok:
            return ints, floats, False
        kept_tensors = _kept_tensors(masks[i], candidate_ptr, candidate_idx, len(tensor_storage))
        held = tensor_output | kept_tensors
        peak_f, kept, peak_b, time_f, time_b = _replay(
            np.concatenate((forward, backward)), len(forward), in_ptr, in_idx, out_ptr, out_idx, op_time,
            op_workspace, tensor_storage, held, storage_bytes, storage_role)
        first = _replay(np.concatenate((everything, backward)), n_forward, in_ptr, in_idx, out_ptr, out_idx,
                        op_time, op_workspace, tensor_storage, held, storage_bytes, storage_role)
        leaf_forward = forward if forward_all else _forward_order(
            kept_tensors, n_forward, in_ptr, in_idx, tensor_producer, tensor_valid)
        leaf = _replay(np.concatenate((leaf_forward, backward)), len(leaf_forward), in_ptr, in_idx, out_ptr,
                       out_idx, op_time, op_workspace, tensor_storage, kept_tensors, storage_bytes, storage_role)
        ints[i, 0], ints[i, 1], ints[i, 2], ints[i, 3] = peak_f, kept, max(peak_b, leaf[2]), first[0]
        ints[i, 4] = leaf[0]
        floats[i, 0], floats[i, 1], floats[i, 3] = time_f + time_b, time_b, leaf[3] + leaf[4]
        checkpoint = tensor_output & ~tensor_spanning  # what a soft pass drops and takes again
        again = _forward_order(checkpoint, n_forward, in_ptr, in_idx, tensor_producer,
                               tensor_valid | kept_tensors | tensor_spanning)
        remakes = False  # the spanning storages stay live through a soft pass
        for op in again:
            for k in range(out_ptr[op], out_ptr[op + 1]):
                remakes = remakes or tensor_spanning[out_idx[k]]
        floats[i, 2] = np.inf if remakes or (kept_tensors & checkpoint).any() else op_time[again].sum()
    return ints, floats, True


def _kernel_arrays(local: LocalBlock) -> tuple:
    return (local.n_forward, len(local.ops), local.in_ptr, local.in_idx, local.out_ptr, local.out_idx,
            local.op_is_view)


def orders(local: LocalBlock, mask: int, leaf: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(forward part, backward part) of an option, as local op ids: the forward computes the
    kept tensors and (unless ``leaf``) the output; the backward recomputes the rest on demand."""
    forward, backward, ok = _option_orders(
        mask, leaf, local.forward_all, *_kernel_arrays(local), local.tensor_storage, local.tensor_producer,
        local.tensor_valid, local.tensor_output, local.storage_tensor_ptr, local.storage_tensor_idx,
        local.candidate_ptr, local.candidate_idx)
    if not ok:
        raise AssertionError("a block's backward reads a tensor its block cannot compute")
    return forward, backward


def output_order(local: LocalBlock, mask: int) -> np.ndarray:
    """Forward ops recomputing the block's output checkpoint from option ``mask``'s kept tensors
    and the block's input (local ids, graph order): a dropped output checkpoint taken again (its
    spanning storages stay live)."""
    kept = _kept_tensors(mask, local.candidate_ptr, local.candidate_idx, len(local.tensor_storage))
    return _forward_order(local.tensor_output & ~local.tensor_spanning, local.n_forward, local.in_ptr, local.in_idx,
                          local.tensor_producer, local.tensor_valid | kept | local.tensor_spanning)


def checkpoint_forward(local: LocalBlock) -> np.ndarray:
    """Forward ops computing only the block's output from its input (local ids, graph order)."""
    return _forward_order(local.tensor_output, local.n_forward, local.in_ptr, local.in_idx,
                          local.tensor_producer, local.tensor_valid)


def _replay_parts(local: LocalBlock, forward: np.ndarray, backward: np.ndarray) -> tuple:
    return _replay(np.concatenate((forward, backward)), len(forward), local.in_ptr, local.in_idx, local.out_ptr,
                   local.out_idx, local.op_time, local.op_workspace, local.tensor_storage, local.tensor_output,
                   local.storage_bytes, local.storage_role)


def evaluate_all(local: LocalBlock, masks) -> list[tuple]:
    """Rows (mask, forward peak, kept, backward peak, time, first-forward peak, backward time,
    output recompute time, leaf forward peak, leaf time):
    an option's forward in a recomputation pass computes what the kept set and the output
    need (a *leaf* pass, the block's own pass once the blocks after it are done, only what the
    kept set needs); in the first forward every op of the block runs. One compiled loop over the
    masks."""
    masks, ints, floats = _evaluate(local, masks)
    return _rows(masks, ints, floats)


def _rows(masks: np.ndarray, ints: np.ndarray, floats: np.ndarray) -> list[tuple]:
    return [(int(m), int(a), int(k), int(b), float(t), int(f), float(tb), float(out), int(lf), float(lt))
            for m, (a, k, b, f, lf), (t, tb, out, lt) in zip(masks, ints.tolist(), floats.tolist())]


def _evaluate(local: LocalBlock, masks) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``evaluate_all``'s columns as arrays: the masks, (forward peak, kept, backward peak,
    first-forward peak, leaf forward peak) and (time, backward time, output time, leaf time)."""
    masks = np.asarray(list(masks), dtype=np.int64)
    ints, floats, ok = _evaluate_masks(
        masks, local.forward_all, *_kernel_arrays(local), local.op_time, local.op_workspace,
        local.tensor_storage, local.tensor_producer, local.tensor_valid, local.tensor_output, local.tensor_spanning,
        local.storage_bytes, local.storage_role, local.storage_tensor_ptr, local.storage_tensor_idx,
        local.candidate_ptr, local.candidate_idx)
    if not ok:
        raise AssertionError("a block's backward reads a tensor its block cannot compute")
    return masks, ints, floats


def block_options(local: LocalBlock, parts: Sequence[tuple[LocalBlock, BlockOptions]] = ()) -> BlockOptions:
    """The Pareto set of options of one block (see the module docstring). ``parts``: the blocks
    it joins, with their own options, for a block made of several (``_composite_masks``)."""
    c = local.n_free
    forced = ((1 << local.n_candidates) - 1) ^ ((1 << c) - 1)
    if len(parts) > 1 and c > COMPOSITE_CANDIDATES:
        masks = _composite_masks(local, parts, forced)
    elif c <= EXHAUSTIVE_CANDIDATES:
        masks = [mask | forced for mask in range(1 << c)]
    else:
        masks = _greedy_masks(local, forced)
    rows = _pareto(*_evaluate(local, masks))
    nothing = np.zeros(0, dtype=np.int64)
    checkpoint = _replay_parts(local, checkpoint_forward(local), nothing)
    first_checkpoint = _replay_parts(local, np.arange(local.n_forward, dtype=np.int64), nothing)
    column = lambda i, dtype: np.array([r[i] for r in rows], dtype=dtype)  # noqa: E731
    masks = column(0, np.int64)
    return BlockOptions(
        masks=masks, forward_peak=column(1, np.int64), kept=column(2, np.int64), backward_peak=column(3, np.int64),
        time=column(4, np.float64), first_forward_peak=column(5, np.int64), backward_time=column(6, np.float64),
        output_time=column(7, np.float64), leaf_forward_peak=column(8, np.int64), leaf_time=column(9, np.float64),
        checkpoint_forward_peak=int(checkpoint[0]), checkpoint_forward_time=float(checkpoint[3]),
        first_forward_time=float(local.op_time[: local.n_forward].sum()),
        first_checkpoint_peak=int(first_checkpoint[0]))


def _composite_masks(local: LocalBlock, parts: Sequence[tuple[LocalBlock, BlockOptions]], forced: int) -> list[int]:
    """Masks of a block made of consecutive ``parts``: every combination of one option per part
    from that part's trade-off between kept memory and time (``_trade_off``, at most
    ``PART_OPTIONS`` of it, from least time to least memory), each candidate set
    as the part's option sets it, and both states of the candidates making a part's output (inside
    the joined block they are ordinary values: kept, or dropped and recomputed from the
    convolution before them and the block input) and of any candidate no part has.
    O(PART_OPTIONS^parts x 2^boundary) masks, where enumerating all 2^c would be too many."""
    bit_of_op = {int(local.ops[k]): i for i, k in enumerate(local.candidates[: local.n_free])}
    covered = 0
    boundary = 0
    choices: list[list[int]] = []
    for part, options in parts:
        translated = []
        trade = _trade_off(options.kept, options.time)
        spread = np.unique(np.linspace(0, len(trade) - 1, min(len(trade), PART_OPTIONS)).round().astype(int))
        for mask in options.masks[trade[spread]]:
            bits = 0
            for i in range(part.n_candidates):
                op = int(part.ops[part.candidates[i]])
                if mask >> i & 1 and op in bit_of_op:
                    bits |= 1 << bit_of_op[op]
            translated.append(bits)
        choices.append(list(dict.fromkeys(translated)))
        for i in range(part.n_candidates):
            op = int(part.ops[part.candidates[i]])
            if op in bit_of_op:
                covered |= 1 << bit_of_op[op]
                tensors = part.candidate_idx[part.candidate_ptr[i]: part.candidate_ptr[i + 1]]
                if part.tensor_output[tensors].any():
                    boundary |= 1 << bit_of_op[op]
    free = [1 << i for i in range(local.n_free) if (boundary | ~covered) >> i & 1]
    masks = [0]
    for options in choices:
        masks = [m | o for m in masks for o in options]
    for bit in free:
        masks = [m & ~bit for m in masks] + [m | bit for m in masks]
    return list(dict.fromkeys(m | forced for m in masks))


def _trade_off(kept: np.ndarray, time: np.ndarray) -> np.ndarray:
    """Indices of the options no other beats on kept memory and time together, by time."""
    order = np.lexsort((kept, time))
    least = np.minimum.accumulate(kept[order])
    return order[np.concatenate(([True], least[1:] < least[:-1]))]


def _greedy_masks(local: LocalBlock, forced: int) -> list[int]:
    """Nested candidate sets for blocks too large to enumerate: from everything kept, drop the
    candidate whose removal adds the least time per byte of kept memory saved, until nothing is
    kept; and from nothing kept, add the one saving the most time per byte."""
    c = local.n_free
    full = ((1 << c) - 1) | forced
    masks = [full, forced]
    for start, removing in ((full, True), (forced, False)):
        mask = start
        _, _, kept_now, _, time_now, *_ = evaluate_all(local, [mask])[0]
        while (mask != forced) if removing else (mask != full):
            trials = [mask ^ (1 << i) for i in range(c) if bool(mask >> i & 1) == removing]
            best, best_score = None, None
            for trial, _, kept, _, time, *_ in evaluate_all(local, trials):
                saved = (kept_now - kept) if removing else (kept - kept_now)
                extra = (time - time_now) if removing else (time_now - time)
                score = extra / max(saved, 1) if removing else -extra / max(saved, 1)
                if best_score is None or score < best_score:
                    best, best_score, kept_best, time_best = trial, score, kept, time
            mask, kept_now, time_now = best, kept_best, time_best
            masks.append(mask)
    return list(dict.fromkeys(masks))


def _pareto(masks: np.ndarray, ints: np.ndarray, floats: np.ndarray) -> list[tuple]:
    """Rows (``evaluate_all``'s) no other row beats or ties on all of the peaks, kept memory, time,
    backward time (what a block costs in the first forward, where its forward is paid anyway) and
    the time to recompute the output (what dropping it costs: a soft pass); at most
    ``MAX_OPTIONS``: the one of least backward peak (what the least memory needs), those no other
    beats on kept memory and time together, then others spread over the rest. Filtered on the
    arrays, so only the front becomes rows: O(rows log rows + rows x front), compiled."""
    forward, kept, backward, first, leaf = ints.T
    time, backward_time, output_time = floats.T[:3]
    order = np.lexsort((first, forward, backward, kept, time))  # stable: ties keep the masks' order
    values = np.column_stack((forward, kept, backward, time, first, backward_time, output_time, leaf))
    chosen = order[_non_dominated(values.astype(np.float64)[order])]
    front = _rows(masks[chosen], ints[chosen], floats[chosen])
    if len(front) > MAX_OPTIONS:  # what the chain trades most: kept memory against time
        lowest = min(range(len(front)), key=lambda i: (front[i][3], front[i][8], front[i][4]))
        traded = _trade_off(np.array([r[2] for r in front]), np.array([r[4] for r in front])).tolist()
        chosen = [lowest] + [i for i in traded if i != lowest]
        trade = [front[i] for i in chosen]
        rest = [r for i, r in enumerate(front) if i not in set(chosen)]
        picks = np.unique(np.linspace(0, len(rest) - 1, max(MAX_OPTIONS - len(trade), 0)).round().astype(int))
        front = sorted(trade[:MAX_OPTIONS] + [rest[i] for i in picks if len(trade) < MAX_OPTIONS],
                       key=lambda r: (r[4], r[2]))
    return front


@numba.njit(cache=True)
def _non_dominated(values):
    """Indices of the rows (sorted so that a row's dominators come before it) no earlier row is
    at most on every column."""
    front = np.empty(len(values), dtype=np.int64)
    size = 0
    for i in range(len(values)):
        dominated = False
        for k in range(size):
            f = front[k]
            dominated = True
            for j in range(values.shape[1]):
                if values[f, j] > values[i, j]:
                    dominated = False
                    break
            if dominated:
                break
        if not dominated:
            front[size] = i
            size += 1
    return front[:size]
