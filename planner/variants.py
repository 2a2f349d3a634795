"""Low-memory operator variants as a graph rewrite: the one way ``planner.gpu``'s ops enter a plan.

``variant_sites(graph)`` lists every place a variant applies; ``apply_variants(graph, sites)``
returns a new graph in which those forward ops call the variant (``remat_planner::*`` custom
ops) and their backward ops read the variant's small saved tensor instead of the big one. Op ids
and op order are unchanged (same number of ops, same positions), so any order of the original
graph's ops is a valid order of the rewritten one; new tensors and storages are appended at the
end of their lists, with exact byte sizes (a bound where the size depends on the data). The
simulator, the executor and every algorithm then treat the rewritten ops like any ATen op.

The variants are ``planner.gpu``'s ``VARIANTS``: each op module declares one ``Variant`` (the ATen
op it replaces, its finder, rewrite and workspace, whether its gradients are bitwise stock) next
to its kernels, and everything here reads that registry:

=====================  ==========================================  ===============================
variant                backward reads instead                      gradients
=====================  ==========================================  ===============================
``relu_packed``        a 1-bit mask instead of the ReLU output     bitwise stock
``dropout_packed``     a 1-bit mask instead of the bool mask       bitwise stock
``max_pool2d_packed``  4/8-bit window positions instead of the     bitwise stock
                       input and the int64 indices
``batch_norm_inverted``  the output instead of the input           within a stated tolerance
=====================  ==========================================  ===============================

A rewritten graph records its sites in ``TrainingGraph.variants`` (``"relu_packed@relu_3"``) and
what runs them in ``TrainingGraph.variant_capability`` (the CuPy kernels or the PyTorch twins, whose
workspace differs): both are part of the fingerprint, and ``apply_variant_names`` re-applies the
sites to a re-captured graph, refusing a plan made for another capability.
``select_variants`` keeps the sites that lower what the backward holds.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from planner.errors import PlanMismatchError
from planner.graph import OpCall, Phase, TensorRef, TrainingGraph, VariantCapability
from planner.graph_builder import GraphBuilder
from planner.gpu import _cuda
from planner.gpu._registry import VARIANTS, Variant
from planner.gpu._sites import VariantSite

if TYPE_CHECKING:
    import torch

__all__ = [
    "VariantSite", "Variant", "VARIANTS", "BITWISE_VARIANTS", "ALL_VARIANTS", "device_capability", "variant_sites",
    "apply_variants", "apply_variant_names", "held_for_backward_bytes", "select_variants", "variant_kinds",
    "with_variants",
]

#: the variants whose gradients are bitwise stock (``batch_norm_inverted`` is within a tolerance);
#: ``plan(op_variants=True)`` chooses among these
BITWISE_VARIANTS = frozenset(name for name, variant in VARIANTS.items() if variant.bitwise)
#: every variant this version has
ALL_VARIANTS = frozenset(VARIANTS)
_REPLACING: dict[str, tuple[Variant, ...]] = {}  # ATen target -> the variants that replace it
for _variant in VARIANTS.values():
    _REPLACING[_variant.replaces] = _REPLACING.get(_variant.replaces, ()) + (_variant,)


def device_capability(device: str) -> VariantCapability:
    """What runs the variant ops of a graph on ``device`` in this process: the CuPy kernels on a
    CUDA device where CuPy is usable, the PyTorch twins everywhere else."""
    return VariantCapability(cupy_kernels=device.startswith("cuda") and _cuda.kernels_available())


# ---- finding sites ------------------------------------------------------------------------------
def variant_sites(graph: TrainingGraph) -> tuple[VariantSite, ...]:
    """Every valid place for a variant in ``graph``, in forward-op order.

    Valid means: a supported dtype (fp32, fp16, bf16, fp64); the backward op really reads the
    forward's saved tensor (directly or through detach/alias ops that nothing else reads); for
    dropout and max-pooling, nothing but that backward reads the bool mask or the indices; for
    batch norm, training mode with an affine weight and one backward op reading the input, the
    forward's statistics and the same weight (each variant's ``find`` says which). Ops already
    rewritten are not listed again. Complexity: O(ops + tensors).
    """
    sites = []
    for op in graph.ops:
        if op.phase is not Phase.FORWARD:
            continue
        for variant in _REPLACING.get(op.target, ()):
            site = variant.find(graph, op)
            if site is not None:
                sites.append(dataclasses.replace(site, name=f"{site.variant}@{op.name}"))
    return tuple(sites)


# ---- rewriting --------------------------------------------------------------------------------
class _Rewrite:
    """A graph's rows in a ``GraphBuilder``, edited site by site, with the edits variants make."""

    def __init__(self, graph: TrainingGraph):
        self.graph = graph
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


def apply_variants(graph: TrainingGraph, sites: Iterable[VariantSite],
                   capability: VariantCapability | None = None) -> TrainingGraph:
    """A new graph with the variants of ``sites`` (from ``variant_sites(graph)``) applied, their
    ops declaring the workspace they need where ``capability`` (default: ``device_capability`` of
    the graph's device) runs them.

    Op ids and order are unchanged; new tensors and storages are appended, in op order whatever
    the order of ``sites`` (so the same sites always give the same graph; apply them in one call:
    applying in several calls numbers the new tensors otherwise); the applied sites' names are
    added to ``variants`` and the capability recorded (so the fingerprint differs from
    ``graph``'s). With no sites, returns ``graph`` itself. Raises ``ValueError`` for a site that is
    not one of ``graph``'s (from another graph, or already applied) or is given twice, or for a
    capability other than that of the variants ``graph`` has already. Complexity: O(ops + tensors).
    """
    sites = tuple(sites)
    if not sites:
        return graph
    capability = capability or device_capability(graph.device)
    if graph.variants and graph.variant_capability != capability:
        raise ValueError(f"this graph's variants run by {graph.variant_capability.describe()}, not "
                         f"{capability.describe()}: apply every variant for one capability")
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
        variant = VARIANTS[site.variant]
        variant.rewrite(rewrite, site, variant.workspace(graph, site, capability))
    return dataclasses.replace(rewrite.build(tuple(names)), variant_capability=capability)


def apply_variant_names(graph: TrainingGraph, names: Sequence[str],
                        planned_for: VariantCapability = VariantCapability()) -> TrainingGraph:
    """Re-apply variants recorded in a plan (``TrainingGraph.variants``, planned for the variants
    to run by ``planned_for``) to a re-captured graph.

    Raises ``PlanMismatchError`` when a named site does not exist in ``graph`` (another model), or
    when the variants would run here by something else than they were planned for (the CuPy
    kernels there, the PyTorch twins here, or the reverse): their workspace, and so the plan's
    peak, would not be the planned one.
    """
    here = device_capability(graph.device)
    if names and here != planned_for:
        fix = ("install CuPy for this CUDA version (pip install 'remat-planner[gpu]') where a CUDA device is usable, "
               "or plan again here" if planned_for.cupy_kernels else "plan again here")
        raise PlanMismatchError(f"the plan's operator variants were planned to run by {planned_for.describe()}, "
                                f"but here they run by {here.describe()}, whose workspace differs: {fix}")
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
    reads = [(("new", site.name), site.saved_bytes)] if ops and site.saved_bytes else []
    return reads + [(graph.tensors[t].storage, graph.storages[graph.tensors[t].storage].nbytes) for t in site.reads]


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
