"""The classic checkpointing baselines, as compared in the Checkmate paper (Jain et al., 2020).

Each takes ``(graph, cost_model, budget_bytes)`` and returns a ``Schedule``; ``plan`` checks it
against the budget with the simulator. "Over articulation points" variants only checkpoint block
boundaries (outputs of ops that cut the forward graph); ``_linear`` variants treat the forward as
a chain and may checkpoint any op, as Checkmate's "linearized" baselines do.
"""
from __future__ import annotations

import math

import numpy as np

from planner.cost import CostModel
from planner.graph import TrainingGraph
from planner.schedule import Schedule
from planner.simulator import simulate
from planner.algorithms.keepset import articulation_ops, model_forward_ops, op_output_bytes, schedule_keeping
from planner.algorithms.result import rank


def store_all(graph: TrainingGraph, cost_model: CostModel, budget_bytes: int) -> Schedule:
    """Keep everything: plain PyTorch. O(ops)."""
    return Schedule.store_all(graph)


def checkpoint_all(graph: TrainingGraph, cost_model: CostModel, budget_bytes: int) -> Schedule:
    """Keep only block boundaries (every articulation point), recompute inside blocks: what
    wrapping every block in ``torch.utils.checkpoint`` does. O(ops + edges)."""
    return schedule_keeping(graph, articulation_ops(graph))


def _every_kth(candidates: list[int]) -> list[int]:
    if not candidates:
        return []
    k = max(1, math.ceil(math.sqrt(len(candidates))))
    return candidates[k - 1 :: k]


def chen_sqrt(graph: TrainingGraph, cost_model: CostModel, budget_bytes: int) -> Schedule:
    """Chen et al. (2016): keep every ceil(sqrt(n))-th of the n articulation points. O(ops + edges)."""
    return schedule_keeping(graph, _every_kth(articulation_ops(graph)))


def chen_sqrt_linear(graph: TrainingGraph, cost_model: CostModel, budget_bytes: int) -> Schedule:
    """Chen's sqrt(n) over all forward ops taken as a chain. O(ops + edges)."""
    sizes = op_output_bytes(graph)
    return schedule_keeping(graph, _every_kth([op for op in model_forward_ops(graph) if sizes[op] > 0]))


def _greedy_segments(graph: TrainingGraph, candidates: set[int], segment_bytes: float) -> list[int]:
    """Chen's greedy rule: walk the forward, start a new segment at the first candidate after
    the running activation size exceeds ``segment_bytes``."""
    sizes = op_output_bytes(graph)
    kept, running = [], 0
    for op in model_forward_ops(graph):
        running += int(sizes[op])
        if op in candidates and running > segment_bytes:
            kept.append(op)
            running = 0
    return kept


def _chen_greedy(graph: TrainingGraph, cost_model: CostModel, budget_bytes: int, candidates: list[int]) -> Schedule:
    """Sweep the segment size (the greedy's only knob) over a log grid; return the fastest
    schedule within budget, or the lowest-peak one if none fits. O(grid x (ops + edges))."""
    sizes = op_output_bytes(graph)
    forward_bytes = int(sizes[model_forward_ops(graph)].sum())
    smallest = max(1, int(sizes[candidates].min())) if candidates else 1
    best, best_key = None, None
    for segment_bytes in np.geomspace(smallest, max(forward_bytes, smallest + 1), num=24):
        schedule = schedule_keeping(graph, _greedy_segments(graph, set(candidates), segment_bytes))
        key = rank(simulate(graph, schedule, cost_model), budget_bytes)
        if best_key is None or key < best_key:
            best, best_key = schedule, key
    return best


def chen_greedy(graph: TrainingGraph, cost_model: CostModel, budget_bytes: int) -> Schedule:
    """Chen's greedy over articulation points, segment size tuned to the budget."""
    return _chen_greedy(graph, cost_model, budget_bytes, articulation_ops(graph))


def chen_greedy_linear(graph: TrainingGraph, cost_model: CostModel, budget_bytes: int) -> Schedule:
    """Chen's greedy over all forward ops taken as a chain, segment size tuned to the budget."""
    sizes = op_output_bytes(graph)
    return _chen_greedy(graph, cost_model, budget_bytes, [op for op in model_forward_ops(graph) if sizes[op] > 0])


def recompute_cheap(graph: TrainingGraph, cost_model: CostModel, budget_bytes: int) -> Schedule:
    """Selective recomputation: keep what compute-bound ops (convolutions, matmuls) produce and
    recompute the memory-bound ones (normalization, activations, concatenation), whose outputs
    cost memory but little time to redo. What torch.compile's partitioner leans towards.

    An op is memory-bound when the device moves its bytes more slowly than it does its FLOPs
    (from the op's FLOPs and bytes against the cost model's device rates, ``CostModel.rates``).
    O(ops + edges).
    """
    spec = cost_model.rates
    kept = [op for op in model_forward_ops(graph)
            if graph.ops[op].flops / spec.fp32_flops > (graph.ops[op].bytes_read + graph.ops[op].bytes_written) / spec.bandwidth]
    return schedule_keeping(graph, kept)
