"""Planning algorithms. Each is ``fn(graph, cost_model, budget_bytes) -> Schedule``; the simulator
judges every schedule they return."""
from typing import Callable

from planner.algorithms.baselines import (
    chen_greedy, chen_greedy_linear, chen_sqrt, chen_sqrt_linear, checkpoint_all, store_all,
)
from planner.algorithms.dp import dp, dp_memory, dp_reorder
from planner.algorithms.reorder import reorder, reorder_schedule  # noqa: F401 (public)
from planner.cost import CostModel
from planner.graph import TrainingGraph
from planner.schedule import Schedule

Algorithm = Callable[[TrainingGraph, CostModel, int], Schedule]

ALGORITHMS: dict[str, Algorithm] = {
    "dp": dp,
    "dp_reorder": dp_reorder,
    "dp_memory": dp_memory,
    "reorder": reorder,
    "store_all": store_all,
    "checkpoint_all": checkpoint_all,
    "chen_sqrt": chen_sqrt,
    "chen_sqrt_linear": chen_sqrt_linear,
    "chen_greedy": chen_greedy,
    "chen_greedy_linear": chen_greedy_linear,
}
BASELINES = ("store_all", "checkpoint_all", "chen_sqrt", "chen_sqrt_linear", "chen_greedy", "chen_greedy_linear")
# fast mode: the DP (judged after reordering), with every baseline, reordered, as a safety net;
# the fastest schedule in budget wins
FAST = ("dp_reorder",) + BASELINES

__all__ = ["ALGORITHMS", "BASELINES", "FAST", "Algorithm", "reorder_schedule"] + list(ALGORITHMS)
