"""Low-memory operator variants as a graph rewrite: the one way ``planner.gpu``'s ops enter a plan.

``variant_sites(graph)`` lists every place a variant applies; ``apply_variants(graph, sites)``
returns a new graph in which those forward ops call the variant (``remat_planner::*`` custom
ops) and their backward ops read the variant's small saved tensor instead of the big one. Op ids
and op order are unchanged (same number of ops, same positions), so any order of the original
graph's ops is a valid order of the rewritten one; new tensors and storages are appended at the
end of their lists, with exact byte sizes. The simulator, the executor and every algorithm then
treat the rewritten ops like any ATen op.

The variants (``planner.gpu`` documents each):

=====================  ==========================================  ===============================
variant                backward reads instead                      gradients
=====================  ==========================================  ===============================
``relu_packed``        a 1-bit mask instead of the ReLU output     bitwise stock
``dropout_packed``     a 1-bit mask instead of the bool mask       bitwise stock
``max_pool2d_packed``  4/8-bit window positions instead of the     bitwise stock
                       input and the int64 indices
``batch_norm_inverted``  the output instead of the input           within a stated tolerance
=====================  ==========================================  ===============================

A rewritten graph records its sites in ``TrainingGraph.variants`` (``"relu_packed@relu_3"``): the
fingerprint differs from the stock graph's, and ``apply_variant_names`` re-applies them to a
re-captured graph. ``select_variants`` keeps the sites that lower what the backward holds.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch

from planner.errors import PlanMismatchError
from planner.graph import OpCall, OpInfo, Phase, TensorRef, TrainingGraph
from planner.graph_builder import GraphBuilder
from planner.gpu import _bits, _cuda
from planner.gpu import batchnorm as _batchnorm
from planner.gpu import dropout as _dropout
from planner.gpu import maxpool as _maxpool
from planner.gpu import relu as _relu
from planner.gpu._checks import FLOAT_DTYPES

#: the variants whose gradients are bitwise stock (``batch_norm_inverted`` is within a tolerance);
#: ``plan(op_variants=True)`` chooses among these
BITWISE_VARIANTS = frozenset({"relu_packed", "dropout_packed", "max_pool2d_packed"})
#: every variant this version has
ALL_VARIANTS = BITWISE_VARIANTS | {"batch_norm_inverted"}

_ops = torch.ops.remat_planner
_VIEW_TARGETS = frozenset({"aten.detach.default", "aten.alias.default"})
_SUPPORTED_DTYPES = frozenset(FLOAT_DTYPES)
_UINT8, _INT64 = torch.uint8, torch.int64


@dataclass(frozen=True)
class VariantSite:
    """One place a variant applies.

    ``backward_ops`` switch to the variant's backward; ``view_ops`` (detach/alias ops between the
    forward's saved tensor and its backward) are re-pointed at the new saved tensor.
    ``saved_bytes``: what the rewritten backward newly needs from the forward (the mask or packed
    positions; the output for batch norm). ``released_bytes``: the forward tensors these backward
    ops no longer read (the ReLU output, the bool mask, the pooling input and int64 indices, the
    batch-norm input); they are freed earlier unless another op still needs them.
    """

    variant: str
    name: str  # "<variant>@<forward op name>": stable across captures of the same model
    forward_op: int
    backward_ops: tuple[int, ...]
    view_ops: tuple[int, ...]
    saved_bytes: int
    released_bytes: int


# ---- finding sites ------------------------------------------------------------------------------
def _ref(value: Any) -> int | None:
    return value.id if isinstance(value, TensorRef) else None


def _chain(graph: TrainingGraph, tensor: int, start: int, reads: Callable[[int, int], bool],
           ) -> tuple[tuple[int, ...], int] | None:
    """From consumer ``start`` of ``tensor``: the detach/alias ops leading to one op that
    ``reads(op, tensor)``, each view's output read by the next op alone. (views, reader) or None."""
    views: list[int] = []
    op, current = start, tensor
    while graph.ops[op].target in _VIEW_TARGETS and len(graph.ops[op].inputs) == 1:
        views.append(op)
        (current,) = graph.ops[op].outputs
        consumers = graph.tensors[current].consumers
        if len(consumers) != 1:
            return None
        op = consumers[0]
    return (tuple(views), op) if reads(op, current) else None


def _only_chain(graph: TrainingGraph, tensor: int, reads: Callable[[int, int], bool]):
    """The single chain from ``tensor`` to a reader, when every consumer of ``tensor`` is on it."""
    consumers = graph.tensors[tensor].consumers
    if len(consumers) != 1:
        return None
    return _chain(graph, tensor, consumers[0], reads)


def _exclusive_storage(graph: TrainingGraph, tensor: int, views: Sequence[int]) -> bool:
    """``tensor``'s storage holds only it and the outputs of ``views`` (so it can be retyped)."""
    storage = graph.tensors[tensor].storage
    allowed = {tensor, *(graph.ops[v].outputs[0] for v in views)}
    return all(t.id in allowed for t in graph.tensors if t.storage == storage)


def _backward(graph: TrainingGraph, op: int, target: str) -> bool:
    return graph.ops[op].phase is Phase.BACKWARD and graph.ops[op].target == target


def _relu_site(graph: TrainingGraph, op: OpInfo) -> VariantSite | None:
    (y,) = op.outputs
    if graph.tensors[y].dtype not in _SUPPORTED_DTYPES:
        return None

    def reads(consumer: int, tensor: int) -> bool:
        args = graph.calls[consumer].args
        return (_backward(graph, consumer, "aten.threshold_backward.default") and len(args) == 3
                and _ref(args[1]) == tensor and _ref(args[0]) != tensor and args[2] == 0)

    chains = [c for c in (_chain(graph, y, start, reads) for start in graph.tensors[y].consumers) if c]
    if len(chains) != 1:
        return None
    views, backward = chains[0]
    n = graph.tensors[y].nbytes
    numel = _numel(graph, y)
    return VariantSite("relu_packed", "", op.id, (backward,), views, _bits.packed_bytes(numel), n)


def _dropout_site(graph: TrainingGraph, op: OpInfo) -> VariantSite | None:
    args = graph.calls[op.id].args
    if len(args) != 3 or args[2] is not True or len(op.outputs) != 2:
        return None
    y, keep = op.outputs
    if graph.tensors[y].dtype not in _SUPPORTED_DTYPES or graph.tensors[keep].dtype != torch.bool:
        return None

    def reads(consumer: int, tensor: int) -> bool:
        call_args = graph.calls[consumer].args
        return (_backward(graph, consumer, "aten.native_dropout_backward.default") and len(call_args) == 3
                and _ref(call_args[1]) == tensor and _ref(call_args[0]) != tensor)

    found = _only_chain(graph, keep, reads)
    if found is None or not _exclusive_storage(graph, keep, found[0]):
        return None
    views, backward = found
    numel = _numel(graph, keep)
    return VariantSite("dropout_packed", "", op.id, (backward,), views, _bits.packed_bytes(numel),
                       graph.tensors[keep].nbytes)


_POOL_DEFAULTS = ([], [0], [1], False)  # stride, padding, dilation, ceil_mode


def _pool_arguments(args: tuple) -> tuple | None:
    """(kernel, stride, padding, dilation, ceil_mode) with ATen's defaults filled in."""
    if not 2 <= len(args) <= 6:
        return None
    filled = tuple(args[1:]) + _POOL_DEFAULTS[len(args) - 2:]
    kernel, stride, padding, dilation, ceil_mode = filled
    if not all(isinstance(v, (list, tuple)) for v in (kernel, stride, padding, dilation)):
        return None
    return list(kernel), list(stride), list(padding), list(dilation), bool(ceil_mode)


def _same_window(arguments: Sequence, window: "_maxpool.Window", ceil_mode: bool) -> bool:
    try:
        return _maxpool.Window.of(*arguments[:4]) == window and bool(arguments[4]) == ceil_mode
    except (ValueError, TypeError):
        return False


def _pool_site(graph: TrainingGraph, op: OpInfo) -> VariantSite | None:
    call = graph.calls[op.id]
    arguments = _pool_arguments(call.args)
    x = _ref(call.args[0]) if call.args else None
    if arguments is None or call.kwargs or x is None or len(op.outputs) != 2:
        return None
    try:
        window = _maxpool.Window.of(*arguments[:4])
    except ValueError:
        return None
    y, indices = op.outputs
    if graph.tensors[x].dtype not in _SUPPORTED_DTYPES or len(graph.tensors[x].shape) not in (3, 4):
        return None

    def reads(consumer: int, tensor: int) -> bool:
        bargs = graph.calls[consumer].args
        return (_backward(graph, consumer, "aten.max_pool2d_with_indices_backward.default") and len(bargs) == 8
                and _ref(bargs[7]) == tensor and _ref(bargs[1]) == x and _ref(bargs[0]) not in (x, tensor)
                and _same_window(bargs[2:7], window, arguments[4]))

    found = _only_chain(graph, indices, reads)
    if found is None or not _exclusive_storage(graph, indices, found[0]):
        return None
    views, backward = found
    saved = _maxpool.packed_bytes(_numel(graph, indices), window)
    return VariantSite("max_pool2d_packed", "", op.id, (backward,), views, saved,
                       graph.tensors[x].nbytes + graph.tensors[indices].nbytes)


def _norm_site(graph: TrainingGraph, op: OpInfo) -> VariantSite | None:
    args = graph.calls[op.id].args
    if len(args) != 8 or graph.calls[op.id].kwargs or args[5] is not True or len(op.outputs) != 5:
        return None
    x, weight, bias, running_mean, running_var = (_ref(a) for a in args[:5])
    if None in (x, weight, running_mean, running_var) or (args[2] is not None and bias is None):
        return None
    shape = graph.tensors[x].shape
    if (len(shape) < 2 or graph.tensors[x].dtype not in _SUPPORTED_DTYPES or graph.tensors[weight].shape != (shape[1],)
            or graph.tensors[weight].dtype not in _SUPPORTED_DTYPES):
        return None
    out, mean, rstd = op.outputs[:3]
    backwards = [c for c in graph.tensors[x].consumers
                 if _backward(graph, c, "aten.native_batch_norm_backward.default")
                 and len(graph.calls[c].args) == 10 and not graph.calls[c].kwargs
                 and tuple(_ref(a) for a in graph.calls[c].args[1:3]) == (x, weight)
                 and tuple(_ref(a) for a in graph.calls[c].args[5:7]) == (mean, rstd)
                 and graph.calls[c].args[7] is True and graph.calls[c].args[8] == args[7]
                 and _ref(graph.calls[c].args[0]) not in (x, out)]
    if len(backwards) != 1:
        return None
    return VariantSite("batch_norm_inverted", "", op.id, (backwards[0],), (), graph.tensors[out].nbytes,
                       graph.tensors[x].nbytes)


_FINDERS: dict[str, Callable[[TrainingGraph, OpInfo], VariantSite | None]] = {
    "aten.relu.default": _relu_site,
    "aten.native_dropout.default": _dropout_site,
    "aten.max_pool2d_with_indices.default": _pool_site,
    "aten._native_batch_norm_legit_functional.default": _norm_site,
}


def _numel(graph: TrainingGraph, tensor: int) -> int:
    return math.prod(graph.tensors[tensor].shape)


def variant_sites(graph: TrainingGraph) -> tuple[VariantSite, ...]:
    """Every valid place for a variant in ``graph``, in forward-op order.

    Valid means: a supported dtype (fp32, fp16, bf16, fp64); the backward op really reads the
    forward's saved tensor (directly or through detach/alias ops that nothing else reads); for
    dropout and max-pooling, nothing but that backward reads the bool mask or the indices; for
    batch norm, training mode with an affine weight and one backward op reading the input, the
    forward's statistics and the same weight. Ops already rewritten are not listed again.
    Complexity: O(ops + tensors).
    """
    sites = []
    for op in graph.ops:
        finder = _FINDERS.get(op.target)
        if finder is not None and op.phase is Phase.FORWARD:
            site = finder(graph, op)
            if site is not None:
                sites.append(dataclasses.replace(site, name=f"{site.variant}@{op.name}"))
    return tuple(sites)


# ---- rewriting --------------------------------------------------------------------------------
class _Rewrite:
    """A graph's rows in a ``GraphBuilder``, edited site by site, with the edits variants make."""

    def __init__(self, graph: TrainingGraph):
        self.graph = graph
        self.kernels = graph.device.startswith("cuda") and _cuda.kernels_available()
        self.builder = GraphBuilder.from_graph(graph)

    def new_tensor(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, nbytes: int, producer: int) -> int:
        """A tensor of ``nbytes`` in a storage of its own, both appended at the end of their lists,
        of the kind of ``producer``'s first output (``producer``'s new call must list it)."""
        kind = self.graph.tensors[self.graph.ops[producer].outputs[0]].kind
        return self.builder.add_tensor(name, shape, dtype, kind, self.builder.add_storage(nbytes))

    def retype(self, tensor: int, shape: tuple[int, ...], dtype: torch.dtype, nbytes: int) -> None:
        """``tensor`` (alone in its storage, save views) now holds a smaller tensor."""
        self.builder.retype(tensor, shape, dtype, nbytes)

    def repoint_views(self, views: Sequence[int], source: int) -> int:
        """Make the detach/alias chain ``views`` read ``source``; returns the chain's last tensor."""
        for view in views:
            call = self.builder.ops[view].call
            self.builder.set_call(view, dataclasses.replace(call, args=(TensorRef(source),) + tuple(call.args[1:])))
            (output,) = self.graph.ops[view].outputs
            src = self.builder.tensors[source]
            self.builder.set_tensor(output, shape=src.shape, dtype=src.dtype, storage=src.storage)
            source = output
        return source

    def set_call(self, op: int, target, args: tuple, output_slots: tuple[int | None, ...],
                 workspace: int) -> None:
        """``op`` calls ``target`` (a variant op, as many FLOPs as the stock op it replaces)."""
        call = OpCall(target, tuple(args), {}, tuple(output_slots), len(output_slots) > 1)
        self.builder.set_call(op, call, workspace_bytes=workspace)

    def build(self, variants: tuple[str, ...]) -> TrainingGraph:
        position = {op.name: op.id for op in self.graph.ops}  # names in op order, however applied
        names = sorted(self.graph.variants + variants, key=lambda name: position[name.split("@", 1)[1]])
        return self.builder.build(variants=tuple(names))


def _stock_layout(rw: _Rewrite, backward: int) -> list[int] | None:
    """The strides of the stock backward op's output, for its variant to give its own: stock
    takes the saved tensor's layout (which the variant no longer reads), and the ops downstream
    round differently in another layout (a channels-last convolution's weight gradient)."""
    (output,) = rw.graph.ops[backward].outputs
    return list(rw.graph.tensors[output].strides) or None


def _rewrite_relu(rw: _Rewrite, site: VariantSite) -> None:
    graph = rw.graph
    (y,) = graph.ops[site.forward_op].outputs
    numel = _numel(graph, y)
    mask_bytes = _bits.packed_bytes(numel)
    forward_ws, backward_ws = _relu.workspace_bytes(numel, rw.kernels)
    mask = rw.new_tensor(f"{graph.tensors[y].name}.mask", (mask_bytes,), _UINT8, mask_bytes, site.forward_op)
    rw.set_call(site.forward_op, _ops.relu_packed.default, graph.calls[site.forward_op].args[:1], (y, mask), forward_ws)
    read = rw.repoint_views(site.view_ops, mask)
    (backward,) = site.backward_ops
    call = graph.calls[backward]
    rw.set_call(backward, _ops.relu_packed_backward.default,
                (call.args[0], TensorRef(read), _stock_layout(rw, backward)), call.output_slots, backward_ws)


def _rewrite_dropout(rw: _Rewrite, site: VariantSite) -> None:
    graph = rw.graph
    _, keep = graph.ops[site.forward_op].outputs
    numel = _numel(graph, keep)
    forward_ws, backward_ws = _dropout.workspace_bytes(numel, rw.kernels)
    rw.retype(keep, (site.saved_bytes,), _UINT8, site.saved_bytes)
    call = graph.calls[site.forward_op]
    rw.set_call(site.forward_op, _ops.dropout_packed.default, call.args, call.output_slots, forward_ws)
    read = rw.repoint_views(site.view_ops, keep)
    (backward,) = site.backward_ops
    bcall = graph.calls[backward]
    rw.set_call(backward, _ops.dropout_packed_backward.default, (bcall.args[0], TensorRef(read), bcall.args[2]),
                bcall.output_slots, backward_ws)


def _contiguous(tensor) -> bool:
    """Whether a traced tensor is row-major (True where its strides were not recorded)."""
    if not tensor.strides:
        return True
    expected, running = [], 1
    for size in reversed(tensor.shape):
        expected.append(running)
        running *= max(size, 1)
    return all(size == 1 or stride == want
               for size, stride, want in zip(tensor.shape, tensor.strides, reversed(expected)))


def _rewrite_pool(rw: _Rewrite, site: VariantSite) -> None:
    graph = rw.graph
    call = graph.calls[site.forward_op]
    arguments = _pool_arguments(call.args)
    window = _maxpool.Window.of(*arguments[:4])
    x = call.args[0]
    _, indices = graph.ops[site.forward_op].outputs
    forward_ws, backward_ws = _maxpool.workspace_bytes(_numel(graph, indices), window, rw.kernels,
                                                       _contiguous(graph.tensors[indices]))
    rw.retype(indices, (site.saved_bytes,), _UINT8, site.saved_bytes)
    rw.set_call(site.forward_op, _ops.max_pool2d_packed.default, (x, *arguments), call.output_slots, forward_ws)
    read = rw.repoint_views(site.view_ops, indices)
    (backward,) = site.backward_ops
    bcall = graph.calls[backward]
    input_size = list(graph.tensors[x.id].shape)
    rw.set_call(backward, _ops.max_pool2d_packed_backward.default,
                (bcall.args[0], TensorRef(read), input_size, *arguments, _stock_layout(rw, backward)),
                bcall.output_slots, backward_ws)


def _rewrite_norm(rw: _Rewrite, site: VariantSite) -> None:
    graph = rw.graph
    call = graph.calls[site.forward_op]
    x, weight, bias, running_mean, running_var, _, momentum, eps = call.args
    shape = graph.tensors[x.id].shape
    out, mean, rstd, new_mean, new_var = graph.ops[site.forward_op].outputs
    name = graph.tensors[x.id].name
    fallback = rw.new_tensor(f"{name}.fallback", (shape[0], 0, *shape[2:]), graph.tensors[x.id].dtype, 0,
                             site.forward_op)
    channels = rw.new_tensor(f"{name}.fallback_channels", (0,), _INT64, 0, site.forward_op)
    itemsize = graph.tensors[x.id].dtype.itemsize
    forward_ws, backward_ws = _batchnorm.workspace_bytes(_numel(graph, x.id), itemsize, shape[1], rw.kernels)
    rw.set_call(site.forward_op, _ops.batch_norm_inverted.default,
                (x, weight, bias, running_mean, running_var, momentum, eps),
                (out, mean, rstd, new_mean, new_var, fallback, channels), forward_ws)
    (backward,) = site.backward_ops
    bcall = graph.calls[backward]
    rw.set_call(backward, _ops.batch_norm_inverted_backward.default,
                (bcall.args[0], TensorRef(out), weight, bias, TensorRef(mean), TensorRef(rstd), TensorRef(fallback),
                 TensorRef(channels), list(bcall.args[9])), bcall.output_slots, backward_ws)


_REWRITES: dict[str, Callable[[_Rewrite, VariantSite], None]] = {
    "relu_packed": _rewrite_relu,
    "dropout_packed": _rewrite_dropout,
    "max_pool2d_packed": _rewrite_pool,
    "batch_norm_inverted": _rewrite_norm,
}


def apply_variants(graph: TrainingGraph, sites: Iterable[VariantSite]) -> TrainingGraph:
    """A new graph with the variants of ``sites`` (from ``variant_sites(graph)``) applied.

    Op ids and order are unchanged; new tensors and storages are appended, in op order whatever
    the order of ``sites`` (so the same sites always give the same graph; apply them in one call:
    applying in several calls numbers the new tensors otherwise); the applied sites' names are
    added to ``variants`` (so the fingerprint differs from ``graph``'s). With no sites, returns
    ``graph`` itself. Raises ``ValueError`` for a site that is not one of ``graph``'s (from
    another graph, or already applied) or is given twice. Complexity: O(ops + tensors).
    """
    sites = tuple(sites)
    if not sites:
        return graph
    valid = {site.name: site for site in variant_sites(graph)}
    names = [site.name for site in sites]
    if len(set(names)) != len(names):
        raise ValueError("a variant site is given twice")
    for site in sites:
        if valid.get(site.name) != site:
            raise ValueError(f"{site.name} is not a variant site of this graph (made for another graph, "
                             "or already applied): list sites with variant_sites(graph)")
    rewrite = _Rewrite(graph)
    for site in sorted(sites, key=lambda s: s.forward_op):  # canonical: new tensors in op order
        _REWRITES[site.variant](rewrite, site)
    return rewrite.build(tuple(names))


def apply_variant_names(graph: TrainingGraph, names: Sequence[str]) -> TrainingGraph:
    """Re-apply variants recorded in a plan (``TrainingGraph.variants``) to a re-captured graph.

    Raises ``PlanMismatchError`` when a named site does not exist in ``graph`` (another model).
    """
    by_name = {site.name: site for site in variant_sites(graph)}
    missing = [name for name in names if name not in by_name]
    if missing:
        raise PlanMismatchError(f"the plan uses low-memory variants {missing[:3]} that this graph does not "
                                "have: it was made for another model, plan again")
    return apply_variants(graph, [by_name[name] for name in names])


# ---- choosing ---------------------------------------------------------------------------------
def _site_reads(graph: TrainingGraph, site: VariantSite, variant: bool) -> list[tuple[Any, int]]:
    """(storage key, bytes) of forward tensors the site's backward-phase ops read, stock or rewritten."""
    ops = [op for op in site.backward_ops + site.view_ops if graph.ops[op].phase is Phase.BACKWARD]
    if not variant:
        return [(graph.tensors[t].storage, graph.storages[graph.tensors[t].storage].nbytes)
                for op in ops for t in graph.ops[op].inputs if _forward_tensor(graph, t)]
    reads = [(("new", site.name), site.saved_bytes)] if ops else []
    if site.variant == "batch_norm_inverted":
        out = graph.ops[site.forward_op].outputs[0]
        mean_rstd = graph.ops[site.forward_op].outputs[1:3]
        reads = [(graph.tensors[t].storage, graph.storages[graph.tensors[t].storage].nbytes)
                 for t in (out, *mean_rstd)]
    return reads


def _forward_tensor(graph: TrainingGraph, tensor: int) -> bool:
    producer = graph.tensors[tensor].producer
    return producer is not None and graph.ops[producer].phase is Phase.FORWARD


def _stock_reads(graph: TrainingGraph) -> dict[Any, int]:
    counts: dict[Any, int] = {}
    for op in graph.backward_ops:
        for t in graph.ops[op].inputs:
            if _forward_tensor(graph, t):
                counts[graph.tensors[t].storage] = counts.get(graph.tensors[t].storage, 0) + 1
    return counts


def _held(graph: TrainingGraph, base: dict[Any, int], deltas: Iterable[tuple[list, list]]) -> int:
    counts = dict(base)
    sizes = {key: graph.storages[key].nbytes for key in base}
    for stock, variant in deltas:
        for key, _ in stock:
            counts[key] -= 1
        for key, nbytes in variant:
            counts[key] = counts.get(key, 0) + 1
            sizes[key] = nbytes
    return sum(sizes[key] for key, count in counts.items() if count > 0)


def held_for_backward_bytes(graph: TrainingGraph, sites: Iterable[VariantSite] = ()) -> int:
    """Bytes of forward-produced storages that backward ops read (what a store-all schedule holds
    from the forward into the backward), were ``sites`` applied. Complexity: O(ops + edges)."""
    deltas = [(_site_reads(graph, s, False), _site_reads(graph, s, True)) for s in sites]
    return _held(graph, _stock_reads(graph), deltas)


def select_variants(graph: TrainingGraph, sites: Iterable[VariantSite] | None = None) -> tuple[VariantSite, ...]:
    """The sites (of ``sites``, default all of ``graph``'s) worth applying: starting from all, a
    site is dropped while dropping it does not raise ``held_for_backward_bytes``. Every site kept
    lowers what the backward holds, and gradients stay stock wherever a variant would save nothing
    (a ReLU whose output the next convolution keeps anyway; a batch norm whose output is no more
    needed than its input). Complexity: O(sites^3) dictionary updates, no graph rebuilt.
    """
    chosen = list(variant_sites(graph) if sites is None else sites)
    base = _stock_reads(graph)
    deltas = {site.name: (_site_reads(graph, site, False), _site_reads(graph, site, True)) for site in chosen}
    changed = True
    while changed:
        changed = False
        current = _held(graph, base, (deltas[s.name] for s in chosen))
        for site in list(chosen):
            without = [s for s in chosen if s is not site]
            held = _held(graph, base, (deltas[s.name] for s in without))
            if held - current < site.released_bytes // 4:
                chosen, current, changed = without, held, True
    return tuple(chosen)


def variant_kinds(option: bool | str | Iterable[str]) -> frozenset[str]:
    """The variant kinds a ``plan(op_variants=...)`` option allows: ``True`` the bitwise ones
    (``BITWISE_VARIANTS``), ``False`` none, ``"all"`` every one, or a collection of names.

    Raises ``ValueError`` naming the known variants for an unknown name.
    """
    if option is True:
        return BITWISE_VARIANTS
    if option is False or option is None:
        return frozenset()
    kinds = ALL_VARIANTS if option == "all" else frozenset([option] if isinstance(option, str) else option)
    unknown = sorted(kinds - ALL_VARIANTS)
    if unknown:
        raise ValueError(f"unknown operator variant(s) {unknown}: op_variants takes True, False, 'all' or "
                         f"names from {sorted(ALL_VARIANTS)}")
    return kinds


def with_variants(graph: TrainingGraph, kinds: Iterable[str]) -> TrainingGraph:
    """``graph`` with the sites of ``kinds`` that ``select_variants`` keeps applied (``graph``
    itself when none is worth it): the planner's greedy choice, made once before any algorithm
    runs. A site's forward and backward together move fewer bytes than the stock pair (the
    forward writes a mask 1/8 to 1/32 of its output's size; the backward reads it instead of a full
    tensor), so the cost models price a variant at or below the stock ops, and a site is worth
    applying when it lowers what the backward holds.
    """
    kinds = frozenset(kinds)
    return apply_variants(graph, select_variants(graph, [s for s in variant_sites(graph) if s.variant in kinds]))
