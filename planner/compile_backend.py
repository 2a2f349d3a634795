"""A ``torch.compile`` backend that plans every captured graph and runs it through the executor.

``torch.compile(model, backend=planner.backend(budget="60%"))``. Dynamo hands the backend each
graph it captures with the parameters lifted to inputs; the backend turns those back into
parameters of a small module (the same ``nn.Parameter`` objects, so ``.grad`` lands on the user's
model), captures it with its input gradients (after a graph break, a graph's inputs are
activations that require grad), plans it with ``planner.plan`` at its first call and runs it
as a ``PlannedModule``. Each graph is planned on its own: with graph breaks, a byte budget
applies to each graph separately; a percentage budget is of each graph's own store-all peak.
``backend.plans`` lists the plans made.
"""
from __future__ import annotations

from typing import Callable, Collection, Sequence

import torch

from planner.capturing import capture
from planner.cost import CostModel
from planner.execute import PlannedModule
from planner.planning import PlanRequest, Replanner


class _GraphWithParameters(torch.nn.Module):
    """Dynamo's graph module, with its parameter inputs held as parameters again."""

    def __init__(self, graph_module: torch.fx.GraphModule, example_inputs: Sequence, parameter_positions: list[int]):
        super().__init__()
        self.graph_module = graph_module
        self.n_args = len(example_inputs)
        self.parameter_positions = parameter_positions
        self.other_positions = [i for i in range(self.n_args) if i not in set(parameter_positions)]
        self.lifted = torch.nn.ParameterList([example_inputs[i] for i in parameter_positions])

    def forward(self, *others: torch.Tensor):
        args: list = [None] * self.n_args
        for position, parameter in zip(self.parameter_positions, self.lifted):
            args[position] = parameter
        for position, value in zip(self.other_positions, others):
            args[position] = value
        return self.graph_module(*args)


class PlanningBackend:
    """The backend ``planner.backend(...)`` returns. ``plans`` lists the plans in use, of every
    graph, as their planned modules keep them."""

    def __init__(self, request):
        self.request = request
        self._planned: list = []  # one _PlannedGraph per graph dynamo compiled

    def __call__(self, graph_module: torch.fx.GraphModule, example_inputs: list) -> Callable:
        parameter_positions = [i for i, v in enumerate(example_inputs) if isinstance(v, torch.nn.Parameter)]
        graph = _PlannedGraph(_GraphWithParameters(graph_module, example_inputs, parameter_positions), self.request)
        self._planned.append(graph)
        return graph

    @property
    def plans(self) -> list:
        return [p for graph in self._planned if graph.planned is not None for p in graph.planned.plans]


class _PlannedGraph:
    """One compiled graph: planned at its first call with gradients, from the real inputs, so that
    a planner error (an infeasible budget) reaches the caller as itself, not wrapped in dynamo's
    ``BackendCompilerFailed``; then run as a ``PlannedModule``, whose guards plan new states."""

    def __init__(self, module: _GraphWithParameters, request):
        self.module = module
        self.request = request
        self.planned = None

    def __call__(self, *args):
        others = tuple(args[i] for i in self.module.other_positions)
        if self.planned is None:
            if not torch.is_grad_enabled():  # nothing to plan for: the graph as it is
                return self.module(*others)
            tensors = tuple(v for v in others if isinstance(v, torch.Tensor))
            chosen = self.request.plan(capture(self.module, others, input_grads=True), self.module, tensors)
            self.planned = PlannedModule(self.module, chosen.graph, chosen.schedule, plan=chosen,
                                         replanner=Replanner(self.request.plan, None))
        return self.planned(*others)


def backend(budget: int | float | str, *, mode: str = "fast", algorithm: str | None = None,
            cost_model: CostModel | str | None = None, op_variants: bool | str | Collection[str] = True
            ) -> PlanningBackend:
    """A ``torch.compile`` backend planning each graph under ``budget`` (arguments as ``planner.plan``)."""
    return PlanningBackend(PlanRequest(budget, mode, algorithm, None, cost_model, op_variants))
