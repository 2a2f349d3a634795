"""Cost models: how long each op takes and how much scratch memory it needs.

Algorithms receive a cost model object; nothing reads globals. ``RooflineCostModel`` estimates
time from FLOPs and bytes moved against a device preset (for planning on one machine for
another, or on meta tensors). This module is torch-free, part of the core with the graph, the
schedule and the simulator; ``planner.profiled_cost`` measures ops for real (``ProfiledCostModel``)
and chooses between the two (``choose_cost_model``).

Workspace: the roofline presets model only what ops declare (``OpInfo.workspace_bytes``: the
low-memory variants' transient masks and indices). On CUDA the profiled model also measures the
scratch kernels allocate (convolution and matmul workspace). On CPU, convolution kernels allocate
scratch inside the kernel that no tensor-level meter sees (a 512-channel 3x3 conv backward: ~9 MiB
extra); neither model counts it there (docs/architecture.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from planner.graph import TrainingGraph


def _is_half(dtype) -> bool:
    """float16 and bfloat16, the dtypes tensor cores run at ``half_flops`` (a torch.dtype, compared
    by its properties: the core does not import torch)."""
    return dtype.is_floating_point and dtype.itemsize == 2


class CostModel(Protocol):
    """What algorithms and the simulator need to know about time and scratch memory."""

    name: str
    # the device's sustained rates, for heuristics that judge an op by them rather than by its
    # time (``recompute_cheap``: is an op compute- or memory-bound); the simulator does not read it
    rates: "DeviceSpec"

    def op_times(self, graph: TrainingGraph) -> np.ndarray:
        """Seconds per op, indexed by op id."""

    def workspace_bytes(self, graph: TrainingGraph) -> np.ndarray:
        """Transient scratch bytes per op, allocated while the op runs."""


@dataclass(frozen=True)
class DeviceSpec:
    """Sustained (not marketing-peak) rates of a device."""

    name: str
    fp32_flops: float  # FLOP/s
    half_flops: float  # FLOP/s for fp16/bf16 (tensor cores where present)
    bandwidth: float  # bytes/s
    launch_overhead: float  # seconds per non-view op


# Datasheet peaks scaled to what large kernels sustain (about 70% of compute, 80% of bandwidth);
# the cpu row is this project's 2-core CI machine (measured: ~60 GFLOP/s fp32 conv, ~8 GB/s).
DEVICE_PRESETS: dict[str, DeviceSpec] = {
    "cpu": DeviceSpec("cpu", 60e9, 30e9, 8e9, 5e-6),
    "v100": DeviceSpec("v100", 0.7 * 15.7e12, 0.7 * 125e12, 0.8 * 900e9, 5e-6),
    "a100": DeviceSpec("a100", 0.7 * 19.5e12, 0.7 * 312e12, 0.8 * 2039e9, 4e-6),
    "h100": DeviceSpec("h100", 0.7 * 67e12, 0.7 * 989e12, 0.8 * 3350e9, 3e-6),
}


class RooflineCostModel:
    """time = max(FLOPs / compute rate, bytes / bandwidth) + launch overhead; views are free.

    Bytes are those read and written, plus a declared workspace (variant ops) written and read once.

    Complexity: O(ops) once per graph, then cached.
    """

    def __init__(self, preset: str | DeviceSpec = "cpu"):
        if isinstance(preset, str):
            if preset not in DEVICE_PRESETS:
                raise ValueError(f"unknown device preset {preset!r}: choose one of {sorted(DEVICE_PRESETS)}")
            preset = DEVICE_PRESETS[preset]
        self.rates = preset
        self.name = f"roofline:{preset.name}"
        self._times: dict[str, np.ndarray] = {}

    def op_times(self, graph: TrainingGraph) -> np.ndarray:
        if graph.fingerprint not in self._times:
            spec = self.rates
            times = np.zeros(len(graph.ops))
            for op in graph.ops:
                if op.is_view:
                    continue
                half = any(_is_half(graph.tensors[t].dtype) for t in op.inputs)
                rate = spec.half_flops if half else spec.fp32_flops
                traffic = op.bytes_read + op.bytes_written + 2 * op.workspace_bytes  # scratch: written, read back
                times[op.id] = max(op.flops / rate, traffic / spec.bandwidth) + spec.launch_overhead
            self._times[graph.fingerprint] = times
        return self._times[graph.fingerprint]

    def workspace_bytes(self, graph: TrainingGraph) -> np.ndarray:
        """The workspace ops declare (variant ops); zero for ATen ops."""
        return np.fromiter((op.workspace_bytes for op in graph.ops), dtype=np.int64, count=len(graph.ops))


def device_preset(device: str) -> str:
    """The preset standing for a device type: ``cpu``, else ``a100``."""
    return "cpu" if device.startswith("cpu") else "a100"


def default_cost_model(graph: TrainingGraph) -> CostModel:
    """The roofline preset matching the graph's device type (``device_preset``)."""
    return RooflineCostModel(device_preset(graph.device))


#: the CUDA caching allocator hands out blocks in multiples of this many bytes
CUDA_BLOCK_BYTES = 512


def describe(cost_model_name: str) -> str:
    """One line for a plan's table: which cost model priced the schedule, and what that means."""
    if cost_model_name.startswith("profiled:"):
        return f"{cost_model_name} (op times measured in a running step on this machine)"
    if cost_model_name.startswith("roofline:"):
        return f"{cost_model_name} (estimated from FLOPs and bytes; not measured)"
    return cost_model_name


def preset_name(cost_model: "CostModel | str | None") -> str | None:
    """The roofline preset a cost model (or its name, or a preset name) stands for; None for a
    profiled or custom one, which a plan file cannot rebuild."""
    name = cost_model if isinstance(cost_model, str) else getattr(cost_model, "name", "")
    preset = name.removeprefix("roofline:")
    return preset if preset in DEVICE_PRESETS else None


def recomputable(cost_model_name: str) -> tuple[CostModel | None, bool]:
    """How a saved plan's predictions can be checked without measuring again: a cost model that
    reproduces its peak, and whether it reproduces its time too. A roofline preset reproduces
    both; a CPU profile the peak (its workspace is what ops declare, as the roofline's); a CUDA
    profile or a custom model neither."""
    preset = cost_model_name.removeprefix("roofline:")
    if cost_model_name.startswith("roofline:") and preset in DEVICE_PRESETS:
        return RooflineCostModel(preset), True
    if cost_model_name.startswith("profiled:cpu"):
        return RooflineCostModel("cpu"), False
    return None, False
