"""Running one graph op on real tensors: shared by the executor and the profiling cost model."""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch.utils._pytree import tree_map

from planner.graph import OpCall, TensorRef


def bind(value: Any, env: Sequence[torch.Tensor | None]) -> Any:
    """Replace every ``TensorRef`` in ``value`` (args, kwargs) by the tensor it names."""
    return tree_map(lambda v: env[v.id] if isinstance(v, TensorRef) else v, value,
                    is_leaf=lambda v: isinstance(v, TensorRef))


def run_call(call: OpCall, env: list[torch.Tensor | None]) -> None:
    """Run ``call`` reading its inputs from ``env`` and storing its outputs into ``env``."""
    result = call.target(*bind(call.args, env), **bind(call.kwargs, env))
    store_outputs(call, result, env)


def store_outputs(call: OpCall, result: Any, env: list[torch.Tensor | None]) -> None:
    for slot, value in zip(call.output_slots, result if call.returns_tuple else (result,)):
        if slot is not None:
            env[slot] = value


def signature(call: OpCall, env: Sequence[torch.Tensor | None]) -> str:
    """What determines an op's run time: the op, its inputs' shapes, strides and dtypes, constants."""
    def describe(v: Any) -> Any:
        if isinstance(v, TensorRef):
            t = env[v.id]
            return (tuple(t.shape), tuple(t.stride()), str(t.dtype))
        return v

    return repr((str(call.target), tree_map(describe, (call.args, call.kwargs),
                                            is_leaf=lambda v: isinstance(v, TensorRef))))


def initial_env(graph, named: dict[str, torch.Tensor], inputs, targets=()) -> list[torch.Tensor | None]:
    """A tensor slot per graph tensor, with the resident ones bound: parameters and buffers to the
    model's tensors of those names (``planner.guards.model_state``), constants to their values."""
    from planner.capture import _as_tuple

    env: list[torch.Tensor | None] = [None] * len(graph.tensors)
    for name, tensor_id in {**graph.parameters, **graph.buffers}.items():
        env[tensor_id] = named[name]
    for tensor_id, value in graph.constants.items():
        env[tensor_id] = value
    for tensor_id, value in zip(graph.inputs + graph.targets, _as_tuple(inputs, "inputs") + _as_tuple(targets, "targets")):
        env[tensor_id] = value
    tangent = graph.tensors[graph.tangent]
    env[graph.tangent] = torch.ones(tangent.shape, dtype=getattr(torch, tangent.dtype.split(".")[1]), device=graph.device)
    return env
