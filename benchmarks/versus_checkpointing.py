"""Measured against per-layer checkpointing as users apply it (issue 15): the planner where
checkpointing's memory is, between it and plain PyTorch, and below what checkpointing reaches.

On a GPT-2 and a Llama whose activations dominate the step (``bench_models``' ``deep`` size: 16
layers of width 128, sequence 1024, a 256-token vocabulary: parameters and the logits are small
beside what the layers hold for the backward), each step
is measured the way ``versus.py`` measures: the meter's peak (``planner.MemoryMeter``), gradients
after one step against eager's, and step times in interleaved rounds (every configuration once
per round; median [min-max]; ratios per round). Configurations:

- eager PyTorch (what the plans' percentages refer to), ``torch.utils.checkpoint`` around each
  decoder layer, transformers' ``gradient_checkpointing_enable()``;
- the planner (``planner.plan`` of the model: measured op times) at each checkpointing tool's
  measured peak;
- the planner at budgets a quarter, half and three quarters of the way from checkpointing's
  peak to eager's, which checkpointing cannot express;
- the planner at its own smallest feasible budget (``InfeasibleBudgetError.min_feasible_bytes``).

Run from the repository root (about 15 minutes on 2 cores)::

    python benchmarks/versus_checkpointing.py --threads 1
    python benchmarks/versus_checkpointing.py --threads 1 --markdown docs/benchmarks.md
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import torch

import planner
from planner.units import format_bytes

from bench_models import build
from realstep import Timing, common_arguments, difference, difference_cell, gradients, interleaved, measure_peak, \
    paired_ratio, parsed
from report import command_line, environment_line, publish
from versus import checkpoint_blocks

SECTION_HEADING = "## Against per-layer checkpointing (issue 15)"
BETWEEN = (0.25, 0.5, 0.75)


@dataclass
class Run:
    """One configuration: how it was made, its measured peak, gradient difference and timing."""

    name: str
    step: object
    peak: int
    gradient_difference: float
    predicted: int | None = None
    timing: Timing | None = None


def _measure(name, model, forward, bench, reference, predicted=None) -> Run:
    step = (lambda: bench.step(forward))
    grads = gradients(model, step)
    peak = measure_peak(model, step, [*bench.inputs, *bench.targets], "cpu").meter_bytes
    return Run(name, step, peak, difference(grads, reference) if reference is not None else 0.0, predicted)


def _planned(name: str, bench, budget: int, reference) -> Run | str:
    model, _, _ = bench.fresh()
    try:
        chosen = planner.plan(model, budget, bench.inputs, loss_fn=bench.loss_fn, targets=bench.targets)
    except planner.InfeasibleBudgetError as error:
        return f"{name}: infeasible (lowest {format_bytes(error.min_feasible_bytes)})"
    return _measure(name, model, chosen.apply(model, bench.loss_fn), bench, reference, chosen.predicted_peak_bytes)


def compare(name: str, rounds: int) -> tuple[str, list[Run], list[str]]:
    bench = build(name, "deep")
    runs, notes = [], []
    model, blocks, hf = bench.fresh()
    eager = _measure("eager PyTorch", model, model, bench, None)
    reference = gradients(model, eager.step)
    runs.append(eager)
    model, blocks, _ = bench.fresh()
    checkpoint_blocks(blocks)
    runs.append(_measure(f"torch.utils.checkpoint, each of {len(blocks)} layers", model, model, bench, reference))
    model, _, hf = bench.fresh()
    hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    runs.append(_measure("gradient_checkpointing_enable()", model, model, bench, reference))
    tools = runs[1:]
    for tool in tools:
        result = _planned(f"planner at the peak of {tool.name}", bench, tool.peak, reference)
        (runs if isinstance(result, Run) else notes).append(result)
    low = min(tool.peak for tool in tools)
    for share in BETWEEN:
        budget = int(low + share * (eager.peak - low))
        result = _planned(f"planner at {share:.0%} of the way from checkpointing's peak to eager's", bench,
                          budget, reference)
        (runs if isinstance(result, Run) else notes).append(result)
    model, _, _ = bench.fresh()
    try:
        planner.plan(model, 1, bench.inputs, loss_fn=bench.loss_fn, targets=bench.targets)
    except planner.InfeasibleBudgetError as error:
        result = _planned("planner at its smallest feasible budget", bench, error.min_feasible_bytes, reference)
        (runs if isinstance(result, Run) else notes).append(result)
    timings = interleaved({run.name: run.step for run in runs}, rounds, "cpu")
    for run in runs:
        run.timing = timings[run.name]
    return bench.description, runs, notes


def markdown(name: str, description: str, runs: list[Run], notes: list[str]) -> str:
    eager = runs[0]
    checkpointing = [r for r in runs if not r.name.startswith("planner") and r is not eager]
    lines = [f"### {name}", "", description + ".", "",
             "| configuration | measured peak | of eager's | predicted | step s [min–max] | vs eager | gradients |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for run in runs:
        ratio = paired_ratio(run.timing, eager.timing)
        lines.append(f"| {run.name} | {format_bytes(run.peak)} | {run.peak / eager.peak:.1%} | "
                     f"{format_bytes(run.predicted) if run.predicted else ''} | {run.timing.cell()} | "
                     f"{ratio[0]:+.1%} [{ratio[1]:+.1%}, {ratio[2]:+.1%}] | {difference_cell(run.gradient_difference)} |")
    lines += [f"- {note}" for note in notes]
    lines += ["", "| claim | planner | checkpointing | verdict |", "|---|---|---|---|"]
    for tool in checkpointing:
        at = next((r for r in runs if r.name == f"planner at the peak of {tool.name}"), None)
        if at is not None:
            median, low, high = paired_ratio(at.timing, tool.timing)
            verdict = "faster" if high < 0 else "slower" if low > 0 else "within noise"
            lines.append(f"| step time at {tool.name}'s peak | {at.timing.median:.3f} s | {tool.timing.median:.3f} s | "
                         f"{median:+.1%} [{low:+.1%}, {high:+.1%}]: {verdict} |")
    best_tool = min(checkpointing, key=lambda r: r.timing.median)
    tool_overhead = paired_ratio(best_tool.timing, eager.timing)[0]
    for run in runs:
        if "of the way" in run.name:
            overhead = paired_ratio(run.timing, eager.timing)[0]
            lines.append(f"| overhead {run.name.removeprefix('planner ')} ({run.peak / eager.peak:.0%} of eager's peak) | "
                         f"{overhead:+.1%} | {tool_overhead:+.1%} (its only setting) | "
                         f"{'lower' if overhead < tool_overhead else 'not lower'} |")
    smallest = next((r for r in runs if r.name == "planner at its smallest feasible budget"), None)
    if smallest is not None:
        lowest_tool = min(checkpointing, key=lambda r: r.peak)
        reduction = 1 - smallest.peak / lowest_tool.peak
        lines.append(f"| smallest measured peak | {format_bytes(smallest.peak)} | {format_bytes(lowest_tool.peak)} "
                     f"| {reduction:.1%} lower |")
    return "\n".join(lines + [""])


def main(argv: list[str]) -> int:
    parser = common_arguments(__doc__.split("\n\n")[0], ["gpt2", "llama"], rounds=5)
    args = parsed(parser, argv[1:])
    began = time.perf_counter()
    sections = []
    for name in args.models:
        description, runs, notes = compare(name, args.rounds)
        sections.append(markdown(name, description, runs, notes))
        print(sections[-1], file=sys.stderr, flush=True)
    body = "\n\n".join([f"```\n{command_line(argv)}\n```",
                        environment_line() + f" {torch.get_num_threads()} intra-op thread(s); {args.rounds} "
                        f"interleaved rounds after one warm-up. Whole run: {time.perf_counter() - began:.0f} s.",
                        *sections])
    publish(SECTION_HEADING, body, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
