"""The chain DP: one option per block, with multi-level recomputation across blocks.

Blocks 0..L-1 form a chain (the loss is block L). A backward pass over blocks s..t starts with
the input of block s held (the checkpoint of the cut before s) and the gradient at the end of t.
It either

- runs block s's forward keeping option o's tensors (``ALL``), solves s+1..t with that much less
  memory, then runs block s's backward; or
- runs blocks s..s2-1 forward keeping only what crosses the cut after s2-1 (``CK``: its
  checkpoint, and the spanning storages of blocks s..s2-1 read after it, ``crossing[s, s2-1]``),
  solves s2..t with that held, then solves s..s2-1 again from the input of s: a block
  recomputed in the backward may itself drop and recompute, as in rotor/revolve (Herrmann et
  al. 2019, and Rockmate's per-block options).

A pass over one block (s = t) is a *leaf*: the blocks after it are done, so its forward computes
only what its option keeps, not its output (``leaf_forward_peak``, ``leaf_time``).

A block's output need not be held while the blocks after its reader run: after ``ALL`` with
option o at s, the pass over s+1..t may be *soft* (``soft[s+1, t, m]``): it drops block s's
output once block s+1's forward has read it, solves what follows with that memory back, and
recomputes the output from option o's kept tensors (``output_time[s, o]``, a BatchNorm, residual
add and ReLU, or a LayerNorm) right before block s+1 needs it again.

``cost[s, t, m]`` is the least time of the pass over s..t with m memory units, and the first
forward (``first[s, m]``: blocks s..L with the loss, before any backward) follows the same rules,
with every op of a block run (its first-forward peak and time) where a recomputation runs only
what the kept tensors and the output need.
Memory held outside every block (long-lived storages, gradients crossing blocks, the
``BlockChain`` arrays) is added where each check happens; memory units are ``limit / Q`` bytes,
every size rounded up, so a plan the DP accepts needs at most its limit in its model.

Complexity: O(L^2 Q (P + L)) time and O(L^2 Q) memory for L blocks, Q units and P options per
block; numba.
"""
from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np

QUANTA = 256
_NONE = np.int32(-(1 << 30))


@dataclass(frozen=True)
class ChainProblem:
    """The DP's inputs in memory units (int64) and seconds."""

    forward_peak: np.ndarray  # [L, P]
    kept: np.ndarray  # [L, P]
    backward_peak: np.ndarray  # [L, P]
    time: np.ndarray  # [L, P] (inf where a block has fewer options)
    output_time: np.ndarray  # [L, P] recomputing the block's output from the option's kept tensors
    first_forward_peak: np.ndarray  # [L, P] the forward peak when the first forward runs the block
    backward_time: np.ndarray  # [L, P] the backward part of ``time``
    leaf_forward_peak: np.ndarray  # [L, P] the forward peak of a leaf pass (``s == t``: no output computed)
    leaf_time: np.ndarray  # [L, P] ``time`` of a leaf pass
    checkpoint: np.ndarray  # [L] output checkpoint of each block (what a soft pass drops)
    crossing: np.ndarray  # [L, L] what a run of blocks s..e recomputed keeping only outputs leaves
    checkpoint_forward_peak: np.ndarray  # [L]
    checkpoint_forward_time: np.ndarray  # [L]
    first_forward_time: np.ndarray  # [L] every forward op of the block (the first forward runs all)
    first_checkpoint_peak: np.ndarray  # [L] the first forward's peak keeping only the output
    long_lived_forward: np.ndarray  # [L + 1]
    long_lived_backward: np.ndarray  # [L + 1]
    frontier: np.ndarray  # [L + 1]
    through: np.ndarray  # [L + 1]
    loss_forward_peak: int
    loss_backward_peak: int
    loss_time: float
    quanta: int  # memory units available at the top


@dataclass(frozen=True)
class ChainSolution:
    time: float  # the DP's objective (seconds, every forward and backward run counted)
    actions: tuple[tuple, ...]  # ("first", s, o) / ("first_ck", s, e) / ("forward", s, o) / ("leaf", s, o) /
    # ("forward_ck", s, e) / ("backward", s, o) / ("output", s, o) / ("loss",), in execution order


@dataclass(frozen=True)
class ChainTables:
    """The DP's tables for every memory amount up to ``problem.quanta``: one computation serves
    every limit a search tries."""

    problem: ChainProblem
    tables: tuple

    def time(self, quanta: int) -> float:
        """The least time with ``quanta`` units (inf if nothing fits)."""
        return float(self.tables[4][0, quanta])

    def least_quanta(self) -> int | None:
        """The fewest units anything fits in."""
        feasible = np.flatnonzero(np.isfinite(self.tables[4][0]))
        return int(feasible[0]) if len(feasible) else None

    def solution(self, quanta: int) -> ChainSolution | None:
        if not np.isfinite(self.time(quanta)):
            return None
        return ChainSolution(self.time(quanta), _decode(self.problem, self.tables, quanta))


def tabulate(problem: ChainProblem) -> ChainTables:
    return ChainTables(problem, _tables(
        problem.forward_peak, problem.kept, problem.backward_peak, problem.time, problem.output_time,
        problem.first_forward_peak, problem.backward_time, problem.leaf_forward_peak, problem.leaf_time,
        problem.first_forward_time,
        problem.first_checkpoint_peak, problem.checkpoint, problem.crossing, problem.checkpoint_forward_peak,
        problem.checkpoint_forward_time,
        problem.long_lived_forward, problem.long_lived_backward, problem.frontier, problem.through,
        problem.loss_forward_peak, problem.loss_backward_peak, problem.loss_time, problem.quanta))


def solve(problem: ChainProblem) -> ChainSolution | None:
    """The least-time chain schedule that fits ``problem.quanta`` units; None if none does."""
    return tabulate(problem).solution(problem.quanta)


@numba.njit(cache=True)
def _tables(fpeak, kept, bpeak, time, out_time, first_fpeak, btime, leaf_fpeak, leaf_time, first_time,
            first_ck_peak, ckpt, cross, ck_peak, ck_time, wf, wb, frontier, through, loss_fpeak, loss_bpeak, loss_time,
            quanta):
    """cost/soft (passes over s..t, input held / droppable), first/first_soft (the first
    forward from s), each with its decision table: an option o (``ALL``), ``P + o`` (``ALL``
    with a soft pass after it), or -s2 (``CK`` up to s2 - 1)."""
    n_blocks, n_options = fpeak.shape
    inf = np.inf
    none = -(1 << 30)
    ck_need, ck_sum = _runs(ck_peak, ck_time, cross)  # recomputing blocks s..e for what crosses after e
    first_need, first_sum = _runs(first_ck_peak, first_time, cross)  # the first forward of them
    cost = np.full((n_blocks, n_blocks, quanta + 1), inf)
    soft = np.full((n_blocks, n_blocks, quanta + 1), inf)
    decision = np.full((n_blocks, n_blocks, quanta + 1), none, dtype=np.int32)
    soft_decision = np.full((n_blocks, n_blocks, quanta + 1), none, dtype=np.int32)
    best = np.empty(quanta + 1)  # per memory amount, over the choices in the original order
    choice = np.empty(quanta + 1, dtype=np.int32)
    for d in range(n_blocks):
        for s in range(n_blocks - d):
            t = s + d
            fwd_extra = frontier[t] + wb[t]
            bwd_extra = through[s] + wb[s]
            x_in = ckpt[s - 1] if s > 0 else 0
            best[:] = inf
            choice[:] = none
            for o in range(n_options):  # m innermost: the tables are read along memory
                if time[s, o] == inf:
                    continue
                if d == 0:  # a leaf pass: the blocks after s are done, its output is not computed
                    low = max(leaf_fpeak[s, o] + fwd_extra, bpeak[s, o] + bwd_extra, 0)
                else:
                    low = max(fpeak[s, o] + fwd_extra, bpeak[s, o] + bwd_extra, kept[s, o], 0)
                for m in range(low, quanta + 1):
                    if d == 0:
                        c, pick = leaf_time[s, o], o
                    else:
                        rest = m - kept[s, o]
                        c, pick = time[s, o] + cost[s + 1, t, rest], o
                        c_soft = time[s, o] + soft[s + 1, t, rest] + out_time[s, o]
                        if c_soft < c:
                            c, pick = c_soft, n_options + o
                    if c < best[m]:
                        best[m], choice[m] = c, pick
            for s2 in range(s + 1, t + 1):
                for m in range(max(ck_need[s, s2 - 1] + fwd_extra, cross[s, s2 - 1], 0), quanta + 1):
                    c = ck_sum[s, s2 - 1] + cost[s2, t, m - cross[s, s2 - 1]] + cost[s, s2 - 1, m]
                    if c < best[m]:
                        best[m], choice[m] = c, -s2
            cost[s, t, :] = best
            decision[s, t, :] = choice
            if s == 0 or d == 0:
                continue
            best[:] = inf  # soft: the input is dropped after block s's forward
            choice[:] = none
            for o in range(n_options):
                if time[s, o] == inf:
                    continue
                low = max(fpeak[s, o] + fwd_extra, bpeak[s, o] + bwd_extra, kept[s, o],
                          ck_peak[s - 1] + kept[s, o] + frontier[s] + wb[s] - x_in, 0)
                for m in range(low, quanta + 1):
                    c = time[s, o] + cost[s + 1, t, min(m - kept[s, o] + x_in, quanta)]
                    if c < best[m]:
                        best[m], choice[m] = c, o
            for s2 in range(s + 1, t + 1):
                low = max(ck_need[s, s2 - 1] + fwd_extra, cross[s, s2 - 1],
                          ck_peak[s - 1] + frontier[s2 - 1] + wb[s2 - 1] - x_in, 0)
                for m in range(low, quanta + 1):
                    c = ck_sum[s, s2 - 1] + cost[s2, t, min(m - cross[s, s2 - 1] + x_in, quanta)] + cost[s, s2 - 1, m]
                    if c < best[m]:
                        best[m], choice[m] = c, -s2
            soft[s, t, :] = best
            soft_decision[s, t, :] = choice
    first = np.full((n_blocks + 1, quanta + 1), inf)
    first_soft = np.full((n_blocks + 1, quanta + 1), inf)
    first_decision = np.full((n_blocks + 1, quanta + 1), none, dtype=np.int32)
    first_soft_decision = np.full((n_blocks + 1, quanta + 1), none, dtype=np.int32)
    for m in range(quanta + 1):
        if loss_fpeak + wf[n_blocks] <= m and loss_bpeak + through[n_blocks] + wb[n_blocks] <= m:
            first[n_blocks, m] = loss_time
            first_decision[n_blocks, m] = 0
    for s in range(n_blocks - 1, -1, -1):
        x_in = ckpt[s - 1] if s > 0 else 0
        bwd_extra = through[s] + wb[s]
        for m in range(quanta + 1):
            best, choice = inf, none
            for o in range(n_options):
                if time[s, o] == inf or first_fpeak[s, o] + wf[s] > m or bpeak[s, o] + bwd_extra > m \
                        or m - kept[s, o] < 0:
                    continue
                rest = m - kept[s, o]
                block_time = first_time[s] + btime[s, o]
                c, pick = block_time + first[s + 1, rest], o
                c_soft = block_time + first_soft[s + 1, rest] + out_time[s, o]
                if c_soft < c:
                    c, pick = c_soft, n_options + o
                if c < best:
                    best, choice = c, pick
            for s2 in range(s + 1, n_blocks + 1):
                if first_need[s, s2 - 1] + wf[s2 - 1] > m or m - cross[s, s2 - 1] < 0:
                    continue
                c = first_sum[s, s2 - 1] + first[s2, m - cross[s, s2 - 1]] + cost[s, s2 - 1, m]
                if c < best:
                    best, choice = c, -s2
            first[s, m] = best
            first_decision[s, m] = choice
            if s == 0:
                continue
            best, choice = inf, none
            for o in range(n_options):
                if time[s, o] == inf or first_fpeak[s, o] + wf[s] > m or bpeak[s, o] + bwd_extra > m \
                        or m - kept[s, o] < 0 or ck_peak[s - 1] + kept[s, o] + frontier[s] + wb[s] > m + x_in:
                    continue
                c = first_time[s] + btime[s, o] + first[s + 1, min(m - kept[s, o] + x_in, quanta)]
                if c < best:
                    best, choice = c, o
            for s2 in range(s + 1, n_blocks + 1):
                if first_need[s, s2 - 1] + wf[s2 - 1] > m or m - cross[s, s2 - 1] < 0 \
                        or ck_peak[s - 1] + frontier[s2 - 1] + wb[s2 - 1] > m + x_in:
                    continue
                c = first_sum[s, s2 - 1] + first[s2, min(m - cross[s, s2 - 1] + x_in, quanta)] + cost[s, s2 - 1, m]
                if c < best:
                    best, choice = c, -s2
            first_soft[s, m] = best
            first_soft_decision[s, m] = choice
    return cost, decision, soft, soft_decision, first, first_decision, first_soft, first_soft_decision


@numba.njit(cache=True)
def _runs(peak, time, cross):
    """For runs of blocks s..e computed forward keeping only outputs: the peak needed (each
    block's peak, with what the run made before it and still reads held) and the total time."""
    n_blocks = len(peak)
    need = np.zeros((n_blocks, n_blocks), dtype=np.int64)
    total = np.zeros((n_blocks, n_blocks))
    for s in range(n_blocks):
        running, seconds = 0, 0.0
        for e in range(s, n_blocks):
            running = max(running, peak[e] + (cross[s, e - 1] if e > s else 0))
            seconds += time[e]
            need[s, e] = running
            total[s, e] = seconds
    return need, total


def _decode(problem: ChainProblem, tables, quanta: int) -> tuple:
    """The DP's choices with ``quanta`` units, as actions in execution order (an explicit stack:
    chains can be deep)."""
    _, decision, _, soft_decision, _, first_decision, _, first_soft_decision = tables
    n_blocks, n_options = problem.kept.shape
    kept, checkpoint = problem.kept, problem.checkpoint
    actions: list[tuple] = []
    stack: list[tuple] = [("first", 0, quanta, None)]
    while stack:
        item = stack.pop()
        kind = item[0]
        if kind in ("first", "first_soft", "pass", "soft"):
            is_first = kind.startswith("first")
            is_soft = kind.endswith("soft")
            if is_first:
                _, s, m, owner = item
                t = n_blocks
                if s == n_blocks:
                    actions.append(("loss",))
                    continue
                choice = int((first_soft_decision if is_soft else first_decision)[s, m])
            else:
                _, s, t, m, owner = item
                choice = int((soft_decision if is_soft else decision)[s, t, m])
            x_in = int(checkpoint[s - 1]) if is_soft else 0
            hard = "first" if is_first else "pass"
            if choice >= 0:
                o = choice % n_options
                actions.append(("first" if is_first else "leaf" if s == t else "forward", s, o))
                stack.append(("backward", s, o))
                if is_soft:
                    stack.append(("output",) + owner)
                rest = m - int(kept[s, o])
                if choice >= n_options:  # the pass after s drops s's output and recomputes it
                    stack.append(("first_soft", s + 1, rest, (s, o)) if is_first else ("soft", s + 1, t, rest, (s, o)))
                elif is_first or s < t:
                    rest = min(rest + x_in, problem.quanta)
                    stack.append(("first", s + 1, rest, None) if is_first else ("pass", s + 1, t, rest, None))
            else:
                s2 = -choice
                actions.append(("first_ck" if is_first else "forward_ck", s, s2 - 1))
                stack.append(("pass", s, s2 - 1, m, None))
                if is_soft:
                    stack.append(("output",) + owner)
                rest = min(m - int(problem.crossing[s, s2 - 1]) + x_in, problem.quanta)
                stack.append((hard, s2, rest, None) if is_first else (hard, s2, t, rest, None))
        else:
            actions.append(item)
    return tuple(actions)
