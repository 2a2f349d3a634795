"""Hierarchical planning: blocks, each block's Pareto set of options, and a chain DP across them.

1. ``blocks.partition`` cuts the step into a chain of small blocks (the loss last) and says what
   crosses between them; ``prepare_all`` weighs several partitions, one of them the small blocks
   joined in pairs; where none fits the budget, ``prepare_fine`` adds finer blocks whose spanning
   storages dropped runs of blocks recompute.
2. ``block_options`` enumerates, once per distinct block (identical transformer layers or ResNet
   blocks share one key), what its forward can keep and what its backward then recomputes: the
   selective keeping (keep a convolution's output, recompute the BatchNorm and ReLU after it) is
   part of every block's options.
3. ``chain.solve`` picks one option per block and where to drop whole runs of blocks and
   recompute them in the backward, recursively (multi-level recomputation).
4. The chosen actions become one op order (``Schedule.from_order`` frees each tensor after its
   last use), which the simulator judges. The DP's memory model is conservative but not exact,
   so its limit is bisected against simulated peaks, as the segment DP's is.

Complexity: O(ops + edges) to partition and to emit a schedule (once per graph, O((ops + edges)
log ops) for the blocks' backward order, ``reorder.backward_rank``); per distinct block
O(2^c (ops + edges)) with c <= 13 candidates (a joined block: O(8^2 x 2^boundary) combined
masks); the chain DP O(L^2 Q (P + L)) for L blocks (once more, on about twice the blocks inside
over-long regions, where no partition fits); one emission and simulation per column tried (at
most 10 bisection steps, then 32 more columns where none fitted).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from planner.algorithms.block_options import (
    BlockOptions, LocalBlock, block_options, checkpoint_forward, local_block, orders, output_order,
)
from planner.algorithms.blocks import (
    BLOCK_SCALES, TINY_MERGE_POLICIES, BlockChain, block_ends, chain_of, cut_sites, partition,
)
from planner.algorithms.chain import ChainProblem, ChainSolution, ChainTables, tabulate
from planner.algorithms.reorder import reorder_schedule
from planner.algorithms.result import rank
from planner.cost import CostModel
from planner.graph import TrainingGraph
from planner.schedule import Schedule
from planner.simulator import SimResult, simulate

LIMIT_SEARCH_STEPS = 10
SCAN_COLUMNS = 32  # columns tried where bisection finds nothing fitting
QUANTA = 512  # memory units of the DP's tables, spanning twice the activation budget
LEAST_MEMORY_COLUMNS = 16  # columns above the fewest units that fit, tried for the lowest peak
JOINED_CANDIDATES = 32  # a pairing whose pairs hold more candidates than this is not weighed
MASK_BITS = 62  # candidates an int64 option mask holds
PAIRINGS = (0,)  # offsets of the first pair where small blocks are joined in pairs (each costs a DP)


@dataclass
class Hierarchy:
    """Everything about a graph that does not depend on the memory limit: the blocks, their local
    arrays and options. Build it once per graph and cost model (``prepare``)."""

    graph: TrainingGraph
    chain: BlockChain
    locals: list[LocalBlock]
    options: list[BlockOptions]
    _orders: dict = field(default_factory=dict, repr=False)

    @property
    def n_blocks(self) -> int:
        return self.chain.n_model_blocks

    def problem(self, limit: float, quanta: int = QUANTA) -> ChainProblem:
        """The chain DP's inputs for memory limits up to ``limit`` bytes (beyond resident memory),
        in ``quanta`` units."""
        unit = max(limit / quanta, 1.0)

        def units(values) -> np.ndarray:
            return np.ceil(np.asarray(values, dtype=np.float64) / unit).astype(np.int64)

        model = self.options[: self.n_blocks]
        width = max((len(o.masks) for o in model), default=1)
        shape = (self.n_blocks, width)
        forward_peak, kept, backward_peak = (np.zeros(shape, dtype=np.int64) for _ in range(3))
        time = np.full(shape, np.inf)
        output_time, backward_time = np.zeros(shape), np.zeros(shape)
        first_forward_peak, leaf_forward_peak = np.zeros(shape, dtype=np.int64), np.zeros(shape, dtype=np.int64)
        leaf_time = np.full(shape, np.inf)
        for b, option in enumerate(model):
            k = len(option.masks)
            output_time[b, :k] = option.output_time
            backward_time[b, :k] = option.backward_time
            first_forward_peak[b, :k] = units(option.first_forward_peak)
            leaf_forward_peak[b, :k] = units(option.leaf_forward_peak)
            leaf_time[b, :k] = option.leaf_time
            forward_peak[b, :k] = units(option.forward_peak)
            kept[b, :k] = units(option.kept)
            backward_peak[b, :k] = units(option.backward_peak)
            time[b, :k] = option.time
        loss = self.options[self.n_blocks]
        chain = self.chain
        return ChainProblem(
            forward_peak=forward_peak, kept=kept, backward_peak=backward_peak, time=time, output_time=output_time,
            first_forward_peak=first_forward_peak, backward_time=backward_time,
            leaf_forward_peak=leaf_forward_peak, leaf_time=leaf_time,
            checkpoint=units(chain.checkpoint_bytes[: self.n_blocks]), crossing=units(chain.crossing_bytes),
            checkpoint_forward_peak=units([o.checkpoint_forward_peak for o in model]).reshape(-1),
            checkpoint_forward_time=np.array([o.checkpoint_forward_time for o in model], dtype=np.float64).reshape(-1),
            first_forward_time=np.array([o.first_forward_time for o in model], dtype=np.float64).reshape(-1),
            first_checkpoint_peak=units([o.first_checkpoint_peak for o in model]).reshape(-1),
            long_lived_forward=units(chain.long_lived_forward), long_lived_backward=units(chain.long_lived_backward),
            frontier=units(chain.frontier_bytes), through=units(chain.through_bytes),
            loss_forward_peak=int(units(loss.forward_peak[0])), loss_backward_peak=int(units(loss.backward_peak[0])),
            loss_time=float(loss.time[0]), quanta=quanta)

    def _option_orders(self, block: int, option: int, leaf: bool = False) -> tuple[np.ndarray, np.ndarray]:
        key = (block, option, leaf)
        if key not in self._orders:
            local = self.locals[block]
            forward, backward = orders(local, int(self.options[block].masks[option]), leaf)
            self._orders[key] = (local.ops[forward], local.ops[backward])
        return self._orders[key]

    def order(self, solution: ChainSolution) -> list[int]:
        """The op order of a chain solution (forward ops repeated where recomputed)."""
        blocks = self.chain.blocks
        pieces: list = []
        for action in solution.actions:
            kind = action[0]
            if kind == "first":
                pieces.append(blocks[action[1]].forward_ops)
            elif kind == "first_ck":
                pieces.extend(blocks[b].forward_ops for b in range(action[1], action[2] + 1))
            elif kind == "loss":
                loss = blocks[self.n_blocks]
                pieces.append(loss.forward_ops)
                pieces.append(loss.backward_ops)
            elif kind in ("forward", "leaf"):
                pieces.append(self._option_orders(action[1], action[2], kind == "leaf")[0])
            elif kind == "output":
                local = self.locals[action[1]]
                pieces.append(local.ops[output_order(local, int(self.options[action[1]].masks[action[2]]))])
            elif kind == "forward_ck":
                for b in range(action[1], action[2] + 1):
                    local = self.locals[b]
                    pieces.append(local.ops[checkpoint_forward(local)])
            else:  # backward
                pieces.append(self._option_orders(action[1], action[2])[1])
        return [int(op) for piece in pieces for op in piece]

    def schedule(self, solution: ChainSolution) -> Schedule:
        return Schedule.from_order(self.graph, self.order(solution))


def prepare(graph: TrainingGraph, cost_model: CostModel, policy: str = TINY_MERGE_POLICIES[0]) -> Hierarchy:
    """Partition ``graph`` (tiny regions merged by ``policy``) and compute every distinct block's
    options."""
    return _BlockSolver(graph, cost_model).hierarchy(partition(graph, policy))


def prepare_all(graph: TrainingGraph, cost_model: CostModel) -> list[Hierarchy]:
    """One hierarchy per distinct partition: small blocks with either tiny-region policy, large
    blocks (``BLOCK_SCALES``) with the first policy only, and the small blocks of the first policy
    joined in pairs (``PAIRINGS``: each offset) where no pair holds more than
    ``JOINED_CANDIDATES`` candidates; each partition costs a DP. A block the
    partitions share is solved once; a joined block combines its parts' options."""
    solver = _BlockSolver(graph, cost_model)
    sites = cut_sites(graph)
    small_ends, *other_ends = _unpaired_ends(sites)
    small = solver.hierarchy(chain_of(graph, sites, small_ends))
    found = {small_ends: small}
    for ends in other_ends:
        if ends not in found:
            found[ends] = solver.hierarchy(chain_of(graph, sites, ends))
    candidates = np.array([local.n_candidates for local in small.locals[: small.n_blocks]])
    for offset in PAIRINGS:
        ends = block_ends(sites, TINY_MERGE_POLICIES[0], BLOCK_SCALES[0], offset)
        joined = np.add.reduceat(candidates, np.searchsorted(small_ends, (0,) + ends[:-1], side="right")) \
            if len(candidates) else candidates
        if ends not in found and len(joined) and joined.max() <= JOINED_CANDIDATES:
            found[ends] = solver.hierarchy(chain_of(graph, sites, ends), small)
    return [hierarchy for hierarchy in found.values() if hierarchy is not None]


def _unpaired_ends(sites) -> list[tuple[int, ...]]:
    """Block ends of ``prepare_all``'s partitions but the joined ones, the small blocks of the
    first policy first."""
    choices = [(TINY_MERGE_POLICIES[0], BLOCK_SCALES[0])] + [(policy, BLOCK_SCALES[0]) for policy in
                                                            TINY_MERGE_POLICIES[1:]] + \
        [(TINY_MERGE_POLICIES[0], scale) for scale in BLOCK_SCALES[1:]]
    return [block_ends(sites, policy, scale) for policy, scale in choices]


def prepare_fine(graph: TrainingGraph, cost_model: CostModel) -> list[Hierarchy]:
    """For budgets no partition of ``prepare_all`` fits: the small blocks with over-long regions
    split ``blocks.FINE_SPLIT`` times finer (more blocks, a larger DP), with spanning storages
    (``blocks.chain_of``), which a run of blocks the chain DP drops drops with it."""
    sites = cut_sites(graph)
    ends = block_ends(sites, TINY_MERGE_POLICIES[0], BLOCK_SCALES[0], fine=True)
    return [_BlockSolver(graph, cost_model).hierarchy(chain_of(graph, sites, ends, spanning=True))]


class _BlockSolver:
    """Block options of one graph under one cost model, each distinct block (``LocalBlock.key``:
    its ops, arrays, times and storage roles) solved once across partitions."""

    def __init__(self, graph: TrainingGraph, cost_model: CostModel):
        self.graph = graph
        self.times = cost_model.op_times(graph)
        self.workspace = cost_model.workspace_bytes(graph)
        self.by_key: dict[str, BlockOptions] = {}

    def hierarchy(self, chain: BlockChain, parts: Hierarchy | None = None) -> Hierarchy | None:
        """The hierarchy of ``chain``; ``parts``: that of a finer chain whose consecutive blocks
        ``chain``'s blocks join (None if a joined block has more candidates than a mask holds:
        joined, a storage its parts held long-lived can become a candidate)."""
        locals_ = [local_block(self.graph, chain, block, self.times, self.workspace) for block in chain.blocks]
        if parts is not None and max(local.n_candidates for local in locals_) > MASK_BITS:
            return None
        for block, local in zip(chain.blocks, locals_):
            if local.key not in self.by_key:
                joined = () if parts is None else [
                    (parts.locals[b], parts.options[b])
                    for b in np.unique(parts.chain.block_of_op[list(block.forward_ops)])]
                self.by_key[local.key] = block_options(local, joined)
        return Hierarchy(self.graph, chain, locals_, [self.by_key[local.key] for local in locals_])


class _Columns:
    """Schedules of a DP table's memory columns, each distinct solution emitted and simulated
    once, and the best one (``result.rank`` for ``budget_bytes``) seen."""

    def __init__(self, hierarchy: Hierarchy, cost_model: CostModel, tables: ChainTables, budget_bytes: int):
        self.hierarchy, self.cost_model, self.tables, self.budget_bytes = hierarchy, cost_model, tables, budget_bytes
        self.seen: dict[tuple, tuple[Schedule, SimResult]] = {}
        self.best: tuple[Schedule, SimResult] | None = None
        self._best_key = None

    def fits(self, column: int) -> bool | None:
        """Whether the schedule of ``column`` fits the budget (None: the DP has none there)."""
        solution = self.tables.solution(column)
        if solution is None:
            return None
        if solution.actions not in self.seen:
            schedule = self.hierarchy.schedule(solution)
            self.seen[solution.actions] = (schedule, simulate(self.hierarchy.graph, schedule, self.cost_model))
        found = self.seen[solution.actions]
        key = rank(found[1], self.budget_bytes)
        if self._best_key is None or key < self._best_key:
            self.best, self._best_key = found, key
        return key[0] == 0


def _bisect(columns: _Columns, low: int, high: int, column: int) -> None:
    """Bisect the DP's memory column in [low, high] against simulated peaks, from ``column``: the
    DP's memory model is conservative but not exact, so the largest column whose schedule
    really fits is searched."""
    for _ in range(LIMIT_SEARCH_STEPS):
        if low > high:
            break
        if columns.fits(column) is False:  # None: nothing fits the DP's model there
            high = column - 1
        else:
            low = column + 1
        column = (low + high) // 2


def search(hierarchy: Hierarchy, cost_model: CostModel, budget_bytes: int) -> tuple[Schedule, SimResult] | None:
    """The fastest schedule the chain DP finds whose simulated peak fits ``budget_bytes``; if
    none fits, the lowest-peak one found (None if the DP found nothing). One DP over memory
    amounts up to twice the activation budget, then bisection over its columns; if that finds
    nothing fitting, ``SCAN_COLUMNS`` columns spread over the rest (where memory the DP's model
    does not see, gradients shared across blocks, makes the simulated peak not grow with the
    column, as in an unrolled LSTM, bisection misses columns that fit)."""
    activation_budget = float(budget_bytes - hierarchy.graph.resident_bytes)
    if activation_budget <= 0:
        return None
    tables = tabulate(hierarchy.problem(2 * activation_budget))
    least = tables.least_quanta()
    if least is None:
        return None
    columns = _Columns(hierarchy, cost_model, tables, budget_bytes)
    _bisect(columns, least, QUANTA, max(least, QUANTA // 2))
    if columns.best[1].peak_bytes > budget_bytes:
        for column in np.unique(np.linspace(least, QUANTA, SCAN_COLUMNS).round().astype(int)):
            columns.fits(int(column))
    return columns.best


def least_memory(hierarchy: Hierarchy, cost_model: CostModel) -> tuple[Schedule, SimResult] | None:
    """The lowest simulated peak the chain DP reaches, whatever its time: the fewest memory
    units the DP fits, found at the store-all scale and again at a finer one around it."""
    graph = hierarchy.graph
    limit = float(simulate(graph, Schedule.store_all(graph), cost_model).peak_bytes - graph.resident_bytes)
    best, best_key = None, None
    for _ in range(2):
        tables = tabulate(hierarchy.problem(limit))
        least = tables.least_quanta()
        if least is None:
            break
        for column in range(least, min(least + LEAST_MEMORY_COLUMNS, QUANTA) + 1):
            schedule = hierarchy.schedule(tables.solution(column))
            result = simulate(graph, schedule, cost_model)
            key = rank(result, 0)  # fitting nothing: by peak, then time
            if best_key is None or key < best_key:
                best, best_key = (schedule, result), key
        limit = limit * (least + 1) / QUANTA * 2  # zoom in: the same units over twice that span
    return best


def hierarchical(graph: TrainingGraph, cost_model: CostModel, budget_bytes: int) -> Schedule:
    """Hierarchical planning (module docstring) on each distinct partition (``prepare_all``, and
    ``prepare_fine`` where none fits): the fastest schedule found within the budget, else the one
    of least peak, reordered where that lowers it further."""
    found = [_plan(hierarchy, cost_model, budget_bytes) for hierarchy in prepare_all(graph, cost_model)]
    found = [f for f in found if f is not None]
    if not any(f[1].peak_bytes <= budget_bytes for f in found):  # tight: finer blocks
        found += [f for f in (_plan(hierarchy, cost_model, budget_bytes) for hierarchy in
                              prepare_fine(graph, cost_model)) if f is not None]
    if not found:
        return Schedule.store_all(graph)
    schedule, result = min(found, key=lambda f: rank(f[1], budget_bytes))
    return schedule if result.peak_bytes <= budget_bytes else reorder_schedule(graph, schedule, cost_model)


def _plan(hierarchy: Hierarchy, cost_model: CostModel, budget_bytes: int) -> tuple[Schedule, SimResult] | None:
    """The fastest fitting schedule of one hierarchy, else its least-peak one, whatever the
    budget (so that the least peak an infeasible budget reports is a budget that plans): tight,
    in that a search just under that peak finds nothing lower."""
    found = search(hierarchy, cost_model, budget_bytes)
    if found is not None and found[1].peak_bytes <= budget_bytes:
        return found
    found = least_memory(hierarchy, cost_model)
    while found is not None:
        lower = search(hierarchy, cost_model, found[1].peak_bytes - 1)
        if lower is None or lower[1].peak_bytes >= found[1].peak_bytes:
            break
        found = lower
    return found
