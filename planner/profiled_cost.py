"""The measured cost model: op times (and CUDA workspace) timed where the step runs, inside a
running step, cached by op signature so repeated blocks and repeated plans are timed once; and
``choose_cost_model``, how ``plan()`` picks between it and the roofline (``planner.cost``).

It runs the step op by op as the executor does (``planner.runtime``), so it sits with the runtime,
above the torch-free core whose ``CostModel`` protocol it implements.
"""
from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from planner._torch import FakeTensor
from planner.algorithms import ALGORITHMS
from planner.calls import as_tuple
from planner.cost import CUDA_BLOCK_BYTES, DEVICE_PRESETS, CostModel, RooflineCostModel, default_cost_model, device_preset
from planner.graph import TrainingGraph
from planner.guards import model_state
from planner.runtime import initial_env, run_call, signature
from planner.schedule import Compute, Schedule
from planner.simulator import simulate


#: ``cost_model=`` name of the measured model (any other name is a roofline preset)
PROFILED = "profiled"
#: timed runs of the step per profile (after one untimed warm-up run); each op's time is the
#: median over these runs and over every op of the same signature
DEFAULT_RUNS = 3
#: op signature -> [seconds, workspace bytes], per device label; filled once per signature
_PROCESS_CACHE: dict[str, dict[str, list[float]]] = {}
#: (device label, graph fingerprint, tensor layouts) -> (times, workspace): a graph profiled
#: before in this process (same model and batch layout) is not run again
_GRAPH_CACHE: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}


def choose_cost_model(graph: TrainingGraph, requested: "CostModel | str | None", model: torch.nn.Module | None = None,
                      inputs=None, targets=None) -> CostModel:
    """The cost model ``plan()`` uses.

    A ``CostModel`` is used as given and a preset name (``"cpu"``, ``"h100"``, ...) gives its
    roofline. ``"profiled"`` measures op times on the model's device. By default a model whose
    parameters, buffers and batch are real tensors on a device that runs here (CPU or CUDA) is
    measured, since a roofline guess mispredicts real steps; a ``TrainingGraph`` given without its
    model, and meta or fake tensors (planning for another machine), get the roofline preset of the
    graph's device.
    """
    if isinstance(requested, str):
        if requested != PROFILED:
            return RooflineCostModel(requested)
        if model is None or not _runs_here(graph, model, inputs, targets):
            raise ValueError('cost_model="profiled" needs the model and its example batch as real tensors on a CPU '
                             "or CUDA device; pass a roofline preset (cost_model=\"h100\") to plan for another machine")
        return _profiled_now(graph, model, inputs, targets)
    if requested is not None:
        return requested
    if model is not None and _runs_here(graph, model, inputs, targets):
        return _profiled_now(graph, model, inputs, targets)
    return default_cost_model(graph)


def _profiled_now(graph: TrainingGraph, model: torch.nn.Module, inputs, targets) -> "ProfiledCostModel":
    """A profiled model with ``graph`` measured already: measuring belongs with capture, before
    exact mode's ``time_limit`` starts (a graph rewritten later is measured on first use)."""
    profiled = ProfiledCostModel.for_model(model, inputs, targets)
    profiled.op_times(graph)
    return profiled


def _runs_here(graph: TrainingGraph, model: torch.nn.Module, inputs, targets) -> bool:
    """Whether the step can run for real on this machine: real (not meta, not fake) tensors on a
    CPU or CUDA device, the graph's."""
    if torch.device(graph.device).type not in ("cpu", "cuda"):
        return False
    try:
        batch = as_tuple(inputs, "inputs") + as_tuple(targets, "targets")
    except TypeError:
        return False
    tensors = [*model.parameters(), *model.buffers(), *batch]
    return all(not isinstance(t, FakeTensor) and t.device == torch.device(graph.device) for t in tensors)


class ProfiledCostModel:
    """Op times measured on the device the step runs on, inside a running step.

    Isolated timings (one op run alone, repeatedly) miss what a real step pays: cold caches after
    the previous op, allocator traffic, the executor's per-op overhead. So the whole step is run op
    by op, ``runs`` times after a warm-up run, in the store-all order (or, when store-all would not
    fit in free memory, the least-memory schedule), and every op is timed where it runs: wall
    clock on CPU, CUDA events on a GPU (read after each run, so timing never stalls the stream).
    An op's time is the median over the runs and over every op with the same signature (op,
    input shapes, strides, dtypes, constants); signatures already measured in this process (or
    in ``cache_path``) are not timed again, and a graph profiled before in this process is not run
    again, so repeated blocks, repeated ``plan()`` calls and the graph with operator variants cost
    little.

    Workspace: on CUDA, the scratch an op allocates beyond its outputs (cuDNN and cuBLAS
    workspace) is read from ``torch.cuda.max_memory_allocated`` around the op, median over runs;
    on CPU only what ops declare (``OpInfo.workspace_bytes``), as the roofline, because the
    meter and the simulator count tensor memory there (docs/architecture.md).

    Bound to a model (``for_model``, ``profile``), it profiles on first use any further graph of
    the same model and batch (the graph ``plan()`` rewrites with operator variants).
    Complexity: 1 + ``runs`` runs of the step per new graph, no timed runs when every signature is
    known; nothing is changed in the model (no buffer update, no ``.grad``, the RNG state restored;
    on CUDA the allocator's peak statistics are reset).
    """

    def __init__(self, times: dict[str, np.ndarray], workspace: dict[str, np.ndarray], device: str,
                 source: "_Source | None" = None):
        self.name = f"profiled:{device}"
        self.rates = DEVICE_PRESETS[device_preset(device)]  # the roofline's rates for this device type
        self._times = times
        self._workspace = workspace
        self._source = source

    def op_times(self, graph: TrainingGraph) -> np.ndarray:
        return self._for_graph(self._times, graph)

    def workspace_bytes(self, graph: TrainingGraph) -> np.ndarray:
        return self._for_graph(self._workspace, graph)

    def _for_graph(self, table: dict[str, np.ndarray], graph: TrainingGraph) -> np.ndarray:
        if graph.fingerprint not in table:
            if self._source is None or not self._source.can_run(graph):
                raise KeyError(f"graph {graph.fingerprint[:12]} was not profiled: call ProfiledCostModel.profile on it")
            self._times[graph.fingerprint], self._workspace[graph.fingerprint] = self._source.profile(graph)
        return table[graph.fingerprint]

    @classmethod
    def for_model(cls, model: torch.nn.Module, inputs, targets=None, *, runs: int = DEFAULT_RUNS,
                  cache_path: str | Path | None = None) -> "ProfiledCostModel":
        """A model that profiles each graph of ``model`` on ``inputs`` when first asked about it."""
        if runs < 1:
            raise ValueError(f"runs={runs}: at least one timed run is needed")
        source = _Source(model, inputs, targets, runs, Path(cache_path) if cache_path else None)
        return cls({}, {}, source.label, source)

    @classmethod
    def profile(cls, graph: TrainingGraph, model: torch.nn.Module, inputs: Sequence[torch.Tensor] | torch.Tensor,
                targets: Sequence[torch.Tensor] | torch.Tensor = (), *, runs: int = DEFAULT_RUNS,
                cache_path: str | Path | None = None) -> "ProfiledCostModel":
        """Profile ``graph`` now (see the class). ``cache_path``: a JSON file of signatures read
        before and written after, shared across graphs and processes; without it, the process's
        own cache only."""
        cost = cls.for_model(model, inputs, targets, runs=runs, cache_path=cache_path)
        cost.op_times(graph)
        return cost


@dataclass
class _Source:
    """The model and batch a profiled cost model runs, and where its measurements are cached."""

    model: torch.nn.Module
    inputs: Any
    targets: Any
    runs: int
    cache_path: Path | None

    @property
    def device(self) -> torch.device:
        tensors = [*self.model.parameters(), *as_tuple(self.inputs, "inputs")]
        return tensors[0].device if tensors else torch.device("cpu")

    @property
    def label(self) -> str:
        """The device as the cache keys it: the GPU's name, or the CPU and its intra-op threads."""
        device = self.device
        if device.type == "cuda":
            return f"cuda ({torch.cuda.get_device_name(device)})"
        threads = torch.get_num_threads()
        return f"cpu ({threads} thread{'s' if threads > 1 else ''})"

    def can_run(self, graph: TrainingGraph) -> bool:
        """Whether ``graph`` is a step of this model on this batch (the same inputs, parameters, buffers)."""
        batch = as_tuple(self.inputs, "inputs") + as_tuple(self.targets, "targets")
        specs = tuple((tuple(v.shape), v.dtype, str(v.device)) for v in batch)
        names = {n for n, _ in self.model.named_parameters(remove_duplicate=False)}
        names |= {n for n, _ in self.model.named_buffers(remove_duplicate=False)}
        return (specs == tuple((s.shape, s.dtype, s.device) for s in graph.input_specs)
                and set(graph.parameters) | set(graph.buffers) <= names)

    def profile(self, graph: TrainingGraph) -> tuple[np.ndarray, np.ndarray]:
        """(times, workspace) per op of ``graph``; measured unless this process has them (no
        ``cache_path``: a file given is read and written every time)."""
        batch = as_tuple(self.inputs, "inputs") + as_tuple(self.targets, "targets")
        layout = tuple(t.stride() for t in (*batch, *self.model.parameters(), *self.model.buffers()))
        known = (self.label, graph.fingerprint, layout)
        if self.cache_path is None and known in _GRAPH_CACHE:
            return _GRAPH_CACHE[known]
        cache = _PROCESS_CACHE.setdefault(self.label, {})
        stored = json.loads(self.cache_path.read_text()) if self.cache_path and self.cache_path.exists() else {}
        cache.update(stored)  # the file given wins
        cuda = self.device.type == "cuda"
        signatures = _measure_in_place(graph, self.model, self.inputs, self.targets, self.runs, cache,
                                       _profiling_schedule(graph, _available_bytes(self.device)), cuda)
        if self.cache_path is not None:  # the file keeps its entries and gains this graph's
            stored.update({key: cache[key] for key in signatures.values() if key in cache})
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            self.cache_path.write_text(json.dumps(stored))
        times = np.zeros(len(graph.ops))
        workspace = np.array([op.workspace_bytes for op in graph.ops], dtype=np.int64)
        for op in graph.ops:
            if not op.is_view:
                seconds, scratch = cache[signatures[op.id]]
                times[op.id] = seconds
                if cuda:  # CPU: declared only, as the meter sees (class docstring)
                    workspace[op.id] = max(workspace[op.id], int(scratch))
        _GRAPH_CACHE[known] = times, workspace
        return times, workspace


def _available_bytes(device: torch.device) -> int:
    """Memory the profiling run may use: free device memory plus the allocator's cached blocks on
    CUDA, available physical memory on CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _profiling_schedule(graph: TrainingGraph, available_bytes: int):
    """Store-all (what eager runs, every op once) when its activations fit in ``available_bytes``
    with a 10% margin; else the least-memory schedule (recomputations are timed too)."""
    store_all = Schedule.store_all(graph)
    needed = simulate(graph, store_all).peak_activation_bytes
    if needed * 1.1 <= available_bytes:
        return store_all
    return ALGORITHMS["dp_memory"](graph, RooflineCostModel("cpu" if graph.device == "cpu" else "a100"), 0)


class _OpClock:
    """Times ops where they run: wall clock on CPU; CUDA events on a GPU, read after a run."""

    def __init__(self, cuda: bool):
        self._cuda = cuda
        self._pending: list[tuple[str, Any, Any]] = []

    def start(self):
        if not self._cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def stop(self, key: str, started) -> None:
        if not self._cuda:
            self._pending.append((key, time.perf_counter() - started, None))
            return
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        self._pending.append((key, started, end))

    def collect(self) -> list[tuple[str, float]]:
        """(signature, seconds) of every op timed since the last call."""
        if self._cuda:
            torch.cuda.synchronize()
            samples = [(key, start.elapsed_time(end) / 1e3) for key, start, end in self._pending]
        else:
            samples = [(key, seconds) for key, seconds, _ in self._pending]
        self._pending = []
        return samples


def _measure_in_place(graph: TrainingGraph, model: torch.nn.Module, inputs, targets, runs: int,
                      cache: dict[str, list[float]], schedule, cuda: bool) -> dict[int, str]:
    """Run ``schedule`` ``1 + runs`` times op by op (the first run untimed), adding to ``cache``
    the median time (and CUDA workspace) of every signature not in it yet; returns each op's
    signature. Under ``no_grad`` and a forked RNG, as the executor runs a step."""
    device = torch.device(graph.device)
    clock = _OpClock(cuda)
    signatures: dict[int, str] = {}
    seconds: dict[str, list[float]] = {}
    scratch: dict[str, list[int]] = {}
    with torch.no_grad(), torch.random.fork_rng(devices=[device] if cuda else []):
        for run in range(1 + runs):
            timing = run > 0
            env = initial_env(graph, model_state(model)[3], inputs, targets)
            for step in schedule.steps:
                if not isinstance(step, Compute):
                    env[step.tensor] = None
                    continue
                op, call = graph.ops[step.op], graph.calls[step.op]
                key = signatures.get(op.id) or signatures.setdefault(op.id, signature(call, env))
                if not (timing and not op.is_view and key not in cache):
                    run_call(call, env)
                    continue
                if cuda:
                    torch.cuda.reset_peak_memory_stats(device)
                    before = torch.cuda.memory_allocated(device)
                started = clock.start()
                run_call(call, env)
                clock.stop(key, started)
                if cuda:
                    outputs = {env[t].untyped_storage().data_ptr(): env[t].untyped_storage().nbytes() for t in op.outputs
                               if env[t] is not None}
                    allocated = sum(-(-n // CUDA_BLOCK_BYTES) * CUDA_BLOCK_BYTES for n in outputs.values())
                    scratch.setdefault(key, []).append(torch.cuda.max_memory_allocated(device) - before - allocated)
            env.clear()
            for key, elapsed in clock.collect():
                seconds.setdefault(key, []).append(elapsed)
            if not timing and all(signatures[op.id] in cache for op in graph.ops if not op.is_view):
                break  # every signature measured before: nothing to time
    for key, samples in seconds.items():
        cache[key] = [statistics.median(samples), max(0, int(statistics.median(scratch.get(key, [0]))))]
    return signatures
