"""The user's entry point: ``plan(model, budget, inputs)`` -> ``Plan``.

A plan is a schedule plus what the simulator predicts for it and how it was found. It can be
saved and loaded (``planner.plan_file``), printed, and applied to the model it was made for;
``planner.search`` finds it.
"""
from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection, Mapping, Sequence

import torch

from planner import plan_file
from planner.algorithms.solvers import DEFAULT_SOLVER
from planner.budgets import parse_budget
from planner.calls import Call, PytreeForm, call_arguments, split_call
from planner.capturing import LossFn, capture
from planner.cost import CostModel, describe, preset_name
from planner.execute import PlannedModule
from planner.graph import TrainingGraph, VariantCapability
from planner.guards import example_targets
from planner.profiled_cost import choose_cost_model
from planner.schedule import Schedule
from planner.search import SearchOutcome, check_choice, search
from planner.simulator import SimResult, simulate
from planner.units import format_bytes, labelled_rows
from planner.variants import apply_variant_names, variant_kinds, with_variants

logger = logging.getLogger("planner")


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
    solver: str = DEFAULT_SOLVER  # exact mode's MILP solver

    def plan(self, graph: TrainingGraph, model: torch.nn.Module | None = None, inputs: tuple = (),
             targets: tuple = ()) -> "Plan":
        """Plan ``graph``, a step of ``model`` on ``inputs`` (its tensors) and ``targets``: with
        them, the default cost model measures this very step (``choose_cost_model``)."""
        cost_model = choose_cost_model(graph, self._cost_model_for(graph), model, inputs, targets)
        return plan(graph, self.budget, mode=self.mode, algorithm=self.algorithm, time_limit=self.time_limit,
                    cost_model=cost_model, op_variants=self.op_variants, solver=self.solver)

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
        data = dict(budget=budget, mode=self.mode, algorithm=self.algorithm, time_limit=self.time_limit,
                    cost_model=preset_name(self.cost_model), op_variants=variants)
        if self.solver != DEFAULT_SOLVER:  # written only when chosen: files of HiGHS plans stay as they were
            data["solver"] = self.solver
        return data

    @classmethod
    def from_json(cls, data: dict) -> "PlanRequest":
        return cls(**data)


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
    # what runs them (the CuPy kernels or the PyTorch twins): their workspace, and so the peak, depends on it
    variant_capability: VariantCapability = VariantCapability()
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
        graph = self.graph_for(model, loss_fn)
        replanner = Replanner(self.replan_request.plan, loss_fn) if replan else None
        return PlannedModule(model, graph, self.schedule, plan=self, replanner=replanner)

    @property
    def replan_request(self) -> PlanRequest:
        """What new states are planned with: the request, or (a plan built by hand) its byte budget."""
        return self.request or PlanRequest(self.budget_bytes)

    def graph_for(self, model: torch.nn.Module, loss_fn: LossFn | None, inputs: Sequence[torch.Tensor] | None = None,
                  targets: Sequence[torch.Tensor] = ()) -> TrainingGraph:
        """The graph this plan runs on for ``model``: the planned graph for the planned model, else
        ``model`` captured again (on ``inputs`` and ``targets``, the call's tensors, or zeros of the
        planned shapes) with the plan's operator variants, refused (``PlanMismatchError``) unless
        its fingerprint is the schedule's, and ``InvalidScheduleError`` unless the recorded
        predictions are the schedule's (``plan_file.check_predictions``). ``apply`` and the
        command line take every graph of a plan from here."""
        source = self._source() if self._source is not None else None
        if self.graph is not None and source is model:
            return self.graph
        if loss_fn is None and len(self.input_specs) > self.n_inputs:
            raise TypeError("this plan was made with a loss function that takes targets: "
                            "pass the same one, plan.apply(model, loss_fn=...)")
        if inputs is None:
            examples = [torch.zeros(s.shape, dtype=s.dtype, device=s.device) for s in self.input_specs]
            inputs, targets = examples[: self.n_inputs], examples[self.n_inputs:]
        call = Call(*self.call.fill(list(inputs))) if self.call is not None else list(inputs)
        graph = capture(model, call, loss_fn, targets=list(targets))
        if self.variants:
            graph = apply_variant_names(graph, self.variants, self.variant_capability)
        self.schedule.check_graph(graph)
        plan_file.check_predictions(self, graph)
        return graph

    # ---- persistence (planner.plan_file) -------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write the plan as JSON: schedule, fingerprint, predictions, input shapes."""
        plan_file.write(self, path)

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        """Read a plan saved by ``save``; ``apply`` then checks it against the model."""
        return cls(**plan_file.read(path, PlanRequest.from_json))

    @classmethod
    def of_search(cls, outcome: SearchOutcome, stock: TrainingGraph, reference: SimResult, budget_bytes: int,
                  cost_model: CostModel, request: PlanRequest) -> "Plan":
        """The plan a search chose for ``stock`` (plain PyTorch's graph, whose store-all step is
        ``reference``), with the simulator's predictions and the search's verdict."""
        best, verdict = outcome.chosen, outcome.verdict
        result = best.simulated
        return cls(
            schedule=best.schedule, graph=best.graph, budget_bytes=budget_bytes,
            predicted_peak_bytes=result.peak_bytes, predicted_time=result.time,
            store_all_peak_bytes=reference.peak_bytes, store_all_time=reference.time,
            resident_bytes=result.resident_bytes, recomputations=result.recomputations,
            algorithm=best.name, status=verdict.status, cost_model=cost_model.name, gap=verdict.gap,
            lower_bound=verdict.lower_bound, message=verdict.message, input_specs=stock.input_specs,
            n_inputs=len(stock.inputs), variants=best.graph.variants, variant_capability=best.graph.variant_capability,
            candidates=outcome.candidates,
            call=stock.call_form, request=request,
        )

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
        return labelled_rows(rows) + (f"\n{self.message}" if self.message else "")


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
    solver: str = DEFAULT_SOLVER,
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
    solver: exact mode's MILP solver: ``"highs"`` (default, installed), or the optional extras
        ``"cpsat"`` (OR-Tools CP-SAT, ``pip install remat-planner[cpsat]``) and ``"scip"``
        (``pip install remat-planner[scip]``); docs/benchmarks.md measures them side by side.

    Raises
    ------
    ValueError: an unreadable budget, unknown mode, algorithm or operator variant, a solver
        outside exact mode.
    SolverUnavailableError: exact mode with a solver that is unknown or not installed (the
        message names the extra to install).
    InfeasibleBudgetError: nothing fits; ``min_feasible_bytes`` is the smallest peak reached.
    """
    request = PlanRequest(budget, mode, algorithm, time_limit, cost_model, op_variants, loss_fn, solver)
    check_choice(mode, algorithm, solver)
    kinds = variant_kinds(op_variants)
    graph, source, batch = _step_of(model, inputs, loss_fn, targets)
    cost_model = choose_cost_model(graph, cost_model, source, batch, targets)
    reference = simulate(graph, Schedule.store_all(graph), cost_model)
    budget_bytes = parse_budget(budget, reference.peak_bytes)
    outcome = search(graph, with_variants(graph, kinds), cost_model, budget_bytes, mode=mode, algorithm=algorithm,
                     time_limit=time_limit, progress=progress, solver=solver)
    chosen = Plan.of_search(outcome, graph, reference, budget_bytes, cost_model, request)
    if source is not None:
        chosen._source = weakref.ref(source)
    return chosen


def _step_of(model: torch.nn.Module | TrainingGraph, inputs, loss_fn: LossFn | None, targets
             ) -> tuple[TrainingGraph, torch.nn.Module | None, Any]:
    """(the graph of one training step, the model it is of or None, the call's tensors) for
    ``plan``'s arguments: a graph is taken as it is, a model is captured on ``inputs``."""
    if isinstance(model, TrainingGraph):
        return model, None, inputs
    if inputs is None:
        raise TypeError("plan(model, budget, inputs): inputs (an example batch) are required for a model")
    return capture(model, inputs, loss_fn, targets=targets), model, split_call(*call_arguments(inputs))[1]
