"""Running one graph op on real tensors: shared by the executor and the profiling cost model."""
from __future__ import annotations

from typing import Any, Sequence

import torch

from planner._torch import tree_map
from planner.calls import as_tuple
from planner.graph import OpCall, TensorRef


def bind(value: Any, env: Sequence[torch.Tensor | None]) -> Any:
    """Replace every ``TensorRef`` in ``value`` (args, kwargs) by the tensor it names."""
    return tree_map(lambda v: env[v.id] if isinstance(v, TensorRef) else v, value,
                    is_leaf=lambda v: isinstance(v, TensorRef))


#: ops whose kernels read the grad mode instead of an argument. oneDNN's LSTM layer (the CPU
#: LSTM) computes the training workspace its backward reads only while grad mode is on, whatever
#: its ``train`` argument says; under ``no_grad`` (where plans run) it returns none.
GRAD_MODE_OPS = frozenset({torch.ops.aten.mkldnn_rnn_layer.default})


def invoke(call: OpCall, env: Sequence[torch.Tensor | None]) -> Any:
    """Run ``call`` on the tensors of ``env`` as eager's training forward runs it: ops in
    ``GRAD_MODE_OPS`` with grad mode on, over detached inputs (so no autograd graph is recorded)."""
    args, kwargs = bind(call.args, env), bind(call.kwargs, env)
    if call.target in GRAD_MODE_OPS:
        detach = lambda v: v.detach() if isinstance(v, torch.Tensor) else v  # noqa: E731
        with torch.enable_grad():
            return call.target(*tree_map(detach, args), **tree_map(detach, kwargs))
    return call.target(*args, **kwargs)


#: an output as ``real_outputs`` describes it: (shape, strides, dtype, storage bytes)
RealOutput = tuple[tuple[int, ...], tuple[int, ...], torch.dtype, int]


def real_outputs(target: Any, args: tuple, kwargs: dict) -> list[RealOutput | None]:
    """What each output of ``target`` is when run as ``invoke`` runs it, on zeros shaped like the
    tensors of ``args``/``kwargs`` (fake tensors from a trace): for ops in ``GRAD_MODE_OPS``, whose
    meta kernels describe the inference path (oneDNN's LSTM layer reports an empty workspace).
    Allocates what the op does once: one layer, not the model."""
    def zeros(v: Any) -> Any:
        return torch.zeros(tuple(v.shape), dtype=v.dtype, device=v.device) if isinstance(v, torch.Tensor) else v

    with torch.enable_grad():
        result = target(*tree_map(zeros, args), **tree_map(zeros, kwargs))
    return [(tuple(v.shape), tuple(v.stride()), v.dtype, v.untyped_storage().nbytes())
            if isinstance(v, torch.Tensor) else None
            for v in (result if isinstance(result, (tuple, list)) else (result,))]


def run_call(call: OpCall, env: list[torch.Tensor | None]) -> None:
    """Run ``call`` reading its inputs from ``env`` and storing its outputs into ``env``."""
    store_outputs(call, invoke(call, env), env)


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
    env: list[torch.Tensor | None] = [None] * len(graph.tensors)
    for name, tensor_id in {**graph.parameters, **graph.buffers}.items():
        env[tensor_id] = named[name]
    for tensor_id, value in graph.constants.items():
        env[tensor_id] = value
    for tensor_id, value in zip(graph.inputs + graph.targets, as_tuple(inputs, "inputs") + as_tuple(targets, "targets")):
        env[tensor_id] = value
    tangent = graph.tensors[graph.tangent]
    env[graph.tangent] = torch.ones(tangent.shape, dtype=tangent.dtype, device=graph.device)
    return env
