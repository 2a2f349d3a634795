"""Blocks: the training step as a chain of small subgraphs, the unit of hierarchical planning.

The model's forward ops, in graph order, are cut into consecutive *blocks*; the loss is one more
block at the end. Every backward op belongs to the block of the forward op it differentiates
(autograd's sequence numbers, ``OpInfo.differentiates``), so a block's backward can run as a unit
once the blocks after it have run theirs: backward blocks run from the last to the first.

Where to cut. Sizes count non-view ops whose outputs someone reads. A cut is *clean* when the
storages crossing it are all made by one op, apart from long-range storages (read ``LONG_RANGE``
or more ops after they are made: rotary tables, attention masks, U-Net skips). Clean cuts are
articulation points of the graph without its long-range edges (ResNet blocks, transformer
residual adds). Regions between clean cuts longer than ``MAX_BLOCK_OPS`` (a DenseNet dense block)
are split where the fewest bytes cross (into pieces ``FINE_SPLIT`` times smaller with ``fine``);
tiny regions are merged (``_merge_small``). A chain of more than ``MAX_CHAIN_BLOCKS`` blocks (an
80-layer LLM) is cut again with sizes doubled. With ``pairing``, adjacent blocks are then joined
in pairs (``_paired``).

What crosses. Once cut, each storage a block makes is classified by the blocks that read it,
forward or backward: *internal* (read by its own block only), a *checkpoint* of the cut after its
block (read by its own block and the next one only: the state a chain DP may keep or recompute),
or *long-lived* (read further away). Long-lived storages are never recomputed: the op making one
is pinned, and the storage is held from the first forward until the last block that reads it
has run its backward. With ``spanning`` (the fine partition tight budgets add), a storage read
by later blocks only, some beyond the next (a DenseNet layer's new features, the dense block's
input, a U-Net skip), is *spanning* instead: an output of its block like a checkpoint, which a
run of blocks the chain DP drops and recomputes drops with it when no block after the run reads
it (``crossing_bytes``: what a run leaves for the blocks after it). That is the claim this
decomposition gives up: a plan never recomputes a long-lived storage, one an earlier block's
backward reads (or, in the standard partitions, any storage read beyond the next block: there a
dropped run keeps them from the first forward instead of recomputing them).
Backward storages read by another block's backward (the gradient of a checkpoint) are the
*frontier* between the two.

The order inside a block's backward. A block's backward ops run in the greedy low-memory order
of store-all's backward (``reorder.backward_rank``: a weight gradient before the input gradient
frees the activation it reads first; a feed-forward layer's hidden is not held while its
gradient is made), where store-all's replay of that block peaks lower with it, else in graph
order. The ops reading forward values keep the graph's order among themselves in either, so a
block asks for the same recomputations in the same sequence (``block_options``).

Complexity: O(ops + edges) for the partition and classification, plus the split DP over
positions, O(positions x window) inside over-long regions, O(L^2 + spanning storages x L) for
``crossing_bytes`` over L blocks; per graph O((ops + edges) log ops) for the greedy order, and
two store-all simulations, O(steps), per partition.
"""
from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np

from planner.algorithms.reorder import backward_rank
from planner.graph import Phase, TrainingGraph
from planner.schedule import Schedule
from planner.simulator import simulate

MAX_BLOCK_OPS = 16  # non-view forward ops of a region cut further
MERGE_BLOCK_OPS = 8  # adjacent regions are merged while together they hold at most this many
TINY_BLOCK_OPS = 2  # a region this small joins a neighbour unless that makes it over-long
# where a tiny region goes: give up the cut more bytes cross, or the one wasting more bytes the
# backward does not read (no rule suits every model; hierarchical planning tries both)
TINY_MERGE_POLICIES = ("fewest bytes", "least waste")
MAX_CHAIN_BLOCKS = 96  # more blocks than this: both sizes above double, until the chain is shorter
# block sizes (multiples of the two above) hierarchical planning partitions with: small blocks give
# the chain DP fine cuts; blocks twice as large hold a transformer layer whole, whose residual input
# is otherwise read two blocks on, long-lived and never recomputed (no size suits every model)
BLOCK_SCALES = (1, 2)
# over-long regions split this many times finer, for tight budgets: a DenseNet layer per block, so
# that the chain DP can hold the features of one layer's backward without its neighbours' state
FINE_SPLIT = 2
LONG_RANGE = 48  # a storage read this many non-view ops after it is made does not block a clean cut

# storage classes
RESIDENT, INTERNAL, CHECKPOINT, LONG_LIVED, BACKWARD_LOCAL, FRONTIER, SPANNING = range(7)


@dataclass(frozen=True)
class Block:
    """Forward ops (graph order) and backward ops (``_assign_backward``'s order) of one block."""

    index: int
    forward_ops: tuple[int, ...]
    backward_ops: tuple[int, ...]
    is_loss: bool = False


@dataclass(frozen=True)
class BlockChain:
    """The blocks of a graph, what crosses between them, and the memory held outside them.

    Memory arrays are indexed by block (the loss block last) and hold bytes:

    - ``checkpoint_bytes[i]``: storages crossing the cut after block i only;
    - ``crossing_bytes[s, e]`` (model blocks): storages made by blocks s..e and read after e (their
      checkpoints and spanning storages): what a run of blocks s..e recomputed from the input of s
      leaves for the blocks after it;
    - ``long_lived_forward[i]``: long-lived storages made by blocks up to i (held during the
      first forward at block i);
    - ``long_lived_backward[i]``: long-lived storages still needed while block i's backward
      runs;
    - ``frontier_bytes[i]``: backward storages made by blocks after i and read by blocks up to
      i (held between the backward of block i+1 and that of block i);
    - ``through_bytes[i]``: those of them read only by blocks before i (held throughout block
      i's backward, which does not touch them).
    """

    graph: TrainingGraph
    blocks: tuple[Block, ...]
    block_of_op: np.ndarray  # int64 per op: its block, -1 for ops of no block
    storage_class: np.ndarray  # int8 per storage
    storage_owner_block: np.ndarray  # int64 per storage: block of the op that makes it, -1 resident
    storage_low_block: np.ndarray  # int64 per storage: the lowest block reading it (its owner if none)
    checkpoint_bytes: np.ndarray
    crossing_bytes: np.ndarray
    long_lived_forward: np.ndarray
    long_lived_backward: np.ndarray
    frontier_bytes: np.ndarray
    through_bytes: np.ndarray
    pinned_ops: frozenset[int]  # forward ops making a long-lived storage: never recomputed

    @property
    def n_model_blocks(self) -> int:
        return len(self.blocks) - 1


@dataclass(frozen=True)
class CutSites:
    """What choosing block ends needs, the same for every policy and size (``cut_sites``):
    positions are into ``model_forward``, the model's forward ops in graph order."""

    model_forward: list[int]
    clean: list[int]  # clean cuts (ends, exclusive), the last one ``len(model_forward)``
    crossing: np.ndarray  # bytes crossing the cut after each position
    counted: np.ndarray  # counted ops before each position
    waste: np.ndarray  # bytes crossing each cut that no backward op reads
    backward_rank: np.ndarray  # per op: the order blocks run their backward ops in (``_assign_backward``)


def partition(graph: TrainingGraph, policy: str = TINY_MERGE_POLICIES[0], scale: int = BLOCK_SCALES[0],
              pairing: int | None = None) -> BlockChain:
    """Cut ``graph`` into blocks (see the module docstring), merging tiny regions by ``policy``
    (one of ``TINY_MERGE_POLICIES``), with block sizes ``scale`` times the defaults, and classify
    what crosses the cuts. With ``pairing`` (0 or 1), adjacent blocks are then joined in pairs,
    the first pair starting at block ``pairing`` (``_paired``)."""
    sites = cut_sites(graph)
    return chain_of(graph, sites, block_ends(sites, policy, scale, pairing))


def block_ends(sites: CutSites, policy: str, scale: int, pairing: int | None = None,
               fine: bool = False) -> tuple[int, ...]:
    """The ends of ``partition``'s blocks (exclusive positions into ``sites.model_forward``);
    ``fine``: over-long regions split into pieces ``FINE_SPLIT`` times smaller."""
    if not sites.model_forward:
        return ()
    while True:  # long chains get larger blocks: the chain DP grows with the cube of their number
        ends = _sized_ends(sites.clean, sites.crossing, sites.counted, sites.waste, MAX_BLOCK_OPS * scale,
                           MERGE_BLOCK_OPS * scale, policy, FINE_SPLIT if fine else 1)
        if len(ends) <= MAX_CHAIN_BLOCKS or scale >= 64:
            break
        scale *= 2
    return tuple(_paired(ends, pairing) if pairing is not None else ends)


def chain_of(graph: TrainingGraph, sites: CutSites, cuts: tuple[int, ...], spanning: bool = False) -> BlockChain:
    """The blocks ending at ``cuts`` and what crosses between them; with ``spanning``, storages read
    by later blocks only, some beyond the next, are spanning outputs of their block, not pinned
    long-lived storages."""
    model_forward = sites.model_forward
    block_of_op = np.full(len(graph.ops), -1, dtype=np.int64)
    start = 0
    for b, end in enumerate(cuts):
        block_of_op[model_forward[start:end]] = b
        start = end
    # a view goes with the block making its base: it stands for that value, and is taken again
    # whenever the base is recomputed
    base_block: dict[int, int] = {}
    for op_id in model_forward:
        op = graph.ops[op_id]
        storages = {graph.tensors[t].storage for t in op.outputs}
        if op.is_view:
            owners = [base_block[s] for s in storages if s in base_block]
            if owners:
                block_of_op[op_id] = min(owners)
        for s in storages:
            base_block.setdefault(s, int(block_of_op[op_id]))
    loss_block = len(cuts)
    forward_lists: list[list[int]] = [[] for _ in range(loss_block)]
    for op_id in model_forward:
        forward_lists[int(block_of_op[op_id])].append(op_id)
    loss_forward = [op for op in graph.forward_ops if graph.ops[op].in_loss]
    block_of_op[loss_forward] = loss_block
    backward_lists = _assign_backward(graph, block_of_op, loss_block, sites.backward_rank)
    blocks = tuple(Block(i, tuple(f), tuple(b)) for i, (f, b) in enumerate(zip(forward_lists, backward_lists)))
    blocks += (Block(loss_block, tuple(loss_forward), tuple(backward_lists[loss_block]), is_loss=True),)
    return _classify(graph, blocks, block_of_op, spanning)


# ---- cutting the forward ---------------------------------------------------------------------
def _storage_spans(graph: TrainingGraph, model_forward: list[int]):
    """Per storage made by the model's forward: the position of the op making it and of its last
    model-forward reader (``len(model_forward)`` when the loss reads it); per position, how many
    *counted* ops come before it: non-view ops whose outputs someone reads (a BatchNorm's
    ``num_batches_tracked += 1`` counts for nothing)."""
    n = len(model_forward)
    position = np.full(len(graph.ops), -1, dtype=np.int64)
    position[model_forward] = np.arange(n)
    made_at = np.full(len(graph.storages), -1, dtype=np.int64)
    last_read = np.full(len(graph.storages), -1, dtype=np.int64)
    resident = graph.resident_storages
    counted = np.zeros(n, dtype=np.int64)
    for p, op_id in enumerate(model_forward):
        op = graph.ops[op_id]
        counted[p] = not op.is_view and any(graph.tensors[t].consumers for t in op.outputs)
        for tensor in op.outputs:
            storage = graph.tensors[tensor].storage
            if storage not in resident and made_at[storage] < 0:
                made_at[storage] = p
        for tensor in op.inputs:
            storage = graph.tensors[tensor].storage
            if made_at[storage] >= 0:
                last_read[storage] = max(last_read[storage], p)
    for op_id in graph.forward_ops:  # loss ops read model outputs after the whole model
        if graph.ops[op_id].in_loss:
            for tensor in graph.ops[op_id].inputs:
                storage = graph.tensors[tensor].storage
                if made_at[storage] >= 0:
                    last_read[storage] = n
    return made_at, last_read, np.concatenate(([0], np.cumsum(counted)))


def cut_sites(graph: TrainingGraph) -> CutSites:
    """Where blocks may end and what each cut costs. O(ops + edges)."""
    model_forward = [op for op in graph.forward_ops if not graph.ops[op].in_loss]
    n = len(model_forward)
    if n == 0:
        return CutSites(model_forward, [], np.zeros(0, dtype=np.int64), np.zeros(1, dtype=np.int64),
                        np.zeros(2, dtype=np.int64), backward_rank(graph))
    made_at, last_read, counted = _storage_spans(graph, model_forward)
    live = np.flatnonzero((made_at >= 0) & (last_read > made_at))
    made, read = made_at[live], last_read[live]
    long_range = counted[np.minimum(read, n)] - counted[made + 1] >= LONG_RANGE
    # crossing[q]: bytes of the storages made at or before q and read after q (the cut after q)
    crossing = np.zeros(n + 1, dtype=np.int64)
    np.add.at(crossing, made, graph.storage_bytes[live])
    np.add.at(crossing, read, -graph.storage_bytes[live])
    crossing = np.cumsum(crossing)[:n]
    # a cut is clean when the short-range storages crossing it are all made by one op
    makers: dict[int, int] = {}
    arrivals: dict[int, list[int]] = {}
    departures: dict[int, list[int]] = {}
    for k in np.flatnonzero(~long_range):
        arrivals.setdefault(int(made[k]), []).append(int(made[k]))
        departures.setdefault(int(read[k]), []).append(int(made[k]))
    clean = []
    for q in range(n):
        for maker in arrivals.get(q, ()):
            makers[maker] = makers.get(maker, 0) + 1
        for maker in departures.get(q, ()):
            makers[maker] -= 1
            if makers[maker] == 0:
                del makers[maker]
        if len(makers) <= 1:
            clean.append(q + 1)
    if not clean or clean[-1] != n:
        clean.append(n)
    # bytes crossing each cut that no backward op reads: what keeping that checkpoint wastes
    saved = np.zeros(len(graph.storages), dtype=np.bool_)
    for op_id in graph.backward_ops:
        saved[[graph.tensors[t].storage for t in graph.ops[op_id].inputs]] = True
    unsaved = ~saved[live]
    waste = np.zeros(n + 2, dtype=np.int64)
    np.add.at(waste, made[unsaved] + 1, graph.storage_bytes[live][unsaved])
    np.add.at(waste, read[unsaved] + 1, -graph.storage_bytes[live][unsaved])
    return CutSites(model_forward, clean, crossing, counted, np.cumsum(waste), backward_rank(graph))


def _paired(ends: list[int], offset: int) -> list[int]:
    """Block ends with adjacent blocks joined in pairs, the first pair starting at block
    ``offset`` (0 or 1): a pair's options hold parts of both blocks at once (a residual block's
    output dropped and recomputed from the convolution before it and the block input), which
    options of single blocks chained by the DP cannot express."""
    return [end for i, end in enumerate(ends) if (i - offset) % 2 == 1 or i == len(ends) - 1]


def _sized_ends(clean: list[int], crossing: np.ndarray, counted: np.ndarray, waste: np.ndarray, max_ops: int,
                merge_ops: int, policy: str, split: int = 1) -> list[int]:
    """Block ends from the clean cuts: over-long regions split in pieces of ``max_ops // split``,
    small ones merged."""
    ends: list[int] = []
    start = 0
    for end in clean:
        if counted[end] - counted[start] > max_ops:
            ends.extend(int(e) for e in _split_dp(crossing.astype(np.float64), counted, start, end, max_ops // split))
        else:
            ends.append(end)
        start = end
    return _merge_small(ends, counted, crossing, waste, max_ops, merge_ops, policy)


@numba.njit(cache=True)
def _split_dp(crossing, counted, start, end, limit):
    """Ends splitting positions [start, end) into pieces of at most ``limit`` counted ops at the
    cuts crossed by the fewest bytes in total. O((end - start) x window)."""
    size = end - start
    best = np.full(size + 1, np.inf)
    parent = np.full(size + 1, -1, dtype=np.int64)
    best[0] = 0.0
    for e in range(1, size + 1):
        q = start + e  # cut after position q - 1
        cost = 0.0 if e == size else crossing[q - 1]
        b = e - 1
        while b >= 0 and counted[q] - counted[start + b] <= limit:
            if best[b] + cost < best[e]:
                best[e] = best[b] + cost
                parent[e] = b
            b -= 1
        if parent[e] < 0 and e == size:  # nothing reachable: a single over-long piece
            best[e] = 0.0
            parent[e] = 0
    cuts = []
    e = size
    while e > 0:
        cuts.append(start + e)
        e = parent[e] if parent[e] >= 0 else 0
    cuts.reverse()
    return np.array(cuts, dtype=np.int64)


def _merge_small(ends: list[int], counted: np.ndarray, crossing: np.ndarray, waste: np.ndarray, max_ops: int,
                 merge_ops: int, policy: str) -> list[int]:
    """Merge tiny regions (at most ``TINY_BLOCK_OPS`` counted ops: a ReLU after a residual add,
    a LayerNorm after one) into a neighbour, then each region into the one before while
    together they hold at most ``merge_ops``; no merge makes a region longer than ``max_ops``.

    A tiny region gives up one of the two cuts beside it. By "fewest bytes": the one more bytes
    cross (its checkpoint would cost more), then the one wasting more, then the later one; so a
    DenseNet layer's new features, not its wider ReLU output, cross between blocks. By "least
    waste": the one wasting more bytes the backward does not read anyway (``waste``), then the
    later one; so a ReLU stays with the residual add before it (the add's output is not saved),
    and a LayerNorm, whose input and output are both saved, goes with the block after it, where
    its output can be recomputed from the checkpoint.
    """
    def key(cut: int) -> tuple:
        if policy == "least waste":
            return (int(waste[cut]), cut)
        return (int(crossing[cut - 1]), int(waste[cut]), cut)

    bounds = [0] + list(ends)
    j = 0
    while j < len(bounds) - 1 and len(bounds) > 2:
        size = counted[bounds[j + 1]] - counted[bounds[j]]
        if size > TINY_BLOCK_OPS:
            j += 1
            continue
        options = []  # (what giving the cut up saves, index of that bound)
        if j > 0 and counted[bounds[j + 1]] - counted[bounds[j - 1]] <= max_ops:
            options.append((key(bounds[j]), j))
        if j + 2 < len(bounds) and counted[bounds[j + 2]] - counted[bounds[j]] <= max_ops:
            options.append((key(bounds[j + 1]), j + 1))
        if not options:
            j += 1
            continue
        _, drop = max(options)
        del bounds[drop]
        j = max(drop - 1, 0)
    merged: list[int] = []
    for end in bounds[1:]:
        begin_of_last = merged[-2] if len(merged) > 1 else 0
        if merged and counted[end] - counted[begin_of_last] <= merge_ops:
            merged[-1] = end
        else:
            merged.append(end)
    return merged


# ---- backward ops ----------------------------------------------------------------------------
def _assign_backward(graph: TrainingGraph, block_of_op: np.ndarray, loss_block: int,
                     rank: np.ndarray) -> list[list[int]]:
    """Backward ops per block: in the order of ``rank`` (``reorder.backward_rank``) where
    store-all's replay of the block peaks lower with it than with graph order, else in graph order.

    An op reading forward values (made by forward ops: activations, views of weights) goes to
    the block of the forward op it differentiates, or where autograd did not tag it (some
    in-place ops), to the latest block whose forward values it reads. An op reading only
    gradients (a sum of gradient contributions) goes to the earliest block its inputs allow:
    the latest-running block among those making them, so contributions are summed, and freed,
    as they come. Then, in graph order, no op runs in a later block than its
    inputs' producers (block backward passes run from the last block to the first).
    """
    storage_block = np.full(len(graph.storages), -1, dtype=np.int64)
    for op_id in graph.forward_ops:
        for tensor in graph.ops[op_id].outputs:
            storage = graph.tensors[tensor].storage
            if storage_block[storage] < 0 and storage not in graph.resident_storages:
                storage_block[storage] = block_of_op[op_id]
    unplaced = []
    for op_id in graph.backward_ops:
        op = graph.ops[op_id]
        producers = [graph.tensors[t].producer for t in op.inputs if graph.tensors[t].producer is not None]
        made_before = [int(block_of_op[p]) for p in producers
                       if graph.ops[p].phase is Phase.BACKWARD and block_of_op[p] >= 0]
        cap = min(made_before) if made_before else None
        read = [int(block_of_op[p]) for p in producers if graph.ops[p].phase is Phase.FORWARD]
        read += [int(b) for b in (storage_block[graph.tensors[t].storage] for t in op.inputs) if b >= 0]
        if op.in_loss:
            block = loss_block
        elif read:
            differentiated = op.differentiates is not None and block_of_op[op.differentiates] >= 0
            block = int(block_of_op[op.differentiates]) if differentiated else max(read)
            block = min(block, cap) if cap is not None else block
        else:  # gradients only (sums of contributions): as soon as its inputs exist
            block = cap if cap is not None else -1
        block_of_op[op_id] = block
        if block < 0:
            unplaced.append(op_id)
    for op_id in reversed(unplaced):  # reads nothing of the step: run it in its first reader's block
        readers = [int(block_of_op[c]) for t in graph.ops[op_id].outputs for c in graph.tensors[t].consumers]
        block_of_op[op_id] = max([b for b in readers if b >= 0], default=0)
    for op_id in graph.backward_ops:  # consistency: not after any producer
        for t in graph.ops[op_id].inputs:
            producer = graph.tensors[t].producer
            if producer is not None and graph.ops[producer].phase is Phase.BACKWARD:
                block_of_op[op_id] = min(block_of_op[op_id], block_of_op[producer])
    in_graph_order: list[list[int]] = [[] for _ in range(loss_block + 1)]
    for op_id in graph.backward_ops:
        in_graph_order[int(block_of_op[op_id])].append(op_id)
    ranked = [sorted(ops, key=lambda op: rank[op]) for ops in in_graph_order]
    graph_peaks, ranked_peaks = (_store_all_block_peaks(graph, lists, block_of_op) for lists in (in_graph_order, ranked))
    return [r if rp < gp else g for g, r, gp, rp in zip(in_graph_order, ranked, graph_peaks, ranked_peaks)]


def _store_all_block_peaks(graph: TrainingGraph, lists: list[list[int]], block_of_op: np.ndarray) -> np.ndarray:
    """Per block, the simulated peak while its backward ops (``lists``, blocks run last to first)
    run after a forward that keeps everything: each block starts from the same live storages
    whatever the order inside the blocks before it, so the peaks compare block by block. O(steps)."""
    schedule = Schedule.from_order(graph, list(graph.forward_ops) + [op for ops in reversed(lists) for op in ops])
    timeline = simulate(graph, schedule).timeline
    is_compute, index = schedule.arrays
    steps = np.arange(len(index))
    latest = np.maximum.accumulate(np.where(is_compute, steps, 0))  # the compute step each step follows
    op = index[latest]
    backward = np.cumsum(is_compute) > len(graph.forward_ops)
    peaks = np.zeros(len(lists), dtype=np.int64)
    np.maximum.at(peaks, block_of_op[op[backward]], timeline[backward])
    return peaks


# ---- what crosses ----------------------------------------------------------------------------
def _classify(graph: TrainingGraph, blocks: tuple[Block, ...], block_of_op: np.ndarray, spanning: bool) -> BlockChain:
    n_blocks = len(blocks)
    n_storages = len(graph.storages)
    owner = np.full(n_storages, -1, dtype=np.int64)
    made_backward = np.zeros(n_storages, dtype=np.bool_)
    owner_op = np.full(n_storages, -1, dtype=np.int64)
    resident = graph.resident_storages
    for op in graph.ops:  # graph order: the forward makes its storages before the backward reads them
        for tensor in op.outputs:
            storage = graph.tensors[tensor].storage
            if storage in resident or owner[storage] >= 0:
                continue
            owner[storage] = block_of_op[op.id]
            owner_op[storage] = op.id
            made_backward[storage] = op.phase is Phase.BACKWARD
    low = owner.copy()  # lowest reader block
    high = owner.copy()  # highest reader block
    for op in graph.ops:
        b = block_of_op[op.id]
        for tensor in op.inputs:
            storage = graph.tensors[tensor].storage
            if owner[storage] >= 0:
                low[storage] = min(low[storage], b)
                high[storage] = max(high[storage], b)
    sizes = graph.storage_bytes
    storage_class = np.full(n_storages, RESIDENT, dtype=np.int8)
    checkpoint = np.zeros(n_blocks, dtype=np.int64)
    long_forward = np.zeros(n_blocks + 1, dtype=np.int64)
    long_backward = np.zeros(n_blocks + 1, dtype=np.int64)
    frontier = np.zeros(n_blocks + 1, dtype=np.int64)
    through = np.zeros(n_blocks + 1, dtype=np.int64)
    pinned: set[int] = set()
    for s in range(n_storages):
        b = owner[s]
        if b < 0:
            continue
        size = int(sizes[s])
        if made_backward[s]:
            if low[s] >= b:
                storage_class[s] = BACKWARD_LOCAL
            else:  # read by earlier blocks' backward: held from block b's backward to block low's
                storage_class[s] = FRONTIER
                frontier[low[s]: b] += size
                if low[s] + 1 < b:
                    through[low[s] + 1: b] += size
        elif high[s] <= b and low[s] >= b:
            storage_class[s] = INTERNAL
        elif low[s] >= b and high[s] <= b + 1 and b + 1 < n_blocks:
            storage_class[s] = CHECKPOINT
            checkpoint[b] += size
        elif spanning and low[s] >= b:  # read by later blocks only, some beyond the next
            storage_class[s] = SPANNING
        else:
            storage_class[s] = LONG_LIVED
            pinned.add(int(owner_op[s]))
    # a pinned op is never recomputed, so everything it makes that is read is held like its
    # long-lived output (a max-pool's indices beside its long-lived output)
    for op_id in pinned:
        for tensor in graph.ops[op_id].outputs:
            s = graph.tensors[tensor].storage
            if storage_class[s] in (INTERNAL, CHECKPOINT) and owner_op[s] == op_id:
                if storage_class[s] == CHECKPOINT:
                    checkpoint[owner[s]] -= int(sizes[s])
                storage_class[s] = LONG_LIVED
    for s in np.flatnonzero(storage_class == LONG_LIVED):
        size = int(sizes[s])
        long_forward[owner[s]:] += size
        long_backward[max(low[s], 0):] += size
    crossing = _crossing(checkpoint[: n_blocks - 1], owner, high, sizes, storage_class == SPANNING)
    return BlockChain(graph, blocks, block_of_op, storage_class, owner, low, checkpoint, crossing,
                      long_forward[:n_blocks],
                      long_backward[:n_blocks], frontier[:n_blocks], through[:n_blocks], frozenset(pinned))


def _crossing(checkpoint: np.ndarray, owner: np.ndarray, high: np.ndarray, sizes: np.ndarray,
              spanning: np.ndarray) -> np.ndarray:
    """``crossing_bytes[s, e]`` over the L model blocks: the checkpoint of e plus the spanning
    storages made by blocks s..e and read after e. O(L^2 + spanning storages x L)."""
    n = len(checkpoint)
    later = np.zeros((n, n), dtype=np.int64)  # [a, e]: spanning bytes made by block a, read after e
    for s in np.flatnonzero(spanning):
        later[owner[s], owner[s]: min(high[s], n)] += int(sizes[s])
    made_from = np.cumsum(later[::-1], axis=0)[::-1]  # [s, e]: by blocks s..n-1, of which only s..e read after e
    return np.triu(made_from + checkpoint[None, :])
