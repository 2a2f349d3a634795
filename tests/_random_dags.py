"""Random small DAG models for property tests of the planning algorithms.

A model is a spec: the width ``d``, the batch size, and a sequence of ops, each reading one or two
earlier values (value 0 is the input ``x``; op ``i`` produces value ``i + 1``). Ops are
``Linear(d, d)``, ``tanh``, ``relu``, ``sigmoid``, and the sum or product of two values, so the
forward graph has branches, skip connections, shared inputs and dead ends. The model returns the
last value that depends on a parameter, and optionally a second such value (the default loss sums
every output), so the loss may read a tensor from the middle of the forward.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import strategies as st
from torch import nn

import planner
from planner import TrainingGraph

UNARY = ("linear", "tanh", "relu", "sigmoid")
BINARY = ("add", "mul")
KINDS = UNARY + BINARY
#: at most how many forward ATen ops each kind becomes (Linear on a 2-D input: a transposed-weight
#: view and addmm; tanh, relu and sigmoid: the op and a detach of the output their backward reads)
ATEN_OPS = {"linear": 2, "tanh": 2, "relu": 2, "sigmoid": 2, "add": 1, "mul": 1}
MAX_FORWARD_OPS = 14  # brute force enumerates 2^(n-1) segmentations


@dataclass(frozen=True)
class DagSpec:
    d: int
    batch: int
    ops: tuple[tuple[str, int, int], ...]  # (kind, first input, second input; equal to the first for unary ops)
    extra_output: int | None  # index of a second returned value, or None

    def requires_grad(self) -> list[bool]:
        """Which values depend on a parameter: all but value 0, the input, for a drawn spec."""
        flags = [False]
        for kind, a, b in self.ops:
            flags.append(kind == "linear" or flags[a] or (kind in BINARY and flags[b]))
        return flags

    @property
    def output(self) -> int:
        flags = self.requires_grad()
        return max(i for i, f in enumerate(flags) if f)


class RandomDag(nn.Module):
    def __init__(self, spec: DagSpec):
        super().__init__()
        self.spec = spec
        self.linears = nn.ModuleDict({
            str(i): nn.Linear(spec.d, spec.d) for i, (kind, _, _) in enumerate(spec.ops) if kind == "linear"})

    def forward(self, x: torch.Tensor):
        values = [x]
        for i, (kind, a, b) in enumerate(self.spec.ops):
            if kind == "linear":
                values.append(self.linears[str(i)](values[a]))
            elif kind == "tanh":
                values.append(torch.tanh(values[a]))
            elif kind == "relu":
                values.append(torch.relu(values[a]))
            elif kind == "sigmoid":
                values.append(torch.sigmoid(values[a]))
            elif kind == "add":
                values.append(values[a] + values[b])
            else:
                values.append(values[a] * values[b])
        out = values[self.spec.output]
        if self.spec.extra_output is None:
            return out
        return out, values[self.spec.extra_output]


@st.composite
def dag_specs(draw, min_ops: int = 4, max_ops: int = 10, max_forward_ops: int = MAX_FORWARD_OPS) -> DagSpec:
    """A random spec whose forward has at most ``max_forward_ops`` ATen ops (estimated from
    ``ATEN_OPS``; the first op is a Linear so that something is trainable)."""
    d = draw(st.integers(4, 16))
    batch = draw(st.integers(2, 8))
    count = draw(st.integers(min_ops, max_ops))
    ops: list[tuple[str, int, int]] = [("linear", 0, 0)]
    aten = ATEN_OPS["linear"]
    for i in range(1, count):
        kinds = [k for k in KINDS if aten + ATEN_OPS[k] <= max_forward_ops]
        if not kinds:
            break
        kind = draw(st.sampled_from(kinds))
        # inputs are drawn as distances back, so that the simplest draw is a chain (values that
        # nothing reads are dead code, which the trace drops); the input x is read only by the
        # first Linear and as the second operand of a sum or product (a skip from the input)
        a = i - (draw(st.integers(0, i - 1)) if draw(st.booleans()) else 0)
        b = i - draw(st.integers(0, i)) if kind in BINARY else a
        ops.append((kind, a, b))
        aten += ATEN_OPS[kind]
    flags = DagSpec(d, batch, tuple(ops), None).requires_grad()
    output = max(i for i, f in enumerate(flags) if f)
    others = [i for i, f in enumerate(flags) if f and i != output]
    extra = draw(st.one_of(st.none(), st.sampled_from(others))) if others else None
    return DagSpec(d, batch, tuple(ops), extra)


@dataclass
class DagCase:
    spec: DagSpec
    model: RandomDag
    x: torch.Tensor
    graph: TrainingGraph


_CACHE: dict[DagSpec, DagCase] = {}


def build_dag(spec: DagSpec) -> DagCase:
    """The model of ``spec`` (seeded), an input batch and its captured graph; cached per spec,
    since several property tests draw the same specs."""
    if spec not in _CACHE:
        torch.manual_seed(0)
        model = RandomDag(spec).train()
        x = torch.randn(spec.batch, spec.d)
        _CACHE[spec] = DagCase(spec, model, x, planner.capture(model, x))
    return _CACHE[spec]
