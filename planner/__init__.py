"""remat-planner: train PyTorch models under a memory budget.

``capture`` turns a model's training step into a ``TrainingGraph``; algorithms turn a graph into a
``Schedule``; ``simulate`` is the one judge of a schedule's peak memory and time; ``measure_*``
tells the truth about real memory.
"""
from planner.capturing import capture
from planner.cost import DEVICE_PRESETS, CostModel, DeviceSpec, RooflineCostModel
from planner.profiled_cost import ProfiledCostModel
from planner.calls import Call
from planner.errors import (
    BackwardError, CaptureError, GraphLintError, InfeasibleBudgetError, InvalidBudgetError, InvalidScheduleError,
    PlanMismatchError, PlannerError, RankMismatchError, SolverUnavailableError, UnsupportedOperatorError,
)
from planner.guards import config
from planner.graph import OpInfo, Phase, TensorInfo, TensorKind, TrainingGraph
from planner.planning import Plan, plan
from planner.execute import PlannedModule
from planner.compile_backend import backend
from planner.blocks import BlockPlan, plan_blocks
from planner.measure import MeasuredStep, MemoryMeter, measure_step, measure_training_step
from planner.schedule import Compute, Free, Schedule
from planner.simulator import SimResult, simulate
from planner.budgets import parse_budget
from planner.units import format_bytes
from planner.allocator import reserved_budget

__all__ = [
    "plan", "Plan", "PlannedModule", "plan_blocks", "BlockPlan", "backend", "capture", "TrainingGraph", "OpInfo", "TensorInfo", "TensorKind", "Phase",
    "Schedule", "Compute", "Free", "simulate", "SimResult",
    "CostModel", "RooflineCostModel", "ProfiledCostModel", "DeviceSpec", "DEVICE_PRESETS",
    "MemoryMeter", "MeasuredStep", "measure_step", "measure_training_step",
    "parse_budget", "format_bytes", "reserved_budget",
    "PlannerError", "CaptureError", "UnsupportedOperatorError", "InvalidScheduleError",
    "PlanMismatchError", "InfeasibleBudgetError", "InvalidBudgetError", "RankMismatchError", "BackwardError",
    "GraphLintError", "SolverUnavailableError", "Call", "config",
]
