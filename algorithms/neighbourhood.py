"""Neighbourhoods of an exact-mode point: the staged MILP re-solved with every binary outside a
window fixed at the point's value. One mechanism serves two callers: repairing a start whose
staged image breaks a recomputation phase (a window of stages, ``milp._repaired``) and improving
an incumbent where the whole MILP's own search stalls (a window of nodes, ``window_search``).

Each window's MILP is a restriction of the whole one, so whatever it finds satisfies every row
(checked again on the staged point) and is only an incumbent: no bound is ever taken from it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import numpy as np

from planner.algorithms.milp import DEFAULT_SOLVER, Formulation, solve, staged_point
from planner.algorithms.staging import StagedProblem

# window search: nodes (topological order) one window frees at every stage, the solver's seconds
# per window, and the least seconds worth starting one with. 20 nodes and 3 s: on the UNet at 33%
# of store-all (by rounds, before ``milp.WHOLE_NONZEROS``), 5 of 7 such windows lowered the
# incumbent from +204.9% to +61.4% in the 18 s a 60 s cell leaves them, where HiGHS's own search
# over the whole MILP reached +199.3% in all 60 s (docs/benchmarks.md, exact mode, "Window
# search"). On ResNet-50 b64 at 33%, 40 s from +11.72%:
# 10 nodes at 1.5 s +11.72%, 20 at 3 s +11.68%, 40 at 5 s +11.60%; 20 keeps several windows
# within the few seconds a cell leaves.
WINDOW_NODES = 20
WINDOW_SECONDS = 3.0
LEAST_WINDOW_SECONDS = 0.5


def restricted_point(problem: StagedProblem, form: Formulation, x: np.ndarray, stages: Sequence[int],
                     nodes: Sequence[int], seconds: float, solver: str = DEFAULT_SOLVER) -> np.ndarray | None:
    """The best point ``solver`` finds in ``seconds`` with every binary of ``form`` fixed at
    ``x``'s value except those of ``stages`` × ``nodes`` (their recomputations, and the holding
    of their nodes' groups), as a staged point that satisfies every row; None if it finds none.
    Complexity: one MILP over the free binaries (HiGHS's presolve removes the fixed columns)."""
    stage_list, node_list = list(stages), list(nodes)
    free_nodes = set(node_list)
    groups = [g for g, group in enumerate(problem.groups) if group.node in free_nodes]
    fixed = form.integrality > 0
    for index, columns in ((form.keep_index, groups), (form.recompute_index, node_list)):
        free = index[np.ix_(stage_list, columns)]
        fixed[free[free >= 0]] = False
    lower, upper = form.col_lower.copy(), form.col_upper.copy()
    lower[fixed] = upper[fixed] = x[fixed]
    outcome = solve(replace(form, col_lower=lower, col_upper=upper), seconds, x, solver=solver)
    if outcome.x is None:
        return None
    point = staged_point(problem, form, form.recompute_of(outcome.x))
    return point if form.violation(point) <= 1e-9 else None


@dataclass(frozen=True)
class WindowReport:
    """What a window search did: windows solved, and how many of them improved the incumbent."""

    windows: int
    improved: int

    def describe(self) -> str:
        return f"window search: {self.improved} of {self.windows} windows improved the incumbent"


def window_search(problem: StagedProblem, form: Formulation, x: np.ndarray, deadline: float,
                  solver: str = DEFAULT_SOLVER, keep_going: Callable[[np.ndarray], bool] | None = None,
                  width: int = WINDOW_NODES) -> tuple[np.ndarray, WindowReport]:
    """A large-neighbourhood search from ``x`` (a point that satisfies every row of ``form``):
    sweeps windows of ``width`` consecutive nodes, half a window apart, each freeing
    those nodes' binaries at every stage for at most ``WINDOW_SECONDS``, keeping any point of
    lower objective; sweeps again until one improves nothing or ``deadline`` (a
    ``time.perf_counter()`` reading) comes. Each sweep takes the windows where the sweep's start
    spends most recomputation time first: the time limit often ends a sweep early.
    ``keep_going`` sees each improved point and may stop the search. Never returns a worse point
    than ``x``. Complexity per sweep: about 2·nodes/``width`` MILPs of at most ``width`` × stages
    free binaries each."""
    n_nodes, step = len(problem.nodes), max(1, width // 2)
    firsts = range(0, max(1, n_nodes - width + step), step)
    stages = range(problem.n_stages)
    windows = improved = 0
    while True:
        sweep_improved = False
        for first in _costliest_first(problem, form, x, firsts, width):
            left = deadline - time.perf_counter()
            if left < LEAST_WINDOW_SECONDS:
                return x, WindowReport(windows, improved)
            windows += 1
            point = restricted_point(problem, form, x, stages, range(first, min(n_nodes, first + width)),
                                     min(WINDOW_SECONDS, left), solver)
            if point is None or form.cost @ point >= form.cost @ x - 1e-9 * max(1.0, abs(form.cost @ x)):
                continue
            x, improved, sweep_improved = point, improved + 1, True
            if keep_going is not None and not keep_going(x):
                return x, WindowReport(windows, improved)
        if not sweep_improved:
            return x, WindowReport(windows, improved)


def _costliest_first(problem: StagedProblem, form: Formulation, x: np.ndarray, firsts: range, width: int) -> list[int]:
    """The windows' first nodes, by the recomputation time ``x`` spends on their nodes, most first
    (ties in node order). O(stages × nodes)."""
    spent = form.recompute_of(x).sum(axis=0) * np.array([node.time for node in problem.nodes])
    window_spent = [spent[first: first + width].sum() for first in firsts]
    return [first for _, first in sorted(zip(window_spent, firsts), key=lambda pair: (-pair[0], pair[1]))]
