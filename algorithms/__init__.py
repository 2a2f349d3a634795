"""Planning algorithms. Each is ``fn(graph, cost_model, budget_bytes) -> Schedule``; the simulator
judges every schedule they return. Reach them through ``ALGORITHMS`` by name; the submodules
(``hierarchical`` with ``blocks``, ``block_options`` and ``chain``; ``baselines``, ``dp``, ``reorder``,
``keepset``, ``bounds``) hold them and their building blocks; ``result`` judges and ranks their
schedules."""
from typing import Callable

from planner.algorithms import baselines, dp, hierarchical, reorder
from planner.algorithms.reorder import reorder_schedule
from planner.cost import CostModel
from planner.graph import TrainingGraph
from planner.schedule import Schedule

Algorithm = Callable[[TrainingGraph, CostModel, int], Schedule]

ALGORITHMS: dict[str, Algorithm] = {
    "hierarchical": hierarchical.hierarchical,
    "dp": dp.dp,
    "dp_reorder": dp.dp_reorder,
    "dp_memory": dp.dp_memory,
    "reorder": reorder.reorder,
    "store_all": baselines.store_all,
    "checkpoint_all": baselines.checkpoint_all,
    "chen_sqrt": baselines.chen_sqrt,
    "chen_sqrt_linear": baselines.chen_sqrt_linear,
    "chen_greedy": baselines.chen_greedy,
    "chen_greedy_linear": baselines.chen_greedy_linear,
    "recompute_cheap": baselines.recompute_cheap,
}
BASELINES = ("store_all", "checkpoint_all", "chen_sqrt", "chen_sqrt_linear", "chen_greedy", "chen_greedy_linear")

__all__ = ["ALGORITHMS", "BASELINES", "Algorithm", "reorder_schedule"]
