"""The user's entry point: ``plan(model, budget, inputs)`` -> ``Plan``.

A plan is a schedule plus what the simulator predicts for it and how it was found. It can be
saved, loaded, printed, and applied to the model it was made for.
"""
from __future__ import annotations

import json
import logging
import math
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection, Mapping, Sequence

import torch

from planner.calls import Call, PytreeForm, call_arguments, split_call
from planner.algorithms import ALGORITHMS
from planner.budgets import parse_budget
from planner.capturing import LossFn, capture
from planner.cost import DEVICE_PRESETS, CostModel, describe, recomputable
from planner.errors import InvalidScheduleError
from planner.execute import PlannedModule
from planner.graph import InputSpec, TrainingGraph
from planner.guards import example_targets
from planner.profiled_cost import choose_cost_model
from planner.schedule import Schedule
from planner.search import MODES, search
from planner.simulator import simulate
from planner.units import format_bytes
from planner.variants import apply_variant_names, variant_kinds, with_variants

logger = logging.getLogger("planner")
PLAN_FORMAT = 1


@dataclass(frozen=True)
class PlanRequest:
    """How a plan was asked for: what ``planner.guards`` plans a new state of the model with (the
    last smaller batch, autocast, another head), so that a byte budget stays bytes and a
    percentage is of the new store-all peak."""

    budget: int | float | str  # as given
    mode: str = "fast"
    algorithm: str | None = None
    time_limit: float | None = None
    cost_model: CostModel | str | None = None
    op_variants: bool | str | Collection[str] = True
    loss_fn: LossFn | None = None  # in memory only: a loaded plan gets it from apply()

    def plan(self, graph: TrainingGraph, model: torch.nn.Module | None = None, inputs: tuple = (),
             targets: tuple = ()) -> "Plan":
        """Plan ``graph``, a step of ``model`` on ``inputs`` (its tensors) and ``targets``: with
        them, the default cost model measures this very step (``choose_cost_model``)."""
        cost_model = choose_cost_model(graph, self._cost_model_for(graph), model, inputs, targets)
        return plan(graph, self.budget, mode=self.mode, algorithm=self.algorithm, time_limit=self.time_limit,
                    cost_model=cost_model, op_variants=self.op_variants)

    def _cost_model_for(self, graph: TrainingGraph) -> CostModel | str | None:
        """The requested cost model, or the default when it cannot cost this graph (a
        ``ProfiledCostModel`` covers the model and batch it was made for)."""
        if self.cost_model is None or isinstance(self.cost_model, str):
            return self.cost_model
        try:
            self.cost_model.op_times(graph)
        except KeyError as error:
            logger.warning("planner: %s; planning this state with the default cost model", error)
            return None
        return self.cost_model

    def to_json(self) -> dict:
        """The request as a plan file keeps it: a cost model by preset name (a profiled or custom
        one is not saved: a loaded plan plans new states with the default cost model)."""
        variants = self.op_variants if isinstance(self.op_variants, (bool, str)) else sorted(self.op_variants)
        budget = self.budget if isinstance(self.budget, (str, int, float)) else str(self.budget)
        return dict(budget=budget, mode=self.mode, algorithm=self.algorithm, time_limit=self.time_limit,
                    cost_model=_preset_of(self.cost_model), op_variants=variants)


def _dtype_named(name: str) -> torch.dtype:
    """A plan file's dtype, ``"torch.float32"`` (``str(torch.float32)``), as the dtype: the one
    place a dtype is read from text. ``ValueError`` for anything that is not a dtype."""
    value = getattr(torch, name.removeprefix("torch."), None) if isinstance(name, str) else None
    if not isinstance(value, torch.dtype):
        raise ValueError(f"{name!r} is not a torch dtype")
    return value


def _preset_of(cost_model: CostModel | str | None) -> str | None:
    name = cost_model if isinstance(cost_model, str) else getattr(cost_model, "name", "")
    preset = name.removeprefix("roofline:")
    return preset if preset in DEVICE_PRESETS else None


@dataclass
class Plan:
    """A schedule for one training step and its predicted cost.

    ``status`` is ``"optimal"`` (proven for the cost model), ``"feasible"`` (within budget, no
    optimality claim; ``gap`` bounds the distance when known) or ``"fallback"`` (an exact solve
    found nothing better than the heuristic it started from).
    """

    schedule: Schedule
    graph: TrainingGraph | None
    budget_bytes: int
    predicted_peak_bytes: int
    predicted_time: float
    store_all_peak_bytes: int
    store_all_time: float
    resident_bytes: int
    recomputations: int
    algorithm: str
    status: str
    cost_model: str
    gap: float | None = None
    lower_bound: float | None = None
    message: str = ""
    input_specs: tuple = ()  # model inputs, then loss targets: what the plan was made for
    n_inputs: int = 0  # how many of input_specs are model inputs
    variants: tuple[str, ...] = ()  # low-memory operator variants the schedule runs ("relu_packed@relu")
    workload: dict | None = None  # how to rebuild the model (CLI plans: spec, batch size, image size)
    call: PytreeForm | None = field(default=None, repr=False)  # how the model is called (None: positionally)
    request: PlanRequest | None = field(default=None, repr=False, compare=False)
    # every schedule the search weighed (algorithms.result.AlgorithmResult), the chosen one included;
    # empty for a loaded plan
    candidates: tuple = field(default=(), repr=False, compare=False)
    _source: Any = field(default=None, repr=False, compare=False)  # weakref to the planned model

    @property
    def overhead(self) -> float:
        """Predicted extra compute time as a fraction of the store-all step."""
        return self.predicted_time / self.store_all_time - 1.0 if self.store_all_time else 0.0

    @property
    def variants_summary(self) -> str:
        """'30 (dropout_packed x24, relu_packed x6)', or 'none (stock PyTorch ops)'."""
        kinds = sorted({name.split("@", 1)[0] for name in self.variants})
        counts = ", ".join(f"{kind} x{sum(n.startswith(kind + '@') for n in self.variants)}" for kind in kinds)
        return f"{len(self.variants)} ({counts})" if self.variants else "none (stock PyTorch ops)"

    # ---- running ----------------------------------------------------------------------------
    def apply(self, model: torch.nn.Module, loss_fn: LossFn | None = None, *, replan: bool = True):
        """``model`` whose forward/backward follow this plan (a ``PlannedModule``).

        Use it as the model: ``loss_fn(planned(x), y).backward()``, then any optimizer; call it as
        the model was called when planned (``planned(**batch)`` for a dict). For a loaded plan, or
        a model other than the one planned, the step is captured again (with ``loss_fn``, which
        must be the one planned with) and its fingerprint compared: a plan for another model, input
        shape or mode raises ``PlanMismatchError``. Afterwards every call is checked against the
        state planned for: eval mode and ``no_grad`` run the model eagerly, other training states
        (a smaller batch, autocast, another head) are planned again with this plan's request, or,
        with ``replan=False`` (to run exactly this plan), raise ``PlanMismatchError``.
        """
        loss_fn = loss_fn or (self.request.loss_fn if self.request else None)
        graph = self._graph_for(model, loss_fn)
        request = self.request or PlanRequest(self.budget_bytes)
        replanner = Replanner(request.plan, loss_fn) if replan else None
        return PlannedModule(model, graph, self.schedule, plan=self, replanner=replanner)

    def _graph_for(self, model: torch.nn.Module, loss_fn: LossFn | None) -> TrainingGraph:
        source = self._source() if self._source is not None else None
        if self.graph is not None and source is model:
            return self.graph
        if loss_fn is None and len(self.input_specs) > self.n_inputs:
            raise TypeError("this plan was made with a loss function that takes targets: "
                            "pass the same one, plan.apply(model, loss_fn=...)")
        examples = [torch.zeros(s.shape, dtype=s.dtype, device=s.device) for s in self.input_specs]
        inputs = examples[: self.n_inputs]
        call = Call(*self.call.fill(inputs)) if self.call is not None else inputs
        graph = capture(model, call, loss_fn, targets=examples[self.n_inputs:])
        if self.variants:
            graph = apply_variant_names(graph, self.variants)
        self.schedule.check_graph(graph)
        self._check_predictions(graph)
        return graph

    def _check_predictions(self, graph: TrainingGraph) -> None:
        """A re-applied plan's recorded predictions must be its schedule's, so that an edited or
        damaged file never prints numbers the step will not meet: what its cost model's name lets
        us recompute (``planner.cost.recomputable``); the executor checks the schedule itself."""
        checker, check_time = recomputable(self.cost_model)
        if checker is None:
            return
        try:
            result = simulate(graph, self.schedule, checker)
        except InvalidScheduleError:
            return  # the executor refuses an invalid schedule, saying why, before anything runs
        if result.peak_bytes != self.predicted_peak_bytes or (
                check_time and not math.isclose(result.time, self.predicted_time, rel_tol=1e-9)):
            raise InvalidScheduleError(
                f"the plan's recorded predictions (peak {self.predicted_peak_bytes} bytes, {self.predicted_time:.6g} s) "
                f"are not its schedule's ({result.peak_bytes} bytes, {result.time:.6g} s): the file was edited or "
                "damaged; plan again")

    # ---- persistence --------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write the plan as JSON: schedule, fingerprint, predictions, input shapes."""
        meta = {k: getattr(self, k) for k in (
            "budget_bytes", "predicted_peak_bytes", "predicted_time", "store_all_peak_bytes",
            "store_all_time", "resident_bytes", "recomputations", "algorithm", "status",
            "cost_model", "gap", "lower_bound", "message", "n_inputs", "workload")}
        meta["variants"] = list(self.variants)
        meta["input_specs"] = [[list(s.shape), str(s.dtype), s.device] for s in self.input_specs]
        meta["call"] = self.call.to_json() if self.call is not None else None
        meta["request"] = (self.request or PlanRequest(self.budget_bytes)).to_json()
        Path(path).write_text(json.dumps({"format": PLAN_FORMAT, "plan": meta, "schedule": self.schedule.to_json()}))

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        """Read a plan saved by ``save``; ``apply`` then checks it against the model."""
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as error:
            raise InvalidScheduleError(f"{path} is not valid JSON ({error}); it may be truncated: plan again") from error
        if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT or "plan" not in data:
            raise InvalidScheduleError(f"{path} is not a plan of format {PLAN_FORMAT}: plan again with this version")
        try:
            meta = dict(data["plan"])
            specs = tuple(InputSpec(tuple(s[0]), _dtype_named(s[1]), s[2]) for s in meta.pop("input_specs"))
            meta.setdefault("workload", None)
            meta["variants"] = tuple(str(name) for name in meta.get("variants", ()))
            call = meta.pop("call", None)  # plan files from before keyword inputs: positional
            meta["call"] = PytreeForm.from_json(call) if call is not None else None
            request = meta.pop("request", None) or {"budget": meta["budget_bytes"], "cost_model": _preset_of(meta["cost_model"])}
            meta["request"] = PlanRequest(**request)
            return cls(schedule=Schedule.from_json(data["schedule"]), graph=None, input_specs=specs, **meta)
        except (KeyError, TypeError, ValueError, IndexError) as error:
            raise InvalidScheduleError(f"{path} is a damaged plan ({error}): plan again") from error

    # ---- reading ------------------------------------------------------------------------------
    def __str__(self) -> str:
        rows = [
            ("algorithm", f"{self.algorithm} ({self.status}" + (f", gap {self.gap:.2%})" if self.gap is not None else ")")),
            ("cost model", describe(self.cost_model)),
            ("budget", format_bytes(self.budget_bytes)),
            ("store-all peak", format_bytes(self.store_all_peak_bytes)),
            ("predicted peak", f"{format_bytes(self.predicted_peak_bytes)} "
                               f"({self.predicted_peak_bytes / self.store_all_peak_bytes:.1%} of store-all)"),
            ("  resident", f"{format_bytes(self.resident_bytes)} (parameters, buffers, .grad, inputs)"),
            ("  activations", format_bytes(self.predicted_peak_bytes - self.resident_bytes)),
            ("predicted overhead", f"{self.overhead:+.1%} compute time ({self.recomputations} ops recomputed)"),
            ("operator variants", self.variants_summary),
        ]
        width = max(len(k) for k, _ in rows)
        lines = [f"{k:<{width}}  {v}" for k, v in rows]
        if self.message:
            lines.append(self.message)
        return "\n".join(lines)


@dataclass(frozen=True)
class Replanner:
    """Plans a new state the way the first plan was made: the same request (budget as given,
    mode, algorithm, cost model, operator variants) and loss function."""

    plan_again: Callable[..., "Plan"]  # PlanRequest.plan(graph, model, inputs, targets)
    loss_fn: LossFn | None

    def __call__(self, model: torch.nn.Module, args: tuple, kwargs: dict, targets: tuple | None,
                 like: TrainingGraph) -> "Plan":
        _, tensors = split_call(args, kwargs)
        if targets is None:
            targets = example_targets(like, tensors)
        graph = capture(model, Call(args, kwargs), self.loss_fn, targets=targets, input_grads=True)
        return self.plan_again(graph, model, tensors, targets)


def plan(
    model: torch.nn.Module | TrainingGraph,
    budget: int | float | str,
    inputs: torch.Tensor | Sequence | Mapping[str, Any] | None = None,
    *,
    loss_fn: LossFn | None = None,
    targets: torch.Tensor | Sequence[torch.Tensor] | None = None,
    mode: str = "fast",
    algorithm: str | None = None,
    time_limit: float | None = None,
    cost_model: CostModel | str | None = None,
    progress: Callable[[float, float, float], bool | None] | None = None,
    op_variants: bool | str | Collection[str] = True,
) -> Plan:
    """Find a schedule for one training step of ``model`` that fits ``budget``.

    Parameters
    ----------
    model: an ``nn.Module`` (with ``inputs``), or a ``TrainingGraph`` from ``planner.capture``
        (capture once, plan many budgets).
    inputs: an example batch, as the model is called: a tensor (``model(x)``), a tuple
        (``model(*inputs)``) or a dict (``model(**inputs)``, e.g. a transformers batch); constants
        in it (flags, ``None``) are part of the plan.
    budget: peak memory of the whole step (parameters, ``.grad``, inputs and activations): bytes,
        ``"6GiB"``, ``"512MB"``, or ``"50%"`` of the store-all (plain PyTorch) peak.
    mode: ``"fast"``: hierarchical planning (``planner.algorithms.hierarchical``: blocks, each
        block's keep/recompute options, a chain DP with multi-level recomputation across them),
        in about a second or less. ``"exact"``: fast mode, then the MILP on HiGHS, which returns a proven
        optimum (``status="optimal"``), or when ``time_limit`` ends the best plan found with its
        proven ``gap`` (``"feasible"``); never a plan slower than fast mode's (``"fallback"``
        says the MILP found nothing better, and ``message`` why).
    algorithm: one name from ``planner.algorithms.ALGORITHMS`` instead of a mode.
    time_limit: seconds for exact mode, from the end of capture (and of profiling the captured
        step) to the answer (default 60); fast mode does not use it.
    cost_model: a ``CostModel``, a roofline preset name (``"cpu"``, ``"v100"``, ``"a100"``,
        ``"h100"``), ``"profiled"``, or None: op times measured on this machine inside a running
        step (``ProfiledCostModel``) for a model with real tensors on CPU or CUDA, the roofline
        preset of the graph's device for a ``TrainingGraph`` or meta/fake tensors
        (``planner.profiled_cost.choose_cost_model``).
    progress: exact mode calls ``progress(incumbent_seconds, bound_seconds, elapsed)`` whenever
        the solver improves its plan (predicted step times); returning True stops the solver,
        which keeps the best plan found so far.
    op_variants: low-memory operator implementations (``planner.gpu``) the plan may use.
        ``True`` (default): those whose gradients are bitwise equal to the stock op's (packed ReLU
        and dropout masks, packed max-pool positions), applied where they lower what the backward
        holds (``planner.variants.select_variants``), before any algorithm runs; plain PyTorch's
        graph stays a candidate (``planner.search``), since where memory is not short the
        variants' extra passes (the CPU twins' byte buffers) can cost more time than they save.
        ``"all"`` adds ``batch_norm_inverted`` (gradients within a tolerance); a collection of
        variant names; ``False``: stock PyTorch ops only.
        Budgets in percent and the overhead always refer to plain PyTorch's store-all step.

    Raises
    ------
    ValueError: an unreadable budget, unknown mode, algorithm or operator variant.
    InfeasibleBudgetError: nothing fits; ``min_feasible_bytes`` is the smallest peak reached.
    """
    request = PlanRequest(budget, mode, algorithm, time_limit, cost_model, op_variants, loss_fn)
    if algorithm is not None and algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}: choose one of {sorted(ALGORITHMS)}")
    if algorithm is None and mode not in MODES:
        raise ValueError(f"unknown or unavailable mode {mode!r}: this version offers {list(MODES)}")
    kinds = variant_kinds(op_variants)
    if isinstance(model, TrainingGraph):
        graph, source = model, None
    else:
        if inputs is None:
            raise TypeError("plan(model, budget, inputs): inputs (an example batch) are required for a model")
        graph, source = capture(model, inputs, loss_fn, targets=targets), model
    batch = split_call(*call_arguments(inputs))[1] if source is not None else inputs  # the call's tensors
    cost_model = choose_cost_model(graph, cost_model, source, batch, targets)

    stock = graph
    reference = simulate(stock, stock.store_all(), cost_model)
    budget_bytes = parse_budget(budget, reference.peak_bytes)
    outcome = search(stock, with_variants(stock, kinds), cost_model, budget_bytes, mode=mode, algorithm=algorithm,
                     time_limit=time_limit, progress=progress)
    best, verdict = outcome.chosen, outcome.verdict
    result = best.simulated
    chosen = Plan(
        schedule=best.schedule, graph=best.graph, budget_bytes=budget_bytes,
        predicted_peak_bytes=result.peak_bytes, predicted_time=result.time,
        store_all_peak_bytes=reference.peak_bytes, store_all_time=reference.time,
        resident_bytes=result.resident_bytes, recomputations=result.recomputations,
        algorithm=best.name, status=verdict.status, cost_model=cost_model.name, gap=verdict.gap,
        lower_bound=verdict.lower_bound, message=verdict.message, input_specs=stock.input_specs,
        n_inputs=len(stock.inputs), variants=best.graph.variants, candidates=outcome.candidates,
        call=stock.call_form, request=request,
    )
    if source is not None:
        chosen._source = weakref.ref(source)
    return chosen
