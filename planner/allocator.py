"""The CUDA caching allocator against the simulator's live bytes, and budgets in reserved memory.

The simulator predicts *live tensor bytes*: every storage counted at its exact size while a
tensor in it lives, plus the workspace of the op running (``planner.MemoryMeter`` sees the same
on any device). PyTorch's CUDA caching allocator reports two larger figures:

- ``torch.cuda.memory_allocated``: the blocks handed out. Every request is rounded up to a
  multiple of 512 bytes (``CUDA_BLOCK_BYTES``), and a request of more than 1 MiB may get a cached
  block up to 1 MiB larger whole (the large pool splits a block only when more than 1 MiB would
  be left). ``allocated_peak`` predicts this figure without the whole-block reuse: the
  simulation with every storage rounded to 512 bytes. Persistent library workspaces (cuBLAS's,
  allocated once per stream) come on top.
- ``torch.cuda.memory_reserved``: the segments obtained from ``cudaMalloc``, which hold the
  allocated blocks and the cached free ones. Free space inside segments that no later request
  fits is fragmentation; it depends on the order and sizes of requests, so it is measured
  (``benchmarks/gpu_check.py`` records reserved against predicted for each plan), not
  simulated.

``reserved_budget`` turns "the step must fit in N bytes of ``memory_reserved``" into the
live-bytes budget ``plan()`` takes, holding back a fraction ``margin`` for rounding and
fragmentation: ``plan(model, reserved_budget("16GiB"), x)``. ``PYTORCH_CUDA_ALLOC_CONF=
expandable_segments:True`` makes the allocator grow segments in place, which cuts fragmentation.
"""
from __future__ import annotations

import dataclasses

from planner.budgets import parse_budget
from planner.cost import CUDA_BLOCK_BYTES, CostModel
from planner.errors import InvalidBudgetError
from planner.graph import StorageInfo, TrainingGraph
from planner.schedule import Schedule
from planner.simulator import simulate

#: fraction of a reserved-memory budget held back by default for the allocator's rounding and
#: fragmentation. Provisional: no GPU has measured it yet (benchmarks/gpu_check.py reports the
#: ratio of reserved to predicted bytes, and this should follow the largest one seen)
DEFAULT_RESERVE_MARGIN = 0.10


def rounded_bytes(nbytes: int) -> int:
    """What the CUDA caching allocator counts for a request of ``nbytes`` (0 stays 0)."""
    return -(-nbytes // CUDA_BLOCK_BYTES) * CUDA_BLOCK_BYTES


def allocator_view(graph: TrainingGraph) -> TrainingGraph:
    """``graph`` with every storage rounded as the allocator rounds it (same ops, tensors and
    fingerprint, so its schedules simulate on it unchanged). O(storages)."""
    storages = tuple(StorageInfo(s.id, rounded_bytes(s.nbytes)) for s in graph.storages)
    return dataclasses.replace(graph, storages=storages)


def allocated_peak(graph: TrainingGraph, schedule: Schedule, cost_model: CostModel | None = None) -> int:
    """The ``torch.cuda.max_memory_allocated`` a step of ``schedule`` should reach (resident
    memory included), but for whole-block reuse and persistent library workspaces."""
    return simulate(allocator_view(graph), schedule, cost_model).peak_bytes


def reserved_budget(reserved: int | float | str, margin: float = DEFAULT_RESERVE_MARGIN) -> int:
    """The live-bytes budget for a step that must fit in ``reserved`` bytes of
    ``torch.cuda.memory_reserved`` ("16GiB", 17e9, ...): ``reserved * (1 - margin)``."""
    if not 0.0 <= margin < 1.0:
        raise InvalidBudgetError(f"margin {margin!r} must be a fraction in [0, 1)")
    if isinstance(reserved, str) and reserved.strip().endswith("%"):
        raise InvalidBudgetError("a reserved-memory budget is a size ('16GiB'), not a percentage of the store-all peak")
    return max(1, int(parse_budget(reserved) * (1.0 - margin)))
