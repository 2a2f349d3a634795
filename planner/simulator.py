"""The simulator: replays a schedule on its graph. The only place peak memory and time are computed.

Memory is counted per storage: a storage holds bytes while any tensor living in it is live.
Resident storages (parameters, buffers, inputs) and the ``.grad`` accumulators are held throughout.
While an op runs, its inputs and outputs are live and its workspace is allocated on top.
The replay loop is compiled (numba); it reports a status code that Python turns into a message.
"""
from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np

from planner.cost import CostModel, default_cost_model
from planner.errors import InvalidScheduleError
from planner.graph import TrainingGraph
from planner.schedule import Schedule


@dataclass(frozen=True)
class SimResult:
    peak_bytes: int  # highest memory at any step, workspace included
    peak_step: int  # index of the step where it occurs
    time: float  # seconds, summed over every Compute step
    timeline: np.ndarray  # memory after each step (int64, workspace excluded)
    resident_bytes: int  # parameters, buffers, inputs, .grad accumulators
    compute_counts: np.ndarray  # per op: how many times the schedule computes it
    # with simulate(part=mask): memory of the storages in the mask alone after each step (int64,
    # workspace excluded), e.g. what the backward allocates; None without a mask
    part_timeline: np.ndarray | None = None

    @property
    def peak_activation_bytes(self) -> int:
        """Peak minus what any schedule holds anyway: the part a plan can change."""
        return self.peak_bytes - self.resident_bytes

    @property
    def recomputations(self) -> int:
        return int(np.maximum(self.compute_counts - 1, 0).sum())


_OK, _NO_OP, _READS_DEAD, _OUTPUT_LIVE, _VIEW_LIVE, _FREES_DEAD, _FREES_RESIDENT = range(7)


@numba.njit(cache=True)
def _replay(is_compute, index, in_ptr, in_idx, out_ptr, out_idx, is_view, resident, tensor_storage,
            storage_bytes, pinned, op_times, workspace, start_bytes, timeline, counts, live, part, part_timeline):
    """Returns (status, failing step, offending tensor, peak, peak step, total time). With a
    non-empty ``part_timeline``, also the memory of the storages flagged in ``part``."""
    n_ops = len(in_ptr) - 1
    n_tensors = len(resident)
    track_part = len(part_timeline) > 0
    refs = pinned.copy()
    memory = start_bytes
    part_memory = 0
    peak, peak_step, total = start_bytes, -1, 0.0
    for step in range(len(is_compute)):
        i = index[step]
        if is_compute[step]:
            if i < 0 or i >= n_ops:
                return _NO_OP, step, -1, peak, peak_step, total
            for k in range(in_ptr[i], in_ptr[i + 1]):
                if not live[in_idx[k]]:
                    return _READS_DEAD, step, in_idx[k], peak, peak_step, total
            for k in range(out_ptr[i], out_ptr[i + 1]):
                t = out_idx[k]
                if live[t]:
                    return _OUTPUT_LIVE, step, t, peak, peak_step, total
                s = tensor_storage[t]
                if refs[s] > 0 and not is_view[i]:
                    # an output may alias an input, or an earlier output of the same op (an RNN's
                    # backward returns one tensor as the gradient of both its biases)
                    aliased = False
                    for j in range(in_ptr[i], in_ptr[i + 1]):
                        aliased = aliased or tensor_storage[in_idx[j]] == s
                    for j in range(out_ptr[i], k):
                        aliased = aliased or tensor_storage[out_idx[j]] == s
                    if not aliased:
                        return _VIEW_LIVE, step, t, peak, peak_step, total
                live[t] = True
                refs[s] += 1
                if refs[s] == 1:
                    memory += storage_bytes[s]
                    if track_part and part[s]:
                        part_memory += storage_bytes[s]
            counts[i] += 1
            total += op_times[i]
            if memory + workspace[i] > peak:
                peak, peak_step = memory + workspace[i], step
        else:
            if i < 0 or i >= n_tensors or not live[i]:
                return _FREES_DEAD, step, i, peak, peak_step, total
            if resident[i]:
                return _FREES_RESIDENT, step, i, peak, peak_step, total
            live[i] = False
            s = tensor_storage[i]
            refs[s] -= 1
            if refs[s] == 0:
                memory -= storage_bytes[s]
                if track_part and part[s]:
                    part_memory -= storage_bytes[s]
        timeline[step] = memory
        if track_part:
            part_timeline[step] = part_memory
    return _OK, -1, -1, peak, peak_step, total


def simulate(graph: TrainingGraph, schedule: Schedule, cost_model: CostModel | None = None, *,
             part: np.ndarray | None = None) -> SimResult:
    """Replay ``schedule`` and return its peak memory, time and memory curve; with ``part`` (a
    boolean mask over storages) also the curve of those storages alone (``part_timeline``).

    Raises ``PlanMismatchError`` for a schedule of another graph and ``InvalidScheduleError`` if a
    step reads or frees a tensor that is not live, recomputes an op whose output (or a view of
    it) is still live, skips or repeats a backward op, never produces a gradient, or leaves a
    tensor allocated. Complexity: O(steps + total op inputs/outputs), compiled.
    """
    schedule.check_graph(graph)
    cost_model = cost_model or default_cost_model(graph)
    arrays = graph.op_arrays
    is_compute, index = schedule.arrays
    pinned = np.zeros(len(graph.storages), dtype=np.int64)
    pinned[list(graph.resident_storages)] = 1  # never reaches zero
    timeline = np.empty(len(index), dtype=np.int64)
    counts = np.zeros(len(graph.ops), dtype=np.int64)
    live = arrays["resident"].copy()
    part_mask = np.zeros(len(graph.storages), dtype=np.bool_) if part is None else np.asarray(part, dtype=np.bool_)
    part_timeline = np.empty(0 if part is None else len(index), dtype=np.int64)
    status, step, tensor, peak, peak_step, total = _replay(
        is_compute, index, arrays["in_ptr"], arrays["in_idx"], arrays["out_ptr"], arrays["out_idx"],
        arrays["is_view"], arrays["resident"], graph.tensor_storage, graph.storage_bytes, pinned,
        np.asarray(cost_model.op_times(graph), dtype=np.float64),
        np.asarray(cost_model.workspace_bytes(graph), dtype=np.int64), graph.resident_bytes,
        timeline, counts, live, part_mask, part_timeline)
    if status != _OK:
        raise InvalidScheduleError(_describe(graph, schedule, status, step, tensor))
    _check_complete(graph, counts, live)
    return SimResult(int(peak), int(peak_step), float(total), timeline, graph.resident_bytes, counts,
                     None if part is None else part_timeline)


def _describe(graph: TrainingGraph, schedule: Schedule, status: int, step: int, tensor: int) -> str:
    instruction = schedule.steps[step]
    name = graph.tensors[tensor].name if 0 <= tensor < len(graph.tensors) else str(tensor)
    op = getattr(instruction, "op", None)
    op_name = graph.ops[op].name if op is not None and 0 <= op < len(graph.ops) else str(op)
    messages = {
        _NO_OP: f"op {op} does not exist in this graph",
        _READS_DEAD: f"op {op_name} reads {name}, which is not live",
        _OUTPUT_LIVE: f"op {op_name} is computed again while its output {name} is live",
        _VIEW_LIVE: f"op {op_name} is recomputed while a view of its output {name} is still live",
        _FREES_DEAD: f"frees tensor {name}, which is not live",
        _FREES_RESIDENT: f"frees resident tensor {name}",
    }
    return f"step {step}: {messages[status]}"


def _check_complete(graph: TrainingGraph, counts: np.ndarray, live: np.ndarray) -> None:
    phases = graph.op_arrays["is_backward"]
    wrong_backward = np.flatnonzero(phases & (counts != 1))
    if len(wrong_backward):
        op = graph.ops[int(wrong_backward[0])]
        raise InvalidScheduleError(f"backward op {op.name} is computed {counts[op.id]} times; it must run exactly once")
    missing_forward = np.flatnonzero(~phases & (counts == 0))
    if len(missing_forward):
        raise InvalidScheduleError(f"forward op {graph.ops[int(missing_forward[0])].name} is never computed")
    leaked = np.flatnonzero(live & ~graph.op_arrays["resident"])
    if len(leaked):
        names = [graph.tensors[int(t)].name for t in leaked[:3]]
        raise InvalidScheduleError(f"{len(leaked)} tensors are never freed, e.g. {names}")
