"""Predicted against measured: does the default cost model's overhead match real steps?

Per model: ``planner.plan(model, budget, inputs, ...)`` with the default cost model (on a model
with real tensors: op times measured in a running step, ``ProfiledCostModel``) at each budget
(``min``: the smallest feasible, from ``InfeasibleBudgetError.min_feasible_bytes`` at one byte);
each plan runs for real beside eager PyTorch, interleaved round by round (eager, plan 1, plan 2,
..., eager, ...). Measured overhead = plan step / eager step - 1 per round: its median and
[min, max] over rounds; eager's own spread is the machine's noise band. Also recorded: the
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
from pathlib import Path
from typing import Any, Sequence

import torch

import planner
from planner.units import format_bytes

from bench_models import BenchModel, build
from realstep import Peak, Timing, difference, difference_cell, gradients, interleaved, measure_peak, paired_ratio
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
    measured_overhead: tuple[float, float, float] | None = None  # median, min, max over rounds
    allocated_prediction: int | None = None  # planner.allocator.allocated_peak (gpu_check.py)
    plan: Any = None  # the Plan and the model copy it runs on, kept for callers (not saved)
    model: Any = None

    def to_json(self) -> dict:
        data = {k: v for k, v in self.__dict__.items() if k not in ("peak", "timing", "plan", "model")}
        data["peak"] = self.peak.to_json() if self.peak else None
        data["timing"] = self.timing.to_json() if self.timing else None
        return data


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
        return {"name": self.name, "description": self.description, "device": self.device,
                "store_all_peak": self.store_all_peak, "eager_peak": self.eager_peak.to_json(),
                "eager_timing": self.eager_timing.to_json() if self.eager_timing else None,
                "rows": [row.to_json() for row in self.rows], "failures": self.failures}


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
    """Plan ``bench`` at each budget with the default cost model, run every plan beside eager."""
    held = [*bench.inputs, *bench.targets]
    graph = planner.capture(bench.model, bench.inputs, bench.loss_fn, targets=bench.targets)
    roofline = roofline_for(device)
    roofline_store_all = planner.simulate(graph, graph.store_all(), roofline).time
    eager = copy.deepcopy(bench.model)
    reference = gradients(eager, lambda: bench.step(eager))
    result = ModelResult(bench.name, bench.description, device, planner.simulate(graph, graph.store_all()).peak_bytes,
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
    timings = interleaved(steps, rounds, device, deadline=deadline)
    result.eager_timing = timings["eager"]
    for row in result.rows:
        row.timing = timings[row.budget]
        row.measured_overhead = paired_ratio(row.timing, result.eager_timing)
    return result


def within_target(row: PlanRow, eager: Timing) -> bool:
    """|predicted - measured| overhead within 5 points, or within the wider noise band (eager's
    spread, or the spread of the per-round overheads)."""
    median, low, high = row.measured_overhead
    band = max(TARGET_POINTS, eager.spread, (high - low) / 2)
    return abs(row.predicted_overhead - median) <= band


def markdown(results: Sequence[ModelResult]) -> str:
    cuda = any(r.device.startswith("cuda") for r in results)
    head = ("| model | budget | algorithm | predicted peak | measured peak | "
            + ("max allocated | max reserved | " if cuda else "")
            + "predicted step s | measured step s [min–max] | predicted overhead | measured overhead [min, max] | "
              "within target | roofline's overhead | gradients vs eager |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for result in results:
        eager = result.eager_timing
        cells = [result.name, "eager", "—", "—", format_bytes(result.eager_peak.meter_bytes)]
        if cuda:
            cells += [_bytes(result.eager_peak.allocated_bytes), _bytes(result.eager_peak.reserved_bytes)]
        cells += ["—", eager.cell() if eager else "—", "—", f"noise band ±{eager.spread / 2:.1%}" if eager else "—",
                  "—", "—", "reference"]
        lines.append("| " + " | ".join(cells) + " |")
        for row in result.rows:
            median, low, high = row.measured_overhead or (float("nan"),) * 3
            cells = [result.name, row.budget,
                     f"`{row.algorithm}`", f"{format_bytes(row.predicted_peak)} ({row.predicted_peak / result.store_all_peak:.0%})",
                     f"{format_bytes(row.peak.meter_bytes)} ({row.peak.meter_bytes / row.predicted_peak - 1:+.2%})"]
            if cuda:
                cells += [_bytes(row.peak.allocated_bytes, row.predicted_peak), _bytes(row.peak.reserved_bytes, row.predicted_peak)]
            cells += [f"{row.predicted_time:.3f}", row.timing.cell(), f"{row.predicted_overhead:+.1%}",
                      f"{median:+.1%} [{low:+.1%}, {high:+.1%}]", "yes" if within_target(row, eager) else "**no**",
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
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet50", "gpt2"])
    parser.add_argument("--size", default="cpu", choices=["small", "cpu", "gpu"])
    parser.add_argument("--budgets", nargs="+", default=["store-all", "70%", "50%", "min"])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--markdown", type=Path, metavar="PATH")
    parser.add_argument("--json", type=Path, metavar="PATH")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv if argv is None else argv)
    args = parse_args(argv[1:])
    began = time.perf_counter()
    results = [measure_model(build(name, args.size, args.device), args.budgets, args.device, args.rounds)
               for name in args.models]
    if args.json:
        args.json.write_text(json.dumps([r.to_json() for r in results], indent=1))
    body = "\n\n".join([
        "```\n" + command_line(argv) + "\n```", environment_line() + f" Whole run: {time.perf_counter() - began:.0f} s.",
        f"Default cost model; {args.rounds} interleaved rounds (eager, each plan, eager, ...) after one warm-up. "
        "Overheads are against eager PyTorch's step (per round, then the median and the range over rounds); "
        "within target: |predicted - measured| ≤ 5 points, or ≤ the noise band where wider (eager's spread or "
        "half the range of the per-round overheads). Peaks: measured by the meter (live tensors), resident "
        "memory included. Roofline's overhead: the same schedule priced by the roofline preset.",
        markdown(results)])
    publish(SECTION_HEADING, body, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
