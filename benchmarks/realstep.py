"""Measuring real training steps on a device, for the benchmarks that compare measurements
(``cost_fidelity.py``, ``versus.py``, ``gpu_check.py``); the device is a parameter everywhere, so
the CPU runs exercise the code the GPU runs.

- ``interleaved``: every configuration's step timed round by round (A B C A B C ...), so a noisy
  machine slows all of them alike; medians, spreads and per-round ratios come from the rounds.
- ``measure_peak``: the step's peak. CPU: ``planner.measure_step``'s meter (live tensor storages).
  CUDA: the same meter on one step, and the caching allocator's ``max_memory_allocated`` and
  ``max_memory_reserved`` on another, after ``empty_cache``, each as resident bytes plus what the
  step added on top of what was allocated (reserved) before it, so other models on the device do
  not count.
- ``gradients`` / ``difference``: one step from zeroed ``.grad``; the largest absolute difference
  relative to the largest reference gradient (0.0: bitwise equal).
"""
from __future__ import annotations

import argparse
import gc
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

import planner
from planner.measure import steady_state_tensors


def common_arguments(description: str, models: Sequence[str], rounds: int) -> argparse.ArgumentParser:
    """The options every measured benchmark takes: models, size, rounds, device, threads, outputs."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--models", nargs="+", default=list(models))
    parser.add_argument("--size", default="cpu", choices=["small", "cpu", "gpu", "deep"])
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="intra-op threads (torch.set_num_threads); on a shared machine 1 is far steadier")
    parser.add_argument("--markdown", type=Path, metavar="PATH")
    parser.add_argument("--json", type=Path, metavar="PATH")
    return parser


def parsed(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """Parse, and apply ``--threads``."""
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


@dataclass(frozen=True)
class Timing:
    """Seconds of one configuration's steps, one sample per round."""

    samples: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def spread(self) -> float:
        """(max - min) / median: this configuration's noise band."""
        return (max(self.samples) - min(self.samples)) / self.median

    def cell(self) -> str:
        return f"{self.median:.3f} [{min(self.samples):.3f}–{max(self.samples):.3f}]"

    def to_json(self) -> dict:
        return {"median": self.median, "min": min(self.samples), "max": max(self.samples), "samples": list(self.samples)}


def paired_ratio(timing: Timing, reference: Timing) -> tuple[float, float, float]:
    """Median, min and max over rounds of ``timing / reference - 1`` (same-round pairs)."""
    ratios = [a / b - 1.0 for a, b in zip(timing.samples, reference.samples)]
    return statistics.median(ratios), min(ratios), max(ratios)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved(steps: dict[str, Callable[[], object]], rounds: int, device: str, warmup: int = 1,
                deadline: float | None = None) -> dict[str, Timing]:
    """Time every step once per round, ``rounds`` rounds after ``warmup`` untimed ones. CUDA:
    CUDA events around each step, after a synchronize. Rounds stop early (at least one kept) once
    ``time.monotonic()`` passes ``deadline``."""
    cuda = device.startswith("cuda")
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for index in range(warmup + rounds):
        for name, step in steps.items():
            synchronize(device)
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                step()
                end.record()
                end.synchronize()
                seconds = start.elapsed_time(end) / 1e3
            else:
                began = time.perf_counter()
                step()
                seconds = time.perf_counter() - began
            if index >= warmup:
                samples[name].append(seconds)
        if deadline is not None and index >= warmup and time.monotonic() > deadline:
            break
    return {name: Timing(tuple(values)) for name, values in samples.items()}


@dataclass(frozen=True)
class Peak:
    """A step's peak memory, resident bytes (parameters, buffers, ``.grad``, batch) included."""

    meter_bytes: int  # live tensor storages (planner.MemoryMeter): what the simulator predicts
    resident_bytes: int
    allocated_bytes: int | None = None  # CUDA: torch.cuda.max_memory_allocated
    reserved_bytes: int | None = None  # CUDA: torch.cuda.max_memory_reserved

    def to_json(self) -> dict:
        return to_json(self)


def measure_peak(model: torch.nn.Module, step: Callable[[], object], held: Sequence[torch.Tensor], device: str,
                 meter: bool = True) -> Peak:
    """The peak of one ``step()`` in steady state (see the module docstring). ``meter=False``
    skips the meter (code the meter cannot see into, such as compiled graphs: ``versus.py``
    measures those itself); ``meter_bytes`` is then the allocator's figure on CUDA, else 0."""
    measured = planner.measure_step(model, step, held) if meter else None
    resident = measured.resident_bytes if measured else _resident_bytes(model, held)
    if not device.startswith("cuda"):
        return Peak(measured.peak_bytes if measured else 0, resident)
    steady_state_tensors(model, held)
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    allocated, reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    allocated_peak = resident + torch.cuda.max_memory_allocated() - allocated
    reserved_peak = resident + torch.cuda.max_memory_reserved() - reserved
    return Peak(measured.peak_bytes if measured else allocated_peak, resident, allocated_peak, reserved_peak)


def _resident_bytes(model: torch.nn.Module, held: Sequence[torch.Tensor]) -> int:
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in steady_state_tensors(model, held)}
    return sum(storages.values())


def gradients(model: torch.nn.Module, step: Callable[[], object]) -> list[torch.Tensor]:
    """``.grad`` of every parameter after one ``step()`` from zeroed gradients (copies, on CPU)."""
    for p in model.parameters():
        if p.grad is not None:
            p.grad.zero_()
    step()
    return [p.grad.detach().cpu().clone() if p.grad is not None else torch.zeros(p.shape) for p in model.parameters()]


def difference(grads: Sequence[torch.Tensor], reference: Sequence[torch.Tensor]) -> float:
    """max |g - r| over every element, relative to max |r| (0.0 exactly when bitwise equal)."""
    if all(torch.equal(g, r) for g, r in zip(grads, reference)):
        return 0.0
    scale = max(float(r.abs().max()) for r in reference if r.numel()) or 1.0
    return max(float((g.double() - r.double()).abs().max()) for g, r in zip(grads, reference) if r.numel()) / scale


def to_json(record, skip: Sequence[str] = ()) -> dict:
    """A result dataclass as JSON-ready values: nested results through their own ``to_json``,
    lists element by element; fields in ``skip`` (callables, models, plans) left out."""
    def value(v):
        if hasattr(v, "to_json"):
            return v.to_json()
        return [value(item) for item in v] if isinstance(v, (list, tuple)) else v

    return {name: value(v) for name, v in record.__dict__.items() if name not in skip}


def difference_cell(value: float | None) -> str:
    if value is None:
        return "—"
    return "bitwise" if value == 0.0 else f"{value:.1e}"
