"""``variant_op``: how every ``remat_planner`` variant op is declared.

Besides registering the ``torch.library`` custom op, it remembers the op's Python body, so that
``planner.MemoryMeter`` can run the body under its own eyes and count the temporaries the body
allocates (the CPU twins unpack masks into byte buffers; the simulator counts those as the op's
workspace). A dispatch mode otherwise sees a custom op as one call and nothing it allocates inside.
"""
from __future__ import annotations

from typing import Callable

import torch

#: "remat_planner::relu_packed" -> the Python body of that op
BODIES: dict[str, Callable] = {}


def variant_op(name: str) -> Callable[[Callable], torch.library.CustomOpDef]:
    """Decorator: ``torch.library.custom_op("remat_planner::<name>", mutates_args=())``, body recorded."""
    qualified = f"remat_planner::{name}"

    def register(body: Callable) -> torch.library.CustomOpDef:
        BODIES[qualified] = body
        return torch.library.custom_op(qualified, mutates_args=())(body)

    return register
