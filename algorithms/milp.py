"""Exact mode: the least-recompute staged schedule as a MILP, solved by HiGHS.

Variables, over the coarsened problem of ``staging.py`` (K stages, nodes f, groups g):

- ``keep[k, g]``: group g is held when stage k starts (``k = 0``: kept after the forward);
- ``recompute[k, f]``: node f is recomputed right before stage k;
- continuous *derived* columns, each defined by lower bounds on binaries (and earlier derived
  columns) and pushed down by the memory rows: ``live`` (is a group still needed from here on in
  a recomputation phase) and ``memory`` (the bytes live at a position of the phase).

A binary exists only while it can still serve a later stage (``last_useful``). Logic rows: a
stage's reads are held or recomputed; a recomputation's inputs are held or recomputed in the
same stage; a group is held into stage k+1 only if it was held or recomputed in stage k; a group
is not both held and recomputed in one stage; backward aliases pin their storage.

Memory rows, against ``budget - resident``, with sizes rounded up and the budget down to a common
unit (so every answer fits in bytes), follow the decoded schedule op by op:

- each forward op: bytes every schedule holds there + groups past their last forward use if kept;
- each op of a recomputation phase: every group still to be read by a later op of the phase, by
  the stage or by a later stage (its ``live`` column: the largest of the recomputations that read
  it later and ``keep[k+1, g]``) + what the op's node holds only inside itself + the fixed
  backward bytes; the ``memory`` columns chain these sums from op to op, so each row has a few
  terms;
- each stage op: its reads + groups carried past it + the fixed backward bytes there;
- each stage's tail ops: groups carried + the fixed backward bytes there.

At the least holding a recomputation pattern needs (``StagedProblem.minimal_keep``) with the
derived columns at their lower bounds (``Formulation.vector``), every row *equals* what the
simulator counts at that step of the decoded schedule (up to the unit rounding): a staged schedule
the simulator fits is never rejected, and any point the rows accept fits. The objective is the
decoded schedule's recompute time exactly. "Optimal" therefore means: no staged schedule (forward
once in graph order, backward ops in the problem's order, whole nodes recomputed before stages)
is faster.

The phase rows are most of the model: ``exact_search`` adds them by rounds, only for the stages
an answer broke (each round a relaxation, so its bound is the whole problem's; see there), except
in a model small enough to solve whole (``WHOLE_NONZEROS``).

The objective is scaled to ``TIME_SCALE`` units per step time and HiGHS's absolute gap is zero:
in seconds a small graph's recompute times are ~1e-8, below HiGHS's default absolute gap (1e-6),
which stopped it at the first incumbent.

Complexity: O(stages x band positions) derived columns and rows, each with O(1) non-zeros, plus
one row per stage over its band.
"""
from __future__ import annotations

import math
import time
from bisect import bisect_left
from dataclasses import dataclass
from typing import Callable, Collection, Sequence

import numpy as np
from scipy import sparse

from planner.algorithms.bounds import memory_lower_bound, step_time_lower_bound
from planner.algorithms.staging import StagedProblem, block_backward_order, build_problem
from planner.cost import CostModel
from planner.graph import TrainingGraph
from planner.quiet import silenced
from planner.schedule import Schedule
from planner.simulator import SimResult, simulate

SCALED_BUDGET = 2 ** 22  # the budget in units is at most this: coefficients stay well inside double precision
TIME_SCALE = 2 ** 20  # objective units per store-all step time
# called with (incumbent time, lower bound, seconds elapsed) at each improvement; returning True
# stops the solver, which then reports its incumbent
Progress = Callable[[float, float, float], "bool | None"]


# ---- linear expressions over columns ----------------------------------------------------------
@dataclass(frozen=True)
class Expr:
    """``const + sum(coef * x[col])``."""

    terms: tuple[tuple[int, float], ...] = ()
    const: float = 0.0

    @staticmethod
    def of(column: int, coef: float = 1.0) -> "Expr":
        return Expr(((column, coef),)) if column >= 0 else Expr()

    def __add__(self, other: "Expr") -> "Expr":
        return Expr(self.terms + other.terms, self.const + other.const)

    def scaled(self, factor: float) -> "Expr":
        if factor == 1.0:
            return self
        return Expr(tuple((c, v * factor) for c, v in self.terms), self.const * factor)

    def minus(self, other: "Expr", factor: float) -> "Expr":
        """``factor * (self - other)`` in one pass."""
        return Expr(tuple((c, v * factor) for c, v in self.terms) + tuple((c, -v * factor) for c, v in other.terms),
                    (self.const - other.const) * factor)

    @staticmethod
    def total(exprs) -> "Expr":
        """The sum of ``exprs``, in time linear in their terms (``+`` copies)."""
        terms: list[tuple[int, float]] = []
        const = 0.0
        for expr in exprs:
            terms.extend(expr.terms)
            const += expr.const
        return Expr(tuple(terms), const)

    def is_constant(self, value: float) -> bool:
        return not self.terms and self.const == value


@dataclass(frozen=True)
class Formulation:
    """``min cost.x`` s.t. ``row_lower <= A x <= row_upper``, ``col_lower <= x <= col_upper``,
    integrality. Memory rows are ``memory @ x + memory_fixed <= capacity`` (in units), or
    ``<= x[peak_column]`` when the peak itself is minimised."""

    problem: StagedProblem
    cost: np.ndarray  # the objective (time units, or the peak column's 1)
    time_cost: np.ndarray  # time units per column: the recompute time of a point
    matrix: sparse.csr_matrix
    row_lower: np.ndarray
    row_upper: np.ndarray
    col_lower: np.ndarray
    col_upper: np.ndarray
    keep_index: np.ndarray  # [K, groups] -> column, -1 where the variable does not exist
    recompute_index: np.ndarray  # [K, nodes] -> column, -1 where it does not exist
    integrality: np.ndarray  # 1 for binaries, 0 for continuous columns
    derived: tuple[tuple[int, tuple[Expr, ...]], ...]  # (column, its lower bounds), in dependency order
    memory: sparse.csr_matrix  # the plan-dependent part of each memory row, in units
    memory_fixed: np.ndarray  # and its fixed part
    memory_labels: tuple[str, ...]
    memory_phase: np.ndarray  # per memory row: the stage whose recomputation phase it follows, -1 if none
    unit: int  # bytes per memory unit
    time_unit: float  # seconds per objective unit
    capacity: int  # units available beyond resident memory (budget mode)
    peak_column: int  # -1 when a budget is given
    constant_violation: str  # a row no choice can satisfy (the budget is below the staged minimum), or ""

    @property
    def n_columns(self) -> int:
        return len(self.cost)

    @property
    def n_binaries(self) -> int:
        return int(self.integrality.sum())

    def vector(self, keep: np.ndarray, recompute: np.ndarray) -> np.ndarray:
        """The point of a holding and recomputation pattern, derived columns at their least."""
        x = np.zeros(self.n_columns)
        for index, values in ((self.keep_index, keep), (self.recompute_index, recompute)):
            present = index >= 0
            x[index[present]] = values[present]
        for column, bounds in self.derived:
            x[column] = max([self.col_lower[column]] + [_value(bound, x) for bound in bounds])
        if self.peak_column >= 0:
            x[self.peak_column] = max(0.0, float(np.max(self.memory @ x + self.memory_fixed, initial=0.0)))
        return x

    def rounded(self, x: np.ndarray) -> np.ndarray:
        """A solver's point with its binaries snapped to 0 or 1 and the derived columns recomputed."""
        snapped = np.where(self.integrality > 0, np.round(x), x)
        return self.vector(self.keep_of(snapped), self.recompute_of(snapped))

    def keep_of(self, x: np.ndarray) -> np.ndarray:
        keep = np.zeros(self.keep_index.shape, dtype=bool)
        present = self.keep_index >= 0
        keep[present] = x[self.keep_index[present]] > 0.5
        return keep

    def recompute_of(self, x: np.ndarray) -> np.ndarray:
        recompute = np.zeros(self.recompute_index.shape, dtype=bool)
        present = self.recompute_index >= 0
        recompute[present] = x[self.recompute_index[present]] > 0.5
        return recompute

    def violation(self, x: np.ndarray) -> float:
        """Largest violation of any row or bound by ``x`` (0 for a feasible point)."""
        ax = self.matrix @ x
        return float(max(0.0, np.max(self.row_lower - ax, initial=0.0), np.max(ax - self.row_upper, initial=0.0),
                         np.max(self.col_lower - x, initial=0.0), np.max(x - self.col_upper, initial=0.0)))

    def objective(self, x: np.ndarray) -> float:
        """The step time of a point, in seconds."""
        return self.problem.base_time + self.time_unit * float(self.time_cost @ x)

    def phases_over_budget(self, x: np.ndarray) -> set[int]:
        """The stages whose recomputation-phase memory rows ``x`` breaks (budget mode)."""
        over = self.memory @ x + self.memory_fixed > self.capacity + 1e-9
        return {int(k) for k in self.memory_phase[over] if k >= 0}

    def peak_bytes(self, x: np.ndarray) -> int:
        """The peak the memory rows count for a point (resident memory included)."""
        units = float(np.max(self.memory @ x + self.memory_fixed, initial=0.0))
        return self.problem.resident_bytes + int(round(units)) * self.unit


def _value(expr: Expr, x: np.ndarray) -> float:
    return expr.const + sum(coef * x[col] for col, coef in expr.terms)


class _Builder:
    """Columns, COO rows and memory rows, appended one by one."""

    def __init__(self) -> None:
        self.lower: list[float] = []
        self.upper: list[float] = []
        self.integer: list[int] = []
        self.time: list[float] = []
        self.rows: tuple[list, list, list] = ([], [], [])
        self.row_lower: list[float] = []
        self.row_upper: list[float] = []
        self.memory: tuple[list, list, list] = ([], [], [])
        self.memory_fixed: list[float] = []
        self.memory_labels: list[str] = []
        self.memory_phase: list[int] = []
        self.derived: list[tuple[int, tuple[Expr, ...]]] = []
        self.covers: dict[Expr, frozenset[Expr]] = {}  # a derived column -> the expressions it is at least

    def column(self, lower: float, upper: float, integer: bool, time_units: float = 0.0) -> int:
        self.lower.append(lower)
        self.upper.append(upper)
        self.integer.append(int(integer))
        self.time.append(time_units)
        return len(self.lower) - 1

    def row(self, expr: Expr, lower: float, upper: float) -> None:
        """``lower <= expr <= upper``."""
        index = len(self.row_lower)
        for col, coef in expr.terms:
            self.rows[0].append(index)
            self.rows[1].append(col)
            self.rows[2].append(coef)
        self.row_lower.append(lower - expr.const)
        self.row_upper.append(upper - expr.const)

    def at_least(self, bounds: Sequence[Expr], upper: float = 1.0) -> Expr:
        """A column no smaller than each of ``bounds`` (the memory rows push it down to their
        largest). No column is made where one bound already covers the others (a constant
        ``upper``, or a column made at least all of them)."""
        bounds = list(dict.fromkeys(b for b in bounds if not b.is_constant(0.0)))
        if not bounds:
            return Expr()
        if any(b.is_constant(upper) for b in bounds):
            return Expr(const=upper)
        for candidate in bounds:
            if all(other in self.covers.get(candidate, {candidate}) for other in bounds):
                return candidate
        column = self.column(0.0, upper, False)
        for bound in bounds:
            self.row(Expr.of(column) + bound.scaled(-1.0), 0.0, np.inf)
        self.derived.append((column, tuple(bounds)))
        made = Expr.of(column)
        self.covers[made] = frozenset({made}).union(*(self.covers.get(b, {b}) for b in bounds))
        return made

    def memory_row(self, expr: Expr, fixed_units: float, label: str, phase: int = -1) -> None:
        """A memory row; ``phase``: the stage whose recomputation phase it follows, -1 if none."""
        index = len(self.memory_fixed)
        self.memory_phase.append(phase)
        for col, coef in expr.terms:
            self.memory[0].append(index)
            self.memory[1].append(col)
            self.memory[2].append(coef)
        self.memory_fixed.append(fixed_units + expr.const)
        self.memory_labels.append(label)


class BuildTimeout(Exception):
    """The deadline passed while the MILP was being built."""


def formulate(problem: StagedProblem, budget_bytes: int | None, phases: Collection[int] | None = None,
              deadline: float | None = None) -> Formulation:
    """Build the sparse MILP for ``problem`` under ``budget_bytes``, or minimising the peak when
    it is None (the units then span the store-all peak). ``phases``: the stages whose
    recomputation phases get memory rows (None: every stage; fewer: a relaxation, whose bounds
    are bounds of the whole problem; see ``exact_search``). Raises ``BuildTimeout`` once
    ``time.perf_counter()`` passes ``deadline`` (checked per stage). Complexity: O(non-zeros)."""
    n_stages, groups, nodes = problem.n_stages, problem.groups, problem.nodes
    if budget_bytes is None:
        scale = float(max(problem.stage_fixed_during.max(initial=0), 1) + sum(g.size for g in groups))
        available = None
    else:
        available = budget_bytes - problem.resident_bytes
        scale = float(max(available, 1))
    unit = max(1, 2 ** math.ceil(math.log2(scale / SCALED_BUDGET))) if scale > SCALED_BUDGET else 1
    capacity = math.floor(available / unit) if available is not None and available > 0 else 0
    time_unit = max(problem.base_time, 1e-30) / TIME_SCALE

    def units(n_bytes: float) -> int:
        return math.ceil(n_bytes / unit)

    size = np.array([units(g.size) for g in groups], dtype=np.int64)
    b = _Builder()
    keep_index = np.full((n_stages + 1, len(groups)), -1, dtype=np.int64)
    recompute_index = np.full((n_stages, len(nodes)), -1, dtype=np.int64)
    for g in range(len(groups)):
        for k in range(min(int(problem.last_useful[g]) + 1, n_stages)):
            keep_index[k, g] = b.column(0.0, 1.0, True)
    for f, node in enumerate(nodes):
        if node.recomputable:
            for k in range(min(int(problem.node_last_useful[f]) + 1, n_stages)):
                recompute_index[k, f] = b.column(0.0, 1.0, True, node.time / time_unit)
    for g, first, last in problem.alias_held:
        for k in range(first + 1, last + 1):
            b.lower[keep_index[k, g]] = 1.0
            if recompute_index[k, groups[g].node] >= 0:
                b.upper[recompute_index[k, groups[g].node]] = 0.0

    def keep(k: int, g: int) -> Expr:
        return Expr.of(int(keep_index[k, g]))

    def redo(k: int, f: int) -> Expr:
        return Expr.of(int(recompute_index[k, f]))

    for k in range(n_stages):
        for g in problem.stage_reads[k]:
            b.row(keep(k, g) + redo(k, groups[g].node), 1.0, np.inf)
        for f in np.flatnonzero(recompute_index[k] >= 0):
            for g in nodes[f].input_groups:
                b.row(redo(k, f).scaled(-1.0) + keep(k, g) + redo(k, groups[g].node), 0.0, np.inf)
        for g in np.flatnonzero(keep_index[k] >= 0):
            if recompute_index[k, groups[g].node] >= 0:
                b.row(keep(k, g) + redo(k, groups[g].node), -np.inf, 1.0)
            if keep_index[k + 1, g] >= 0:
                b.row(keep(k + 1, g).scaled(-1.0) + keep(k, g) + redo(k, groups[g].node), 0.0, np.inf)

    # ---- memory ----
    for position, (fixed, held, kept) in enumerate(problem.forward_rows):
        expr = Expr(tuple((int(keep_index[0, g]), float(size[g])) for g in kept if keep_index[0, g] >= 0)) \
            if n_stages else Expr()
        b.memory_row(expr, units(fixed + sum(groups[g].size for g in held)), f"forward op {position}")
    for k in range(n_stages):
        if deadline is not None and time.perf_counter() > deadline:
            raise BuildTimeout
        if phases is None or k in phases:
            _phase_rows(b, problem, k, keep_index, recompute_index, size, units)
        reads = set(problem.stage_reads[k])
        after = [g for g in np.flatnonzero(keep_index[k + 1] >= 0)]
        b.memory_row(Expr(tuple((int(keep_index[k + 1, g]), float(size[g])) for g in after if g not in reads)),
                     units(problem.stage_fixed_during[k] + sum(groups[g].size for g in reads)), f"stage {k}")
        if problem.tails[k]:
            b.memory_row(Expr(tuple((int(keep_index[k + 1, g]), float(size[g])) for g in after)),
                         units(problem.tail_fixed[k]), f"ops after stage {k}")
    if problem.prefix:
        first = np.flatnonzero(keep_index[0] >= 0) if n_stages else []
        b.memory_row(Expr(tuple((int(keep_index[0, g]), float(size[g])) for g in first)),
                     units(problem.tail_fixed[n_stages]), "backward start")
    return _assemble(b, problem, keep_index[:n_stages], recompute_index, unit, time_unit, capacity,
                     budget_bytes is None)


def _phase_rows(b: _Builder, problem: StagedProblem, k: int, keep_index: np.ndarray, recompute_index: np.ndarray,
                size: np.ndarray, units) -> None:
    """Memory op by op through the recomputation phase before stage k (module docstring).

    A group's term at position q: held (``keep``) before its node runs; held or made while it
    runs; afterwards ``live_j``, the largest of the recomputations reading it at or after q
    (``readers[j:]``) and of ``keep[k+1, g]`` (1 when the stage reads it)."""
    groups = problem.groups
    band = recompute_index[k] >= 0
    band_positions = [p for f in np.flatnonzero(band) for p in range(problem.nodes[f].start,
                                                                     problem.nodes[f].start + len(problem.nodes[f].ops))]
    if not band_positions:
        return
    reads = set(problem.stage_reads[k])
    terms: dict[int, Callable[[int], Expr]] = {}
    events: dict[int, list[int]] = {}
    for g in range(len(groups)):
        owner = groups[g].node
        in_band = bool(band[owner])
        if keep_index[k, g] < 0 and not in_band:
            continue
        held = Expr.of(int(keep_index[k, g]))
        readers = [r for r in groups[g].readers if band[problem.position_node[r]]]
        if g in reads:
            final = Expr(const=1.0)
        else:
            final = Expr.of(int(keep_index[k + 1, g]))
        made = groups[g].producer if in_band else None
        live = [final]  # live[j]: needed by readers[j:] or after the phase; built from the end
        for j in reversed(range(0 if made is not None else 1, len(readers))):  # without a maker, keep stands for live[0]
            live.append(b.at_least([live[-1], Expr.of(int(recompute_index[k, problem.position_node[readers[j]]]))]))
        live.reverse()
        if made is None:
            live.insert(0, held)
        making = held + Expr.of(int(recompute_index[k, owner]))
        terms[g] = _term(made, readers, held, making, live)
        for q in ([made - 1, made] if made is not None else []) + readers:
            events.setdefault(q, []).append(g)
    room = float(units(problem.stage_fixed_before[k]))
    rows = [p for p in band_positions if not problem.position_is_view[p]]
    previous, memory, changed = None, Expr(), set()
    for q in rows:
        if previous is None:
            expr = Expr.total(term(q).scaled(float(size[g])) for g, term in terms.items())
        else:
            changed = {g for e in range(previous, q) for g in events.get(e, ())}
            expr = Expr.total([memory] + [terms[g](q).minus(terms[g](previous), float(size[g])) for g in changed])
        if previous is None or changed:
            memory = _memory_column(b, expr)
        node = int(problem.position_node[q])
        b.memory_row(memory + Expr.of(int(recompute_index[k, node]), float(units(problem.position_transient[q]))),
                     room, f"recomputing {problem.graph.ops[problem.positions[q]].name} before stage {k}", k)
        previous = q


def _term(made: int | None, readers: list[int], held: Expr, making: Expr, live: list[Expr]) -> Callable[[int], Expr]:
    def term(q: int) -> Expr:
        if made is not None and q < made:
            return held
        if made is not None and q == made:
            return making
        return live[bisect_left(readers, q)]
    return term


def _memory_column(b: _Builder, expr: Expr) -> Expr:
    """A continuous column at least ``expr`` (bytes live at a position of a phase)."""
    merged: dict[int, float] = {}
    for col, coef in expr.terms:
        merged[col] = merged.get(col, 0.0) + coef
    expr = Expr(tuple((c, v) for c, v in merged.items() if v != 0.0), expr.const)
    if not expr.terms:
        return expr
    column = b.column(0.0, np.inf, False)
    b.row(Expr.of(column) + expr.scaled(-1.0), 0.0, np.inf)
    b.derived.append((column, (expr,)))
    return Expr.of(column)


def _assemble(b: _Builder, problem: StagedProblem, keep_index, recompute_index, unit: int, time_unit: float,
              capacity: int, minimise_peak: bool) -> Formulation:
    memory = sparse.csr_matrix((b.memory[2], (b.memory[0], b.memory[1])),
                               shape=(len(b.memory_fixed), len(b.lower) + int(minimise_peak)))
    fixed = np.array(b.memory_fixed, dtype=np.float64)
    violations = [f"{label} needs {problem.resident_bytes + f * unit:.0f} bytes whatever is kept"
                  for label, f in zip(b.memory_labels, fixed) if not minimise_peak and f > capacity]
    peak_column = -1
    rows = [sparse.csr_matrix((b.rows[2], (b.rows[0], b.rows[1])), shape=(len(b.row_lower), len(b.lower)))]
    lower, upper = [np.array(b.row_lower)], [np.array(b.row_upper)]
    if minimise_peak:
        peak_column = b.column(0.0, np.inf, False)
        rows = [sparse.hstack([rows[0], sparse.csr_matrix((len(b.row_lower), 1))]).tocsr()]
        peak = sparse.csr_matrix((-np.ones(len(fixed)), (np.arange(len(fixed)), np.full(len(fixed), peak_column))),
                                 shape=memory.shape)
        rows.append((memory + peak).tocsr())
        lower.append(np.full(len(fixed), -np.inf))
        upper.append(-fixed)
    else:
        rows.append(memory)
        lower.append(np.full(len(fixed), -np.inf))
        upper.append(capacity - fixed)
    time_cost = np.array(b.time, dtype=np.float64)
    cost = time_cost.copy()
    if minimise_peak:
        cost = np.zeros_like(time_cost)
        cost[peak_column] = 1.0
    matrix = sparse.vstack(rows).tocsr()
    return Formulation(
        problem=problem, cost=cost, time_cost=time_cost, matrix=matrix, row_lower=np.concatenate(lower),
        row_upper=np.concatenate(upper), col_lower=np.array(b.lower), col_upper=np.array(b.upper),
        keep_index=keep_index, recompute_index=recompute_index, integrality=np.array(b.integer, dtype=np.int64),
        derived=tuple(b.derived), memory=memory, memory_fixed=fixed, memory_labels=tuple(b.memory_labels),
        memory_phase=np.array(b.memory_phase, dtype=np.int64),
        unit=unit, time_unit=time_unit, capacity=capacity, peak_column=peak_column,
        constant_violation=violations[0] if violations else "")


# ---- solving ------------------------------------------------------------------------------------
DEFAULT_SOLVER = "highs"  # the others, optional extras, are in ``planner.algorithms.solvers``


@dataclass(frozen=True)
class SolveOutcome:
    """What a solver backend reports, in the formulation's objective units."""

    x: np.ndarray | None  # best point found
    bound: float  # proven lower bound on the objective, -inf if none
    root_bound: float  # the bound when the root node was done (-inf if unknown)
    optimal: bool
    solver: str
    message: str = ""


def solve_highs(form: Formulation, time_limit: float, start: np.ndarray | None = None,
                progress: Progress | None = None, gap: float = 1e-4,
                screen: Callable[[np.ndarray], bool] | None = None) -> SolveOutcome:
    """HiGHS through highspy: MIP start, time limit (passing the model in included), relative gap
    (absolute gap 0: see the module docstring), progress callbacks, the root node's bound.
    ``screen`` sees every improving point; once it returns True the solve ends as soon as the root
    node is done (its bound kept)."""
    import highspy

    stop_at = time.perf_counter() + time_limit
    with silenced(1):  # the constructor prints a banner
        h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    h.setOptionValue("mip_rel_gap", gap)
    h.setOptionValue("mip_abs_gap", 0.0)
    h.setOptionValue("random_seed", 0)
    h.passModel(highs_model(highspy, form))
    if start is not None:
        h.setSolution(_highs_solution(highspy, start))
    root: list[float] = []
    stop: list[bool] = []
    screened_out: list[bool] = []

    def watch(event) -> None:
        out = event.data_out
        if not root and out.mip_node_count > 0 and np.isfinite(out.mip_dual_bound):
            root.append(float(out.mip_dual_bound))
        if stop or (screened_out and out.mip_node_count > 0):
            event.interrupt()

    h.cbMipInterrupt += watch
    if progress is not None or screen is not None:
        def report(event) -> None:
            out = event.data_out
            if screen is not None and screen(form.rounded(np.asarray(out.mip_solution))):
                screened_out.append(True)
            if progress is not None and progress(_seconds(form, out.mip_primal_bound),
                                                 _seconds(form, out.mip_dual_bound), out.running_time):
                stop.append(True)

        h.cbMipImprovingSolution += report
    h.setOptionValue("time_limit", max(stop_at - time.perf_counter(), 0.0))  # passing the model counts
    h.run()
    model_status = h.getModelStatus()
    if model_status == highspy.HighsModelStatus.kModelEmpty:  # nothing to decide: no stage reads the forward
        return SolveOutcome(np.zeros(0), 0.0, 0.0, True, "highs", "nothing to decide")
    info = h.getInfo()
    has_point = info.primal_solution_status == 2  # kSolutionStatusFeasible
    x = form.rounded(np.asarray(h.getSolution().col_value)) if has_point else None
    optimal = model_status == highspy.HighsModelStatus.kOptimal
    bound = float(info.mip_dual_bound) if np.isfinite(info.mip_dual_bound) else -np.inf
    if optimal and x is not None:
        bound = max(bound, float(form.cost @ x) * (1 - gap))
    root_bound = root[0] if root else bound
    return SolveOutcome(x, bound, root_bound, optimal and x is not None, "highs", h.modelStatusToString(model_status))


def highs_model(highspy, form: Formulation):
    """``form`` as a ``highspy.HighsLp`` (SCIP reads it too, as the MPS file HiGHS writes)."""
    lp = highspy.HighsLp()
    lp.num_col_, lp.num_row_ = form.n_columns, len(form.row_lower)
    lp.col_cost_ = form.cost
    lp.col_lower_, lp.col_upper_ = form.col_lower, form.col_upper
    lp.row_lower_, lp.row_upper_ = form.row_lower, form.row_upper
    csc = form.matrix.tocsc()
    lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
    lp.a_matrix_.start_, lp.a_matrix_.index_, lp.a_matrix_.value_ = csc.indptr, csc.indices, csc.data
    lp.integrality_ = [highspy.HighsVarType.kInteger if i else highspy.HighsVarType.kContinuous
                       for i in form.integrality]
    return lp


def _seconds(form: Formulation, objective_units: float) -> float:
    """A time objective in seconds (the whole step)."""
    return form.problem.base_time + form.time_unit * objective_units


def _highs_solution(highspy, start: np.ndarray):
    solution = highspy.HighsSolution()
    solution.col_value = list(map(float, start))
    solution.value_valid = True
    return solution


def solve_scipy(form: Formulation, time_limit: float, gap: float = 1e-4) -> SolveOutcome:
    """``scipy.optimize.milp`` (HiGHS inside SciPy): no MIP start, no progress; the fallback."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    if form.n_columns == 0:  # nothing to decide (SciPy rejects an empty model)
        return SolveOutcome(np.zeros(0), 0.0, 0.0, True, "scipy", "nothing to decide")
    result = milp(form.cost, integrality=form.integrality, bounds=Bounds(form.col_lower, form.col_upper),
                  constraints=LinearConstraint(form.matrix, form.row_lower, form.row_upper),
                  options={"time_limit": max(float(time_limit), 0.0), "mip_rel_gap": gap, "disp": False})
    x = form.rounded(result.x) if result.x is not None else None
    bound = float(getattr(result, "mip_dual_bound", -np.inf) or -np.inf)
    return SolveOutcome(x, bound, -np.inf, result.status == 0 and x is not None, "scipy", result.message)


def lp_bound(form: Formulation, time_limit: float) -> float:
    """The LP relaxation's optimum, in objective units: a lower bound (-inf if not solved)."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    if form.n_columns == 0:  # nothing to decide: no stage reads the forward
        return 0.0
    result = milp(form.cost, integrality=np.zeros(form.n_columns), bounds=Bounds(form.col_lower, form.col_upper),
                  constraints=LinearConstraint(form.matrix, form.row_lower, form.row_upper),
                  options={"time_limit": max(float(time_limit), 0.0)})
    return float(result.fun) if result.status == 0 else -np.inf


def solve(form: Formulation, time_limit: float, start: np.ndarray | None = None,
          progress: Progress | None = None, screen: Callable[[np.ndarray], bool] | None = None,
          solver: str = DEFAULT_SOLVER) -> SolveOutcome:
    """``solver``'s answer: HiGHS through highspy (with the MIP start and ``screen``), or SciPy's
    HiGHS where highspy is not installed (an error inside highspy is not retried there: it would
    fail the same way); ``"cpsat"`` or ``"scip"`` (``planner.algorithms.solvers``)."""
    if solver != DEFAULT_SOLVER:
        from planner.algorithms.solvers import solve_with

        return solve_with(solver, form, time_limit, start, progress, screen)
    try:
        import highspy  # noqa: F401
    except ImportError:
        return solve_scipy(form, time_limit)
    return solve_highs(form, time_limit, start, progress, screen=screen)


# ---- exact mode ---------------------------------------------------------------------------------
# hierarchical plans seed the solver; the staged schedule a plan maps to runs its recomputations
# later (right before their stage) and whole nodes, so its peak can differ a little: the hierarchy
# also searches at these fractions of the budget, and the fastest start the rows accept is used
SEED_SHRINK = (1.0, 0.98, 0.96, 0.93, 0.9, 0.85, 0.8)
FALLBACK_SEEDS = ("checkpoint_all", "recompute_cheap", "store_all")
# a start whose staged image breaks a phase is repaired over the stages this close to it
REPAIR_WINDOW = 2
REPAIR_SECONDS = 5.0
# with no start that fits, at most this share of the time left finds one (``_first_fitting_point``)
FEASIBILITY_SHARE = 0.8
# the share of the solver's time kept for the window search (``neighbourhood.window_search``) when
# the whole MILP does not prove its answer optimal first, given only where the start is more than
# WINDOW_GAP of its step above the universal bound: there HiGHS's own search stalls near its start
# (the UNet at 33% of store-all, by rounds: +204.9% to +199.3% in 58 s; with the windows
# +61.4%; better in 3 of its 4 benchmark cells, worse at 30%), while nearer starts gain nothing
# from the windows in that time and the bound loses a little (ResNet-50 b64, the transformer,
# MobileNet-v2 at 33%, starts 0.7-3.1% above; docs/benchmarks.md, exact mode, "Window search")
WINDOW_SHARE = 0.3
WINDOW_GAP = 0.05
# a MILP with at most this many non-zeros is solved whole, every phase row in from the first
# round: each round restarts HiGHS's search, and where memory is shortest the phases bind at many
# stages (the UNet below fast mode's least peak: 14-39 of its 62 stages), so the rounds spend the
# time restarting. The UNet (48k non-zeros; HiGHS, 60 s; docs/benchmarks.md, "Whole MILP or
# rounds"), whole against by rounds: at its least peak +71.3% against +114.7%, at 33% of
# store-all +31.1% against +61.4%, at 30% +40.9% against +52.0%; at fast mode's least peak worse,
# +29.5% against +23.7%; at 50% optimal either way, in 24.8 s against 4.2 s. The transformer's
# model (164k) solved whole lost bound (33%: +13.1% against +15.0%), and ResNet-50 b64's (305k)
# LP alone takes 38 s with every phase row: larger models keep the rounds.
WHOLE_NONZEROS = 100_000


# seconds kept back from every solve for the solver's own overrun past its time limit and taking
# its answer out: HiGHS reads its clock between simplex iterations, and on DenseNet-121 b32's
# 137k binaries it ended 0.2-1.0 s past its limit on a quiet machine, up to 2.2 s on a loaded one
SOLVER_SLACK = 2.0


@dataclass(frozen=True)
class Deadline:
    """When an exact search must have answered (a ``time.perf_counter()`` reading), and the seconds
    it keeps back from building and solving for what follows the last solve: ``finish``, the
    answer's staged point, decoding and simulating it (measured on the start, ``_finish_cost``),
    and ``SOLVER_SLACK``. One clock for every round, so the whole search ends by ``end``."""

    end: float
    finish: float = 0.0

    @property
    def build_by(self) -> float:
        """The ``formulate`` deadline: building may not eat into what is kept back."""
        return self.end - self.finish - SOLVER_SLACK

    def solver_limit(self) -> float:
        """The time limit of a solve that starts now (0 once nothing is left)."""
        return max(0.0, self.build_by - time.perf_counter())


# what "optimal" and the bound are over (``Plan.message`` says it)
SCHEDULE_CLASS = ("staged schedules: the forward once in graph order, the backward in the hierarchy's block "
                  "order, whole nodes recomputed right before the backward op that reads them")


@dataclass(frozen=True)
class ExactResult:
    """The MILP's answer, checked by the simulator. ``schedule`` is None when it found none."""

    schedule: Schedule | None
    time: float | None  # simulated step time of ``schedule``
    lower_bound: float  # no staged schedule is faster (seconds; -inf when unknown)
    optimal: bool
    message: str
    root_bound: float = -np.inf  # the bound after HiGHS's root node (seconds)
    start_time: float | None = None  # simulated time of the MIP start, None if none entered
    columns: int = 0
    binaries: int = 0
    rows: int = 0
    store_all_time: float = 0.0  # the step without recomputation (seconds), for overheads

    def overhead(self, seconds: float | None) -> str:
        """A step time as an overhead on store-all's, for messages ("none" when unknown)."""
        if seconds is None or not np.isfinite(seconds) or self.store_all_time <= 0:
            return "none"
        return f"{seconds / self.store_all_time - 1:+.2%}"

    def summary(self) -> str:
        """Incumbent, start, root and final bounds as overheads on store-all, and the size."""
        overhead = self.overhead
        return (f"incumbent {overhead(self.time)} (start {overhead(self.start_time)}), root bound "
                f"{overhead(self.root_bound)}, final bound {overhead(self.lower_bound)}; {self.binaries} binaries, "
                f"{self.rows} rows")


def exact_problem(graph: TrainingGraph, cost_model: CostModel) -> StagedProblem:
    """The staged problem exact mode solves: the backward in the hierarchy's block order."""
    return build_problem(graph, cost_model, block_backward_order(graph))


def encode(problem: StagedProblem, form: Formulation, schedule: Schedule) -> np.ndarray | None:
    """A schedule as a point of ``form`` (its staged image: see ``StagedProblem.recomputations``),
    or None if it does not start with the forward."""
    recompute = problem.recomputations(schedule)
    if recompute is None:
        return None
    recompute &= form.recompute_index >= 0
    return form.vector(problem.minimal_keep(recompute), recompute)


def _best_start(graph: TrainingGraph, cost_model: CostModel, budget_bytes: int, problem: StagedProblem,
                form: Formulation, starts: Sequence[Schedule], deadline: float,
                solver: str = DEFAULT_SOLVER) -> np.ndarray | None:
    """The MIP start: the fastest of ``starts`` and of the seeds whose point satisfies every row;
    if none does, the least-peak MILP's first point that does (``_first_fitting_point``)."""
    from planner.algorithms import ALGORITHMS
    from planner.algorithms import hierarchical

    best: list[np.ndarray] = []

    def offer(x: np.ndarray | None) -> bool:
        if x is None or form.violation(x) > 1e-9:
            return False
        if not best or form.cost @ x < form.cost @ best[0]:
            best[:] = [x]
        return True

    for schedule in starts:
        x = encode(problem, form, schedule)
        if x is not None and not offer(x) and time.perf_counter() < deadline:
            offer(_repaired(problem, form, x, deadline))
    hierarchy = hierarchical.prepare(graph, cost_model)
    for fraction in SEED_SHRINK:
        if time.perf_counter() > deadline:
            break
        found = hierarchical.search(hierarchy, cost_model, int(budget_bytes * fraction))
        if found is not None and found[1].peak_bytes <= budget_bytes and offer(encode(problem, form, found[0])):
            break  # smaller budgets only slow the plan down
    if not best:
        for name in FALLBACK_SEEDS:
            if time.perf_counter() > deadline:
                break
            offer(encode(problem, form, ALGORITHMS[name](graph, cost_model, budget_bytes)))
    if not best and time.perf_counter() < deadline:
        offer(_first_fitting_point(graph, cost_model, problem, form, starts, deadline, solver))
    return best[0] if best else None


def _least_peak_start(graph: TrainingGraph, cost_model: CostModel, problem: StagedProblem, peak_form: Formulation,
                      starts: Sequence[Schedule]) -> np.ndarray | None:
    """The MIP start of a least-peak MILP: the point of least peak among ``starts`` and
    checkpoint-all."""
    from planner.algorithms import ALGORITHMS

    points = [encode(problem, peak_form, s) for s in [*starts, ALGORITHMS["checkpoint_all"](graph, cost_model, 1)]]
    points = [x for x in points if x is not None]
    return min(points, key=lambda x: peak_form.cost @ x) if points else None


def _first_fitting_point(graph: TrainingGraph, cost_model: CostModel, problem: StagedProblem, form: Formulation,
                         starts: Sequence[Schedule], deadline: float, solver: str) -> np.ndarray | None:
    """Where no plan of the heuristics fits (a budget below fast mode's least peak), a start from
    the least-peak MILP (``formulate`` without a budget), stopped at its first schedule that fits
    ``form``'s budget, within ``FEASIBILITY_SHARE`` of the time left. The cost MILP alone often
    finds no schedule there: on the UNet at 30% of store-all, none in 60 s; the least-peak MILP
    fits it in 9 s. Complexity: one MILP build and one time-limited solve."""
    try:
        peak_form = formulate(problem, None, deadline=deadline)
    except BuildTimeout:
        return None
    found: list[np.ndarray] = []

    def screen(x: np.ndarray) -> bool:
        point = staged_point(problem, form, peak_form.recompute_of(x))
        if form.violation(point) <= 1e-9:
            found.append(point)
        return bool(found)

    start = _least_peak_start(graph, cost_model, problem, peak_form, starts)
    outcome = solve(peak_form, FEASIBILITY_SHARE * max(0.0, deadline - time.perf_counter()), start, screen=screen,
                    solver=solver)
    if not found and outcome.x is not None:
        screen(outcome.x)
    return found[0] if found else None


def _repaired(problem: StagedProblem, form: Formulation, x: np.ndarray, deadline: float) -> np.ndarray | None:
    """A start whose staged image breaks recomputation phases (a plan that recomputes just in
    time can hold less than its image, which recomputes a stage's nodes together: the
    transformer's at 33% by 5.9 MiB), repaired: the MILP over the stages within
    ``REPAIR_WINDOW`` of a broken phase, every other binary fixed at the start's value, for at
    most ``REPAIR_SECONDS`` (``neighbourhood.restricted_point``). The point it returns satisfies
    every row (or None)."""
    from planner.algorithms.neighbourhood import restricted_point

    broken = form.phases_over_budget(x)
    if not broken:
        return None
    window = sorted({k for p in broken for k in range(p - REPAIR_WINDOW, p + REPAIR_WINDOW + 1)
                     if 0 <= k < problem.n_stages})
    return restricted_point(problem, form, x, window, range(len(problem.nodes)),
                            min(REPAIR_SECONDS, deadline - time.perf_counter()))


def staged_point(problem: StagedProblem, form: Formulation, recompute: np.ndarray) -> np.ndarray:
    """The point of ``form`` for a recomputation pattern at its least holding."""
    return form.vector(problem.minimal_keep(recompute), recompute)


def _finish_cost(graph: TrainingGraph, cost_model: CostModel, problem: StagedProblem, form: Formulation,
                 recompute: np.ndarray) -> tuple[float, Schedule, SimResult]:
    """The seconds the work after a solve takes, measured on ``recompute``: the solver's point
    rounded (``Formulation.rounded``, as long as a staged point) and its staged point, then the
    schedule decoded and simulated. Returns them with that schedule and its simulation (reused
    when the search ends on this pattern). O(one staged point + one simulation)."""
    began = time.perf_counter()
    staged_point(problem, form, recompute)
    point_seconds = time.perf_counter() - began
    schedule = problem.schedule(recompute)
    result = simulate(graph, schedule, cost_model)
    return time.perf_counter() - began + point_seconds, schedule, result


def exact_search(graph: TrainingGraph, cost_model: CostModel, budget_bytes: int, time_limit: float,
                 progress: Progress | None = None, starts: Sequence[Schedule] = (),
                 solver: str = DEFAULT_SOLVER, universal: float | None = None) -> ExactResult:
    """Solve the staged MILP for ``budget_bytes`` within ``time_limit`` seconds (building, seeding
    and decoding included: ``Deadline``) with ``solver`` (``planner.algorithms.solvers.SOLVERS``),
    starting from the fastest of ``starts`` (schedules of ``graph``) and the hierarchical seeds
    that its rows accept. A round is not started without the time the last one took to build its
    model. Raises ``SolverUnavailableError`` for a solver that is unknown or not installed; never raises
    for a solver failure: the message says what happened.

    Row generation over the recomputation phases (their rows are most of the model, and the LP
    over all of them does not finish its root in 60 s on ResNet-50): solve with the phase rows of
    no stage, check the answer against every row, add the phases it breaks, solve again. Each
    round is a relaxation of the whole problem, so its proven bound is a bound of the whole
    problem; an answer that satisfies every row is an incumbent, and when a round proves its
    answer optimal and that answer satisfies every row, it is optimal for the whole problem.

    A model of at most ``WHOLE_NONZEROS`` non-zeros is solved whole, in one round.

    Where the start is more than ``WINDOW_GAP`` of its step above ``universal`` (the step time no
    schedule beats, ``bounds.step_time_lower_bound``, computed here when not given), the rounds
    get all but ``WINDOW_SHARE`` of the solver's time; unless one proves optimality, the rest
    goes to a window search from the incumbent (``neighbourhood.window_search``), which improves
    the plan where HiGHS's own search stalls, and leaves the bound as the rounds proved it.
    """
    from planner.algorithms.solvers import require

    require(solver)
    began = time.perf_counter()
    deadline = Deadline(began + time_limit)
    problem = exact_problem(graph, cost_model)
    try:
        full = formulate(problem, budget_bytes, deadline=deadline.build_by)
    except BuildTimeout:
        return ExactResult(None, None, -np.inf, False, "the time limit ended while the MILP was being built",
                           store_all_time=problem.base_time)
    size = dict(columns=full.n_columns, binaries=full.n_binaries, rows=len(full.row_lower),
                store_all_time=problem.base_time)
    if full.constant_violation:
        return ExactResult(None, None, -np.inf, False, f"no staged schedule fits: {full.constant_violation}", **size)
    incumbent = _best_start(graph, cost_model, budget_bytes, problem, full, starts, deadline.build_by, solver)
    start, start_time = incumbent, full.objective(incumbent) if incumbent is not None else None
    finish, start_schedule, start_result = _finish_cost(
        graph, cost_model, problem, full, full.recompute_of(incumbent) if incumbent is not None
        else np.zeros_like(full.recompute_index, dtype=bool))
    deadline = Deadline(deadline.end, finish)
    if universal is None:
        universal = step_time_lower_bound(graph, cost_model, budget_bytes)
    far = start_time is None or start_time - universal > WINDOW_GAP * start_time
    reserve = WINDOW_SHARE * deadline.solver_limit() if far else 0.0  # the window search's
    bound, root, optimal, stopped, rounds = -np.inf, None, False, [], 0
    message = "the time limit ended before the solver started"
    active: set[int] = set(range(problem.n_stages)) if full.matrix.nnz <= WHOLE_NONZEROS else set()
    setup = 0.0  # seconds the last round took to build its model (the next one is not started without them)
    while not optimal and not stopped and deadline.solver_limit() - reserve > setup:
        round_began = time.perf_counter()
        try:
            form = full if len(active) == problem.n_stages else formulate(problem, budget_bytes, active,
                                                                            deadline.build_by)
        except BuildTimeout:
            break

        def relayed(_incumbent: float, round_bound: float, _elapsed: float) -> bool | None:
            answer = progress(full.objective(incumbent) if incumbent is not None else np.inf,
                              max(bound, round_bound), time.perf_counter() - began)
            if answer:
                stopped.append(True)
            return answer

        def screen(x: np.ndarray) -> bool:
            """Keep a round's point that satisfies every row; True once one breaks a new phase."""
            nonlocal incumbent
            point = staged_point(problem, full, form.recompute_of(x))
            if full.violation(point) <= 1e-9:
                if incumbent is None or full.objective(point) < full.objective(incumbent):
                    incumbent = point
                return False
            pending.update(full.phases_over_budget(point) - active)
            return bool(pending)

        pending: set[int] = set()
        hint = form.vector(full.keep_of(incumbent), full.recompute_of(incumbent)) if incumbent is not None else None
        setup = time.perf_counter() - round_began
        try:
            outcome = solve(form, deadline.solver_limit() - reserve, hint, relayed if progress is not None else None,
                            screen if len(active) < problem.n_stages else None, solver)
        except Exception as error:  # noqa: BLE001 - any solver failure falls back to the heuristic
            message = f"the MILP solver failed ({type(error).__name__}: {error})"
            stopped.append(True)
            break
        rounds += 1
        message = f"{outcome.solver}: {outcome.message}"
        bound = max(bound, _seconds(form, outcome.bound))
        root = _seconds(form, outcome.root_bound) if root is None else root
        if outcome.x is None:
            break
        point = staged_point(problem, full, form.recompute_of(outcome.x))
        broken = full.phases_over_budget(point) | pending
        if full.violation(point) <= 1e-9:
            if incumbent is None or full.objective(point) < full.objective(incumbent):
                incumbent = point
            optimal = outcome.optimal
            if not optimal and not broken - active:
                break  # no new rows: another round would solve the same model and end the same way
        elif not broken - active:
            message += "; a round's answer breaks a row outside the recomputation phases (please report this)"
            break
        active |= broken
    message += f" ({rounds} rounds, phase rows of {len(active)} of {problem.n_stages} stages)"
    if incumbent is not None and not optimal and not stopped:
        try:
            incumbent, report = _window_search(problem, full, incumbent, deadline, solver, progress, bound, began)
            message += f"; {report.describe()}" if report.windows else ""
        except Exception as error:  # noqa: BLE001 - the rounds' incumbent stands
            message += f"; the window search's solver failed ({type(error).__name__}: {error})"
    root = -np.inf if root is None else root
    if incumbent is None:
        return ExactResult(None, None, bound, False, f"{message}, no schedule found", root_bound=min(root, bound),
                           start_time=start_time, **size)
    if incumbent is start:  # no round found better: the start's simulation stands
        schedule, result = start_schedule, start_result
    else:
        schedule = problem.schedule(full.recompute_of(incumbent))
        result = simulate(graph, schedule, cost_model)
    if result.peak_bytes > budget_bytes:  # the rows bound the simulator's count; never trust a miss
        return ExactResult(None, None, bound, False, f"the MILP's schedule peaks at {result.peak_bytes} bytes, "
                           f"over the budget: discarded (please report this)", root_bound=min(root, bound),
                           start_time=start_time, **size)
    bound = min(bound, result.time)  # HiGHS's bound can pass its own optimum by rounding
    return ExactResult(schedule, result.time, bound, optimal, message, root_bound=min(root, bound),
                       start_time=start_time, **size)


def _window_search(problem: StagedProblem, form: Formulation, incumbent: np.ndarray, deadline: Deadline, solver: str,
                   progress: Progress | None, bound: float, began: float):
    """The incumbent improved by ``neighbourhood.window_search`` in the time the rounds left,
    each improvement relayed to ``progress`` (which may stop it)."""
    from planner.algorithms.neighbourhood import window_search

    def keep_going(x: np.ndarray) -> bool:
        return progress is None or not progress(form.objective(x), bound, time.perf_counter() - began)

    return window_search(problem, form, incumbent, deadline.build_by, solver, keep_going)


@dataclass(frozen=True)
class LowestPeak:
    """Exact mode's lowest feasible budget: the staged schedule of least peak found, and a proven
    lower bound on the peak of every staged schedule."""

    schedule: Schedule | None
    peak_bytes: int | None  # simulated peak of ``schedule``
    lower_bound_bytes: int  # no staged schedule peaks lower (resident memory included)
    # optimal: proven the least staged peak, or meeting ``memory_lower_bound`` (least of all schedules)
    optimal: bool
    message: str


def lowest_peak_search(graph: TrainingGraph, cost_model: CostModel, time_limit: float,
                       starts: Sequence[Schedule] = (), solver: str = DEFAULT_SOLVER) -> LowestPeak:
    """Minimise the peak itself over staged schedules (``formulate`` without a budget) with
    ``solver``, from the least-peak point of ``starts`` and checkpoint-all. The rows round each
    size up to the memory unit, so the proven bound in bytes gives back one unit per term of the
    fullest row; ``bounds.memory_lower_bound`` (every schedule runs its largest op) is a bound
    too, and a schedule that meets it is the least peak of every schedule, rounding or not."""
    from planner.algorithms.solvers import require

    require(solver)

    deadline = Deadline(time.perf_counter() + time_limit)
    problem = exact_problem(graph, cost_model)
    try:
        form = formulate(problem, None, deadline=deadline.build_by)
    except BuildTimeout:
        return LowestPeak(None, None, graph.resident_bytes, False, "the time limit ended while the MILP was being built")
    start = _least_peak_start(graph, cost_model, problem, form, starts)
    finish = _finish_cost(graph, cost_model, problem, form, form.recompute_of(start) if start is not None
                          else np.zeros_like(form.recompute_index, dtype=bool))[0]
    outcome = solve(form, Deadline(deadline.end, finish).solver_limit(), start, solver=solver)
    slack = form.unit * (int(np.diff(form.memory.indptr).max(initial=0)) + 1) if form.unit > 1 else 0
    floor = memory_lower_bound(graph, cost_model)
    bound = max(floor, graph.resident_bytes + max(0, math.ceil(outcome.bound) * form.unit - slack)
                if np.isfinite(outcome.bound) else graph.resident_bytes)
    if outcome.x is None:
        return LowestPeak(None, None, bound, False, f"{outcome.solver}: {outcome.message}, no schedule found")
    schedule = problem.schedule(form.recompute_of(outcome.x))
    peak = simulate(graph, schedule, cost_model).peak_bytes
    message = f"{outcome.solver}: {outcome.message}"
    if peak <= floor:
        message += "; the peak meets memory_lower_bound: the least of every schedule"
    return LowestPeak(schedule, peak, min(bound, peak), (outcome.optimal and slack == 0) or peak <= floor, message)
