"""Capture benchmark: how long ``planner.capture`` takes on common models, and what it finds.

Why: capture is the first step of every plan, so its wall time is paid on every run (issue 2 sets a
target of at most 3 s for ResNet-50 at batch 32 on the project's 2-core CPU machine). The same pass
also records each graph's size (forward, backward and total ATen ops) and the store-all reference
peak from the simulator, so changes to capture or to the memory model show up as changed numbers.

Every model is built with random weights (no downloads) in train mode, captured, measured and
deleted before the next one is built. Capture itself uses fake tensors, but the example batch is a
real tensor (32 x 3 x 224 x 224 floats is about 18 MiB).

Run from the repository root::

    python benchmarks/capture_models.py                      # all models, one capture each
    python benchmarks/capture_models.py --repeats 3          # best of 3 captures per model
    python benchmarks/capture_models.py --models resnet50 vgg16 --batch-size 16
    python benchmarks/capture_models.py --repeats 2 --markdown docs/benchmarks.md

``--markdown PATH`` replaces the "## Capture (issue 2)" section of PATH (creating the file or the
section if needed) and leaves every other section alone, so other benchmarks can share the file.
"""
from __future__ import annotations

import argparse
import gc
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torchvision

import planner
from report import command_line, environment_line, publish

SECTION_HEADING = "## Capture (issue 2)"
RESNET50_TARGET_SECONDS = 3.0


@dataclass(frozen=True)
class ModelSpec:
    """A benchmark model: how to build it and the shape of one example batch."""

    name: str
    build: Callable[[], torch.nn.Module]
    sample_shape: tuple[int, ...]  # one example, without the batch dimension


def _transformer_encoder() -> torch.nn.Module:
    layer = torch.nn.TransformerEncoderLayer(
        d_model=512, nhead=8, dim_feedforward=2048, dropout=0.1, batch_first=True)
    return torch.nn.TransformerEncoder(layer, num_layers=6, enable_nested_tensor=False)


MODELS: dict[str, ModelSpec] = {spec.name: spec for spec in (
    ModelSpec("resnet18", lambda: torchvision.models.resnet18(weights=None), (3, 224, 224)),
    ModelSpec("resnet50", lambda: torchvision.models.resnet50(weights=None), (3, 224, 224)),
    ModelSpec("vgg16", lambda: torchvision.models.vgg16(weights=None), (3, 224, 224)),
    ModelSpec("mobilenet_v2", lambda: torchvision.models.mobilenet_v2(weights=None), (3, 224, 224)),
    ModelSpec("densenet121", lambda: torchvision.models.densenet121(weights=None), (3, 224, 224)),
    ModelSpec("googlenet", lambda: torchvision.models.googlenet(
        weights=None, aux_logits=False, init_weights=False), (3, 224, 224)),
    ModelSpec("inception_v3", lambda: torchvision.models.inception_v3(
        weights=None, aux_logits=False, init_weights=False), (3, 299, 299)),
    ModelSpec("transformer_encoder", _transformer_encoder, (128, 512)),
)}


@dataclass(frozen=True)
class CaptureRow:
    """One model's capture measurements; the numeric fields are None when capture failed."""

    model: str
    input_shape: tuple[int, ...]
    capture_seconds: tuple[float, ...] = ()  # every timed capture, in run order
    forward_ops: int | None = None
    backward_ops: int | None = None
    total_ops: int | None = None  # len(graph.ops): fx-level ATen ops, views included
    resident_bytes: int | None = None  # parameters, buffers, .grad accumulators, inputs
    peak_bytes: int | None = None  # store-all simulated peak
    peak_activation_bytes: int | None = None  # store-all peak minus resident
    error: str | None = None

    @property
    def best_seconds(self) -> float | None:
        return min(self.capture_seconds) if self.capture_seconds else None


def time_captures(model: torch.nn.Module, batch: torch.Tensor, repeats: int) -> tuple[list[float], planner.TrainingGraph]:
    """Capture ``repeats`` times; return each wall time and the last graph."""
    seconds: list[float] = []
    graph = None
    for _ in range(repeats):
        graph = None  # drop the previous graph before timing the next capture
        start = time.perf_counter()
        graph = planner.capture(model, batch)
        seconds.append(time.perf_counter() - start)
    assert graph is not None
    return seconds, graph


def measure(spec: ModelSpec, batch_size: int, repeats: int) -> CaptureRow:
    """Build, capture and simulate one model; a failure becomes a row with its error."""
    shape = (batch_size, *spec.sample_shape)
    torch.manual_seed(0)
    model = spec.build().train()
    batch = torch.randn(shape)
    try:
        seconds, graph = time_captures(model, batch, repeats)
        result = planner.simulate(graph, planner.Schedule.store_all(graph))
        return CaptureRow(
            model=spec.name, input_shape=shape, capture_seconds=tuple(seconds),
            forward_ops=len(graph.forward_ops), backward_ops=len(graph.backward_ops),
            total_ops=len(graph.ops), resident_bytes=graph.resident_bytes,
            peak_bytes=result.peak_bytes, peak_activation_bytes=result.peak_activation_bytes,
        )
    except Exception as error:  # keep benchmarking the other models; the table shows the error
        return CaptureRow(model=spec.name, input_shape=shape, error=f"{type(error).__name__}: {error}")
    finally:
        del model, batch
        gc.collect()


# ---- reporting ----------------------------------------------------------------------------------
TABLE_HEADER = ("model", "input shape", "forward ops", "backward ops", "total ops", "capture seconds",
                "resident (params+buffers+grads+inputs)", "store-all peak", "store-all activation peak")


def _cell(value: int | None, fmt: Callable[[int], str] = str) -> str:
    return "—" if value is None else fmt(value)


def table_cells(row: CaptureRow) -> list[str]:
    shape = "×".join(map(str, row.input_shape))
    if row.error is not None:
        message = row.error.splitlines()[0].replace("|", "\\|")[:200]
        return [row.model, shape, f"failed: {message}"] + [""] * (len(TABLE_HEADER) - 3)
    return [
        row.model, shape, _cell(row.forward_ops), _cell(row.backward_ops), _cell(row.total_ops),
        f"{row.best_seconds:.2f}", _cell(row.resident_bytes, planner.format_bytes),
        _cell(row.peak_bytes, planner.format_bytes), _cell(row.peak_activation_bytes, planner.format_bytes),
    ]


def markdown_table(rows: Sequence[CaptureRow]) -> str:
    lines = ["| " + " | ".join(TABLE_HEADER) + " |",
             "|" + "|".join(["---"] * 2 + ["---:"] * (len(TABLE_HEADER) - 2)) + "|"]
    lines += ["| " + " | ".join(table_cells(row)) + " |" for row in rows]
    return "\n".join(lines)


def resnet50_verdict(rows: Sequence[CaptureRow]) -> str | None:
    """One sentence on the ResNet-50 capture target, if ResNet-50 was benchmarked."""
    row = next((r for r in rows if r.model == "resnet50"), None)
    if row is None:
        return None
    if row.error is not None:
        return f"ResNet-50 capture failed, so the ≤ {RESNET50_TARGET_SECONDS:g} s target was not met."
    runs = ", ".join(f"{s:.2f}" for s in row.capture_seconds)
    met = "met" if row.best_seconds <= RESNET50_TARGET_SECONDS else "missed"
    return (f"ResNet-50 capture took {row.best_seconds:.2f} s (best of {len(row.capture_seconds)}; "
            f"runs: {runs} s): the ≤ {RESNET50_TARGET_SECONDS:g} s target is {met}.")


def section_body(rows: Sequence[CaptureRow], argv: Sequence[str], repeats: int) -> str:
    environment = environment_line()
    notes = (f"Capture seconds: `time.perf_counter()` around `planner.capture` only, best of {repeats} "
             "(models captured in table order in one process, so the first model's first capture also pays "
             "one-off import and cache costs). Peaks: `planner.simulate(graph, planner.Schedule.store_all(graph))` with the "
             "default cost model; the activation peak is the peak minus the resident bytes. Ops are "
             "fx-level ATen ops (views included); total = forward + backward.")
    parts = ["```\n" + command_line(argv) + "\n```", environment, notes, markdown_table(rows)]
    verdict = resnet50_verdict(rows)
    if verdict:
        parts.append(verdict)
    return "\n\n".join(parts) + "\n"


# ---- command line -------------------------------------------------------------------------------
def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS), metavar="MODEL",
                        help=f"models to capture, in order (default: all): {', '.join(MODELS)}")
    parser.add_argument("--batch-size", type=int, default=32, help="examples per batch (default: 32)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="captures per model; the table reports the fastest (default: 1)")
    parser.add_argument("--markdown", type=Path, metavar="PATH",
                        help=f"also write the table into the '{SECTION_HEADING}' section of PATH")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.repeats < 1:
        parser.error("--batch-size and --repeats must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv if argv is None else argv)
    args = parse_args(argv[1:])
    rows = []
    for name in args.models:
        print(f"capturing {name} ...", file=sys.stderr, flush=True)
        row = measure(MODELS[name], args.batch_size, args.repeats)
        status = row.error or f"best {row.best_seconds:.2f} s of {', '.join(f'{s:.2f}' for s in row.capture_seconds)}"
        print(f"  {name}: {status}", file=sys.stderr, flush=True)
        rows.append(row)
    body = section_body(rows, argv, args.repeats)
    publish(SECTION_HEADING, body, args.markdown)
    return 1 if any(row.error for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
