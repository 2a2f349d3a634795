"""The simulator: replays a schedule on its graph. The only place peak memory and time are computed.

Memory is counted per storage: a storage holds bytes while any tensor living in it is live.
Resident storages (parameters, buffers, inputs) and the ``.grad`` accumulators are held throughout.
While an op runs, its inputs and outputs are live and its workspace is allocated on top.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from planner.cost import CostModel, default_cost_model
from planner.errors import InvalidScheduleError
from planner.graph import Phase, TrainingGraph
from planner.schedule import Compute, Schedule


@dataclass(frozen=True)
class SimResult:
    peak_bytes: int  # highest memory at any step, workspace included
    peak_step: int  # index of the step where it occurs
    time: float  # seconds, summed over every Compute step
    timeline: np.ndarray  # memory after each step (int64, workspace excluded)
    resident_bytes: int  # parameters, buffers, inputs, .grad accumulators
    compute_counts: np.ndarray  # per op: how many times the schedule computes it

    @property
    def peak_activation_bytes(self) -> int:
        """Peak minus what any schedule holds anyway: the part a plan can change."""
        return self.peak_bytes - self.resident_bytes

    @property
    def recomputations(self) -> int:
        return int(np.maximum(self.compute_counts - 1, 0).sum())


def simulate(graph: TrainingGraph, schedule: Schedule, cost_model: CostModel | None = None) -> SimResult:
    """Replay ``schedule`` and return its peak memory, time and memory curve.

    Raises ``PlanMismatchError`` for a schedule of another graph and ``InvalidScheduleError`` if a
    step reads or frees a tensor that is not live, recomputes an op whose output is still live,
    skips or repeats a backward op, never produces a gradient, or leaves a tensor allocated.
    Complexity: O(steps + total op inputs/outputs).
    """
    schedule.check_graph(graph)
    cost_model = cost_model or default_cost_model(graph)
    op_times = cost_model.op_times(graph)
    workspace = cost_model.workspace_bytes(graph)
    storage_bytes = graph.storage_bytes
    tensor_storage = graph.tensor_storage
    tensors, ops = graph.tensors, graph.ops

    live = np.zeros(len(tensors), dtype=bool)
    refs = np.zeros(len(storage_bytes), dtype=np.int64)
    for storage in graph.resident_storages:
        refs[storage] = 1  # pinned: never reaches zero
    for tensor in tensors:
        if graph.is_resident(tensor.id):
            live[tensor.id] = True
    counts = np.zeros(len(ops), dtype=np.int64)
    memory = graph.resident_bytes
    peak, peak_step, total_time = memory, -1, 0.0
    timeline = np.empty(len(schedule.steps), dtype=np.int64)

    for index, step in enumerate(schedule.steps):
        if isinstance(step, Compute):
            if not 0 <= step.op < len(ops):
                raise InvalidScheduleError(f"step {index}: op {step.op} does not exist in this graph")
            op = ops[step.op]
            for t in op.inputs:
                if not live[t]:
                    raise InvalidScheduleError(
                        f"step {index}: op {op.name} reads {tensors[t].name}, which is not live")
            for t in op.outputs:
                if live[t]:
                    raise InvalidScheduleError(
                        f"step {index}: op {op.name} is computed again while its output {tensors[t].name} is live")
                storage = tensor_storage[t]
                if refs[storage] > 0 and not op.is_view and storage not in _input_storages(graph, op):
                    raise InvalidScheduleError(
                        f"step {index}: op {op.name} is recomputed while a view of its output "
                        f"{tensors[t].name} is still live")
                live[t] = True
                refs[storage] += 1
                if refs[storage] == 1:
                    memory += int(storage_bytes[storage])
            counts[step.op] += 1
            total_time += float(op_times[step.op])
            if memory + workspace[step.op] > peak:
                peak, peak_step = memory + int(workspace[step.op]), index
        else:
            t = step.tensor
            if not 0 <= t < len(tensors) or not live[t]:
                raise InvalidScheduleError(f"step {index}: frees tensor {t}, which is not live")
            if graph.is_resident(t):
                raise InvalidScheduleError(f"step {index}: frees resident tensor {tensors[t].name}")
            live[t] = False
            storage = tensor_storage[t]
            refs[storage] -= 1
            if refs[storage] == 0:
                memory -= int(storage_bytes[storage])
        timeline[index] = memory

    _check_complete(graph, counts, live)
    return SimResult(peak, peak_step, total_time, timeline, graph.resident_bytes, counts)


def _input_storages(graph: TrainingGraph, op) -> set[int]:
    return {int(graph.tensor_storage[t]) for t in op.inputs}


def _check_complete(graph: TrainingGraph, counts: np.ndarray, live: np.ndarray) -> None:
    for op in graph.ops:
        if op.phase is Phase.BACKWARD and counts[op.id] != 1:
            raise InvalidScheduleError(f"backward op {op.name} is computed {counts[op.id]} times; it must run exactly once")
        if op.phase is Phase.FORWARD and counts[op.id] == 0:
            raise InvalidScheduleError(f"forward op {op.name} is never computed")
    leaked = [graph.tensors[t].name for t in np.flatnonzero(live) if not graph.is_resident(int(t))]
    if leaked:
        raise InvalidScheduleError(f"{len(leaked)} tensors are never freed, e.g. {leaked[:3]}")
