"""Schedules: the ordered instructions of one training step, the one output of every algorithm.

A schedule is a sequence of ``Compute(op)`` and ``Free(tensor)`` steps. A forward op computed a
second time is a recomputation; its outputs must have been freed before. Schedules are tied to the
graph they were made for by its fingerprint, in memory and in JSON.
"""
from __future__ import annotations

import json
import weakref
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Iterable, Union

import numpy as np

from planner.errors import InvalidScheduleError, PlanMismatchError
from planner.graph import TrainingGraph

FORMAT_VERSION = 1


@dataclass(frozen=True)
class Compute:
    """Run op ``op`` (again, if it ran before: a recomputation). Which implementation runs is
    part of the graph (``planner.variants`` rewrites ops), not of the schedule."""

    op: int


@dataclass(frozen=True)
class Free:
    tensor: int


Step = Union[Compute, Free]


class _Pool:
    """Steps are immutable: one object per op (or tensor) id, shared by every schedule, kept in
    an object array so that a schedule's steps are gathered by index."""

    def __init__(self, kind):
        self.kind = kind
        self.objects = np.empty(0, dtype=object)

    def gather(self, ids: np.ndarray) -> np.ndarray:
        needed = int(ids.max()) + 1 if len(ids) else 0
        if needed > len(self.objects):
            grown = np.empty(max(needed, 2 * len(self.objects)), dtype=object)
            grown[: len(self.objects)] = self.objects
            for i in range(len(self.objects), len(grown)):
                grown[i] = self.kind(i)
            self.objects = grown
        return self.objects[ids]


_COMPUTES = _Pool(Compute)
_FREES = _Pool(Free)


def _expand(pointer: np.ndarray, values: np.ndarray, ops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(step position, value) for every value of every step's op, in step then CSR order."""
    counts = pointer[ops + 1] - pointer[ops]
    total = int(counts.sum())
    offsets = np.repeat(pointer[ops] - (np.cumsum(counts) - counts), counts) + np.arange(total)
    return np.repeat(np.arange(len(ops)), counts), values[offsets]


def _step_id(value) -> int:
    """An op or tensor id read from JSON: an integer (``1.0`` is accepted, ``1.5`` and ``"1"`` are not)."""
    if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
        raise ValueError(f"id {value!r} is not an integer")
    return int(value)


@dataclass(frozen=True)
class Schedule:
    steps: tuple[Step, ...]
    fingerprint: str

    @classmethod
    def from_order(cls, graph: TrainingGraph, order: Iterable[int | Compute]) -> "Schedule":
        """Schedule computing ``order`` (op ids or ``Compute`` steps) and freeing every tensor
        right after its last use; tensors consumed on production (gradients, buffer updates, the
        loss) right after they are produced; gradients of inputs at the end (autograd takes them
        when the step's backward returns).

        Raises ``InvalidScheduleError`` if an op reads a tensor that was never produced.
        Complexity: O(total inputs + outputs of the computed ops).
        """
        ops = np.fromiter((c.op if isinstance(c, Compute) else c for c in order), dtype=np.int64)
        n = len(ops)
        if n and (ops.min() < 0 or ops.max() >= len(graph.ops)):
            raise InvalidScheduleError(f"op ids must lie in [0, {len(graph.ops)}): got {int(ops.min())}..{int(ops.max())}")
        arrays = graph.op_arrays
        # every output of every step is an instance of its tensor, alive until its last read
        instance_position, instance_tensor = _expand(arrays["out_ptr"], arrays["out_idx"], ops)
        read_position, read_tensor = _expand(arrays["in_ptr"], arrays["in_idx"], ops)
        produced = ~arrays["resident"][read_tensor]
        read_position, read_tensor = read_position[produced], read_tensor[produced]
        # a read is of the latest instance of its tensor produced at an earlier step
        keys = instance_tensor * (n + 1) + instance_position
        by_key = np.argsort(keys, kind="stable")
        found = np.searchsorted(keys[by_key], read_tensor * (n + 1) + read_position) - 1
        instance = by_key[np.maximum(found, 0)]
        orphans = np.flatnonzero((found < 0) | (instance_tensor[instance] != read_tensor))
        if len(orphans):
            position, tensor = int(read_position[orphans[0]]), int(read_tensor[orphans[0]])
            raise InvalidScheduleError(f"step {position}: op {graph.ops[int(ops[position])].name} reads "
                                       f"{graph.tensors[tensor].name}, which no earlier step produced")
        last_use = instance_position.copy()
        np.maximum.at(last_use, instance, read_position)
        if graph.input_gradients:  # returned to autograd when the step ends
            last_use[np.isin(instance_tensor, list(graph.input_gradients))] = n - 1
        freed = np.lexsort((instance_tensor, last_use))  # after each step, its frees by tensor id
        frees_before = np.searchsorted(last_use[freed], np.arange(n), side="left")  # frees after earlier steps
        # step k's compute sits after k computes and the frees of steps before it; its frees follow it
        compute_at = np.arange(n) + frees_before
        free_at = np.arange(len(freed)) + last_use[freed] + 1
        is_compute = np.zeros(n + len(freed), dtype=np.bool_)
        is_compute[compute_at] = True
        index = np.empty(n + len(freed), dtype=np.int64)
        index[compute_at] = ops
        index[free_at] = instance_tensor[freed]
        steps = np.empty(n + len(freed), dtype=object)
        steps[compute_at] = _COMPUTES.gather(ops)
        steps[free_at] = _FREES.gather(instance_tensor[freed])
        schedule = cls(tuple(steps.tolist()), graph.fingerprint)
        schedule.__dict__["arrays"] = (is_compute, index)  # known already: spare the cached property
        return schedule

    @classmethod
    def store_all(cls, graph: TrainingGraph) -> "Schedule":
        """What plain PyTorch does: every op once, in graph order, each tensor freed after its last
        use. The reference every budget fraction refers to, built once per graph (kept while the
        graph lives: the schedule holds its fingerprint, not the graph)."""
        schedule = _STORE_ALL.get(graph)
        if schedule is None:
            schedule = _STORE_ALL[graph] = cls.from_order(graph, range(len(graph.ops)))
        return schedule

    @cached_property
    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """Steps as arrays for compiled loops: is-compute flags, and op or tensor ids."""
        is_compute = np.fromiter((isinstance(s, Compute) for s in self.steps), dtype=np.bool_, count=len(self.steps))
        index = np.fromiter((s.op if isinstance(s, Compute) else s.tensor for s in self.steps), dtype=np.int64,
                            count=len(self.steps))
        return is_compute, index

    # ---- reading ---------------------------------------------------------------------------
    @property
    def computes(self) -> list[Compute]:
        return [s for s in self.steps if isinstance(s, Compute)]

    def recomputed_ops(self) -> dict[int, int]:
        """op id -> how many extra times it is computed."""
        counts: dict[int, int] = {}
        for step in self.computes:
            counts[step.op] = counts.get(step.op, 0) + 1
        return {op: n - 1 for op, n in counts.items() if n > 1}

    def check_graph(self, graph: TrainingGraph) -> None:
        if graph.fingerprint != self.fingerprint:
            raise PlanMismatchError(
                f"this schedule was made for graph {self.fingerprint[:12]} but the graph given is "
                f"{graph.fingerprint[:12]} (another model, batch shape, dtype or mode): plan again for it")

    # ---- JSON --------------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {
            "format": FORMAT_VERSION,
            "fingerprint": self.fingerprint,
            "steps": [["c", s.op] if isinstance(s, Compute) else ["f", s.tensor] for s in self.steps],
        }

    @classmethod
    def from_json(cls, data: dict) -> "Schedule":
        if not isinstance(data, dict) or "steps" not in data or "fingerprint" not in data:
            raise InvalidScheduleError("not a schedule: expected an object with 'format', 'fingerprint' and 'steps'")
        if data.get("format") != FORMAT_VERSION:
            raise InvalidScheduleError(
                f"schedule format {data.get('format')!r} is not supported by this version (format "
                f"{FORMAT_VERSION}): plan again with this version, or upgrade remat-planner")
        steps: list[Step] = []
        try:
            for row in data["steps"]:
                if row[0] == "c" and len(row) == 2:
                    steps.append(Compute(_step_id(row[1])))
                elif row[0] == "f" and len(row) == 2:
                    steps.append(Free(_step_id(row[1])))
                else:
                    raise ValueError(row)
        except (TypeError, ValueError, IndexError) as error:
            raise InvalidScheduleError(f"corrupted schedule step {error}: plan again") from error
        return cls(tuple(steps), str(data["fingerprint"]))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json()))

    @classmethod
    def load(cls, path: str | Path, graph: TrainingGraph | None = None) -> "Schedule":
        """Read a schedule; with ``graph``, refuse one made for another graph."""
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as error:
            raise InvalidScheduleError(f"{path} is not valid JSON ({error}); it may be truncated: plan again") from error
        schedule = cls.from_json(data)
        if graph is not None:
            schedule.check_graph(graph)
        return schedule


_STORE_ALL: "weakref.WeakKeyDictionary[TrainingGraph, Schedule]" = weakref.WeakKeyDictionary()
