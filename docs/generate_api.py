"""Write docs/api.md from the public API's docstrings: ``python docs/generate_api.py``.

tests/test_docs.py fails when the committed file differs from what this script writes.
"""
from __future__ import annotations

import inspect
import sys
from pathlib import Path

import planner
import planner.algorithms

SECTIONS = [
    ("Planning", ["plan", "Plan", "PlannedModule", "backend", "Call", "plan_blocks", "BlockPlan"]),
    ("Capture and the graph", ["capture", "TrainingGraph", "OpInfo", "TensorInfo", "TensorKind", "Phase"]),
    ("Schedules and the simulator", ["Schedule", "Compute", "Free", "simulate", "SimResult"]),
    ("Cost models", ["CostModel", "RooflineCostModel", "ProfiledCostModel", "DeviceSpec"]),
    ("Measuring", ["MemoryMeter", "MeasuredStep", "measure_step", "measure_training_step"]),
    ("Units", ["parse_budget", "format_bytes", "reserved_budget"]),
    ("Errors", ["PlannerError", "CaptureError", "UnsupportedOperatorError", "InvalidScheduleError",
                "PlanMismatchError", "RankMismatchError", "InfeasibleBudgetError", "InvalidBudgetError",
                "BackwardError", "GraphLintError", "SolverUnavailableError"]),
]


def _signature(obj) -> str:
    try:
        return str(inspect.signature(obj))
    except (TypeError, ValueError):
        return ""


def _entry(name: str, obj) -> str:
    kind = "class" if inspect.isclass(obj) else "function"
    doc = inspect.getdoc(obj) or "(no docstring)"
    return f"### `planner.{name}`\n\n```python\n{kind} {name}{_signature(obj)}\n```\n\n{doc}\n"


def render() -> str:
    parts = ["# API reference\n", "Generated from the docstrings by `python docs/generate_api.py`; do not edit by hand.\n"]
    for title, names in SECTIONS:
        parts.append(f"## {title}\n")
        parts.extend(_entry(name, getattr(planner, name)) for name in names)
    parts.append("## Algorithms (`planner.algorithms.ALGORITHMS`)\n")
    parts.append("Each is `fn(graph, cost_model, budget_bytes) -> Schedule`.\n")
    for name, fn in planner.algorithms.ALGORITHMS.items():
        summary = (inspect.getdoc(fn) or '').split("\n\n")[0].replace("\n", " ")
        parts.append(f"- `{name}`: {summary}")
    return "\n".join(parts) + "\n"


if __name__ == "__main__":
    Path(__file__).with_name("api.md").write_text(render())
    sys.exit(0)
