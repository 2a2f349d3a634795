"""Cost models: how long each op takes and how much scratch memory it needs.

Algorithms receive a cost model object; nothing reads globals. ``RooflineCostModel`` estimates
time from FLOPs and bytes moved against a device preset; ``ProfiledCostModel`` times every op on
the real device with real tensors and caches the result by op signature, so repeated blocks and
repeated runs are timed once.

Workspace: the roofline presets model only what ops declare (``OpInfo.workspace_bytes``: the
low-memory variants' transient masks and indices). On CPU, convolution kernels allocate scratch memory
inside the kernel that no tensor-level meter sees (a 512-channel 3x3 conv backward: ~9 MiB extra);
the profiled model measures it with ``torch.profiler`` and reports it per op.
"""
from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import torch

from planner.graph import TrainingGraph
from planner.quiet import silenced

_HALF_DTYPES = {"torch.float16", "torch.bfloat16"}


class CostModel(Protocol):
    """What algorithms and the simulator need to know about time and scratch memory."""

    name: str

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
PRESETS: dict[str, DeviceSpec] = {
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
            if preset not in PRESETS:
                raise ValueError(f"unknown device preset {preset!r}: choose one of {sorted(PRESETS)}")
            preset = PRESETS[preset]
        self.spec = preset
        self.name = f"roofline:{preset.name}"
        self._times: dict[str, np.ndarray] = {}

    def op_times(self, graph: TrainingGraph) -> np.ndarray:
        if graph.fingerprint not in self._times:
            spec = self.spec
            times = np.zeros(len(graph.ops))
            for op in graph.ops:
                if op.is_view:
                    continue
                half = any(graph.tensors[t].dtype in _HALF_DTYPES for t in op.inputs)
                rate = spec.half_flops if half else spec.fp32_flops
                traffic = op.bytes_read + op.bytes_written + 2 * op.workspace_bytes  # scratch: written, read back
                times[op.id] = max(op.flops / rate, traffic / spec.bandwidth) + spec.launch_overhead
            self._times[graph.fingerprint] = times
        return self._times[graph.fingerprint]

    def workspace_bytes(self, graph: TrainingGraph) -> np.ndarray:
        """The workspace ops declare (variant ops); zero for ATen ops."""
        return np.fromiter((op.workspace_bytes for op in graph.ops), dtype=np.int64, count=len(graph.ops))


def default_cost_model(graph: TrainingGraph) -> CostModel:
    """The roofline preset matching the graph's device type (``cpu``, else ``a100``)."""
    return RooflineCostModel("cpu" if graph.device.startswith("cpu") else "a100")


class ProfiledCostModel:
    """Times every op on the device it will run on, with real tensors, and caches by signature.

    ``ProfiledCostModel.profile(graph, model, inputs, targets)`` runs the step once op by op in
    graph order (store-all memory, as eager), timing each distinct op signature ``repeats`` times
    (median) and recording in-kernel workspace on CPU through ``torch.profiler``. The cache file
    (``cache_path``, default ``~/.cache/remat-planner/profile-<device>.json``) is reused across
    graphs and runs. Complexity: one run of the step plus ``repeats`` runs per distinct signature.
    """

    def __init__(self, times: dict[str, np.ndarray], workspace: dict[str, np.ndarray], device: str):
        self.name = f"profiled:{device}"
        self._times = times
        self._workspace = workspace

    def op_times(self, graph: TrainingGraph) -> np.ndarray:
        return self._for_graph(self._times, graph)

    def workspace_bytes(self, graph: TrainingGraph) -> np.ndarray:
        return self._for_graph(self._workspace, graph)

    @staticmethod
    def _for_graph(table: dict[str, np.ndarray], graph: TrainingGraph) -> np.ndarray:
        if graph.fingerprint not in table:
            raise KeyError(f"graph {graph.fingerprint[:12]} was not profiled: call ProfiledCostModel.profile on it")
        return table[graph.fingerprint]

    @classmethod
    def profile(cls, graph: TrainingGraph, model: torch.nn.Module, inputs: Sequence[torch.Tensor] | torch.Tensor,
                targets: Sequence[torch.Tensor] | torch.Tensor = (), *, repeats: int = 3,
                cache_path: str | Path | None = None) -> "ProfiledCostModel":
        from planner.guards import model_state
        from planner.runtime import initial_env, run_call, signature

        device = graph.device
        path = Path(cache_path) if cache_path else _default_cache(device)
        cache: dict[str, list[float]] = json.loads(path.read_text()) if path.exists() else {}
        env = initial_env(graph, model_state(model)[3], inputs, targets)
        frees_after = _store_all_frees(graph)
        times = np.zeros(len(graph.ops))
        workspace = np.zeros(len(graph.ops), dtype=np.int64)
        with torch.no_grad():
            for op in graph.ops:
                call = graph.calls[op.id]
                key = signature(call, env)
                if key not in cache and not op.is_view:
                    cache[key] = _time_op(call, env, repeats, device) + [_workspace_of(call, env, device)]
                run_call(call, env)
                if not op.is_view:
                    times[op.id], workspace[op.id] = cache[key][0], cache[key][1]
                for tensor in frees_after[op.id]:
                    env[tensor] = None
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cache))
        return cls({graph.fingerprint: times}, {graph.fingerprint: workspace}, device)


def _default_cache(device: str) -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    return root / "remat-planner" / f"profile-{name.replace(' ', '_')}.json"


def _store_all_frees(graph: TrainingGraph) -> list[list[int]]:
    from planner.schedule import Compute, Free

    frees: list[list[int]] = [[] for _ in graph.ops]
    current = -1
    for step in graph.store_all().steps:
        if isinstance(step, Compute):
            current = step.op
        elif isinstance(step, Free):
            frees[current].append(step.tensor)
    return frees


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _time_op(call, env, repeats: int, device: str) -> list[float]:
    from planner.runtime import bind

    args, kwargs = bind(call.args, env), bind(call.kwargs, env)
    samples = []
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        call.target(*args, **kwargs)
        _synchronize(device)
        samples.append(time.perf_counter() - start)
    return [statistics.median(samples)]


def _workspace_of(call, env, device: str) -> int:
    """Scratch bytes the op allocates beyond its outputs (peak inside the kernel)."""
    from planner.runtime import bind

    args, kwargs = bind(call.args, env), bind(call.kwargs, env)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        result = call.target(*args, **kwargs)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        with silenced(2), torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            result = call.target(*args, **kwargs)
        peak = _profiler_peak(prof)
    outputs = result if isinstance(result, (tuple, list)) else (result,)
    output_bytes = sum(o.untyped_storage().nbytes() for o in outputs if isinstance(o, torch.Tensor))
    return max(0, int(peak) - output_bytes)


def _profiler_peak(prof) -> int:
    """Peak of the running sum of the profiler's allocation events (frees are negative)."""
    events = sorted((e.time_range.start, e.cpu_memory_usage) for e in prof.events() if e.name == "[memory]")
    running = peak = 0
    for _, delta in events:
        running += delta
        peak = max(peak, running)
    return peak
