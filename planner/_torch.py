"""The private PyTorch APIs the planner uses outside tracing, wrapped in one place.

Tracing's internals (AOT autograd, fake-tensor mode, the partitioner tags) live in
``planner/_aot.py``; everything else private is here, so that a PyTorch release that moves one of
them is fixed in one module (``tests/test_layers.py`` refuses private imports elsewhere):

- ``torch.utils._pytree``: flattening calls and outputs (``TreeSpec``, ``tree_*``, ``treespec_*``);
- ``torch._ops.OpOverload`` and its ``_schema``: what an ATen op returns, whether it mutates, its
  arguments by name;
- ``torch.utils._python_dispatch``: ``TorchDispatchMode``, wrapper subclasses, the mode stack;
- ``torch._subclasses.fake_tensor.FakeTensor``: telling traced tensors from real ones;
- ``torch._C._autograd``: whether the running backward retains its graph.
"""
from __future__ import annotations

from typing import Any

import torch
from torch._ops import OpOverload
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import (
    TorchDispatchMode, _get_current_dispatch_mode_stack, is_traceable_wrapper_subclass,
)
from torch.utils._pytree import (
    TreeSpec, tree_flatten, tree_flatten_with_path, tree_map, tree_unflatten, treespec_dumps, treespec_loads,
)

__all__ = [
    "OpOverload", "FakeTensor", "TorchDispatchMode", "is_traceable_wrapper_subclass", "TreeSpec",
    "tree_flatten", "tree_flatten_with_path", "tree_map", "tree_unflatten", "treespec_dumps",
    "treespec_loads", "schema_returns", "schema_is_mutable", "schema_name", "bind_arguments", "dispatch_modes",
    "backward_retains_graph",
]


def schema_returns(op: OpOverload) -> tuple:
    """The return values an ATen op's schema declares (their ``alias_info`` says which alias an input)."""
    return tuple(op._schema.returns)


def schema_is_mutable(op: OpOverload) -> bool:
    """Whether the op writes into one of its arguments."""
    return op._schema.is_mutable


def schema_name(op: OpOverload) -> str:
    """``"namespace::name"`` (no overload), as ``torch.library`` registers it."""
    return op._schema.name


def bind_arguments(op: OpOverload, args: tuple, kwargs: dict) -> dict[str, Any]:
    """A call's arguments by the names of ``op``'s schema, its defaults filled in where the call
    leaves them out (``{"input": ..., "training": True, ...}``): what a pattern matches on, however
    the trace spelled the call. Raises ``TypeError`` when the call does not fit the schema."""
    arguments = op._schema.arguments
    if len(args) > len(arguments) or set(kwargs) - {a.name for a in arguments}:
        raise TypeError(f"{op}: the call does not fit its schema ({len(args)} positional, keywords {sorted(kwargs)})")
    bound = {}
    for position, argument in enumerate(arguments):
        if position < len(args):
            if argument.name in kwargs:
                raise TypeError(f"{op}: {argument.name!r} is given both by position and by keyword")
            bound[argument.name] = args[position]
        elif argument.name in kwargs:
            bound[argument.name] = kwargs[argument.name]
        elif argument.has_default_value():
            bound[argument.name] = argument.default_value
        else:
            raise TypeError(f"{op}: the call leaves out {argument.name!r}, which has no default")
    return bound


def dispatch_modes() -> list[TorchDispatchMode]:
    """The dispatch modes active now, outermost first."""
    return list(_get_current_dispatch_mode_stack())


def backward_retains_graph() -> bool:
    """Inside a backward: whether it was asked to retain its graph (``retain_graph=True``)."""
    return torch._C._autograd._get_current_graph_task_keep_graph()
