"""What fast and exact mode weigh, and how they choose: the search behind ``planner.plan``.

Fast mode plans hierarchically (``planner.algorithms.hierarchical``) on the graph with the chosen
operator variants and, when variants apply, on plain PyTorch's graph too (the variants' extra
passes can cost more time than they save where memory is not short), and weighs store-all on
each, the plan that recomputes nothing. Exact mode adds the staged MILP. Every candidate is an
``AlgorithmResult`` judged by the simulator, and ``algorithms.result.best`` picks the winner.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from planner.algorithms import ALGORITHMS
from planner.algorithms.bounds import step_time_lower_bound
from planner.algorithms.milp import SCHEDULE_CLASS, ExactResult, exact_search
from planner.algorithms.result import AlgorithmResult, best
from planner.algorithms.solvers import DEFAULT_SOLVER, require as require_solver
from planner.cost import CostModel
from planner.errors import InfeasibleBudgetError
from planner.graph import TrainingGraph
from planner.units import format_bytes

MODES = ("fast", "exact")
FAST_ALGORITHM = "hierarchical"
#: graphs up to this many ops also get the segment DP, whose O(ops^2) tables are cheap there and
#: whose segment-by-segment recomputation the blocks of so small a graph are too coarse to express
SMALL_GRAPH_OPS = 96
DEFAULT_TIME_LIMIT = 60.0  # seconds, exact mode
logger = logging.getLogger("planner")


@dataclass(frozen=True)
class Verdict:
    """How a search ended, for ``Plan``: its status, gap, bound and message."""

    status: str  # "optimal" / "feasible" / "fallback"
    gap: float | None
    lower_bound: float | None
    message: str


@dataclass(frozen=True)
class SearchOutcome:
    chosen: AlgorithmResult
    candidates: tuple[AlgorithmResult, ...]  # every schedule weighed, the chosen one included
    verdict: Verdict


def check_choice(mode: str, algorithm: str | None, solver: str = DEFAULT_SOLVER) -> None:
    """Raise ``ValueError`` for an unknown algorithm, (without one) an unknown mode, or a solver
    outside exact mode; ``SolverUnavailableError`` for a solver not installed. Called before
    capture, so that a wrong choice fails at once."""
    if algorithm is not None and algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}: choose one of {sorted(ALGORITHMS)}")
    if algorithm is None and mode not in MODES:
        raise ValueError(f"unknown or unavailable mode {mode!r}: this version offers {list(MODES)}")
    if solver != DEFAULT_SOLVER and (algorithm is not None or mode != "exact"):
        raise ValueError(f"solver={solver!r} chooses exact mode's MILP solver: pass mode=\"exact\" too")
    require_solver(solver)


def run(name: str, graph: TrainingGraph, cost_model: CostModel, budget_bytes: int) -> AlgorithmResult:
    """One algorithm of ``planner.algorithms.ALGORITHMS``, judged."""
    return AlgorithmResult.judge(name, graph, ALGORITHMS[name](graph, cost_model, budget_bytes), cost_model,
                                 budget_bytes)


def fast_candidates(stock: TrainingGraph, graph: TrainingGraph, cost_model: CostModel,
                    budget_bytes: int) -> list[AlgorithmResult]:
    """Fast mode's candidates: store-all and hierarchical planning on ``graph`` (with variants)
    and, if that is not ``stock``, on ``stock`` as well; on graphs of at most ``SMALL_GRAPH_OPS``
    ops the segment DP too. (The hierarchy runs the backward block
    by block, which can reorder gradient sums against the graph: store-all is the plan of no
    recomputation in the graph's own order.)"""
    found = []
    for candidate in (graph, stock) if graph is not stock else (graph,):
        found.append(run("store_all", candidate, cost_model, budget_bytes))
        found.append(run(FAST_ALGORITHM, candidate, cost_model, budget_bytes))
        if len(candidate.ops) <= SMALL_GRAPH_OPS:
            found.append(run("dp_reorder", candidate, cost_model, budget_bytes))
    return found


def search(stock: TrainingGraph, graph: TrainingGraph, cost_model: CostModel, budget_bytes: int, *,
           mode: str = "fast", algorithm: str | None = None, time_limit: float | None = None,
           progress: Callable[[float, float, float], bool | None] | None = None,
           solver: str = DEFAULT_SOLVER) -> SearchOutcome:
    """The best schedule for ``budget_bytes`` by ``algorithm`` alone, or by ``mode`` (exact mode's
    MILP on ``solver``, ``planner.algorithms.solvers.SOLVERS``).

    Raises ``InfeasibleBudgetError`` when nothing fits; its minimum is the lowest peak reached
    (with ``algorithm``, fast mode's too, and the message says when fast mode would fit).
    """
    began = time.perf_counter()
    if algorithm is not None:
        tried = [run(algorithm, graph, cost_model, budget_bytes)]
    else:
        tried = fast_candidates(stock, graph, cost_model, budget_bytes)
    exact = None
    if algorithm is None and mode == "exact":
        limit = DEFAULT_TIME_LIMIT if time_limit is None else float(time_limit)
        starts = [t.schedule for t in tried if t.graph is graph and t.fits]
        # every candidate is a schedule of one of these graphs: the least of their bounds covers them all
        graphs = (graph,) if graph is stock else (graph, stock)
        universal = min(step_time_lower_bound(g, cost_model, budget_bytes) for g in graphs)
        exact = exact_search(graph, cost_model, budget_bytes, limit - (time.perf_counter() - began), progress,
                             starts, solver, universal)
        if exact.schedule is not None:
            tried.append(AlgorithmResult.judge("milp", graph, exact.schedule, cost_model, budget_bytes))
    chosen = best(tried)
    if not chosen.fits:
        _raise_infeasible(stock, graph, cost_model, budget_bytes, algorithm, tried)
    if exact is not None:
        verdict = _exact_verdict(exact, chosen, universal)
    elif algorithm is None:
        verdict = Verdict("feasible", None, None, f"fast mode: hierarchical planning; best of {len(tried)} candidates")
    else:
        verdict = Verdict("feasible", None, None, "")
    return SearchOutcome(chosen, tuple(tried), verdict)


def _raise_infeasible(stock, graph, cost_model, budget_bytes, algorithm, tried) -> None:
    lowest = min(t.simulated.peak_bytes for t in tried)
    names = ", ".join(dict.fromkeys(t.name for t in tried))
    if algorithm is None:
        raise InfeasibleBudgetError(budget_bytes, lowest, f"tried {names}")
    fast = best(fast_candidates(stock, graph, cost_model, budget_bytes))
    if fast.fits:  # say how low fast mode gets, not just the algorithm asked for
        raise InfeasibleBudgetError(budget_bytes, lowest, f"{algorithm} peaks at {format_bytes(lowest)}, "
                                    "but fast mode fits this budget: plan without algorithm=")
    raise InfeasibleBudgetError(budget_bytes, min(lowest, fast.simulated.peak_bytes), f"tried {names} and fast mode")


def _exact_verdict(exact: ExactResult, chosen: AlgorithmResult, universal: float) -> Verdict:
    """Two bounds, two classes. The MILP's bound covers staged schedules
    (``planner.algorithms.milp.SCHEDULE_CLASS``); a faster fast-mode plan lies outside that set.
    ``universal`` (``planner.algorithms.bounds.step_time_lower_bound``, seconds) covers every
    schedule of the graph, with and without variants. ``lower_bound`` and ``gap`` are against the
    stronger bound that covers the chosen plan's class, and the message says which that is; it
    reports the MILP's incumbent, its root and final bounds and the universal bound, as overheads
    on store-all's step time, and the gap over every schedule."""
    staged = exact.lower_bound if np.isfinite(exact.lower_bound) else None
    chosen_time = chosen.simulated.time
    universal_gap = max(0.0, (chosen_time - universal) / chosen_time)
    every = (f"universal bound {exact.overhead(universal)} covers every schedule: gap "
             f"{universal_gap:.2%} over them")
    numbers = exact.summary()
    if chosen.name == "milp":
        status = "optimal" if exact.optimal else "feasible"
        staged_stronger = staged is not None and staged >= universal
        bound = staged if staged_stronger else universal
        gap = 0.0 if exact.optimal else max(0.0, (chosen_time - bound) / chosen_time)
        which = (f"the bound and the gap cover {SCHEDULE_CLASS}" if staged_stronger
                 else "the bound and the gap are the universal ones")
        if exact.optimal:
            which = f"\"optimal\" and the gap cover {SCHEDULE_CLASS}; " + (
                "so does the bound" if staged_stronger else "the bound is the universal one")
        logger.info("exact mode: %s, gap %s (%s)", status, gap, exact.message)
        return Verdict(status, gap, bound, f"exact mode: MILP ({exact.message}); {numbers}; {which}; {every}")
    logger.info("exact mode fell back to fast mode: %s", exact.message)
    return Verdict("fallback", universal_gap, universal, f"exact mode: fast mode's plan is faster than the MILP's "
                   f"(it lies outside {SCHEDULE_CLASS}); MILP: {exact.message}; {numbers}; the gap and the bound "
                   f"are the universal ones: {every}")

