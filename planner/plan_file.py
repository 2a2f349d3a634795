"""The plan file: a ``Plan`` as JSON, and the check its recorded predictions must pass.

Layout, format ``PLAN_FORMAT``: ``{"format": 1, "plan": {...}, "schedule": Schedule.to_json()}``.
``plan`` holds the predictions and how they were found (``SCALAR_FIELDS``), the operator
variants, the input shapes the plan was made for, how the model is called and the request new
states are planned with. Reading refuses anything else with ``InvalidScheduleError`` naming the
fix (plan again). Files of format 1 from before keyword inputs, re-planning and operator variants
lack ``call``, ``request``, ``workload`` or ``variants``: ``_migrate`` fills them, in this one place,
with what those versions meant (positional call, the byte budget, no workload, stock ops), so the
format number did not change and no saved file's bytes did.

A file's form is checked on reading; its numbers once the model is captured again
(``check_predictions``), since only then is there a graph to replay the schedule on.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from planner.calls import PytreeForm
from planner.cost import preset_name, recomputable
from planner.errors import InvalidScheduleError
from planner.graph import InputSpec, TrainingGraph, VariantCapability
from planner.schedule import Schedule
from planner.simulator import simulate

if TYPE_CHECKING:
    from planner.planning import Plan

PLAN_FORMAT = 1
#: ``Plan`` fields written as they are, in this order (the order is part of a file's bytes)
SCALAR_FIELDS = ("budget_bytes", "predicted_peak_bytes", "predicted_time", "store_all_peak_bytes",
                 "store_all_time", "resident_bytes", "recomputations", "algorithm", "status",
                 "cost_model", "gap", "lower_bound", "message", "n_inputs", "workload")
_FIELDS = frozenset(SCALAR_FIELDS) | {"variants", "variant_capability", "input_specs", "call", "request"}


def write(plan: "Plan", path: str | Path) -> None:
    """Save ``plan``: schedule, fingerprint, predictions, input shapes, call form and request."""
    meta: dict[str, Any] = {name: getattr(plan, name) for name in SCALAR_FIELDS}
    meta["variants"] = list(plan.variants)
    if plan.variant_capability != VariantCapability():  # absent: the PyTorch twins (and older files)
        meta["variant_capability"] = asdict(plan.variant_capability)
    meta["input_specs"] = [[list(s.shape), str(s.dtype), s.device] for s in plan.input_specs]
    meta["call"] = plan.call.to_json() if plan.call is not None else None
    meta["request"] = plan.replan_request.to_json()
    Path(path).write_text(json.dumps({"format": PLAN_FORMAT, "plan": meta, "schedule": plan.schedule.to_json()}))


def read(path: str | Path, request_from_json: Callable[[dict], Any]) -> dict[str, Any]:
    """The ``Plan`` fields a file saved by ``write`` holds (no graph: ``Plan.apply`` captures the
    model again), its request built by ``request_from_json``. Raises ``InvalidScheduleError`` for
    anything but such a file: not JSON, another format, missing or unknown keys, bad values."""
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as error:
        raise InvalidScheduleError(f"{path} is not valid JSON ({error}); it may be truncated: plan again") from error
    if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT or "plan" not in data:
        raise InvalidScheduleError(f"{path} is not a plan of format {PLAN_FORMAT}: plan again with this version")
    try:
        meta = _migrate(dict(data["plan"]))
        if meta.keys() != _FIELDS:
            raise KeyError(", ".join(sorted(meta.keys() ^ _FIELDS)))
        specs = tuple(InputSpec(tuple(s[0]), _dtype_named(s[1]), s[2]) for s in meta.pop("input_specs"))
        call = meta.pop("call")
        return dict(meta, schedule=Schedule.from_json(data["schedule"]), graph=None, input_specs=specs,
                    variants=tuple(str(name) for name in meta["variants"]),
                    variant_capability=VariantCapability(**meta["variant_capability"]),
                    call=PytreeForm.from_json(call) if call is not None else None,
                    request=request_from_json(meta["request"]))
    except (KeyError, TypeError, ValueError, IndexError) as error:
        raise InvalidScheduleError(f"{path} is a damaged plan ({error}): plan again") from error


def _dtype_named(name: str) -> torch.dtype:
    """A plan file's dtype, ``"torch.float32"`` (``str(torch.float32)``), as the dtype: the one
    place a dtype is read from text. ``ValueError`` for anything that is not a dtype."""
    value = getattr(torch, name.removeprefix("torch."), None) if isinstance(name, str) else None
    if not isinstance(value, torch.dtype):
        raise ValueError(f"{name!r} is not a torch dtype")
    return value


def _migrate(meta: dict) -> dict:
    """A format-1 plan as this version writes it: the keys older writers of format 1 left out,
    with what they meant then (see the module docstring)."""
    meta.setdefault("workload", None)
    meta.setdefault("variants", [])
    meta.setdefault("variant_capability", {})  # what runs the variants: absent for the PyTorch twins
    meta.setdefault("call", None)  # called positionally
    if meta.get("request") is None:  # planned again with the byte budget and the preset, if any
        meta["request"] = {"budget": meta["budget_bytes"], "cost_model": preset_name(meta["cost_model"])}
    return meta


def check_predictions(plan: "Plan", graph: TrainingGraph) -> None:
    """A re-applied plan's recorded predictions must be its schedule's, so that an edited or
    damaged file never prints numbers the step will not meet: what its cost model's name lets
    us recompute (``planner.cost.recomputable``); the executor checks the schedule itself."""
    checker, check_time = recomputable(plan.cost_model)
    if checker is None:
        return
    try:
        result = simulate(graph, plan.schedule, checker)
    except InvalidScheduleError:
        return  # the executor refuses an invalid schedule, saying why, before anything runs
    if result.peak_bytes != plan.predicted_peak_bytes or (
            check_time and not math.isclose(result.time, plan.predicted_time, rel_tol=1e-9)):
        raise InvalidScheduleError(
            f"the plan's recorded predictions (peak {plan.predicted_peak_bytes} bytes, {plan.predicted_time:.6g} s) "
            f"are not its schedule's ({result.peak_bytes} bytes, {result.time:.6g} s): the file was edited or "
            "damaged; plan again")
