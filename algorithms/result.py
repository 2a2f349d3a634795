"""One result type for every algorithm, and the one rule that ranks them.

Every algorithm returns a ``Schedule``; wrapping it with the simulator's verdict gives an
``AlgorithmResult`` (in the spirit of ``scipy.optimize.OptimizeResult``): the schedule, what the
simulator says of it, whether it fits the budget and how it was found. ``rank`` is the one
ordering every search uses (the DP's limit search, Chen's greedy sweep, the hierarchical
bisection, fast and exact mode): among schedules that fit, the fastest; among those that do not,
the lowest peak.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from planner.cost import CostModel
from planner.graph import TrainingGraph
from planner.schedule import Schedule
from planner.simulator import SimResult, simulate


def rank(simulated: SimResult, budget_bytes: int) -> tuple:
    """Sort key: fitting schedules first, by time then peak; the others by peak then time."""
    if simulated.peak_bytes <= budget_bytes:
        return (0, simulated.time, simulated.peak_bytes)
    return (1, simulated.peak_bytes, simulated.time)


@dataclass(frozen=True)
class AlgorithmResult:
    """A schedule, judged by the simulator against a budget."""

    name: str  # how it was found: "hierarchical", "checkpoint_all+reorder", "milp", ...
    graph: TrainingGraph  # the graph it runs on (stock ops, or with operator variants)
    schedule: Schedule
    simulated: SimResult
    budget_bytes: int

    @classmethod
    def judge(cls, name: str, graph: TrainingGraph, schedule: Schedule, cost_model: CostModel,
              budget_bytes: int) -> "AlgorithmResult":
        return cls(name, graph, schedule, simulate(graph, schedule, cost_model), budget_bytes)

    @property
    def fits(self) -> bool:
        return self.simulated.peak_bytes <= self.budget_bytes

    @property
    def key(self) -> tuple:
        return rank(self.simulated, self.budget_bytes)


def best(results: Iterable[AlgorithmResult]) -> AlgorithmResult:
    """The result ``rank`` puts first."""
    return min(results, key=lambda r: r.key)
