"""Exact mode: the least-recompute staged schedule as a MILP, solved by HiGHS.

Variables, over the coarsened problem of ``staging.py`` (K stages, nodes f, groups g):

- ``keep[k, g]``: group g is held when stage k starts (``k = 0``: kept after the forward);
- ``recompute[k, f]``: node f is recomputed right before stage k.

A variable exists only while it can still serve a later stage (``last_useful``), so the problem
is a band, not a K x n square. Constraints: a stage's reads are held or recomputed; a
recomputation's inputs are held or recomputed in the same stage; a group is held into stage k+1
only if it was held or recomputed in stage k; backward aliases pin their storage.

Memory, against ``budget - resident``, with sizes rounded up and the budget down to a common unit
(so every answer fits in bytes):

- each forward op: bytes every schedule holds there + groups past their last forward use if kept;
- each stage, while recomputing: groups held + the groups of every recomputed node + the largest
  transient (what one node holds only while it runs, a continuous variable per stage);
- each stage op: its reads + groups carried past it + the fixed backward bytes there;
- each stage's tail ops: groups carried + the fixed backward bytes there.

Every row is an upper bound of what the simulator will count for the decoded schedule, so a
solution that satisfies them fits; the objective is the decoded schedule's recompute time
exactly. "Optimal" therefore means: no staged schedule in graph order, recomputing whole nodes,
is faster under this memory accounting. The forward rows are direct sums (a band of O(n * g)
non-zeros), the stage rows O(band).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy import sparse

from planner.algorithms.staging import StagedProblem, build_problem
from planner.cost import CostModel
from planner.graph import TrainingGraph
from planner.quiet import silenced
from planner.schedule import Schedule
from planner.simulator import simulate

SCALED_BUDGET = 2 ** 22  # the budget in units is at most this: coefficients stay well inside double precision
# called with (incumbent time, lower bound, seconds elapsed) at each improvement; returning True
# stops the solver, which then reports its incumbent
Progress = Callable[[float, float, float], "bool | None"]


@dataclass(frozen=True)
class Formulation:
    """``min c.x`` s.t. ``row_lower <= A x <= row_upper``, ``col_lower <= x <= col_upper``, x binary."""

    problem: StagedProblem
    cost: np.ndarray
    matrix: sparse.csr_matrix
    row_lower: np.ndarray
    row_upper: np.ndarray
    col_lower: np.ndarray
    col_upper: np.ndarray
    keep_index: np.ndarray  # [K, groups] -> column, -1 where the variable does not exist
    recompute_index: np.ndarray  # [K, nodes] -> column, -1 where it does not exist
    transient_index: np.ndarray  # [K] -> column of the stage's transient bytes (continuous)
    transient_units: np.ndarray  # per node: units it holds only while it runs (peak minus groups)
    integrality: np.ndarray  # 1 for binaries, 0 for the continuous transient columns
    unit: int  # bytes per memory unit
    constant_violation: str  # a row no choice can satisfy (the budget is below the staged minimum), or ""

    @property
    def n_columns(self) -> int:
        return len(self.cost)

    def vector(self, keep: np.ndarray, recompute: np.ndarray) -> np.ndarray:
        x = np.zeros(self.n_columns)
        for index, values in ((self.keep_index, keep), (self.recompute_index, recompute)):
            present = index >= 0
            x[index[present]] = values[present]
        x[self.transient_index] = np.max(recompute * self.transient_units, axis=1, initial=0)
        return x

    def rounded(self, x: np.ndarray) -> np.ndarray:
        """A solver's point with its binaries snapped to 0 or 1."""
        return np.where(self.integrality > 0, np.round(x), x)

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
        return self.problem.base_time + float(self.cost @ x)


class _Rows:
    """COO triplets and bounds, appended row by row."""

    def __init__(self) -> None:
        self.rows: list[int] = []
        self.cols: list[int] = []
        self.vals: list[float] = []
        self.lower: list[float] = []
        self.upper: list[float] = []

    def add(self, columns, values, lower: float, upper: float) -> None:
        row = len(self.lower)
        self.rows.extend([row] * len(columns))
        self.cols.extend(columns)
        self.vals.extend(values)
        self.lower.append(lower)
        self.upper.append(upper)


def formulate(problem: StagedProblem, budget_bytes: int) -> Formulation:
    """Build the sparse MILP for ``problem`` under ``budget_bytes``. Complexity: O(non-zeros)."""
    n_stages, groups, nodes = problem.n_stages, problem.groups, problem.nodes
    available = budget_bytes - problem.resident_bytes
    unit = max(1, 2 ** math.ceil(math.log2(max(available, 1) / SCALED_BUDGET))) if available > 0 else 1
    capacity = math.floor(available / unit)

    def units(n_bytes: float) -> int:
        return math.ceil(n_bytes / unit)

    size = np.array([units(g.size) for g in groups], dtype=np.int64)
    keep_index = np.full((n_stages, len(groups)), -1, dtype=np.int64)
    recompute_index = np.full((n_stages, len(nodes)), -1, dtype=np.int64)
    column = 0
    for g in range(len(groups)):
        span = min(int(problem.last_useful[g]) + 1, n_stages)
        keep_index[:span, g] = np.arange(column, column + span)
        column += span
    for f, node in enumerate(nodes):
        if node.recomputable:
            span = min(int(problem.node_last_useful[f]) + 1, n_stages)
            recompute_index[:span, f] = np.arange(column, column + span)
            column += span
    transient_index = np.arange(column, column + n_stages)
    column += n_stages
    transient = np.array([max(0, units(node.peak_bytes) - int(size[list(node.groups)].sum())) for node in nodes],
                         dtype=np.int64)
    cost = np.zeros(column)
    col_lower, col_upper = np.zeros(column), np.ones(column)
    col_upper[transient_index] = np.inf
    integrality = np.ones(column)
    integrality[transient_index] = 0
    for f, node in enumerate(nodes):
        present = recompute_index[:, f] >= 0
        cost[recompute_index[present, f]] = node.time
    for g, first, last in problem.alias_held:
        for k in range(first + 1, last + 1):
            col_lower[keep_index[k, g]] = 1.0
            if recompute_index[k, groups[g].node] >= 0:
                col_upper[recompute_index[k, groups[g].node]] = 0.0

    rows = _Rows()
    violations: list[str] = []

    def capacity_row(columns: list[int], sizes: list[int], fixed_bytes: float, where: str) -> None:
        room = capacity - units(fixed_bytes)
        if room < 0:
            violations.append(f"{where} needs {fixed_bytes + problem.resident_bytes:.0f} bytes whatever is kept")
        if columns:
            rows.add(columns, sizes, -np.inf, float(room))

    def holders(k: int, g: int) -> list[int]:
        return [c for c in (keep_index[k, g], recompute_index[k, groups[g].node]) if c >= 0]

    for k in range(n_stages):
        for g in problem.stage_reads[k]:
            rows.add(holders(k, g), [1.0] * len(holders(k, g)), 1.0, np.inf)
        for f in np.flatnonzero(recompute_index[k] >= 0):
            for g in nodes[f].input_groups:
                cols = holders(k, g)
                rows.add([recompute_index[k, f]] + cols, [1.0] + [-1.0] * len(cols), -np.inf, 0.0)
        for f in np.flatnonzero((recompute_index[k] >= 0) & (transient > 0)):
            rows.add([recompute_index[k, f], transient_index[k]], [float(transient[f]), -1.0], -np.inf, 0.0)
        if k + 1 < n_stages:
            for g in np.flatnonzero(keep_index[k + 1] >= 0):
                cols = holders(k, g)
                rows.add([keep_index[k + 1, g]] + cols, [1.0] + [-1.0] * len(cols), -np.inf, 0.0)

    for position, (fixed, held, kept) in enumerate(problem.forward_rows):
        columns = [keep_index[0, g] for g in kept if keep_index[0, g] >= 0] if n_stages else []
        sizes = [size[g] for g in kept if n_stages and keep_index[0, g] >= 0]
        capacity_row(columns, sizes, fixed + sum(groups[g].size for g in held), f"forward op {position}")
    for k in range(n_stages):
        held = np.flatnonzero(keep_index[k] >= 0)
        redo = np.flatnonzero(recompute_index[k] >= 0)
        capacity_row(list(keep_index[k, held]) + list(recompute_index[k, redo]) + [transient_index[k]],
                     list(size[held]) + [int(size[list(nodes[f].groups)].sum()) for f in redo] + [1],
                     problem.stage_fixed_before[k], f"recomputation before stage {k}")
        reads = set(problem.stage_reads[k])
        after = [g for g in np.flatnonzero(keep_index[k + 1] >= 0)] if k + 1 < n_stages else []
        capacity_row([keep_index[k + 1, g] for g in after if g not in reads], [size[g] for g in after if g not in reads],
                     problem.stage_fixed_during[k] + sum(groups[g].size for g in reads), f"stage {k}")
        if problem.tails[k]:
            capacity_row([keep_index[k + 1, g] for g in after], [size[g] for g in after],
                         problem.tail_fixed[k], f"ops after stage {k}")
    if problem.prefix:
        first = np.flatnonzero(keep_index[0] >= 0) if n_stages else []
        capacity_row([keep_index[0, g] for g in first], [size[g] for g in first], problem.tail_fixed[n_stages],
                     "backward start")

    matrix = sparse.csr_matrix((rows.vals, (rows.rows, rows.cols)), shape=(len(rows.lower), column))
    return Formulation(problem, cost, matrix, np.array(rows.lower), np.array(rows.upper), col_lower, col_upper,
                       keep_index, recompute_index, transient_index, transient, integrality, unit,
                       violations[0] if violations else "")


@dataclass(frozen=True)
class SolveOutcome:
    """What a solver backend reports, in the formulation's terms."""

    x: np.ndarray | None  # best point found
    bound: float  # proven lower bound on the objective (recompute time), -inf if none
    optimal: bool
    solver: str
    message: str = ""


def solve_highs(form: Formulation, time_limit: float, start: np.ndarray | None = None,
                progress: Progress | None = None, gap: float = 1e-4) -> SolveOutcome:
    """HiGHS through highspy: MIP start, time limit, relative gap, progress callbacks."""
    import highspy

    with silenced(1):  # the constructor prints a banner
        h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    h.setOptionValue("time_limit", max(float(time_limit), 0.0))
    h.setOptionValue("mip_rel_gap", gap)
    h.setOptionValue("random_seed", 0)
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
    h.passModel(lp)
    if start is not None:
        h.setSolution(_highs_solution(highspy, start))
    if progress is not None:
        base, stop = form.problem.base_time, []

        def report(event) -> None:
            out = event.data_out
            if progress(base + out.mip_primal_bound, base + out.mip_dual_bound, out.running_time):
                stop.append(True)

        def interrupt(event) -> None:
            if stop:
                event.interrupt()

        h.cbMipImprovingSolution += report
        h.cbMipInterrupt += interrupt
    h.run()
    model_status = h.getModelStatus()
    if model_status == highspy.HighsModelStatus.kModelEmpty:  # nothing to decide: no stage reads the forward
        return SolveOutcome(np.zeros(0), 0.0, True, "highs", "nothing to decide")
    info = h.getInfo()
    has_point = info.primal_solution_status == 2  # kSolutionStatusFeasible
    x = form.rounded(np.asarray(h.getSolution().col_value)) if has_point else None
    optimal = model_status == highspy.HighsModelStatus.kOptimal
    bound = float(info.mip_dual_bound) if np.isfinite(info.mip_dual_bound) else -np.inf
    if optimal and x is not None:
        bound = max(bound, float(form.cost @ x) * (1 - gap))
    return SolveOutcome(x, bound, optimal and x is not None, "highs", h.modelStatusToString(model_status))


def _highs_solution(highspy, start: np.ndarray):
    solution = highspy.HighsSolution()
    solution.col_value = list(map(float, start))
    solution.value_valid = True
    return solution


def solve_scipy(form: Formulation, time_limit: float, gap: float = 1e-4) -> SolveOutcome:
    """``scipy.optimize.milp`` (HiGHS inside SciPy): no MIP start, no progress; the fallback."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    result = milp(form.cost, integrality=form.integrality, bounds=Bounds(form.col_lower, form.col_upper),
                  constraints=LinearConstraint(form.matrix, form.row_lower, form.row_upper),
                  options={"time_limit": max(float(time_limit), 0.0), "mip_rel_gap": gap, "disp": False})
    x = form.rounded(result.x) if result.x is not None else None
    bound = float(getattr(result, "mip_dual_bound", -np.inf) or -np.inf)
    return SolveOutcome(x, bound, result.status == 0 and x is not None, "scipy", result.message)


def lp_bound(form: Formulation, time_limit: float) -> float:
    """The LP relaxation's optimum: a lower bound on the recompute time (-inf if not solved)."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    result = milp(form.cost, integrality=np.zeros(form.n_columns), bounds=Bounds(form.col_lower, form.col_upper),
                  constraints=LinearConstraint(form.matrix, form.row_lower, form.row_upper),
                  options={"time_limit": max(float(time_limit), 0.0)})
    return float(result.fun) if result.status == 0 else -np.inf


def solve(form: Formulation, time_limit: float, start: np.ndarray | None = None,
          progress: Progress | None = None) -> SolveOutcome:
    """The fallback ladder: highspy (with the MIP start), else SciPy's HiGHS."""
    try:
        import highspy  # noqa: F401
    except ImportError:
        return solve_scipy(form, time_limit)
    return solve_highs(form, time_limit, start, progress)


# staged algorithms (no reordering) whose schedules seed the solver: the best one the MILP's
# memory rows accept becomes its MIP start
SEEDS = ("dp", "checkpoint_all", "chen_greedy", "chen_greedy_linear", "chen_sqrt", "recompute_cheap", "store_all")
# the DP also runs at these fractions of the budget: its memory model and the MILP's rows differ,
# and the fastest DP plan the rows accept is usually the best start
DP_SEED_SHRINK = (0.97, 0.94, 0.9, 0.85, 0.8)


@dataclass(frozen=True)
class ExactResult:
    """The MILP's answer, checked by the simulator. ``schedule`` is None when it found none."""

    schedule: Schedule | None
    time: float | None  # simulated step time of ``schedule``
    lower_bound: float  # no staged schedule is faster (seconds; -inf when unknown)
    optimal: bool
    message: str
    columns: int = 0
    rows: int = 0


def _seed(graph: TrainingGraph, cost_model: CostModel, budget_bytes: int, problem: StagedProblem,
          form: Formulation) -> np.ndarray | None:
    """The MIP start: the fastest seed schedule that satisfies every row, or None."""
    from planner.algorithms import ALGORITHMS

    runs = [(name, budget_bytes) for name in SEEDS] + [("dp", int(budget_bytes * f)) for f in DP_SEED_SHRINK]
    start = None
    for name, budget in runs:
        recompute = problem.recomputations(ALGORITHMS[name](graph, cost_model, budget))
        if recompute is None:
            continue
        x = form.vector(problem.minimal_keep(recompute), recompute)
        if form.violation(x) <= 1e-9 and (start is None or form.cost @ x < form.cost @ start):
            start = x
        if name == "dp" and budget < budget_bytes and start is not None:
            break  # the DP's plans only slow down as its budget shrinks
    return start


def exact_search(graph: TrainingGraph, cost_model: CostModel, budget_bytes: int, time_limit: float,
                 progress: Progress | None = None) -> ExactResult:
    """Solve the staged MILP for ``budget_bytes`` within ``time_limit`` seconds (building and
    seeding included). Never raises for a solver failure: the message says what happened."""
    began = time.perf_counter()
    problem = build_problem(graph, cost_model)
    form = formulate(problem, budget_bytes)
    size = dict(columns=form.n_columns, rows=len(form.row_lower))
    if form.constant_violation:
        return ExactResult(None, None, -np.inf, False, f"no staged schedule fits: {form.constant_violation}", **size)
    start = _seed(graph, cost_model, budget_bytes, problem, form)
    remaining = time_limit - (time.perf_counter() - began)
    if remaining <= 0:
        return ExactResult(None, None, -np.inf, False, "the time limit ended before the solver started", **size)
    try:
        outcome = solve(form, remaining, start, progress)
    except Exception as error:  # noqa: BLE001 - any solver failure falls back to the heuristic
        return ExactResult(None, None, -np.inf, False, f"the MILP solver failed ({type(error).__name__}: {error})",
                           **size)
    bound = problem.base_time + outcome.bound
    if outcome.x is None:
        return ExactResult(None, None, bound, False, f"{outcome.solver}: {outcome.message}, no schedule found", **size)
    schedule = problem.schedule(form.recompute_of(outcome.x))
    result = simulate(graph, schedule, cost_model)
    if result.peak_bytes > budget_bytes:  # the rows bound the simulator's count; never trust a miss
        return ExactResult(None, None, bound, False, f"the MILP's schedule peaks at {result.peak_bytes} bytes, "
                           f"over the budget: discarded (please report this)", **size)
    bound = min(bound, result.time)  # HiGHS's bound can pass its own optimum by rounding
    return ExactResult(schedule, result.time, bound, outcome.optimal, f"{outcome.solver}: {outcome.message}", **size)
