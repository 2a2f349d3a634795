"""Predicted against measured: does the default cost model's overhead match real steps?

Per model: ``planner.plan(model, budget, inputs, ...)`` with the default cost model (on a model
with real tensors: op times measured in a running step, ``ProfiledCostModel``) at store-all and
each budget (``min``: the smallest feasible, from ``InfeasibleBudgetError.min_feasible_bytes`` at
one byte); every plan runs for real beside eager PyTorch, interleaved round by round (eager,
store-all, plan 1, ..., eager, ...). A plan's predicted overhead is its predicted time over
store-all's, so its measured overhead is its step over the store-all plan's step - 1, per round
(median and [min, max] over rounds): same executor, same traced graph, only the schedule differs.
Eager's step against the store-all plan's is listed apart (the executor's own overhead, and the
traced graph's differences from eager code, such as an explicit causal mask). Also recorded: the
measured peak (meter; on CUDA the allocator's too) against the predicted one, the predicted and
measured step seconds, the gradients against eager's, and what the cpu (CPU) or h100 (CUDA)
roofline predicts for the same schedule, for comparison.

Run from the repository root::

    python benchmarks/cost_fidelity.py                                  # ResNet-50 and GPT-2, CPU sizes
    python benchmarks/cost_fidelity.py --size small --rounds 2          # seconds
    python benchmarks/cost_fidelity.py --markdown docs/benchmarks.md --json fidelity.json

``gpu_check.py`` calls ``measure_model`` on CUDA (store-all, 50%, 33%).
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

import planner
from planner.units import format_bytes

from bench_models import BenchModel, build
from realstep import (Peak, Timing, common_arguments, difference, difference_cell, gradients, interleaved,
                      measure_peak, paired_ratio, parsed, to_json)
from report import command_line, environment_line, publish

SECTION_HEADING = "## Predicted against measured step time (issue 17)"
TARGET_POINTS = 0.05  # |predicted - measured overhead|, or the noise band where wider


@dataclass
class PlanRow:
    budget: str
    budget_bytes: int
    algorithm: str
    cost_model: str
    predicted_peak: int
    predicted_time: float
    predicted_overhead: float
    roofline_overhead: float  # the same schedule priced by the roofline preset
    plan_seconds: float
    peak: Peak | None = None
    gradient_difference: float | None = None
    timing: Timing | None = None
    measured_overhead: tuple[float, float, float] | None = None  # vs store-all: median, min, max over rounds
    allocated_prediction: int | None = None  # planner.allocator.allocated_peak (gpu_check.py)
    plan: Any = None  # the Plan and the model copy it runs on, kept for callers (not saved)
    model: Any = None

    def to_json(self) -> dict:
        return to_json(self, skip=("plan", "model"))


@dataclass
class ModelResult:
    name: str
    description: str
    device: str
    store_all_peak: int
    eager_peak: Peak
    eager_timing: Timing | None = None
    rows: list[PlanRow] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return to_json(self)


def roofline_for(device: str) -> planner.RooflineCostModel:
    return planner.RooflineCostModel("cpu" if device == "cpu" else "h100")


def resolve_budget(bench: BenchModel, label: str, model: torch.nn.Module) -> int | str:
    """``"min"``: the smallest budget fast mode meets (planned at one byte); ``"store-all"``:
    100%; anything else as ``plan()`` reads it."""
    if label == "store-all":
        return "100%"
    if label != "min":
        return label
    try:
        planner.plan(model, 1, bench.inputs, loss_fn=bench.loss_fn, targets=bench.targets)
    except planner.InfeasibleBudgetError as error:
        return error.min_feasible_bytes
    raise AssertionError("a one-byte budget fitted")


def measure_model(bench: BenchModel, budgets: Sequence[str], device: str, rounds: int,
                  deadline: float | None = None) -> ModelResult:
    """Plan ``bench`` at store-all and each budget with the default cost model, run every plan
    beside eager."""
    budgets = ["store-all", *(b for b in budgets if b != "store-all")]
    held = [*bench.inputs, *bench.targets]
    graph = planner.capture(bench.model, bench.inputs, bench.loss_fn, targets=bench.targets)
    roofline = roofline_for(device)
    roofline_store_all = planner.simulate(graph, planner.Schedule.store_all(graph), roofline).time
    eager = copy.deepcopy(bench.model)
    reference = gradients(eager, lambda: bench.step(eager))
    result = ModelResult(bench.name, bench.description, device, planner.simulate(graph, planner.Schedule.store_all(graph)).peak_bytes,
                         measure_peak(eager, lambda: bench.step(eager), held, device))
    steps = {"eager": lambda: bench.step(eager)}
    for label in budgets:
        if deadline is not None and time.monotonic() > deadline:
            result.failures.append(f"{label}: skipped, out of time")
            continue
        model = copy.deepcopy(bench.model)
        try:
            began = time.perf_counter()
            chosen = planner.plan(model, resolve_budget(bench, label, model), bench.inputs, loss_fn=bench.loss_fn,
                                  targets=bench.targets)
            seconds = time.perf_counter() - began
        except planner.PlannerError as error:
            result.failures.append(f"{label}: {type(error).__name__}: {error}")
            continue
        priced = planner.simulate(chosen.graph, chosen.schedule, roofline).time / roofline_store_all - 1.0
        row = PlanRow(label, chosen.budget_bytes, chosen.algorithm, chosen.cost_model, chosen.predicted_peak_bytes,
                      chosen.predicted_time, chosen.overhead, priced, seconds, plan=chosen, model=model)
        planned = chosen.apply(model, bench.loss_fn)
        step = (lambda planned=planned: bench.step(planned))
        row.gradient_difference = difference(gradients(model, step), reference)
        row.peak = measure_peak(model, step, held, device)
        result.rows.append(row)
        steps[label] = step
        print(f"  {bench.name} {label}: {row.algorithm}, predicted {row.predicted_overhead:+.1%}, planned in {seconds:.0f} s",
              file=sys.stderr, flush=True)
    timings = interleaved(steps, rounds, device, deadline=deadline)
    result.eager_timing = timings["eager"]
    store_all = timings.get("store-all")
    for row in result.rows:
        row.timing = timings[row.budget]
        row.measured_overhead = paired_ratio(row.timing, store_all) if store_all else None
    return result


def noise_band(result: ModelResult) -> float:
    """Half the relative spread of the store-all plan's steps: how much one step varies here."""
    return result.rows[0].timing.spread / 2 if result.rows and result.rows[0].budget == "store-all" else float("nan")


def within_target(row: PlanRow, band: float) -> bool:
    """|predicted - measured| overhead within 5 points, or within the noise band where wider."""
    return abs(row.predicted_overhead - row.measured_overhead[0]) <= max(TARGET_POINTS, band)


def markdown(results: Sequence[ModelResult]) -> str:
    cuda = any(r.device.startswith("cuda") for r in results)
    head = ("| model | budget | algorithm | predicted peak | measured peak | "
            + ("max allocated | max reserved | " if cuda else "")
            + "predicted step s | measured step s [min–max] | predicted overhead | measured overhead [min, max] | "
              "within target | roofline's overhead | gradients vs eager |")
    # measured overhead: against the store-all plan (eager's row: eager against the store-all plan)
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for result in results:
        eager, band = result.eager_timing, noise_band(result)
        store_all = result.rows[0].timing if result.rows and result.rows[0].budget == "store-all" else None
        versus_plan = "—"
        if eager and store_all:
            median, low, high = paired_ratio(eager, store_all)
            versus_plan = f"{median:+.1%} [{low:+.1%}, {high:+.1%}]"
        cells = [result.name, "eager PyTorch", "—", "—", format_bytes(result.eager_peak.meter_bytes)]
        if cuda:
            cells += [_bytes(result.eager_peak.allocated_bytes), _bytes(result.eager_peak.reserved_bytes)]
        cells += ["—", eager.cell() if eager else "—", "—", versus_plan, f"noise band ±{band:.1%}", "—", "reference"]
        lines.append("| " + " | ".join(cells) + " |")
        for row in result.rows:
            median, low, high = row.measured_overhead or (float("nan"),) * 3
            cells = [result.name, row.budget,
                     f"`{row.algorithm}`", f"{format_bytes(row.predicted_peak)} ({row.predicted_peak / result.store_all_peak:.0%})",
                     f"{format_bytes(row.peak.meter_bytes)} ({row.peak.meter_bytes / row.predicted_peak - 1:+.2%})"]
            if cuda:
                cells += [_bytes(row.peak.allocated_bytes, row.predicted_peak), _bytes(row.peak.reserved_bytes, row.predicted_peak)]
            cells += [f"{row.predicted_time:.3f}", row.timing.cell(), f"{row.predicted_overhead:+.1%}",
                      f"{median:+.1%} [{low:+.1%}, {high:+.1%}]", "yes" if within_target(row, band) else "**no**",
                      f"{row.roofline_overhead:+.1%}", difference_cell(row.gradient_difference)]
            lines.append("| " + " | ".join(cells) + " |")
    notes = [f"- {r.name}: {r.description}; store-all peak {format_bytes(r.store_all_peak)}; cost model "
             f"`{r.rows[0].cost_model if r.rows else '—'}`" + (f"; failed: {'; '.join(r.failures)}" if r.failures else "")
             for r in results]
    return "\n".join(lines + [""] + notes)


def _bytes(value: int | None, predicted: int | None = None) -> str:
    if value is None:
        return "—"
    return format_bytes(value) + (f" ({value / predicted - 1:+.1%})" if predicted else "")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = common_arguments(__doc__.split("\n\n")[0], ["resnet50", "gpt2"], rounds=7)
    parser.add_argument("--budgets", nargs="+", default=["store-all", "70%", "50%", "min"])
    return parsed(parser, argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv if argv is None else argv)
    args = parse_args(argv[1:])
    began = time.perf_counter()
    results = [measure_model(build(name, args.size, args.device), args.budgets, args.device, args.rounds)
               for name in args.models]
    if args.json:
        args.json.write_text(json.dumps([r.to_json() for r in results], indent=1))
    body = "\n\n".join([
        "```\n" + command_line(argv) + "\n```",
        environment_line() + f" {torch.get_num_threads()} intra-op thread(s). Whole run: {time.perf_counter() - began:.0f} s.",
        f"Default cost model; {args.rounds} interleaved rounds (eager, store-all, each plan, eager, ...) after one "
        "warm-up. Measured overhead: the plan's step over the store-all plan's, per round, then the median and "
        "[min, max] over rounds (eager's row: eager over the store-all plan); within target: |predicted - "
        "measured| ≤ 5 points, or ≤ the noise band (half the store-all plan's spread) where wider. Peaks: "
        "measured by the meter (live tensors), resident memory included. Roofline's overhead: the same "
        "schedule priced by the roofline preset.",
        markdown(results)])
    publish(SECTION_HEADING, body, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
