"""How a model is called and what it returns, as pytree forms: tensors are numbered slots, every
other leaf a constant of the form.

``plan(model, budget, inputs)`` takes a tensor, a tuple (``model(*inputs)``) or a dict
(``model(**inputs)``); the graph records the call's form, so the planned module is called the same
way and the form's constants (flags, ``None``) are part of what the plan assumed. The model's
output gets a form too: the planned module rebuilds it (a transformers ``ModelOutput``, a dict)
from the tensors the plan computes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

from planner._torch import TreeSpec, tree_flatten, tree_unflatten, treespec_dumps, treespec_loads

#: non-tensor leaves a call may hold: hashable, comparable, saved in plan files as JSON
CONSTANT_TYPES = (type(None), bool, int, float, str)


@dataclass(frozen=True)
class Slot:
    """The ``index``-th tensor of a form's tensors."""

    index: int


@dataclass(frozen=True)
class Dropped:
    """An output leaf that is neither a tensor nor a constant (a transformers ``Cache`` holding the
    traced tensors): the planned module returns ``None`` in its place."""

    type_name: str


@dataclass(frozen=True)
class PytreeForm:
    """A pytree whose tensor leaves are ``Slot``\\ s: ``fill`` puts real tensors back."""

    spec: TreeSpec
    leaves: tuple

    def fill(self, tensors) -> Any:
        return tree_unflatten([tensors[leaf.index] if isinstance(leaf, Slot) else None if isinstance(leaf, Dropped)
                               else leaf for leaf in self.leaves], self.spec)

    @property
    def n_tensors(self) -> int:
        return sum(isinstance(leaf, Slot) for leaf in self.leaves)

    @property
    def dropped(self) -> tuple[str, ...]:
        return tuple(leaf.type_name for leaf in self.leaves if isinstance(leaf, Dropped))

    def to_json(self) -> dict:
        return {"spec": treespec_dumps(self.spec),
                "leaves": [["tensor", leaf.index] if isinstance(leaf, Slot) else ["constant", leaf] for leaf in self.leaves]}

    @classmethod
    def from_json(cls, data: dict) -> "PytreeForm":
        leaves = tuple(Slot(int(value)) if kind == "tensor" else value for kind, value in data["leaves"])
        if any(not isinstance(leaf, (Slot, *CONSTANT_TYPES)) for leaf in leaves):
            raise ValueError("a call form's constants must be None, bool, int, float or str")
        return cls(treespec_loads(data["spec"]), leaves)


def split(value: Any, what: str, keep_objects: bool = False) -> tuple[PytreeForm, tuple[torch.Tensor, ...]]:
    """``value`` as a form and its tensors, in pytree order. A leaf that is neither a tensor nor a
    constant raises ``TypeError`` naming it, or with ``keep_objects`` becomes ``Dropped``."""
    leaves, spec = tree_flatten(value)
    tensors: list[torch.Tensor] = []
    template = []
    for position, leaf in enumerate(leaves):
        if isinstance(leaf, torch.Tensor):
            template.append(Slot(len(tensors)))
            tensors.append(leaf)
        elif isinstance(leaf, CONSTANT_TYPES):
            template.append(leaf)
        elif keep_objects:
            template.append(Dropped(type(leaf).__name__))
        else:
            raise TypeError(f"{what} holds a {type(leaf).__name__} (leaf {position}): pass tensors, or constants "
                            "(None, bool, int, float, str), in tuples, lists and dicts")
    return PytreeForm(spec, tuple(template)), tuple(tensors)


@dataclass(frozen=True)
class Call:
    """A call with both positional and keyword arguments, ``model(*args, **kwargs)``."""

    args: tuple
    kwargs: dict


def call_arguments(inputs: Any) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of the model call ``inputs`` stands for: a tensor is ``model(x)``, a tuple
    or list ``model(*inputs)``, a dict ``model(**inputs)``, a ``Call`` both. Keywords are sorted,
    so that the form does not depend on the order a batch dict was built in."""
    if isinstance(inputs, Call):
        return tuple(inputs.args), dict(sorted(inputs.kwargs.items()))
    if isinstance(inputs, Mapping):
        if not all(isinstance(key, str) for key in inputs):
            raise TypeError("a dict of inputs is passed as keywords, model(**inputs): its keys must be strings")
        return (), dict(sorted(inputs.items()))
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    return (inputs,), {}


def split_call(args: tuple, kwargs: dict, what: str = "inputs") -> tuple[PytreeForm, tuple[torch.Tensor, ...]]:
    """The form of ``model(*args, **kwargs)`` and its tensors; ``form.fill(tensors)`` gives back
    ``(args, kwargs)``."""
    return split((tuple(args), dict(sorted(kwargs.items()))), what)


def as_tuple(values: Any, what: str) -> tuple[torch.Tensor, ...]:
    """Loss targets (or inputs) as given, None, one tensor or a sequence, as a tuple of tensors;
    ``TypeError`` naming ``what`` for anything else."""
    if values is None:
        return ()
    values = tuple(values) if isinstance(values, (tuple, list)) else (values,)
    for i, value in enumerate(values):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{what}[{i}] is a {type(value).__name__}; pass tensors "
                            "(a tensor, or a tuple/list of tensors)")
    return values
