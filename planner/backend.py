"""A ``torch.compile`` backend that plans every captured graph and runs it through the executor.

``torch.compile(model, backend=planner.backend(budget="60%"))``. Dynamo hands the backend each
graph it captures with the parameters lifted to inputs; the backend turns those back into
parameters of a small module (the same ``nn.Parameter`` objects, so ``.grad`` lands on the user's
model), captures it with its input gradients (after a graph break, a graph's inputs are
activations that require grad), plans it with ``planner.plan`` and runs it as a
``PlannedModule``. Each graph is
planned on its own: with graph breaks, a byte budget applies to each graph separately; a
percentage budget is of each graph's own store-all peak.
"""
from __future__ import annotations

from typing import Callable, Collection, Sequence

import torch

from planner.cost import CostModel


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


def backend(budget: int | float | str, *, mode: str = "fast", algorithm: str | None = None,
            cost_model: CostModel | str | None = None, op_variants: bool | str | Collection[str] = True) -> Callable:
    """A ``torch.compile`` backend planning each graph under ``budget`` (arguments as ``planner.plan``)."""
    from planner.capture import capture
    from planner.execute import PlannedModule
    from planner.plan import plan

    def compile_graph(graph_module: torch.fx.GraphModule, example_inputs: list) -> Callable:
        parameter_positions = [i for i, v in enumerate(example_inputs) if isinstance(v, torch.nn.Parameter)]
        module = _GraphWithParameters(graph_module, example_inputs, parameter_positions)
        others = tuple(example_inputs[i] for i in module.other_positions)
        graph = capture(module, others, input_grads=True)
        chosen = plan(graph, budget, mode=mode, algorithm=algorithm, cost_model=cost_model, op_variants=op_variants)
        planned = PlannedModule(module, chosen.graph, chosen.schedule)

        def run(*args):
            return planned(*(args[i] for i in module.other_positions))

        return run

    return compile_graph
