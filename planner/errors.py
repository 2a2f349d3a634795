"""Typed errors. Each message says what went wrong and what to do about it."""
from __future__ import annotations

from planner.units import format_bytes


class PlannerError(Exception):
    """Base class of every error this library raises on purpose."""


class InvalidBudgetError(PlannerError, ValueError):
    """A budget that is not a size: unreadable, zero, negative, not finite, or an unknown unit.

    Also a ``ValueError``, which is what budgets raised before this type existed.
    """


class CaptureError(PlannerError):
    """The model, its inputs or its loss cannot be traced into a training graph."""


class UnsupportedOperatorError(CaptureError):
    """The traced graph contains an operator the planner cannot account for."""

    def __init__(self, operator: str, reason: str):
        self.operator = operator
        super().__init__(f"unsupported operator {operator}: {reason}")


class InvalidScheduleError(PlannerError):
    """A schedule does not describe a valid training step for its graph."""


class PlanMismatchError(PlannerError):
    """A schedule or plan is used with a graph other than the one it was made for."""


class RankMismatchError(PlanMismatchError):
    """Ranks of a distributed job planned differently (another shape, model or version): their
    plans would not compute the same step."""


class InfeasibleBudgetError(PlannerError):
    """No schedule found fits the memory budget.

    ``min_feasible_bytes`` is the smallest peak any algorithm that was tried reached: a budget at
    or above it is feasible.
    """

    def __init__(self, budget_bytes: int, min_feasible_bytes: int, detail: str = ""):
        self.budget_bytes = budget_bytes
        self.min_feasible_bytes = min_feasible_bytes
        message = (
            f"budget {format_bytes(budget_bytes)} is below the smallest peak found, "
            f"{format_bytes(min_feasible_bytes)} ({min_feasible_bytes} bytes): raise the budget to at "
            f"least that, or reduce the batch size"
        )
        super().__init__(message + (f"; {detail}" if detail else ""))


class SolverUnavailableError(PlannerError, ValueError):
    """Exact mode was asked for a MILP solver that is unknown or not installed; the message names
    the extra that installs it (``pip install remat-planner[cpsat]``)."""


class BackwardError(PlannerError, RuntimeError):
    """A backward pass a planned step cannot run as asked (a second one without
    ``retain_graph=True``, higher-order gradients); the message says what to do."""


class GraphLintError(PlannerError):
    """A ``TrainingGraph`` breaks one of its invariants (``TrainingGraph.lint``): a bug in whatever
    built or rewrote it. ``invariant`` names the rule; ``op`` and ``tensor`` the ids at fault."""

    def __init__(self, invariant: str, detail: str, op: int | None = None, tensor: int | None = None):
        self.invariant, self.op, self.tensor = invariant, op, tensor
        where = ", ".join(f"{what} {index}" for what, index in (("op", op), ("tensor", tensor)) if index is not None)
        super().__init__(f"graph invariant '{invariant}' broken{' at ' + where if where else ''}: {detail}")
