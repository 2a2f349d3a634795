"""The one way to make a ``TrainingGraph``: rows added and edited, every derived field computed in ``build``.

Capture (``planner.capturing``) adds the traced tensors and ops; the variant rewrite
(``planner.variants``) starts from a graph (``GraphBuilder.from_graph``) and replaces calls and
retypes tensors. Neither computes a derived field: an op's inputs and outputs come from its call
(the ``TensorRef`` arguments and the output slots), a tensor's producer from the op whose call
outputs it, and ``build`` derives the rest at once (consumers, tensor bytes from shape and dtype,
``is_view`` from storages, bytes read and written, views' zero FLOPs), so an edit cannot leave a
stale field behind. ``TrainingGraph.lint`` checks what ``build`` promises.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from planner.graph import OpCall, OpInfo, Phase, StorageInfo, TensorInfo, TensorKind, TrainingGraph, tensor_bytes

if TYPE_CHECKING:
    import torch


@dataclass
class TensorRow:
    """A tensor under construction (read it; change it through ``GraphBuilder``'s methods)."""

    name: str
    shape: tuple[int, ...]
    dtype: "torch.dtype"
    storage: int
    kind: TensorKind
    strides: tuple[int, ...] = ()
    producer: int | None = None  # kept by GraphBuilder from the ops' calls


@dataclass
class OpRow:
    """An op under construction (read it; change it through ``GraphBuilder``'s methods)."""

    name: str
    phase: Phase
    call: OpCall
    flops: float  # as counted for the op; build() makes a view's 0
    is_random: bool
    in_loss: bool
    workspace_bytes: int = 0
    differentiates: int | None = None
    inputs: tuple[int, ...] = ()  # from the call, kept by GraphBuilder
    outputs: tuple[int, ...] = ()


class GraphBuilder:
    """Mutable rows of a graph: tensors, storages, ops and their calls; ``build()`` freezes them.

    Ids are positions, given in the order rows are added, so the graph's op order is the order of
    ``add_op`` calls (a topological order, forward then backward, is the caller's to keep; ``lint``
    checks it). Complexity: every method O(its arguments), ``build`` O(ops + tensors + edges).
    """

    def __init__(self):
        self.tensors: list[TensorRow] = []
        self.ops: list[OpRow] = []
        self.storage_sizes: list[int] = []
        self._base: TrainingGraph | None = None

    @classmethod
    def from_graph(cls, graph: TrainingGraph) -> "GraphBuilder":
        """The rows of ``graph``, to edit; ``build`` keeps its other fields unless given."""
        builder = cls()
        builder._base = graph
        builder.storage_sizes = [s.nbytes for s in graph.storages]
        builder.tensors = [TensorRow(t.name, t.shape, t.dtype, t.storage, t.kind, t.strides, t.producer)
                           for t in graph.tensors]
        builder.ops = [OpRow(op.name, op.phase, call, op.flops, op.is_random, op.in_loss, op.workspace_bytes,
                             op.differentiates, op.inputs, op.outputs) for op, call in zip(graph.ops, graph.calls)]
        return builder

    # ---- storages and tensors ---------------------------------------------------------------------
    def add_storage(self, nbytes: int) -> int:
        self.storage_sizes.append(int(nbytes))
        return len(self.storage_sizes) - 1

    def resize_storage(self, storage: int, nbytes: int) -> None:
        self.storage_sizes[storage] = int(nbytes)

    def add_tensor(self, name: str, shape: tuple[int, ...], dtype: "torch.dtype", kind: TensorKind,
                   storage: int | None = None, strides: tuple[int, ...] = ()) -> int:
        """A tensor in ``storage``, or in a new storage of exactly its bytes; its producer is the
        op whose call lists it as an output (``add_op``, ``set_call``)."""
        shape = tuple(int(s) for s in shape)
        if storage is None:
            storage = self.add_storage(tensor_bytes(shape, dtype))
        self.tensors.append(TensorRow(name, shape, dtype, storage, kind, tuple(int(s) for s in strides)))
        return len(self.tensors) - 1

    def set_tensor(self, tensor: int, **fields: Any) -> None:
        """Change ``shape``, ``dtype``, ``strides``, ``storage`` or ``kind`` of ``tensor`` (not its
        producer: that follows the calls)."""
        unknown = set(fields) - {"shape", "dtype", "strides", "storage", "kind"}
        if unknown:
            raise TypeError(f"set_tensor cannot change {sorted(unknown)}")
        row = self.tensors[tensor]
        for name, value in fields.items():
            setattr(row, name, tuple(int(v) for v in value) if name in ("shape", "strides") else value)

    def retype(self, tensor: int, shape: tuple[int, ...], dtype: "torch.dtype", storage_bytes: int | None = None) -> None:
        """``tensor`` now holds ``shape`` and ``dtype``; its storage (which holds it alone, save
        views) is resized to ``storage_bytes``, by default the tensor's new bytes."""
        self.set_tensor(tensor, shape=shape, dtype=dtype)
        row = self.tensors[tensor]
        self.resize_storage(row.storage, tensor_bytes(row.shape, dtype) if storage_bytes is None else storage_bytes)

    # ---- ops --------------------------------------------------------------------------------------
    def add_op(self, name: str, phase: Phase, call: OpCall, *, flops: float, is_random: bool = False,
               in_loss: bool = False, workspace_bytes: int = 0, differentiates: int | None = None) -> int:
        """An op running ``call``, after every op added before it; its outputs' producer becomes it."""
        self.ops.append(OpRow(name, phase, call, float(flops), is_random, in_loss, int(workspace_bytes), differentiates))
        op = len(self.ops) - 1
        self._attach(op, call)
        return op

    def set_call(self, op: int, call: OpCall, workspace_bytes: int | None = None, flops: float | None = None) -> None:
        """``op`` runs ``call`` instead (another target, arguments or outputs); its inputs, outputs
        and their producers follow. The op keeps its FLOPs and workspace unless given."""
        self._attach(op, call)
        row = self.ops[op]
        if workspace_bytes is not None:
            row.workspace_bytes = int(workspace_bytes)
        if flops is not None:
            row.flops = float(flops)

    def set_in_loss(self, op: int) -> None:
        self.ops[op].in_loss = True

    def _attach(self, op: int, call: OpCall) -> None:
        """The one place an op's inputs, outputs and its outputs' producer are set: from ``call``."""
        row = self.ops[op]
        for tensor in row.outputs:
            self.tensors[tensor].producer = None
        row.call = call
        row.inputs, row.outputs = call.input_ids(), call.output_ids()
        for tensor in row.outputs:
            self.tensors[tensor].producer = op

    # ---- freezing ---------------------------------------------------------------------------------
    def build(self, **fields: Any) -> TrainingGraph:
        """The graph of these rows, with every derived field computed here, and ``fields`` (the
        graph-level ones: parameters, loss, ...; taken from ``from_graph``'s graph where not given)."""
        nbytes = [tensor_bytes(t.shape, t.dtype) for t in self.tensors]
        consumers: list[list[int]] = [[] for _ in self.tensors]
        ops = []
        for op_id, row in enumerate(self.ops):
            for tensor in row.inputs:
                consumers[tensor].append(op_id)
            input_storages = {self.tensors[t].storage for t in row.inputs}
            is_view = all(self.tensors[t].storage in input_storages for t in row.outputs)
            ops.append(OpInfo(
                id=op_id, name=row.name, target=str(row.call.target), phase=row.phase, inputs=row.inputs,
                outputs=row.outputs, flops=0.0 if is_view else row.flops,
                bytes_read=0 if is_view else sum(nbytes[t] for t in row.inputs),
                bytes_written=0 if is_view else sum(nbytes[t] for t in row.outputs),
                is_view=is_view, is_random=row.is_random, in_loss=row.in_loss,
                workspace_bytes=row.workspace_bytes, differentiates=row.differentiates))
        tensors = tuple(TensorInfo(id=i, name=t.name, shape=t.shape, dtype=t.dtype, nbytes=nbytes[i], storage=t.storage,
                                   kind=t.kind, producer=t.producer, consumers=tuple(consumers[i]), strides=t.strides)
                        for i, t in enumerate(self.tensors))
        rows = dict(ops=tuple(ops), tensors=tensors, calls=tuple(row.call for row in self.ops),
                    storages=tuple(StorageInfo(i, n) for i, n in enumerate(self.storage_sizes)))
        if self._base is not None:
            return dataclasses.replace(self._base, **rows, **fields)
        return TrainingGraph(**rows, **fields)
