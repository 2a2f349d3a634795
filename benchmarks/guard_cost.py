"""Guard cost (issue 13): what checking a planned module's state costs on every call.

Why: a planned module checks, at every call, that the model and the call are in the state its
plan was made for (``planner.guards``: modes, module types and attributes, parameters and buffers
by name, autocast, the inputs). The target is under 1% of a CPU training step. This times the
check alone (``step_key`` plus the plan-cache lookup, the work ``PlannedModule.forward`` does
before running the plan), and, for scale, an eager step and the planned step at the store-all
budget (same work as eager, plus the executor, the guard and the chain of backward nodes),
interleaved (eager, planned, eager, ...) and reported as medians.

Run from the repository root::

    python benchmarks/guard_cost.py
    python benchmarks/guard_cost.py --repeats 7 --markdown docs/benchmarks.md
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
import torchvision

import planner
from planner.calls import split_call
from planner.guards import step_key
from report import command_line, environment_line, publish
from step_time import _time_steps  # one warm-up call, then the median of timed calls

SECTION_HEADING = "## Guard cost (issue 13)"
TARGET = 0.01  # of a CPU step


@dataclass(frozen=True)
class Workload:
    name: str
    model: torch.nn.Module
    inputs: object  # as plan() takes them: a tensor, or a dict of keyword arguments
    loss_fn: Callable[..., torch.Tensor]
    targets: tuple = ()


def resnet50(batch: int) -> Workload:
    torch.manual_seed(0)
    x, y = torch.randn(batch, 3, 128, 128), torch.randint(0, 1000, (batch,))
    return Workload(f"ResNet-50, batch {batch}, 128x128", torchvision.models.resnet50().train(), x,
                    F.cross_entropy, (y,))


def gpt2(batch: int) -> Workload:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=12, use_cache=False)  # GPT-2 small: 12 layers, width 768
    ids = torch.randint(0, config.vocab_size, (batch, 128))
    return Workload(f"GPT-2 (12 layers, width 768), batch {batch}, sequence 128",
                    transformers.GPT2LMHeadModel(config).train(), {"input_ids": ids, "labels": ids},
                    lambda out: out.loss)


@dataclass(frozen=True)
class Row:
    name: str
    modules: int
    parameters: int
    guard: float  # seconds, median
    eager: float
    planned: float


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(work: Workload, repeats: int, guard_repeats: int) -> Row:
    model = work.model
    reference = copy.deepcopy(model)
    args, kwargs = ((), work.inputs) if isinstance(work.inputs, dict) else ((work.inputs,), {})
    planned = planner.plan(model, "100%", work.inputs, loss_fn=work.loss_fn, targets=work.targets).apply(model)

    def guard() -> None:
        form, tensors = split_call(args, kwargs)
        key, _ = step_key(model, form, tensors, "cpu")
        assert planned.cache.step_for(key, args, kwargs) is not None

    def eager_step() -> None:
        work.loss_fn(reference(*args, **kwargs), *work.targets).backward()

    def planned_step() -> None:
        work.loss_fn(planned(*args, **kwargs), *work.targets).backward()

    eager_step(), planned_step()  # warm-up
    guard_time = _time_steps(guard, guard_repeats)
    eager, planned_times = [], []
    for _ in range(repeats):  # interleaved: the machine is shared, its load drifts
        eager.append(_seconds(eager_step))
        planned_times.append(_seconds(planned_step))
    return Row(work.name, len(list(model.modules())), len(list(model.parameters())), guard_time,
               statistics.median(eager), statistics.median(planned_times))


def render(rows: list[Row], argv: list[str], repeats: int, guard_repeats: int) -> str:
    lines = [
        environment_line() + " The machine was shared with other jobs: step times are medians of interleaved runs "
        "and may be rerun on a quiet machine.",
        "",
        f"Reproduce: `{command_line(argv)}`",
        "",
        f"{torch.get_num_threads()} intra-op thread(s). "
        f"The guard: computing the state key and finding its plan (median of {guard_repeats} calls). Steps: "
        f"forward, loss and backward, `.grad` accumulated (median of {repeats}, interleaved eager / planned); "
        "the planned step runs the store-all plan (eager's work, through the executor).",
        "",
        "| model | modules | parameters | guard per call | eager step | guard / eager step | planned step (store-all) | planned / eager |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r.name} | {r.modules} | {r.parameters} | {r.guard * 1e6:.0f} µs | {r.eager:.3f} s | "
                     f"{r.guard / r.eager:.3%} | {r.planned:.3f} s | {r.planned / r.eager:.3f} |")
    worst = max(r.guard / r.eager for r in rows)
    lines += ["", f"Target: the guard under {TARGET:.0%} of a CPU step; largest measured {worst:.3%} "
              f"({'met' if worst < TARGET else 'NOT met'})."]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per model and side (default 5)")
    parser.add_argument("--guard-repeats", type=int, default=300, help="timed guard checks (default 300)")
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads (default 1: on a shared machine more threads wait at barriers)")
    parser.add_argument("--markdown", type=Path, help="write the section into this file (docs/benchmarks.md)")
    args = parser.parse_args(argv[1:])
    torch.set_num_threads(args.threads)
    rows = [measure(work, args.repeats, args.guard_repeats) for work in (resnet50(16), gpt2(4))]
    publish(SECTION_HEADING, render(rows, argv, args.repeats, args.guard_repeats), args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
