"""Measured side by side: what users run today to save activation memory, against the planner.

Tools, each at its natural settings, on the same model and batch:
- ``torch.utils.checkpoint`` (non-reentrant) around each block;
- transformers' ``gradient_checkpointing_enable()`` (Hugging Face models only);
- selective activation checkpointing around each block, policy "save matmul outputs"
  (``create_selective_checkpoint_contexts`` with mm/addmm/bmm/convolution/SDPA kept, the rest
  recomputed);
- ``torch.compile`` with ``torch._functorch.config.activation_memory_budget`` (1.0 is the
  default min-cut partition). CUDA: the inductor backend. CPU: the same decompositions and
  min-cut partitioner (``compiler="inductor"``) with eager kernels (inductor's CPU code
  generation takes minutes per model on 2 cores, and its buffers bypass the dispatcher the meter
  watches), so the CPU rows measure the partitioner's memory and recompute choices, not
  inductor's fused kernels.

Then the planner (``planner.plan`` with the default cost model: measured op times) at each
tool's measured peak. Every configuration is measured the same way: gradients after one step
against eager's, the peak of one step (CPU: ``planner.MemoryMeter``, which sees compiled graphs
run inside it, with ``fullgraph=True`` so that nothing eager escapes it; CUDA: the allocator's
``max_memory_allocated``), and step times in interleaved rounds (every configuration once per
round), reported as median [min–max]; the planner's time against the tool's is the per-round
ratio (median [min, max]).

Run from the repository root::

    python benchmarks/versus.py                                   # CPU sizes, all four models
    python benchmarks/versus.py --models gpt2 --size small --rounds 2
    python benchmarks/versus.py --markdown docs/benchmarks.md --json versus.json

``gpu_check.py`` calls ``compare`` on CUDA.
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import planner
from planner._torch import dispatch_modes
from planner.measure import MemoryMeter, steady_state_tensors
from planner.units import format_bytes

from _compile_internals import activation_memory_budget, inductor_partitioned_backend
from bench_models import BUILDERS, BenchModel, build
from realstep import (Timing, common_arguments, difference, difference_cell, gradients, interleaved, measure_peak,
                      paired_ratio, parsed, to_json)
from report import command_line, environment_line, publish

SECTION_HEADING = "## Side by side with today's tools (issue 17)"
COMPILE_BUDGETS = (1.0, 0.5, 0.1)
aten = torch.ops.aten
#: "save matmul outputs": what the selective checkpointing policy keeps (the rest is recomputed)
MATMUL_OPS = [getattr(aten, name).default for name in (
    "mm", "addmm", "bmm", "baddbmm", "convolution", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_flash_attention_for_cpu") if hasattr(aten, name)]


@dataclass
class Config:
    """One way of running the step: a tool at a setting, or the planner at a tool's peak."""

    name: str
    setting: str
    step: Callable[[], object] | None = None
    peak_bytes: int | None = None
    reserved_bytes: int | None = None
    gradient_difference: float | None = None
    timing: Timing | None = None
    versus: str | None = None  # the planner row: which tool's peak it was given
    predicted_peak: int | None = None
    predicted_overhead: float | None = None
    algorithm: str | None = None
    failure: str | None = None

    def to_json(self) -> dict:
        return to_json(self, skip=("step",))


@dataclass
class Comparison:
    name: str
    description: str
    device: str
    configs: list[Config] = field(default_factory=list)

    def to_json(self) -> dict:
        return to_json(self)


def checkpoint_blocks(blocks: Sequence[torch.nn.Module], context_fn: Callable | None = None) -> None:
    """Wrap every block's forward in non-reentrant ``torch.utils.checkpoint`` (optionally selective)."""
    options = {"context_fn": context_fn} if context_fn else {}
    for block in blocks:
        def checkpointed(*args, _forward=block.forward, **kwargs):
            return torch.utils.checkpoint.checkpoint(_forward, *args, use_reentrant=False, **options, **kwargs)
        block.forward = checkpointed


class _CompiledGraphMeter:
    """Runs the compiled forward and backward graphs inside ``meter`` when one is set, so that a
    ``MemoryMeter`` sees what compiled code allocates (dynamo runs eagerly when a dispatch mode is
    active at the call, so the meter cannot simply surround the step)."""

    def __init__(self):
        self.meter: MemoryMeter | None = None

    def compiler(self, graph: torch.fx.GraphModule, _example_inputs):
        from functorch.compile import make_boxed_func

        run_graph = make_boxed_func(graph)

        def run(args):
            meter = self.meter
            if meter is None or meter in dispatch_modes():
                return run_graph(args)
            with meter:
                return run_graph(args)

        run._boxed_call = True
        return run


def compiled(model: torch.nn.Module, budget: float, device: str) -> tuple[Callable, _CompiledGraphMeter | None]:
    """``torch.compile(model)`` under ``activation_memory_budget=budget`` (see the module docstring)."""
    if device.startswith("cuda"):
        backend, graphs = "inductor", None
    else:
        graphs = _CompiledGraphMeter()
        backend = inductor_partitioned_backend(graphs.compiler, graphs.compiler)
    function = torch.compile(model, backend=backend, fullgraph=graphs is not None)  # CPU: nothing eager escapes the meter

    def call(*inputs):
        with activation_memory_budget(budget):
            return function(*inputs)

    return call, graphs


def _metered_compiled_peak(bench: BenchModel, model: torch.nn.Module, forward: Callable,
                           graphs: _CompiledGraphMeter) -> int:
    """The step's peak with the compiled graphs run inside the meter (``_CompiledGraphMeter``)."""
    resident = steady_state_tensors(model, [*bench.inputs, *bench.targets])
    graphs.meter = meter = MemoryMeter(include=resident)
    try:
        output = forward(*bench.inputs)  # outside the meter: dynamo runs the compiled code
        with meter:
            loss = bench.loss_fn(output, *bench.targets)
            del output
            loss.backward()
    finally:
        graphs.meter = None
    return meter.peak_bytes


def tools(bench: BenchModel, device: str, compile_budgets: Sequence[float]) -> list[tuple[str, str, Callable]]:
    """(tool, setting, make) for every tool that applies; ``make()`` -> (model, forward, graphs)."""
    def eager():
        model, _, _ = bench.fresh()
        return model, model, None

    def blocks():
        model, block_list, _ = bench.fresh()
        checkpoint_blocks(block_list)
        return model, model, None

    def hf_checkpointing():
        model, _, hf = bench.fresh()
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model, model, None

    def selective():
        from torch.utils.checkpoint import create_selective_checkpoint_contexts

        model, block_list, _ = bench.fresh()
        checkpoint_blocks(block_list, functools.partial(create_selective_checkpoint_contexts, MATMUL_OPS))
        return model, model, None

    def compiled_at(budget: float):
        def make():
            model, _, _ = bench.fresh()
            forward, graphs = compiled(model, budget, device)
            return model, forward, graphs
        return make

    listed = [("eager PyTorch", "", eager), ("torch.utils.checkpoint", f"each of {len(bench.blocks)} blocks", blocks)]
    if bench.hf is not None:
        listed.append(("gradient_checkpointing_enable()", "transformers", hf_checkpointing))
    listed.append(("selective checkpointing", "save matmul outputs, each block", selective))
    listed += [("torch.compile", f"activation_memory_budget={b}", compiled_at(b)) for b in compile_budgets]
    return listed


def compare(bench: BenchModel, device: str, rounds: int, compile_budgets: Sequence[float] = COMPILE_BUDGETS,
            deadline: float | None = None) -> Comparison:
    """Every tool, each followed by the planner at its measured peak (so that a deadline leaves
    complete pairs); then all of them timed together, interleaved."""
    result = Comparison(bench.name, bench.description, device)
    held = [*bench.inputs, *bench.targets]
    cuda = device.startswith("cuda")
    reference = None
    planned: dict[int, Config] = {}
    for tool, setting, make in tools(bench, device, compile_budgets):
        config = Config(tool, setting)
        result.configs.append(config)
        if deadline is not None and time.monotonic() > deadline:
            config.failure = "skipped: out of time"
            continue
        try:
            model, forward, graphs = make()
            step = (lambda model=model, forward=forward: bench.step(forward))
            grads = gradients(model, step)  # also compiles
            reference = grads if reference is None else reference
            config.gradient_difference = difference(grads, reference)
            if graphs is not None:  # CPU compile: the meter runs inside the compiled graphs
                config.peak_bytes = _metered_compiled_peak(bench, model, forward, graphs)
            else:
                peak = measure_peak(model, step, held, device, meter=not cuda)
                config.peak_bytes, config.reserved_bytes = peak.meter_bytes, peak.reserved_bytes
            config.step = step
        except Exception as error:  # a tool that fails on this model is a result, not a crash
            config.failure = f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
            continue
        label = f"{tool} {setting}".rstrip()
        result.configs.append(Config("planner", f"at the peak of {label}", versus=label))
        _plan_at(bench, config.peak_bytes, result.configs[-1], reference, held, device, planned)
    steps = {f"{c.name}|{c.setting}": c.step for c in result.configs if c.step is not None}
    timings = interleaved(steps, rounds, device, deadline=deadline)
    for config in result.configs:
        config.timing = timings.get(f"{config.name}|{config.setting}")
    return result


def _plan_at(bench: BenchModel, budget: int, config: Config, reference, held, device: str,
             planned: dict[int, Config]) -> None:
    """The planner at ``budget`` (its plan measured like the tools); one plan per distinct budget."""
    if budget in planned:
        for key in ("peak_bytes", "reserved_bytes", "gradient_difference", "predicted_peak", "predicted_overhead",
                    "algorithm", "failure"):
            setattr(config, key, getattr(planned[budget], key))
        config.step = planned[budget].step
        return
    planned[budget] = config
    model, _, _ = bench.fresh()
    try:
        chosen = planner.plan(model, budget, bench.inputs, loss_fn=bench.loss_fn, targets=bench.targets)
    except planner.InfeasibleBudgetError as error:
        config.failure = f"infeasible: lowest peak {format_bytes(error.min_feasible_bytes)}"
        return
    config.predicted_peak, config.predicted_overhead, config.algorithm = (
        chosen.predicted_peak_bytes, chosen.overhead, chosen.algorithm)
    forward = chosen.apply(model, bench.loss_fn)
    step = (lambda: bench.step(forward))
    config.gradient_difference = difference(gradients(model, step), reference)
    peak = measure_peak(model, step, held, device, meter=not device.startswith("cuda"))
    config.peak_bytes, config.reserved_bytes = peak.meter_bytes, peak.reserved_bytes
    config.step = step


def markdown(comparisons: Sequence[Comparison]) -> str:
    cuda = any(c.device.startswith("cuda") for c in comparisons)
    peak_name = "max allocated" if cuda else "measured peak"
    lines = []
    for comparison in comparisons:
        lines += [f"### {comparison.name}", "", comparison.description + ".", ""]
        eager = comparison.configs[0]
        head = (f"| tool | setting | {peak_name} | of eager's | " + ("max reserved | " if cuda else "")
                + "step s [min–max] | vs eager | gradients vs eager | planner's plan |")
        lines += [head, "|" + "---|" * (head.count("|") - 1)]
        for config in sorted(comparison.configs, key=lambda c: c.name == "planner"):  # tools, then the planner
            if config.failure and config.peak_bytes is None:
                lines.append(f"| {config.name} | {config.setting} | {config.failure} |" + " |" * (head.count("|") - 4))
                continue
            share = f"{config.peak_bytes / eager.peak_bytes:.1%}" if eager.peak_bytes else "—"
            ratio = "—"
            if config.timing and eager.timing:
                median, low, high = paired_ratio(config.timing, eager.timing)
                ratio = f"{median:+.1%} [{low:+.1%}, {high:+.1%}]"
            plan = (f"`{config.algorithm}`, predicted {format_bytes(config.predicted_peak)}, {config.predicted_overhead:+.1%}"
                    if config.algorithm else "")
            cells = [config.name, config.setting, format_bytes(config.peak_bytes), share]
            if cuda:
                cells.append(format_bytes(config.reserved_bytes) if config.reserved_bytes else "—")
            cells += [config.timing.cell() if config.timing else "—", ratio,
                      difference_cell(config.gradient_difference), plan]
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", "The planner at each tool's measured peak: its step time against the tool's (per round, median "
                  "[min, max]); faster is negative.", ""]
        lines += ["| tool | tool's peak | planner's peak | planner vs tool | verdict |", "|---|---|---|---|---|"]
        for config in comparison.configs:
            if config.versus is None or config.name != "planner":
                continue
            tool = next(c for c in comparison.configs if f"{c.name} {c.setting}".rstrip() == config.versus)
            if config.timing is None or tool.timing is None:
                lines.append(f"| {config.versus} | {format_bytes(tool.peak_bytes)} | {config.failure or '—'} | — | — |")
                continue
            median, low, high = paired_ratio(config.timing, tool.timing)
            verdict = "faster" if high < 0 else "slower" if low > 0 else "within noise"
            lines.append(f"| {config.versus} | {format_bytes(tool.peak_bytes)} | {format_bytes(config.peak_bytes)} | "
                         f"{median:+.1%} [{low:+.1%}, {high:+.1%}] | {verdict} |")
        lines.append("")
    return "\n".join(lines)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = common_arguments(__doc__.split("\n\n")[0], list(BUILDERS), rounds=5)
    parser.add_argument("--compile-budgets", nargs="*", type=float, default=list(COMPILE_BUDGETS))
    return parsed(parser, argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv if argv is None else argv)
    args = parse_args(argv[1:])
    began = time.perf_counter()
    comparisons = []
    for name in args.models:
        try:
            bench = build(name, args.size, args.device)
        except LookupError as error:
            print(f"{name}: skipped ({error})", file=sys.stderr)
            continue
        comparisons.append(compare(bench, args.device, args.rounds, args.compile_budgets))
        print(f"{name}: done at {time.perf_counter() - began:.0f} s", file=sys.stderr, flush=True)
    if args.json:
        args.json.write_text(json.dumps([c.to_json() for c in comparisons], indent=1))
    body = "\n\n".join(["```\n" + command_line(argv) + "\n```",
                        environment_line() + f" {torch.get_num_threads()} intra-op thread(s). Whole run: "
                        f"{time.perf_counter() - began:.0f} s; {args.rounds} "
                        "interleaved rounds after one warm-up.", markdown(comparisons)])
    publish(SECTION_HEADING, body, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
