"""Operator-variant benchmark: what the low-memory implementations (``planner.gpu``) buy, with
and without them (``plan(..., op_variants=True / False)``), simulated and measured.

Why: issue 6 asks, for ResNet-50 and the transformer, for the smallest feasible budget and the
overhead at 33% of the store-all peak, with and without the variants, simulated and measured
with the CPU meter.

Per model (random weights, train mode, seed 0; one capture of a real step):

- simulated: the store-all peak of the graph with the variants the planner applies, the smallest
  budget fast mode meets (``InfeasibleBudgetError.min_feasible_bytes`` of a plan at 1 byte: the
  lowest peak fast mode reaches), and fast mode at 33% of plain PyTorch's store-all peak
  (predicted overhead on the default cost model, the cpu roofline; winning algorithm; variants
  used), all as a percentage of plain PyTorch's store-all peak; where the variants reach a lower
  peak than stock ops, also a plan at that peak (a budget only the variants meet);
- measured: one real step of each of those plans (at its smallest feasible budget where the
  budget does not fit) under ``planner.measure_step`` (the CPU meter, which also sees the variant ops'
  temporaries), its wall time against one eager step, and whether its loss and every gradient
  are bitwise equal to eager PyTorch's (same seed: dropout draws the same mask).

CPU wall times include the meter's per-op bookkeeping and the variants' PyTorch twins (a byte
buffer per mask); on CUDA the CuPy kernels replace the twins.

Run from the repository root (about 10 minutes)::

    python benchmarks/op_variants.py
    python benchmarks/op_variants.py --markdown docs/benchmarks.md
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import planner
from planner.units import format_bytes
from planner.variants import variant_kinds, with_variants
from plan_quality import MODELS
from report import command_line, environment_line, publish

SECTION_HEADING = "## Operator variants (issue 6)"
BUDGET = 0.33  # of plain PyTorch's store-all peak
SHAPES = {"resnet50": (32, 3, 224, 224), "transformer_encoder": (32, 128, 512)}


@dataclass
class Variant:
    """One setting of ``op_variants`` on one model."""

    label: str
    store_all_peak: int = 0
    min_feasible: int = 0
    plan: planner.Plan | None = None
    budget_used: float = 0.0  # of plain PyTorch's store-all peak
    plan_seconds: float = 0.0
    measured_peak: int = 0
    step_seconds: float = 0.0
    bitwise: bool = False


@dataclass
class ModelRow:
    name: str
    shape: tuple[int, ...]
    ops: int = 0
    store_all_peak: int = 0
    eager_peak: int = 0
    eager_seconds: float = 0.0
    settings: list[Variant] = field(default_factory=list)


def _step(model, inputs, targets, loss_fn):
    """One training step; the output is not held through the backward (training code does not)."""
    torch.manual_seed(1)
    loss = (loss_fn or torch.sum)(model(*inputs), *targets)
    loss.backward()
    return loss.detach()


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def run_model(name: str) -> ModelRow:
    spec, shape = MODELS[name], SHAPES[name]
    torch.manual_seed(0)
    model = spec.build().train()
    inputs = (torch.randn(shape),)
    targets = (torch.randint(0, spec.classes, (shape[0],)),) if spec.classes else ()
    graph = planner.capture(model, inputs, spec.loss_fn, targets=targets)
    reference = planner.simulate(graph, planner.Schedule.store_all(graph))
    row = ModelRow(name, shape, len(graph.ops), reference.peak_bytes)

    eager = copy.deepcopy(model)
    _step(eager, inputs, targets, spec.loss_fn)  # warm-up: the first step pays one-off initialisation
    eager.load_state_dict(model.state_dict())  # and undo its running-statistics update
    eager.zero_grad(set_to_none=True)
    measured = planner.measure_step(eager, lambda: _step(eager, inputs, targets, spec.loss_fn), [*inputs, *targets])
    eager.zero_grad(set_to_none=False)
    want_loss = _step(eager, inputs, targets, spec.loss_fn)
    want = _grads(eager)
    row.eager_peak, row.eager_seconds = measured.peak_bytes, measured.seconds
    del eager

    def run_plan(setting: Variant, option: bool, budget: int) -> None:
        """Plan at ``budget`` (its smallest feasible budget if that is higher), run it, measure."""
        start = time.perf_counter()
        try:
            chosen = planner.plan(graph, budget, op_variants=option)
        except planner.InfeasibleBudgetError:
            chosen = planner.plan(graph, setting.min_feasible, op_variants=option)
        setting.plan_seconds, setting.plan = time.perf_counter() - start, chosen
        setting.budget_used = chosen.budget_bytes / reference.peak_bytes
        trained = copy.deepcopy(model)
        planned = chosen.apply(trained, loss_fn=spec.loss_fn)
        step = planner.measure_step(trained, lambda: _step(planned, inputs, targets, spec.loss_fn), [*inputs, *targets])
        setting.measured_peak, setting.step_seconds = step.peak_bytes, step.seconds
        trained.zero_grad(set_to_none=False)
        loss = _step(planned, inputs, targets, spec.loss_fn)
        got = _grads(trained)
        setting.bitwise = torch.equal(loss, want_loss) and got.keys() == want.keys() and all(
            torch.equal(got[n], want[n]) for n in want)
        row.settings.append(setting)
        print(f"{name}, {setting.label}: overhead {chosen.overhead:+.2%} at {setting.budget_used:.1%}, measured "
              f"peak {format_bytes(setting.measured_peak)}, bitwise {setting.bitwise}", file=sys.stderr, flush=True)

    for label, option in (("stock ops", False), ("with variants", True)):
        setting = Variant(label)
        try:
            planner.plan(graph, 1, op_variants=option)
        except planner.InfeasibleBudgetError as error:
            setting.min_feasible = error.min_feasible_bytes
        rewritten = with_variants(graph, variant_kinds(option))  # what fast mode plans on
        setting.store_all_peak = planner.simulate(rewritten, planner.Schedule.store_all(rewritten)).peak_bytes
        run_plan(setting, option, int(BUDGET * reference.peak_bytes))
    stock, variants = row.settings
    if variants.min_feasible < stock.min_feasible:  # a budget only the variants reach
        below = Variant("with variants, below stock's minimum", variants.store_all_peak, variants.min_feasible)
        run_plan(below, True, variants.min_feasible)
    return row


def _pct(value: int, of: int) -> str:
    return f"{value / of:.1%}"


def render(rows: list[ModelRow], argv: list[str], seconds: float) -> str:
    lines = [environment_line(), "", f"Command: `{command_line(argv)}` ({seconds / 60:.1f} min).", "",
             "Simulated (cpu roofline cost model); percentages are of plain PyTorch's store-all peak.", "",
             "| model | input | ops | ops setting | store-all peak | smallest feasible budget | budget | overhead "
             "| algorithm | variants used | planning s |",
             "|---|---|---:|---|---:|---:|---:|---:|---|---:|---:|"]
    for row in rows:
        for s in row.settings:
            lines.append(f"| {row.name} | {'×'.join(map(str, row.shape))} | {row.ops} | {s.label} | "
                         f"{format_bytes(s.store_all_peak)} ({_pct(s.store_all_peak, row.store_all_peak)}) | "
                         f"{_pct(s.min_feasible, row.store_all_peak)} | {s.budget_used:.1%} | {s.plan.overhead:+.2%} | "
                         f"`{s.plan.algorithm}` | {len(s.plan.variants)} | {s.plan_seconds:.2f} |")
    lines += ["", "Measured: one real CPU step of each plan under `planner.measure_step` (the CPU meter).", "",
              "| model | ops setting | budget | predicted peak | measured peak | measured − predicted | "
              "step s (eager s) | loss and gradients bitwise equal to eager |",
              "|---|---|---:|---:|---:|---:|---:|---|"]
    for row in rows:
        for s in row.settings:
            predicted = s.plan.predicted_peak_bytes
            lines.append(f"| {row.name} | {s.label} | {s.budget_used:.1%} | {format_bytes(predicted)} | "
                         f"{format_bytes(s.measured_peak)} | {(s.measured_peak - predicted) / predicted:+.2%} | "
                         f"{s.step_seconds:.1f} ({row.eager_seconds:.1f}) | {'yes' if s.bitwise else 'NO'} |")
    lines += ["", "Eager PyTorch's measured peak: " + ", ".join(
        f"{row.name} {format_bytes(row.eager_peak)} ({_pct(row.eager_peak, row.store_all_peak)} of store-all)"
        for row in rows) + "."]
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args(argv[1:])
    torch.set_num_threads(2)
    start = time.perf_counter()
    rows = [run_model(name) for name in args.models]
    publish(SECTION_HEADING, render(rows, argv, time.perf_counter() - start), args.markdown)


if __name__ == "__main__":
    main(sys.argv)
