"""Exact mode's other MILP solvers, optional extras: OR-Tools CP-SAT and SCIP (pyscipopt).

Both solve the same ``milp.Formulation`` HiGHS solves (``milp.solve`` dispatches on the name);
HiGHS stays the default (docs/benchmarks.md, "Second solver, side by side", measures them).

CP-SAT takes integers only, and the formulation is integral by construction except its
objective, so nothing is rounded that could cut off a schedule:

- every row coefficient and row bound is an integer (sizes and budgets are whole memory units,
  logic rows 0/1); ``to_cpsat`` checks it and refuses a formulation that is not;
- continuous columns are the derived ``live`` and ``memory`` columns (and the peak column): at a
  pattern's least point (``Formulation.vector``) each is an integer combination of binaries, and
  that point is feasible whenever any point with those binaries is (each derived column is at
  least as small there, and the memory rows only grow with them). Declaring them integers in
  ``[ceil(lower), upper]``, with ``upper`` an interval bound on that least value (``_upper``),
  therefore keeps every feasible binary pattern;
- the objective (recompute time units, fractional) is scaled by a power of two and rounded
  *down*: every column is non-negative, so the scaled objective is at most the true one and
  CP-SAT's bound, divided back, is a valid bound of the true objective. The incumbent is
  re-costed exactly (``form.cost @ x``); rounding down can only make "optimal" optimal within
  one scaled unit per recomputed node (below 2**-20 of a step time in all), far inside the
  relative gap.

SCIP reads floating-point rows, so it gets the formulation as it is (written by highspy to an
MPS file, the one serialisation). Complexity: linear in the formulation's non-zeros, plus the
solvers' own search.
"""
from __future__ import annotations

import math
import os
import tempfile
import time
from typing import Callable

import numpy as np

from planner.algorithms.milp import DEFAULT_SOLVER, Formulation, Progress, SolveOutcome, _seconds, highs_model
from planner.errors import SolverUnavailableError
from planner.quiet import silenced

SOLVERS = (DEFAULT_SOLVER, "cpsat", "scip")
# the import each solver needs, and the extra that installs it
REQUIREMENTS = {DEFAULT_SOLVER: ("highspy", None), "cpsat": ("ortools", "cpsat"), "scip": ("pyscipopt", "scip")}
WORKERS = 2  # CP-SAT's search workers: the cores of the machine the benchmarks ran on
# with two workers CP-SAT's default portfolio runs one LP-light search and local search, which on
# these models proves no bound above 0; the full LP (all rows and cuts) and core-based search do
SUBSOLVERS = ("max_lp", "core")
OBJECTIVE_ACTIVITY = 2.0 ** 50  # the scaled objective's largest value stays well inside int64


def require(solver: str) -> None:
    """Raise ``SolverUnavailableError`` unless ``solver`` is known and installed (HiGHS falls back
    to SciPy's copy, so it is always available)."""
    if solver not in REQUIREMENTS:
        raise SolverUnavailableError(f"unknown MILP solver {solver!r}: choose one of {list(SOLVERS)}")
    module, extra = REQUIREMENTS[solver]
    if extra is None:
        return
    try:
        __import__(module)
    except ImportError:
        raise SolverUnavailableError(f"MILP solver {solver!r} needs the {module} package, which is not installed: "
                                     f"pip install remat-planner[{extra}]") from None


def solve_with(solver: str, form: Formulation, time_limit: float, start: np.ndarray | None,
               progress: Progress | None, screen: Callable[[np.ndarray], bool] | None,
               gap: float = 1e-4) -> SolveOutcome:
    """``form`` solved by ``"cpsat"`` or ``"scip"`` (``milp.solve`` runs HiGHS itself)."""
    backend = {"cpsat": solve_cpsat, "scip": solve_scip}[solver]
    return backend(form, time_limit, start, progress, gap, screen)


# ---- CP-SAT ---------------------------------------------------------------------------------------
def _upper(form: Formulation) -> np.ndarray:
    """Column upper bounds with every derived column (and the peak column) bounded by the largest
    value it takes at a least point: interval arithmetic over its lower bounds, in dependency
    order. O(non-zeros)."""
    lower, upper = form.col_lower, form.col_upper.copy()
    for column, bounds in form.derived:
        largest = max(b.const + sum(c * (upper[i] if c > 0 else lower[i]) for i, c in b.terms) for b in bounds)
        upper[column] = min(upper[column], max(lower[column], largest))
    if form.peak_column >= 0:
        reach = _largest_activity(form.memory, lower, upper)
        upper[form.peak_column] = max(0.0, float(np.max(reach + form.memory_fixed, initial=0.0)))
    return upper


def _largest_activity(matrix, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """Per row, the largest value of ``matrix @ x`` over the box ``lower <= x <= upper`` (each
    term at its own largest; +inf where a term is unbounded). O(non-zeros)."""
    matrix = matrix.tocsr()
    largest = matrix.data * np.where(matrix.data > 0, upper[matrix.indices], lower[matrix.indices])
    rows = np.repeat(np.arange(matrix.shape[0]), np.diff(matrix.indptr))
    return np.bincount(rows, weights=largest, minlength=matrix.shape[0])


def _integers(values: np.ndarray, what: str) -> np.ndarray:
    finite = values[np.isfinite(values)]
    if not np.array_equal(finite, np.round(finite)):
        raise ValueError(f"CP-SAT needs integer {what}; this formulation has fractional ones")
    return values


def to_cpsat(form: Formulation):
    """The CP-SAT model of ``form``: integer rows and domains, the objective scaled and rounded
    down (module docstring)."""
    from ortools.sat.python import cp_model

    upper = _upper(form)
    if not np.all(np.isfinite(upper)):
        raise ValueError("a continuous column without a bound cannot become a CP-SAT integer")
    if np.any((form.cost != 0) & (form.col_lower < 0)):
        raise ValueError("rounding the objective down needs non-negative columns")
    matrix = form.matrix.tocsr()
    _integers(matrix.data, "row coefficients")
    row_lower, row_upper = _integers(form.row_lower, "row bounds"), _integers(form.row_upper, "row bounds")
    model = cp_model.CpModel()
    proto = model.proto
    for lo, hi in zip(np.ceil(form.col_lower).astype(np.int64).tolist(), np.floor(upper).astype(np.int64).tolist()):
        proto.variables.add().domain.extend([lo, hi])
    # an open side of a row becomes one past the row's activity over the box
    lows = np.where(np.isfinite(row_lower), row_lower, -_largest_activity(-matrix, form.col_lower, upper) - 1)
    highs = np.where(np.isfinite(row_upper), row_upper, _largest_activity(matrix, form.col_lower, upper) + 1)
    lows, highs = lows.astype(np.int64).tolist(), highs.astype(np.int64).tolist()
    indptr, indices, data = matrix.indptr, matrix.indices.tolist(), matrix.data.astype(np.int64).tolist()
    for r in range(matrix.shape[0]):
        a, b = int(indptr[r]), int(indptr[r + 1])  # an empty row stays: its bounds may exclude 0
        linear = proto.constraints.add().linear
        linear.vars.extend(indices[a:b])
        linear.coeffs.extend(data[a:b])
        linear.domain.extend([lows[r], highs[r]])
    activity = float(np.abs(form.cost) @ upper)
    scale = 2.0 ** math.floor(math.log2(OBJECTIVE_ACTIVITY / activity)) if activity > 0 else 1.0
    coefficients = np.floor(form.cost * scale).astype(np.int64)
    used = np.flatnonzero(coefficients)
    proto.objective.vars.extend(used.tolist())
    proto.objective.coeffs.extend(coefficients[used].tolist())
    proto.objective.scaling_factor = 1.0 / scale  # CP-SAT reports objective and bound in the formulation's units
    return model


def solve_cpsat(form: Formulation, time_limit: float, start: np.ndarray | None = None,
                progress: Progress | None = None, gap: float = 1e-4,
                screen: Callable[[np.ndarray], bool] | None = None) -> SolveOutcome:
    """OR-Tools CP-SAT, ``WORKERS`` workers: the MIP start as a hint, the time limit (building
    the model included), relative gap, progress at each solution, ``screen`` as HiGHS's (CP-SAT
    has no root node: it stops at once, and ``root_bound`` is -inf)."""
    from ortools.sat.python import cp_model

    began = time.perf_counter()
    if form.n_columns == 0:
        return SolveOutcome(np.zeros(0), 0.0, 0.0, True, "cpsat", "nothing to decide")
    model = to_cpsat(form)
    if start is not None:
        model.proto.solution_hint.vars.extend(range(form.n_columns))
        model.proto.solution_hint.values.extend(np.round(start).astype(np.int64).tolist())
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = max(time_limit - (time.perf_counter() - began), 0.0)
    solver.parameters.num_workers = WORKERS
    solver.parameters.subsolvers.extend(SUBSOLVERS)
    solver.parameters.relative_gap_limit = gap
    solver.parameters.random_seed = 0
    bounds: list[float] = []  # CP-SAT's bound as it improves, for progress
    solver.best_bound_callback = lambda bound: bounds.append(float(bound))

    class Watch(cp_model.CpSolverSolutionCallback):
        def on_solution_callback(self) -> None:
            if screen is not None and screen(form.rounded(np.asarray(self.response_proto.solution, dtype=float))):
                self.stop_search()
            found = self.objective_value
            if progress is not None and progress(_seconds(form, found), _seconds(form, max(bounds, default=-np.inf)),
                                                 time.perf_counter() - began):
                self.stop_search()

    status = solver.solve(model, Watch() if progress is not None or screen is not None else None)
    has_point = status in (cp_model.OPTIMAL, cp_model.FEASIBLE)
    x = form.rounded(np.asarray(solver.response_proto.solution, dtype=float)) if has_point else None
    bound = float(solver.best_objective_bound) if status != cp_model.INFEASIBLE else np.inf
    if x is not None:
        bound = min(bound, float(form.cost @ x))
    bound = bound if np.isfinite(bound) or status == cp_model.INFEASIBLE else -np.inf
    optimal = status == cp_model.OPTIMAL and x is not None
    return SolveOutcome(x, bound, -np.inf, optimal, "cpsat", solver.status_name(status))


# ---- SCIP -----------------------------------------------------------------------------------------
def solve_scip(form: Formulation, time_limit: float, start: np.ndarray | None = None,
               progress: Progress | None = None, gap: float = 1e-4,
               screen: Callable[[np.ndarray], bool] | None = None) -> SolveOutcome:
    """SCIP (one thread) on the formulation as HiGHS holds it: the MIP start, the time limit
    (building included), relative gap, progress and ``screen`` at each new best solution, SCIP's
    root-node bound."""
    import highspy
    import pyscipopt

    began = time.perf_counter()
    if form.n_columns == 0:
        return SolveOutcome(np.zeros(0), 0.0, 0.0, True, "scip", "nothing to decide")
    model = pyscipopt.Model()
    model.hideOutput()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "exact.mps")
        _write_mps(highspy, form, path)
        model.readProblem(path)
    named = {column.name: column for column in model.getVars()}  # SCIP orders them its own way
    columns = [named[f"c{i}"] for i in range(form.n_columns)]  # HiGHS's names for unnamed columns
    model.setParam("limits/time", max(time_limit - (time.perf_counter() - began), 0.0))
    model.setParam("limits/gap", gap)
    model.setParam("randomization/randomseedshift", 0)
    if start is not None:
        point = model.createSol()
        for column, value in zip(columns, start.tolist()):
            model.setSolVal(point, column, value)
        model.addSol(point)

    def values() -> np.ndarray:
        best = model.getBestSol()
        return np.array([model.getSolVal(best, column) for column in columns])

    class Watch(pyscipopt.Eventhdlr):
        def eventinit(self) -> None:
            self.model.catchEvent(pyscipopt.SCIP_EVENTTYPE.BESTSOLFOUND, self)

        def eventexec(self, event) -> None:
            stop = screen is not None and screen(form.rounded(values()))
            if progress is not None and progress(_seconds(form, model.getPrimalbound()),
                                                 _seconds(form, model.getDualbound()), time.perf_counter() - began):
                stop = True
            if stop:
                model.interruptSolve()

    if progress is not None or screen is not None:
        model.includeEventhdlr(Watch(), "progress", "exact mode's progress and screen")
    # SCIP takes the start in before its events are caught: it is reported here, the first incumbent
    if start is not None and progress is not None and progress(_seconds(form, float(form.cost @ start)), -np.inf,
                                                               time.perf_counter() - began):
        return SolveOutcome(form.rounded(start), -np.inf, -np.inf, False, "scip", "stopped at the MIP start")
    model.optimize()
    status = model.getStatus()
    x = form.rounded(values()) if model.getNSols() > 0 else None
    bound = float(model.getDualbound())
    if status == "infeasible":
        bound = np.inf
    elif not np.isfinite(bound) or abs(bound) >= model.infinity():
        bound = -np.inf
    root = float(model.getDualboundRoot()) if model.getNNodes() > 0 else bound
    root = root if np.isfinite(root) and abs(root) < model.infinity() else bound
    # "gaplimit": within ``gap`` of the bound, what HiGHS reports as Optimal under its mip_rel_gap
    proven = status in ("optimal", "gaplimit") and x is not None
    return SolveOutcome(x, bound, min(root, bound), proven, "scip", status)


def _write_mps(highspy, form: Formulation, path: str) -> None:
    """``form`` as an MPS file, written by HiGHS from the model ``solve_highs`` passes it."""
    with silenced(1):
        h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    h.passModel(highs_model(highspy, form))
    h.writeModel(path)
