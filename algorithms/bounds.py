"""Lower bounds: no schedule of a graph can peak below these."""
from __future__ import annotations

from planner.cost import CostModel
from planner.graph import TrainingGraph


def memory_lower_bound(graph: TrainingGraph, cost_model: CostModel) -> int:
    """Resident memory plus the largest single op's working set (its inputs' and outputs'
    storages, and workspace): every op must run once with all of them live.

    Complexity: O(ops + edges).
    """
    workspace = cost_model.workspace_bytes(graph)
    largest = 0
    for op in graph.ops:
        storages = {graph.tensors[t].storage for t in op.inputs + op.outputs} - graph.resident_storages
        largest = max(largest, sum(graph.storages[s].nbytes for s in storages) + int(workspace[op.id]))
    return graph.resident_bytes + largest
