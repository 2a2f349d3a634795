"""Plan-quality benchmark: predicted overhead and peak of every planner method at fixed budgets,
against torch.compile's own activation-memory-budget partitioner, all judged by one simulator.

Why: issue 4 asks whether fast mode (``planner.plan``) finds the cheapest schedule that fits, and
how far its lowest reachable peak is from the memory lower bound. Every schedule, whoever made it,
is replayed by ``planner.simulate`` with the default cost model (the cpu roofline preset), so the
numbers compare choices, not simulators.

Per model (random weights, train mode, captured once with fake tensors):

- budgets 70%, 50% and 33% of the store-all peak (resident memory included: parameters, ``.grad``,
  buffers, inputs); per method: fits or not, predicted overhead (simulated time / store-all time
  - 1), simulated peak, planning wall time;
- methods: fast mode (``planner.plan(graph, "50%")``), each algorithm of
  ``planner.algorithms.ALGORITHMS`` called directly (``dp``, ``dp_memory`` which ignores the budget,
  the Chen baselines, ``checkpoint_all``), and torch.compile's min-cut partitioner
  (``min_cut_rematerialization_partition``) under ``torch._functorch.config.activation_memory_budget``
  0.7, 0.5 and 0.33: its saved values are mapped to forward ops of the planner's graph and replayed
  with ``schedule_keeping``; a budget's row shows the fastest of its settings that fits;
- the smallest budget fast mode meets (bisection on bytes, starting from
  ``InfeasibleBudgetError.min_feasible_bytes`` at a 1-byte budget) vs ``memory_lower_bound``.

The partitioner runs inside our own partition hook of ``aot_module_simplified`` on the same training
step the planner traces (``planner.capture``'s step module, boundary markers included), so the joint
graph's fx node names are the planner's op names; the script checks that they match. Parameters and
buffers are passed as static-lifetime inputs, as torch.compile (dynamo) does. Only the partitioner's
choice is used; nothing is compiled or run.

Run from the repository root::

    python benchmarks/plan_quality.py                                  # all models
    python benchmarks/plan_quality.py --models resnet50 vgg16
    python benchmarks/plan_quality.py --markdown docs/benchmarks.md

``--markdown PATH`` replaces the "## Plan quality (issue 4)" section of PATH and leaves the other
sections alone; a hand-written "### Analysis" subsection at the end of the section is carried over.
"""
from __future__ import annotations

import argparse
import copy
import gc
import operator
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.fx
import torch.nn.functional as F
import torchvision

import planner
from planner import zoo
from planner.algorithms import ALGORITHMS
from planner.algorithms.bounds import memory_lower_bound
from planner.algorithms.keepset import schedule_keeping
from planner.cost import default_cost_model
from planner.graph import Phase, TrainingGraph
from _compile_internals import (
    activation_memory_budget, aot_module_simplified, is_parameter_or_buffer, min_cut_rematerialization_partition,
)
from report import ANALYSIS_HEADING, command_line, environment_line, kept_analysis, write_section

SECTION_HEADING = "## Plan quality (issue 4)"
BUDGETS = (70, 50, 33)  # percent of the store-all peak
COMPILE_SETTINGS = (0.7, 0.5, 0.33)  # torch._functorch.config.activation_memory_budget
FAST = "fast mode"
COMPILE = "torch.compile min-cut"
# algorithms called on their own, in table order; those missing from ALGORITHMS are skipped
ALGORITHM_ROWS = ("dp", "dp_reorder", "dp_memory", "checkpoint_all", "chen_sqrt", "chen_sqrt_linear",
                  "chen_greedy", "chen_greedy_linear")
BISECT_TOLERANCE = 0.0025  # of the store-all peak


# ---- models -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSpec:
    name: str
    build: Callable[[], torch.nn.Module]
    input_shape: tuple[int, ...]
    classes: int | None  # cross-entropy on random labels of this many classes; None: sum of the output

    @property
    def loss_fn(self):
        return F.cross_entropy if self.classes else None

    def description(self) -> str:
        loss = "cross-entropy on random labels" if self.classes else "default loss (sum of the output)"
        return f"input {'×'.join(map(str, self.input_shape))}, {loss}"


def _transformer_encoder() -> torch.nn.Module:
    layer = torch.nn.TransformerEncoderLayer(
        d_model=512, nhead=8, dim_feedforward=2048, dropout=0.1, batch_first=True)
    return torch.nn.TransformerEncoder(layer, num_layers=6, enable_nested_tensor=False)


MODELS: dict[str, ModelSpec] = {spec.name: spec for spec in (
    ModelSpec("resnet50", lambda: torchvision.models.resnet50(weights=None), (64, 3, 224, 224), 1000),
    ModelSpec("densenet121", lambda: torchvision.models.densenet121(weights=None), (32, 3, 224, 224), 1000),
    ModelSpec("mobilenet_v2", lambda: torchvision.models.mobilenet_v2(weights=None), (64, 3, 224, 224), 1000),
    ModelSpec("vgg16", lambda: torchvision.models.vgg16(weights=None), (64, 3, 224, 224), 1000),
    ModelSpec("transformer_encoder", _transformer_encoder, (32, 128, 512), None),
    ModelSpec("unet", lambda: zoo.UNet(3, 4, width=32, depth=4), (16, 3, 128, 128), None),
)}


# ---- results ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Outcome:
    """One schedule, judged by the simulator (or the error that kept it from being judged)."""

    fits: bool
    peak_bytes: int | None  # simulated peak; for an infeasible fast mode, the lowest peak it reached
    overhead: float | None  # simulated time / store-all time - 1
    seconds: float  # planning wall time
    detail: str = ""  # fast mode: the algorithm it picked; torch.compile: the setting used
    error: str | None = None


@dataclass(frozen=True)
class CompileSetting:
    """What one activation_memory_budget setting of the min-cut partitioner gives in our simulator."""

    setting: float
    outcome: Outcome
    saved_values: int  # forward-module outputs it saves for the backward
    saved_resident: int  # parameters, buffers and inputs among them (need no op)
    saved_remapped: int  # backward-tagged values it computes in its forward, traced back to forward ops
    kept_ops: int  # forward ops of the planner's graph those tensors map to
    recomputed_by_partitioner: int  # model forward ops (loss aside) its own backward module computes again
    recomputed_by_replay: int  # model forward ops our replay of the keep-set computes again
    same_recomputation: bool  # the two sets are equal
    unmapped: tuple[str, ...]  # saved nodes with no op of that name in the planner's graph
    cse_merged: int  # joint-graph nodes the partitioner's CSE pass merged away


@dataclass
class ModelResult:
    spec: ModelSpec
    capture_seconds: float = 0.0
    forward_ops: int = 0
    backward_ops: int = 0
    store_all_peak: int = 0
    store_all_time: float = 0.0
    resident_bytes: int = 0
    cells: dict[tuple[str, int], Outcome] = field(default_factory=dict)  # (method, budget %) -> outcome
    compile_settings: list[CompileSetting] = field(default_factory=list)
    compile_error: str | None = None
    lower_bound: int = 0
    tiny_budget_min_feasible: int | None = None  # InfeasibleBudgetError.min_feasible_bytes at 1 byte
    min_feasible_budget: int | None = None  # smallest budget fast mode met in the bisection
    min_feasible_peak: int | None = None  # its plan's predicted peak
    bisection_infeasible: int | None = None  # largest budget it failed at
    bisection_steps: int = 0
    min_feasible_algorithm: str = ""
    bisection_seconds: float = 0.0
    error: str | None = None
    problems: list[str] = field(default_factory=list)  # invalid schedules and other surprises, with repro

    def methods(self) -> list[str]:
        return list(dict.fromkeys(method for method, _ in self.cells))


# ---- torch.compile's partitioner --------------------------------------------------------------
class _Partitioned(Exception):
    def __init__(self, result):
        self.result = result


def _planner_op_nodes(graph: torch.fx.Graph) -> list[tuple[str, str]]:
    """(name, target) of the joint-graph nodes that become ops of a planner graph."""
    from planner.capturing import _BOUNDARY

    return [(n.name, str(n.target)) for n in graph.nodes
            if n.op == "call_function" and n.target is not operator.getitem and n.target is not _BOUNDARY]


def _forward_sources(node: torch.fx.Node, forward_ops: set[str]) -> tuple[list[str], bool]:
    """The forward ops of the planner's graph whose outputs hold a saved value, and whether the
    value had to be traced back to them.

    A getitem's tensor belongs to its multi-output op and a boundary marker's to its source;
    placeholders (parameters, buffers, inputs) are resident and need no op. The partitioner may
    also compute in its forward, and save, a node AOT tagged as backward (a ``detach`` or
    ``transpose`` of a forward value or of a weight): a planner schedule runs backward ops in the
    backward only, so such a value is replaced by the forward ops it is computed from.
    """
    from planner.capturing import _BOUNDARY

    sources, remapped, pending, seen = [], False, [node], set()
    while pending:
        current = pending.pop()
        if current in seen:
            continue
        seen.add(current)
        if current.op == "call_function" and (current.target is operator.getitem or current.target is _BOUNDARY):
            pending.append(current.args[0])
        elif current.op == "placeholder":
            continue
        elif current.name in forward_ops:
            sources.append(current.name)
        else:
            remapped = True
            pending.extend(current.all_input_nodes)
    return sources, remapped


def compile_partitioner_choices(spec: ModelSpec, model: torch.nn.Module, inputs: tuple, targets: tuple,
                                settings: Sequence[float], solver: str) -> tuple[list[tuple[str, str]], list[dict]]:
    """Trace the planner's training step with AOT autograd and, in our partition hook, run the
    min-cut partitioner once per ``activation_memory_budget`` setting on a copy of the joint graph.

    Returns the joint graph's (name, target) op list (to check against the planner's graph) and,
    per setting, the names of the saved values' producing ops, resident saves, CSE merges and the
    partitioner's wall time.
    """
    from planner import _aot
    from planner.calls import split_call
    from planner.capturing import _TrainingStep

    def partition(joint: torch.fx.GraphModule, joint_inputs, *, num_fwd_outputs: int, **_kwargs):
        primals = [n for n in joint.graph.nodes if n.op == "placeholder" and "tangents" not in str(n.target)]
        static = [i for i, n in enumerate(primals)
                  if is_parameter_or_buffer(n.meta.get("desc"))]
        op_nodes = _planner_op_nodes(joint.graph)
        forward_names = {n.name for n in joint.graph.nodes if n.meta.get("partitioner_tag") == _aot.FORWARD_TAG}
        forward_op_names = forward_names & {name for name, _ in op_nodes}
        names_before = {n.name for n in joint.graph.nodes}
        choices = []
        for setting in settings:
            working = torch.fx.GraphModule(joint, copy.deepcopy(joint.graph))
            with activation_memory_budget(setting, solver):
                start = time.perf_counter()
                forward, backward = min_cut_rematerialization_partition(
                    working, joint_inputs, num_fwd_outputs=num_fwd_outputs, static_lifetime_input_indices=static)
                seconds = time.perf_counter() - start
            outputs = next(iter(forward.graph.find_nodes(op="output"))).args[0]
            saved = [n for n in outputs[num_fwd_outputs:] if isinstance(n, torch.fx.Node)]
            traced = [_forward_sources(n, forward_names) for n in saved]
            choices.append(dict(
                setting=setting, seconds=seconds, saved=len(saved),
                producers=[name for sources, _ in traced for name in sources],
                recomputed={n.name for n in backward.graph.nodes
                            if n.op == "call_function" and n.name in forward_op_names},
                resident=sum(not sources and not remapped for sources, remapped in traced),
                remapped=sum(remapped for _, remapped in traced),
                cse_merged=len(names_before - {n.name for n in working.graph.nodes}),
            ))
        raise _Partitioned((op_nodes, choices))

    call_form, _ = split_call(tuple(inputs), {})
    step = _TrainingStep(model, spec.loss_fn, call_form)
    try:
        aot_module_simplified(step, tuple(inputs) + tuple(targets), fw_compiler=lambda g, _: g,
                              bw_compiler=lambda g, _: g, partition_fn=partition)
    except _Partitioned as done:
        return done.result
    raise RuntimeError("AOT autograd never called the partition hook")


def evaluate_compile(result: ModelResult, graph: TrainingGraph, cost, choices: list[dict]) -> None:
    op_ids = {op.name: op.id for op in graph.ops}
    for choice in choices:
        names = list(dict.fromkeys(choice["producers"]))
        unmapped = tuple(n for n in names if n not in op_ids)
        kept = [op_ids[n] for n in names if n in op_ids and graph.ops[op_ids[n]].phase is Phase.FORWARD]
        outcome = _judge(result, graph, cost, lambda: schedule_keeping(graph, kept), None,
                         f"{COMPILE} activation_memory_budget={choice['setting']}", seconds=choice["seconds"])
        ours = set()
        if outcome.error is None:  # which forward ops our replay recomputes, to compare with its backward
            counts = planner.simulate(graph, schedule_keeping(graph, kept), cost).compute_counts
            ours = {graph.ops[i].name for i in range(len(graph.ops)) if counts[i] > 1}
        model_ops = {op.name for op in graph.ops if not op.in_loss}  # our schedules never recompute the loss
        theirs = choice["recomputed"] & model_ops
        result.compile_settings.append(CompileSetting(
            choice["setting"], outcome, saved_values=choice["saved"], saved_resident=choice["resident"],
            saved_remapped=choice["remapped"], kept_ops=len(kept),
            recomputed_by_partitioner=len(theirs), recomputed_by_replay=len(ours & model_ops),
            same_recomputation=ours & model_ops == theirs, unmapped=unmapped, cse_merged=choice["cse_merged"]))


# ---- measuring ----------------------------------------------------------------------------------
def _judge(result: ModelResult, graph: TrainingGraph, cost, make: Callable[[], planner.Schedule],
           budget: int | None, what: str, seconds: float | None = None) -> Outcome:
    """Time ``make()`` (unless ``seconds`` is given), simulate its schedule, and note failures."""
    start = time.perf_counter()
    try:
        schedule = make()
        elapsed = time.perf_counter() - start if seconds is None else seconds
        simulated = planner.simulate(graph, schedule, cost)
    except Exception as error:  # an invalid schedule is a finding: keep going, report it
        message = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
        result.problems.append(f"{result.spec.name}, {what}: {message}")
        return Outcome(False, None, None, time.perf_counter() - start, error=message)
    fits = budget is None or simulated.peak_bytes <= budget
    return Outcome(fits, simulated.peak_bytes, simulated.time / result.store_all_time - 1.0, elapsed)


def _fast_mode(result: ModelResult, graph: TrainingGraph, cost, percent: int) -> Outcome:
    start = time.perf_counter()
    try:
        chosen = planner.plan(graph, f"{percent}%", cost_model=cost, op_variants=False)
    except planner.InfeasibleBudgetError as error:
        return Outcome(False, error.min_feasible_bytes, None, time.perf_counter() - start)
    except Exception as error:
        message = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
        result.problems.append(f"{result.spec.name}, planner.plan(graph, '{percent}%'): {message}")
        return Outcome(False, None, None, time.perf_counter() - start, error=message)
    seconds = time.perf_counter() - start
    # judged again like every other method (plan() already simulated it; this is a consistency check)
    simulated = planner.simulate(graph, chosen.schedule, cost)
    if simulated.peak_bytes != chosen.predicted_peak_bytes:
        result.problems.append(f"{result.spec.name}, fast mode at {percent}%: plan predicted "
                               f"{chosen.predicted_peak_bytes} bytes, simulate says {simulated.peak_bytes}")
    return Outcome(simulated.peak_bytes <= chosen.budget_bytes, simulated.peak_bytes,
                   simulated.time / result.store_all_time - 1.0, seconds, detail=chosen.algorithm)


def _min_feasible(result: ModelResult, graph: TrainingGraph, cost) -> None:
    """Smallest budget fast mode meets: from the lowest peak it reports at a 1-byte budget, bisect
    down towards the lower bound (each step one ``planner.plan``) to a tolerance of
    ``BISECT_TOLERANCE`` of the store-all peak."""
    start = time.perf_counter()
    result.lower_bound = memory_lower_bound(graph, cost)
    try:
        planner.plan(graph, 1, cost_model=cost, op_variants=False)
    except planner.InfeasibleBudgetError as error:
        result.tiny_budget_min_feasible = error.min_feasible_bytes

    def attempt(budget: int):
        result.bisection_steps += 1
        try:
            return planner.plan(graph, budget, cost_model=cost, op_variants=False)
        except planner.InfeasibleBudgetError:
            return None

    high = result.tiny_budget_min_feasible or result.store_all_peak
    best = attempt(high)
    if best is None:  # the lowest peak fast mode reports is not a budget it meets: search upwards
        result.problems.append(f"{result.spec.name}: planner.plan(graph, {high}) is infeasible although "
                               f"InfeasibleBudgetError.min_feasible_bytes at a 1-byte budget said {high}")
        low, high = high, result.store_all_peak
        best = attempt(high)
    else:
        low = result.lower_bound - 1
    tolerance = max(1, int(BISECT_TOLERANCE * result.store_all_peak))
    while best is not None and high - low > tolerance:
        middle = (low + high) // 2
        found = attempt(middle)
        if found is None:
            low = middle
        else:
            high, best = middle, found
    if best is not None:
        result.min_feasible_budget = high
        result.min_feasible_peak = best.predicted_peak_bytes
        result.min_feasible_algorithm = best.algorithm
    result.bisection_infeasible = low if low >= result.lower_bound else None
    result.bisection_seconds = time.perf_counter() - start


def run_model(spec: ModelSpec, compile_solver: str, with_compile: bool) -> ModelResult:
    result = ModelResult(spec)
    torch.manual_seed(0)
    model = spec.build().train()
    inputs = (torch.randn(spec.input_shape),)
    targets = (torch.randint(0, spec.classes, (spec.input_shape[0],)),) if spec.classes else ()
    try:
        start = time.perf_counter()
        graph = planner.capture(model, inputs, spec.loss_fn, targets=targets)
        result.capture_seconds = time.perf_counter() - start
    except Exception as error:
        result.error = f"capture failed: {type(error).__name__}: {error}"
        return result
    cost = default_cost_model(graph)
    reference = planner.simulate(graph, planner.Schedule.store_all(graph), cost)
    result.store_all_peak, result.store_all_time = reference.peak_bytes, reference.time
    result.resident_bytes = graph.resident_bytes
    result.forward_ops, result.backward_ops = len(graph.forward_ops), len(graph.backward_ops)
    _log(f"  captured in {result.capture_seconds:.1f} s; store-all peak {planner.format_bytes(reference.peak_bytes)}")

    for percent in BUDGETS:
        budget = planner.parse_budget(f"{percent}%", reference.peak_bytes)
        result.cells[(FAST, percent)] = _fast_mode(result, graph, cost, percent)
        for name in ALGORITHM_ROWS:
            if name in ALGORITHMS:
                result.cells[(name, percent)] = _judge(
                    result, graph, cost, lambda name=name: ALGORITHMS[name](graph, cost, budget), budget,
                    f"ALGORITHMS[{name!r}](graph, default_cost_model(graph), {budget})")
        _log(f"  {percent}%: fast mode {_cell(result.cells[(FAST, percent)], reference.peak_bytes)}")

    if with_compile:
        try:
            op_nodes, choices = compile_partitioner_choices(spec, model, inputs, targets, COMPILE_SETTINGS,
                                                            compile_solver)
            planner_ops = [(op.name, op.target) for op in graph.ops]
            if op_nodes != planner_ops:
                differ = next((i for i, (a, b) in enumerate(zip(op_nodes, planner_ops)) if a != b),
                              min(len(op_nodes), len(planner_ops)))
                raise RuntimeError(f"the partitioner's joint graph differs from the planner's at op {differ}")
            evaluate_compile(result, graph, cost, choices)
        except Exception as error:
            result.compile_error = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
            _log(f"  torch.compile partitioner failed: {result.compile_error}")
        for percent in BUDGETS:
            result.cells[(COMPILE, percent)] = _compile_cell(result, percent)
        for setting in result.compile_settings:
            _log(f"  torch.compile {setting.setting}: {_cell(setting.outcome, reference.peak_bytes)}")

    _min_feasible(result, graph, cost)
    _log(f"  min feasible {_percent(result.min_feasible_peak, reference.peak_bytes)} "
         f"(bound {_percent(result.lower_bound, reference.peak_bytes)}) in {result.bisection_seconds:.1f} s")
    return result


def _compile_cell(result: ModelResult, percent: int) -> Outcome:
    """The fastest partitioner setting that fits the budget, else its lowest peak."""
    if result.compile_error is not None:
        return Outcome(False, None, None, 0.0, error=result.compile_error)
    budget = planner.parse_budget(f"{percent}%", result.store_all_peak)
    judged = [s for s in result.compile_settings if s.outcome.peak_bytes is not None]
    fitting = [s for s in judged if s.outcome.peak_bytes <= budget]
    if fitting:
        best = min(fitting, key=lambda s: (s.outcome.overhead, s.outcome.peak_bytes))
        return Outcome(True, best.outcome.peak_bytes, best.outcome.overhead, best.outcome.seconds,
                       detail=f"{best.setting:g}")
    if not judged:
        return Outcome(False, None, None, 0.0, error="no setting could be judged")
    lowest = min(judged, key=lambda s: s.outcome.peak_bytes)
    return Outcome(False, lowest.outcome.peak_bytes, None, sum(s.outcome.seconds for s in result.compile_settings))


# ---- reporting ----------------------------------------------------------------------------------
def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _percent(value: int | None, reference: int) -> str:
    return "—" if value is None else f"{value / reference:.1%}"


def _cell(outcome: Outcome, reference: int, with_detail: bool = False) -> str:
    if outcome.error is not None:
        return "error (see notes)"
    if not outcome.fits:
        return f"does not fit ({_percent(outcome.peak_bytes, reference)})"
    text = f"{outcome.overhead:+.1%} ({_percent(outcome.peak_bytes, reference)})"
    return text + (f" @{outcome.detail}" if with_detail and outcome.detail else "")


def quality_table(result: ModelResult) -> str:
    header = ["method"] + [f"{p}% budget" for p in BUDGETS]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * len(BUDGETS)]
    for method in result.methods():
        cells = [_cell(result.cells[(method, p)], result.store_all_peak, with_detail=method == COMPILE)
                 for p in BUDGETS]
        lines.append(f"| {_method_label(method)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _method_label(method: str) -> str:
    if method == FAST:
        return "**fast mode** (`planner.plan`)"
    if method == COMPILE:
        return "torch.compile min-cut (fastest fitting setting)"
    return f"`{method}`" + (" (ignores the budget)" if method == "dp_memory" else "")


def times_table(result: ModelResult) -> str:
    header = ["method"] + [f"{p}%" for p in BUDGETS]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * len(BUDGETS)]
    for method in result.methods():
        cells = []
        for p in BUDGETS:
            outcome = result.cells[(method, p)]
            cells.append("—" if method == COMPILE and not outcome.fits else f"{outcome.seconds:.2f}")
        lines.append(f"| {_method_label(method)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compile_table(result: ModelResult) -> str:
    lines = ["| activation_memory_budget | overhead | peak (% of store-all) | saved values | of which resident | "
             "of which backward-tagged | kept forward ops | recomputed model ops: its backward / our replay | "
             "CSE-merged nodes | partition seconds |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in result.compile_settings:
        o = s.outcome
        overhead = "error (see notes)" if o.error else f"{o.overhead:+.1%}"
        lines.append(f"| {s.setting:g} | {overhead} | {_percent(o.peak_bytes, result.store_all_peak)} | "
                     f"{s.saved_values} | {s.saved_resident} | {s.saved_remapped} | {s.kept_ops} | "
                     f"{s.recomputed_by_partitioner} / {s.recomputed_by_replay}"
                     f"{' (same ops)' if s.same_recomputation else ' (different ops)'} | {s.cse_merged} | "
                     f"{o.seconds:.2f} |")
    return "\n".join(lines)


def fast_mode_picks(result: ModelResult) -> str:
    picks = [f"{p}%: `{result.cells[(FAST, p)].detail}`" for p in BUDGETS if result.cells[(FAST, p)].fits]
    return "Fast mode picked " + ", ".join(picks) + "." if picks else "Fast mode fit none of the budgets."


def min_feasible_line(result: ModelResult) -> str:
    peak = result.store_all_peak
    fmt = planner.format_bytes
    if result.min_feasible_budget is None:
        return "Smallest budget fast mode meets: none found."
    gap = result.min_feasible_peak / result.lower_bound - 1.0
    failed = (f", infeasible at {fmt(result.bisection_infeasible)}" if result.bisection_infeasible is not None
              else "")
    tiny = ("—" if result.tiny_budget_min_feasible is None
            else f"{fmt(result.tiny_budget_min_feasible)} ({_percent(result.tiny_budget_min_feasible, peak)})")
    return (f"Smallest budget fast mode meets: **{fmt(result.min_feasible_budget)} "
            f"({_percent(result.min_feasible_budget, peak)} of store-all)**, plan peak "
            f"{fmt(result.min_feasible_peak)} via `{result.min_feasible_algorithm}`{failed} "
            f"({result.bisection_steps} `planner.plan` calls, {result.bisection_seconds:.1f} s; "
            f"`min_feasible_bytes` at a 1-byte budget: {tiny}). "
            f"Memory lower bound (`memory_lower_bound`): **{fmt(result.lower_bound)} "
            f"({_percent(result.lower_bound, peak)})**; fast mode's lowest peak is {gap:+.1%} above it.")


def not_lowest(results: Sequence[ModelResult]) -> list[str]:
    """Budgets where some method fits with less overhead than fast mode, or fits where it does not."""
    found = []
    for result in results:
        if result.error:
            continue
        for p in BUDGETS:
            fast = result.cells[(FAST, p)]
            for method in result.methods():
                other = result.cells[(method, p)]
                if method == FAST or not other.fits:
                    continue
                if not fast.fits:
                    found.append(f"{result.spec.name} at {p}%: fast mode does not fit, `{method}` does "
                                 f"({_cell(other, result.store_all_peak, True)})")
                elif other.overhead < fast.overhead - 1e-9:
                    found.append(f"{result.spec.name} at {p}%: `{method}` {_cell(other, result.store_all_peak, True)} "
                                 f"vs fast mode {_cell(fast, result.store_all_peak)}")
    return found


def model_section(result: ModelResult) -> str:
    spec = result.spec
    title = f"### {spec.name}"
    if result.error:
        return f"{title}\n\n{spec.description()}: {result.error}"
    fmt = planner.format_bytes
    facts = (f"{spec.description()}; {result.forward_ops} forward + {result.backward_ops} backward ops; "
             f"captured in {result.capture_seconds:.1f} s. Store-all: peak {fmt(result.store_all_peak)} "
             f"(resident {fmt(result.resident_bytes)}, {result.resident_bytes / result.store_all_peak:.1%}), "
             f"simulated step {result.store_all_time:.2f} s.")
    parts = [title, facts,
             "Predicted overhead (simulated peak as % of store-all); `does not fit (x%)`: the lowest peak "
             "the method reached.", quality_table(result), fast_mode_picks(result)]
    if result.compile_error:
        parts.append(f"torch.compile's partitioner could not be evaluated: {result.compile_error}")
    elif result.compile_settings:
        parts += ["torch.compile's min-cut partitioner, each `activation_memory_budget` setting judged by our "
                  "simulator:", compile_table(result)]
        unmapped = sorted({n for s in result.compile_settings for n in s.unmapped})
        if unmapped:
            parts.append(f"Saved values with no planner op of that name (left out of the keep-set): "
                         f"{', '.join(unmapped[:10])}{' …' if len(unmapped) > 10 else ''}.")
    parts += ["Planning wall time, seconds:", times_table(result), min_feasible_line(result)]
    return "\n\n".join(parts)


def section_body(results: Sequence[ModelResult], argv: Sequence[str], args: argparse.Namespace,
                 total_seconds: float) -> str:
    notes = (
        "Every schedule is judged by `planner.simulate(graph, schedule, default_cost_model(graph))` "
        "(cpu roofline preset): overhead = simulated time / store-all time − 1; peaks include resident "
        "memory (parameters, `.grad`, buffers, inputs). Budgets are percentages of the store-all peak. "
        "Rows: fast mode is `planner.plan(graph, \"70%\")` etc. (best of its candidates); the other rows call "
        "`planner.algorithms.ALGORITHMS[name](graph, cost, budget_bytes)` directly. torch.compile: "
        "`min_cut_rematerialization_partition` (solver `" + args.compile_solver + "`, flops runtime "
        "estimator, default CSE) run in our own AOT partition hook on the planner's training step, under "
        "`activation_memory_budget` " + ", ".join(f"{s:g}" for s in COMPILE_SETTINGS) + "; the forward "
        "module's saved values are mapped to their producing ops in the planner's graph (a getitem's to its "
        "multi-output op; a value AOT tagged as backward but computed in its forward, such as a `detach`, "
        "to the forward ops it is computed from) and replayed with `schedule_keeping` in graph order; the "
        "model ops its own backward module recomputes are compared with those our replay recomputes (the "
        "loss is left aside: it may recompute the loss, our schedules never do). Its budget is relative to "
        "its own activation estimate, not to our peak, so each setting is listed with what it gives here; "
        "a budget's row shows the fastest setting that fits (`@setting`). Planning time: wall time of "
        "`planner.plan` (which also simulates its candidates), of the algorithm call, or of the partitioner "
        "call (tracing excluded). Models are measured one after another in one process; "
        f"the whole run took {total_seconds / 60:.1f} min."
    )
    parts = ["```\n" + command_line(argv) + "\n```", environment_line(), notes]
    parts += [model_section(r) for r in results]
    gaps = not_lowest(results)
    summary = ("Fast mode has the lowest overhead of every method that fits, at every budget of every model."
               if not gaps else "Where a method fits with less predicted overhead than fast mode (or fits "
               "where fast mode does not):\n\n" + "\n".join(f"- {g}" for g in gaps))
    parts += ["### Summary", summary]
    problems = [p for r in results for p in r.problems]
    if problems:
        parts.append("Problems found:\n\n" + "\n".join(f"- {p}" for p in problems))
    return "\n\n".join(parts) + "\n"


# ---- command line -------------------------------------------------------------------------------
def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS), metavar="MODEL",
                        help=f"models to benchmark, in order (default: all): {', '.join(MODELS)}")
    parser.add_argument("--compile-solver", default="dp", choices=("dp", "greedy", "ilp"),
                        help="torch._functorch.config.activation_memory_budget_solver (default: dp)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile's partitioner")
    parser.add_argument("--markdown", type=Path, metavar="PATH",
                        help=f"also write the '{SECTION_HEADING}' section of PATH")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv if argv is None else argv)
    args = parse_args(argv[1:])
    start = time.perf_counter()
    results = []
    for name in args.models:
        _log(f"{name} ...")
        results.append(run_model(MODELS[name], args.compile_solver, not args.no_compile))
        gc.collect()  # the model and its graph are gone with run_model's frame
        _log(f"  done at {time.perf_counter() - start:.0f} s")
    body = section_body(results, argv, args, time.perf_counter() - start)
    print(f"{SECTION_HEADING}\n\n{body}")
    if args.markdown is not None:
        analysis = kept_analysis(args.markdown, SECTION_HEADING)
        write_section(args.markdown, SECTION_HEADING, body + ("\n" + analysis + "\n" if analysis else ""))
        kept = f"; kept its '{ANALYSIS_HEADING}' (hand-written): check it against the new numbers"
        _log(f"wrote section '{SECTION_HEADING}' of {args.markdown}" + (kept if analysis else ""))
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
