"""How every low-memory variant is declared: its ops (``variant_op``) and the variant itself
(``Variant``, registered once in ``VARIANTS``).

``variant_op`` registers a ``torch.library`` custom op and remembers its Python body, so that
``planner.MemoryMeter`` can run the body under its own eyes and count the temporaries the body
allocates (the CPU twins unpack masks into byte buffers; the simulator counts those as the op's
workspace). A dispatch mode otherwise sees a custom op as one call and nothing it allocates inside.

A ``Variant`` holds all a variant knows besides its kernels: the ATen op it replaces, whether its
gradients are bitwise stock, where it applies in a graph, how the graph is rewritten, and the
workspace its ops declare on a device of a given capability. Each op module (``gpu/relu.py``, ...)
declares its own next to its kernels; ``VARIANTS`` is what ``planner.variants``, the planner's
options and the CLI read.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

if TYPE_CHECKING:
    from planner.gpu._sites import Rewriter, VariantSite
    from planner.graph import OpInfo, TrainingGraph, VariantCapability

#: "remat_planner::relu_packed" -> the Python body of that op
BODIES: dict[str, Callable] = {}


def variant_op(name: str) -> Callable[[Callable], torch.library.CustomOpDef]:
    """Decorator: ``torch.library.custom_op("remat_planner::<name>", mutates_args=())``, body recorded."""
    qualified = f"remat_planner::{name}"

    def register(body: Callable) -> torch.library.CustomOpDef:
        BODIES[qualified] = body
        return torch.library.custom_op(qualified, mutates_args=())(body)

    return register


@dataclass(frozen=True)
class Variant:
    """One low-memory operator variant.

    ``find(graph, op)`` gives the site at forward op ``op`` (whose target is ``replaces``) or None;
    ``workspace(graph, site, capability)`` the scratch bytes (forward, backward) its two ops
    allocate on such a device; ``rewrite(rewriter, site, workspace)`` makes the site's ops call
    ``ops`` (forward, backward) instead of stock.
    """

    name: str
    replaces: str  # the ATen forward op, "aten.relu.default"
    bitwise: bool  # gradients bitwise stock's (else within the tolerance its module states)
    backward_reads: str  # what its backward reads instead of stock's saved tensors (the docs' listing)
    ops: tuple[Callable, Callable]  # the forward and backward op overloads it runs (torch.ops.remat_planner.*)
    find: Callable[["TrainingGraph", "OpInfo"], "VariantSite | None"]
    workspace: Callable[["TrainingGraph", "VariantSite", "VariantCapability"], tuple[int, int]]
    rewrite: Callable[["Rewriter", "VariantSite", tuple[int, int]], None]


#: every variant, by name, in the order their modules declare them
VARIANTS: dict[str, Variant] = {}


def register_variant(variant: Variant) -> Variant:
    """Add ``variant`` to ``VARIANTS`` (once: a second variant of the same name is a bug)."""
    if variant.name in VARIANTS:
        raise ValueError(f"operator variant {variant.name!r} is registered twice")
    VARIANTS[variant.name] = variant
    return variant
