"""Reordering alone: how much lower the store-all peak gets with the same computations reordered.

Why: issue 4 asks what greedy operator reordering saves before any recomputation (MODeL reports
about 15% on AlexNet). Each model is captured (fake tensors), its store-all schedule simulated,
then ``planner.algorithms.reorder_schedule`` applied and simulated again.

Run from the repository root::

    python benchmarks/reorder_savings.py --markdown docs/benchmarks.md
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
import torchvision

import planner
from planner.algorithms import reorder_schedule
from report import command_line, environment_line, publish

SECTION_HEADING = "## Reordering alone (issue 4)"


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], torch.nn.Module]
    inputs: Callable[[int], tuple[torch.Tensor, ...]]
    vision: bool = True


def _transformer() -> torch.nn.Module:
    layer = torch.nn.TransformerEncoderLayer(512, 8, 2048, dropout=0.1, batch_first=True)
    return torch.nn.TransformerEncoder(layer, 6, enable_nested_tensor=False)


def _images(size: int) -> Callable[[int], tuple[torch.Tensor, ...]]:
    return lambda batch: (torch.randn(batch, 3, size, size),)


CASES = {
    "alexnet": Case("alexnet", torchvision.models.alexnet, _images(224)),
    "vgg16": Case("vgg16", torchvision.models.vgg16, _images(224)),
    "resnet50": Case("resnet50", torchvision.models.resnet50, _images(224)),
    "mobilenet_v2": Case("mobilenet_v2", torchvision.models.mobilenet_v2, _images(224)),
    "densenet121": Case("densenet121", torchvision.models.densenet121, _images(224)),
    "transformer": Case("transformer", _transformer, lambda batch: (torch.randn(batch, 128, 512),), vision=False),
}


@dataclass(frozen=True)
class Row:
    name: str
    batch: int
    store_all_peak: int
    reordered_peak: int
    activation_peak: int
    seconds: float


def measure(case: Case, batch: int) -> Row:
    torch.manual_seed(0)
    model = case.build().train()
    inputs = case.inputs(batch)
    if case.vision:
        graph = planner.capture(model, inputs, F.cross_entropy, targets=torch.randint(0, 1000, (batch,)))
    else:
        graph = planner.capture(model, inputs)
    store_all = planner.simulate(graph, planner.Schedule.store_all(graph))
    start = time.perf_counter()
    reordered = reorder_schedule(graph, planner.Schedule.store_all(graph))
    seconds = time.perf_counter() - start
    return Row(case.name, batch, store_all.peak_bytes, planner.simulate(graph, reordered).peak_bytes,
               store_all.peak_activation_bytes, seconds)


def section_body(rows: Sequence[Row], argv: Sequence[str]) -> str:
    lines = ["| model | batch | store-all peak | reordered peak | saving (of total) | saving (of activations) | reorder seconds |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        saved = r.store_all_peak - r.reordered_peak
        lines.append(f"| {r.name} | {r.batch} | {planner.format_bytes(r.store_all_peak)} | "
                     f"{planner.format_bytes(r.reordered_peak)} | {saved / r.store_all_peak:.1%} | "
                     f"{saved / r.activation_peak:.1%} | {r.seconds:.3f} |")
    notes = ("Same computations, no recomputation: the store-all schedule reordered by greedy list "
             "scheduling (`planner.algorithms.reorder_schedule`), peaks from `planner.simulate`. CNNs "
             "use cross-entropy on random labels, 224x224 images; the transformer is 6 layers, d_model "
             "512, sequence 128, sum loss. Total includes parameters, `.grad`, buffers and the batch.")
    return "\n\n".join(["```\n" + command_line(argv) + "\n```", environment_line(), notes, "\n".join(lines)]) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--markdown", type=Path, metavar="PATH")
    args = parser.parse_args(argv[1:])
    rows = []
    for name in args.models:
        rows.append(measure(CASES[name], args.batch_size))
        print(f"  {name}: {rows[-1]}", file=sys.stderr, flush=True)
    body = section_body(rows, argv)
    publish(SECTION_HEADING, body, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
