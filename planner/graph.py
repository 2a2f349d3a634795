"""The training-graph IR: every algorithm, the simulator and the executor read this one type.

A ``TrainingGraph`` is the whole training step (forward, loss, backward) as ATen operators in a
topological order. Operators read and write tensors; tensors live in storages, and memory is
counted per storage, so views and aliases cost nothing extra. Parameters, buffers and inputs are
*resident* (alive for the whole step), as are the ``.grad`` accumulators: a steady-state step has
them allocated already, and each gradient the backward produces is added into its accumulator and
freed at once, as eager autograd does.
"""
from __future__ import annotations

import enum
import hashlib
import json
import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from planner.errors import GraphLintError

if TYPE_CHECKING:  # the core holds torch's dtype objects without importing torch
    import torch


class Phase(str, enum.Enum):
    FORWARD = "forward"
    BACKWARD = "backward"


class TensorKind(str, enum.Enum):
    PARAMETER = "parameter"
    BUFFER = "buffer"
    INPUT = "input"  # model inputs and loss targets
    TANGENT = "tangent"  # d(loss)/d(loss), the seed of the backward
    CONSTANT = "constant"  # a tensor the forward builds from constants, bound to its traced value
    ACTIVATION = "activation"  # anything an operator produces, except parameter gradients
    GRADIENT = "gradient"  # a parameter's gradient, accumulated into .grad when produced


RESIDENT_KINDS = frozenset({TensorKind.PARAMETER, TensorKind.BUFFER, TensorKind.INPUT, TensorKind.TANGENT,
                            TensorKind.CONSTANT})


@dataclass(frozen=True)
class TensorInfo:
    id: int
    name: str
    shape: tuple[int, ...]
    dtype: "torch.dtype"
    nbytes: int  # numel * element size of this tensor (its storage may be larger)
    storage: int
    kind: TensorKind
    producer: int | None  # op id; None for resident tensors
    consumers: tuple[int, ...]  # op ids, in graph order, without repeats
    # element strides as traced (the memory layout: channels-last, transposed); () for the tensors a
    # graph rewrite adds. Variant ops give their outputs the layout the stock op's output has here.
    strides: tuple[int, ...] = ()


@dataclass(frozen=True)
class StorageInfo:
    id: int
    nbytes: int


@dataclass(frozen=True)
class OpInfo:
    id: int
    name: str
    target: str  # the ATen overload, e.g. "aten.convolution.default"
    phase: Phase
    inputs: tuple[int, ...]  # tensor ids, without repeats
    outputs: tuple[int, ...]  # tensor ids
    flops: float
    bytes_read: int
    bytes_written: int
    is_view: bool  # every output aliases an input's storage: free to run, allocates nothing
    is_random: bool  # draws from the RNG: a recomputation must replay the same state
    in_loss: bool  # part of the loss (forward) or of its backward, outside the model itself
    # scratch bytes the op is known to allocate beyond its outputs while it runs (the variant ops
    # of planner.variants declare theirs); cost models add it to their own workspace estimate
    workspace_bytes: int = 0
    # for a backward op, the forward op whose derivative it computes (autograd's sequence number,
    # as AOT records it); None for forward ops, gradient accumulations and ops autograd did not tag.
    # Hierarchical planning uses it to give each backward op to the block of its forward op.
    differentiates: int | None = None


@dataclass(frozen=True)
class TensorRef:
    """Stands for a graph tensor inside an ``OpCall``'s arguments."""

    id: int


@dataclass(frozen=True)
class OpCall:
    """How to run an op: ``target(*args, **kwargs)`` with each ``TensorRef`` replaced by a tensor.

    ``output_slots`` maps the positions of the result to tensor ids (``None`` where a position
    holds no tensor); a single-tensor result has one slot and ``returns_tuple`` false.
    """

    target: Callable[..., Any]
    args: tuple
    kwargs: dict
    output_slots: tuple[int | None, ...]
    returns_tuple: bool

    def input_ids(self) -> tuple[int, ...]:
        """The tensor ids the call reads, in argument order, without repeats: the op's inputs."""
        return tuple(dict.fromkeys(ref.id for ref in _refs((self.args, self.kwargs))))

    def output_ids(self) -> tuple[int, ...]:
        """The tensor ids the call returns, in slot order: the op's outputs."""
        return tuple(slot for slot in self.output_slots if slot is not None)


def _refs(value: Any):
    """Every ``TensorRef`` in nested lists, tuples and dicts, depth first."""
    if isinstance(value, TensorRef):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _refs(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _refs(item)


def tensor_bytes(shape: tuple[int, ...], dtype: "torch.dtype") -> int:
    """numel * element size: what a dense tensor of ``shape`` and ``dtype`` occupies."""
    return math.prod(shape) * dtype.itemsize


@dataclass(frozen=True)
class InputSpec:
    shape: tuple[int, ...]
    dtype: "torch.dtype"
    device: str


@dataclass(frozen=True)
class VariantCapability:
    """What the device a graph's operator variants were rewritten for runs them with.

    Their workspace depends on it (the CuPy kernels need less scratch than the PyTorch twins), and
    so do a plan's predicted peak and the graph's fingerprint: a plan made where the kernels run
    does not belong to a graph rewritten where they do not. Whether the CUDA device can run them
    is all that matters: the kernels compile for whatever device CuPy reports, with the same
    workspace on every compute capability.
    """

    cupy_kernels: bool = False  # CUDA tensors and a usable CuPy: the kernels; else the PyTorch twins

    def describe(self) -> str:
        return "the CuPy kernels" if self.cupy_kernels else "the PyTorch twins (no CuPy kernels)"


@dataclass(frozen=True, eq=False)
class TrainingGraph:
    """One training step as a graph, frozen: built by ``planner.graph_builder.GraphBuilder`` (for
    capture and every rewrite), which derives its derived fields; ``lint()`` checks them."""

    ops: tuple[OpInfo, ...]
    tensors: tuple[TensorInfo, ...]
    storages: tuple[StorageInfo, ...]
    calls: tuple[OpCall, ...] = field(repr=False)
    parameters: dict[str, int]  # parameter name -> tensor id
    buffers: dict[str, int]
    inputs: tuple[int, ...]  # the model's inputs, in call order
    targets: tuple[int, ...]  # extra arguments of the loss function
    tangent: int
    loss: int
    model_outputs: tuple[int, ...]  # the tensors the model returns, in its output's pytree order
    # d(loss)/d(model output) for each, where the model's backward starts (None: the loss ignores it)
    output_grads: tuple[int | None, ...]
    gradients: dict[int, int]  # gradient tensor id -> parameter tensor id
    buffer_updates: dict[int, int]  # tensor holding a new value -> the buffer (or input) it is written into
    input_gradients: dict[int, int]  # gradient tensor id -> input tensor id (inputs that require grad)
    input_specs: tuple[InputSpec, ...]  # model inputs then targets, to re-capture at apply time
    device: str
    constants: dict[int, Any] = field(default_factory=dict, repr=False)  # CONSTANT tensor id -> its value
    # how the model is called and what it returns (planner.calls.PytreeForm), and the state the
    # trace assumed (planner.guards.StepKey): given by capture
    call_form: Any = field(default=None, repr=False)
    output_form: Any = field(default=None, repr=False)
    assumptions: Any = field(default=None, repr=False)
    # low-memory operator variants applied by planner.variants ("relu_packed@relu_3", ...), and
    # what runs them (their workspace depends on it)
    variants: tuple[str, ...] = ()
    variant_capability: VariantCapability = VariantCapability()

    # ---- derived views -------------------------------------------------------------------
    @cached_property
    def resident_storages(self) -> frozenset[int]:
        """Storages alive for the whole step: parameters, buffers, inputs, the loss tangent."""
        return frozenset(t.storage for t in self.tensors if t.kind in RESIDENT_KINDS)

    @cached_property
    def grad_accumulator_bytes(self) -> int:
        """Bytes of the ``.grad`` tensors of every parameter that receives a gradient (a tied
        parameter, listed under several names, has one ``.grad``)."""
        return sum(self.storages[s].nbytes for s in {self.tensors[p].storage for p in self.gradients.values()})

    @cached_property
    def resident_bytes(self) -> int:
        """Memory alive for the whole step, whatever the schedule."""
        storage_bytes = sum(self.storages[s].nbytes for s in self.resident_storages)
        return storage_bytes + self.grad_accumulator_bytes

    @cached_property
    def storage_bytes(self) -> np.ndarray:
        return np.array([s.nbytes for s in self.storages], dtype=np.int64)

    @cached_property
    def tensor_storage(self) -> np.ndarray:
        return np.array([t.storage for t in self.tensors], dtype=np.int64)

    @cached_property
    def op_arrays(self) -> dict[str, np.ndarray]:
        """The ops as flat arrays for compiled loops: inputs and outputs in CSR form, view flags,
        and a resident mask over tensors."""
        def csr(lists):
            pointer = np.zeros(len(lists) + 1, dtype=np.int64)
            pointer[1:] = np.cumsum([len(x) for x in lists])
            return pointer, np.array([v for x in lists for v in x], dtype=np.int64)

        in_ptr, in_idx = csr([op.inputs for op in self.ops])
        out_ptr, out_idx = csr([op.outputs for op in self.ops])
        resident = np.array([t.kind in RESIDENT_KINDS for t in self.tensors], dtype=np.bool_)
        is_view = np.array([op.is_view for op in self.ops], dtype=np.bool_)
        is_backward = np.array([op.phase is Phase.BACKWARD for op in self.ops], dtype=np.bool_)
        return dict(in_ptr=in_ptr, in_idx=in_idx, out_ptr=out_ptr, out_idx=out_idx,
                    resident=resident, is_view=is_view, is_backward=is_backward)

    @cached_property
    def forward_ops(self) -> tuple[int, ...]:
        return tuple(op.id for op in self.ops if op.phase is Phase.FORWARD)

    @cached_property
    def backward_ops(self) -> tuple[int, ...]:
        return tuple(op.id for op in self.ops if op.phase is Phase.BACKWARD)

    def is_resident(self, tensor: int) -> bool:
        return self.tensors[tensor].kind in RESIDENT_KINDS

    # ---- invariants ------------------------------------------------------------------------
    def lint(self) -> None:
        """Check every invariant the builder promises (as ``torch.fx.Graph.lint``): dense ids in
        order; each op's inputs and outputs are its call's and exist; producers and consumers
        agree with them; a topological order, forward ops before backward ops; bytes agree with
        shape, dtype and storage; views share their input's storage and cost nothing; kinds and
        phases fit the graph's fields. Raises ``GraphLintError`` naming the invariant, op and
        tensor. Complexity: O(ops + tensors + edges)."""
        _check_rows(self)
        _check_ops(self)
        _check_tensors(self)
        for op in self.ops:
            _check_op_costs(self, op)
        _check_fields(self)

    # ---- identity ------------------------------------------------------------------------
    @cached_property
    def fingerprint(self) -> str:
        """Stable hash of structure, shapes and dtypes, the operator variants applied and what runs
        them: a schedule belongs to exactly one graph."""
        digest = hashlib.sha256()
        for t in self.tensors:
            named = t.name if t.kind in RESIDENT_KINDS else ""
            # a dtype by its name, "torch.float32": the hash dtypes had as strings (plan files keep it)
            digest.update(repr((t.shape, str(t.dtype), t.storage, t.kind.value, t.producer, named)).encode())
        for op, call in zip(self.ops, self.calls):
            digest.update(repr((op.target, op.phase.value, op.inputs, op.outputs)).encode())
            digest.update(_constant_repr(call).encode())
        digest.update(repr((self.model_outputs, self.output_grads, self.loss)).encode())
        if self.variants:
            digest.update(repr(self.variants).encode())
        if self.variant_capability.cupy_kernels:  # the twins hash as before capabilities were recorded
            digest.update(b"variants run by the CuPy kernels")
        return digest.hexdigest()[:32]

    # ---- analysis --------------------------------------------------------------------------
    def to_networkx(self):
        """A ``networkx.DiGraph`` over op ids; edges carry the tensor id and its bytes.

        networkx is an optional extra, used here alone: imported on call, so the planner runs without it."""
        try:
            import networkx as nx
        except ImportError as error:
            raise ImportError("TrainingGraph.to_networkx needs networkx: pip install 'remat-planner[networkx]'") from error

        dag = nx.DiGraph()
        for op in self.ops:
            dag.add_node(op.id, name=op.name, target=op.target, phase=op.phase.value, flops=op.flops)
        for t in self.tensors:
            if t.producer is not None:
                for consumer in t.consumers:
                    dag.add_edge(t.producer, consumer, tensor=t.id, nbytes=t.nbytes)
        return dag

    def summary(self) -> dict[str, int]:
        """Resident bytes by kind: what any schedule of this step holds throughout."""
        by_kind: dict[str, int] = {}
        seen: set[int] = set()
        for t in self.tensors:
            if t.kind in RESIDENT_KINDS and t.storage not in seen:
                seen.add(t.storage)
                by_kind[t.kind.value] = by_kind.get(t.kind.value, 0) + self.storages[t.storage].nbytes
        by_kind["gradient accumulators"] = self.grad_accumulator_bytes
        return by_kind

    def __repr__(self) -> str:
        variants = f", {len(self.variants)} variants" if self.variants else ""
        return (f"TrainingGraph({len(self.forward_ops)} forward ops, {len(self.backward_ops)} backward ops, "
                f"{len(self.tensors)} tensors{variants}, fingerprint={self.fingerprint[:12]})")


def _constant_repr(call: OpCall) -> str:
    """The non-tensor arguments of a call (strides, dims, flags), which change what an op computes."""
    def scrub(value):
        if isinstance(value, TensorRef):
            return "T"
        if isinstance(value, (list, tuple)):
            return [scrub(v) for v in value]
        if isinstance(value, dict):
            return {k: scrub(v) for k, v in value.items()}
        return repr(value)

    return json.dumps([scrub(list(call.args)), scrub(call.kwargs)], sort_keys=True)


# ---- lint: one function per group of invariants -------------------------------------------------
def _check_rows(graph: TrainingGraph) -> None:
    for what, rows in (("op", graph.ops), ("tensor", graph.tensors), ("storage", graph.storages)):
        for index, row in enumerate(rows):
            if row.id != index:
                raise GraphLintError("dense ids in order", f"{what} at position {index} has id {row.id}",
                                     **({what: index} if what != "storage" else {}))
    if len(graph.calls) != len(graph.ops):
        raise GraphLintError("one call per op", f"{len(graph.calls)} calls for {len(graph.ops)} ops")
    for storage in graph.storages:
        if storage.nbytes < 0:
            raise GraphLintError("storage bytes", f"storage {storage.id} has {storage.nbytes} bytes")


def _check_ops(graph: TrainingGraph) -> None:
    n_tensors = len(graph.tensors)
    seen_backward = False
    for op, call in zip(graph.ops, graph.calls):
        if op.target != str(call.target):
            raise GraphLintError("target is the call's", f"{op.target} but the call runs {call.target}", op=op.id)
        if op.inputs != call.input_ids() or op.outputs != call.output_ids():
            raise GraphLintError("inputs and outputs are the call's",
                                 f"{op.inputs} -> {op.outputs}, the call {call.input_ids()} -> {call.output_ids()}", op=op.id)
        for tensor in op.inputs + op.outputs:
            if not 0 <= tensor < n_tensors:
                raise GraphLintError("tensors exist", f"reads or writes tensor {tensor} of {n_tensors}", op=op.id)
        for tensor in op.inputs:
            producer = graph.tensors[tensor].producer
            if producer is not None and producer >= op.id:
                raise GraphLintError("topological order", f"reads tensor {tensor} before op {producer} produces it",
                                     op=op.id, tensor=tensor)
        for tensor in op.outputs:
            if graph.tensors[tensor].producer != op.id:
                raise GraphLintError("producer is the op writing it", f"its producer is "
                                     f"{graph.tensors[tensor].producer}", op=op.id, tensor=tensor)
        if op.phase is Phase.BACKWARD:
            seen_backward = True
        elif seen_backward:
            raise GraphLintError("forward ops before backward ops", "a forward op after a backward op", op=op.id)
        if (op.differentiates is not None) and (op.phase is Phase.FORWARD or not 0 <= op.differentiates < op.id
                                                or graph.ops[op.differentiates].phase is not Phase.FORWARD):
            raise GraphLintError("differentiates a forward op", f"differentiates {op.differentiates}", op=op.id)


def _check_op_costs(graph: TrainingGraph, op: OpInfo) -> None:
    input_storages = {graph.tensors[t].storage for t in op.inputs}
    is_view = all(graph.tensors[t].storage in input_storages for t in op.outputs)
    if op.is_view != is_view:
        raise GraphLintError("views share storage with their base", f"is_view is {op.is_view} but its outputs "
                             f"{'all' if is_view else 'do not all'} live in its inputs' storages", op=op.id)
    read = 0 if is_view else sum(graph.tensors[t].nbytes for t in op.inputs)
    written = 0 if is_view else sum(graph.tensors[t].nbytes for t in op.outputs)
    if (op.bytes_read, op.bytes_written) != (read, written) or (is_view and op.flops != 0):
        raise GraphLintError("bytes moved are its tensors'", f"reads {op.bytes_read} and writes {op.bytes_written} "
                             f"bytes ({op.flops} FLOPs), its tensors {read} and {written}", op=op.id)
    if op.workspace_bytes < 0:
        raise GraphLintError("workspace bytes", f"workspace of {op.workspace_bytes} bytes", op=op.id)


def _check_tensors(graph: TrainingGraph) -> None:
    consumers: list[list[int]] = [[] for _ in graph.tensors]
    for op in graph.ops:
        for tensor in op.inputs:
            consumers[tensor].append(op.id)
    for t in graph.tensors:
        if t.consumers != tuple(consumers[t.id]):
            raise GraphLintError("consumers are the ops reading it", f"consumers {t.consumers}, readers "
                                 f"{tuple(consumers[t.id])}", tensor=t.id)
        if t.producer is not None and t.id not in graph.ops[t.producer].outputs:
            raise GraphLintError("producer is the op writing it", f"op {t.producer} does not write it", tensor=t.id)
        if (t.producer is None) != (t.kind in RESIDENT_KINDS):
            raise GraphLintError("resident tensors have no producer, others one",
                                 f"a {t.kind.value} tensor with producer {t.producer}", tensor=t.id)
        if not 0 <= t.storage < len(graph.storages):
            raise GraphLintError("tensors live in existing storages", f"storage {t.storage}", tensor=t.id)
        if t.nbytes != tensor_bytes(t.shape, t.dtype):
            raise GraphLintError("bytes are shape times element size", f"{t.nbytes} bytes for {t.shape} {t.dtype}",
                                 tensor=t.id)
        # views are exempt: their offset in the storage they view is not recorded
        made_by_view = t.producer is not None and graph.ops[t.producer].is_view
        if not made_by_view and _extent_bytes(t) > graph.storages[t.storage].nbytes:
            raise GraphLintError("a tensor fits its storage", f"spans {_extent_bytes(t)} bytes in storage {t.storage} "
                                 f"of {graph.storages[t.storage].nbytes}", tensor=t.id)
    empty = set(range(len(graph.storages))) - {t.storage for t in graph.tensors}
    if empty:
        raise GraphLintError("every storage holds a tensor", f"storages {sorted(empty)[:5]} hold none")


def _extent_bytes(t: TensorInfo) -> int:
    """The bytes ``t`` needs in its storage: its bytes, or for a broadcast tensor (a stride 0 over
    a dimension of size > 1: an expanded input) the span of its strides from its first element."""
    if 0 in t.shape or not any(stride == 0 and size > 1 for size, stride in zip(t.shape, t.strides)):
        return t.nbytes
    return (1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.strides))) * t.dtype.itemsize


def _check_fields(graph: TrainingGraph) -> None:
    def expect(invariant: str, tensor: int | None, kinds: set[TensorKind] | None = None) -> None:
        if tensor is None or not 0 <= tensor < len(graph.tensors):
            raise GraphLintError(invariant, f"names tensor {tensor}, not one of {len(graph.tensors)}")
        if kinds is not None and graph.tensors[tensor].kind not in kinds:
            raise GraphLintError(invariant, f"is a {graph.tensors[tensor].kind.value} tensor", tensor=tensor)

    for tensor in graph.parameters.values():
        expect("parameters are parameter tensors", tensor, {TensorKind.PARAMETER})
    for tensor in graph.buffers.values():
        expect("buffers are buffer tensors", tensor, {TensorKind.BUFFER})
    for tensor in graph.inputs + graph.targets:
        expect("inputs and targets are input tensors", tensor, {TensorKind.INPUT})
    expect("the tangent is the tangent tensor", graph.tangent, {TensorKind.TANGENT})
    expect("the loss is an activation", graph.loss, {TensorKind.ACTIVATION})
    for gradient, parameter in graph.gradients.items():
        expect("gradients are gradient tensors", gradient, {TensorKind.GRADIENT})
        expect("gradients are of parameters", parameter, {TensorKind.PARAMETER})
    for new, old in graph.buffer_updates.items():
        expect("buffer updates are computed", new, {TensorKind.ACTIVATION})
        expect("buffer updates write buffers or inputs", old, {TensorKind.BUFFER, TensorKind.INPUT})
    for gradient, tensor in graph.input_gradients.items():
        expect("input gradients are computed", gradient, {TensorKind.ACTIVATION, TensorKind.GRADIENT})
        expect("input gradients are of inputs", tensor, {TensorKind.INPUT})
    for tensor in graph.constants:
        expect("constants are constant tensors", tensor, {TensorKind.CONSTANT})
    for tensor in graph.model_outputs:
        expect("model outputs exist", tensor)
    for tensor in graph.output_grads:
        if tensor is not None:
            expect("output gradients exist", tensor)
    if len(graph.output_grads) != len(graph.model_outputs):
        raise GraphLintError("one gradient slot per model output", f"{len(graph.output_grads)} for "
                             f"{len(graph.model_outputs)} outputs")
    specs = graph.input_specs
    for spec, tensor in zip(specs, graph.inputs + graph.targets):
        if (spec.shape, spec.dtype) != (graph.tensors[tensor].shape, graph.tensors[tensor].dtype):
            raise GraphLintError("input specs describe the inputs", f"spec {spec.shape} {spec.dtype}", tensor=tensor)
    if len(specs) != len(graph.inputs) + len(graph.targets):
        raise GraphLintError("input specs describe the inputs", f"{len(specs)} specs for "
                             f"{len(graph.inputs) + len(graph.targets)} inputs and targets")
    names = {op.name for op in graph.ops}
    for variant in graph.variants:
        if variant.split("@", 1)[-1] not in names:
            raise GraphLintError("variants name ops", f"{variant} names no op")
