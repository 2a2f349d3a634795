"""torch.compile's private pieces that the comparison benchmarks (versus.py, plan_quality.py)
configure, wrapped in one place: the activation-memory budget of AOT autograd's min-cut
partitioner (``torch._functorch.config``), the partitioner itself, ``aot_module_simplified`` and
its placeholder descriptors (``torch._functorch``), dynamo's ``aot_autograd`` backend factory
(``torch._dynamo``) and inductor's decomposition table (``torch._inductor``).

The planner's own private imports live in ``planner/_aot.py`` and ``planner/_torch.py``;
``tests/test_layers.py`` refuses them anywhere else.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Callable, Iterator

from torch._functorch import config as _functorch_config
from torch._functorch._aot_autograd import descriptors as _descriptors
from torch._functorch.aot_autograd import aot_module_simplified
from torch._functorch.partitioners import min_cut_rematerialization_partition

__all__ = ["activation_memory_budget", "aot_module_simplified", "min_cut_rematerialization_partition",
           "is_parameter_or_buffer", "inductor_partitioned_backend"]


@contextlib.contextmanager
def activation_memory_budget(budget: float, solver: str | None = None) -> Iterator[None]:
    """``torch._functorch.config.activation_memory_budget`` (and its solver) for the block's duration."""
    settings = {"activation_memory_budget": budget}
    if solver is not None:
        settings["activation_memory_budget_solver"] = solver
    with _functorch_config.patch(**settings):
        yield


def is_parameter_or_buffer(description: object) -> bool:
    """Whether an AOT placeholder descriptor (``node.meta["desc"]``) is a parameter or a buffer."""
    return isinstance(description, (_descriptors.ParamAOTInput, _descriptors.BufferAOTInput))


def inductor_partitioned_backend(fw_compiler: Callable, bw_compiler: Callable) -> Callable:
    """A torch.compile backend that runs inductor's decompositions and min-cut partitioner, then
    hands the graphs to the given compilers (inductor itself is imported only when needed: slow)."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._inductor.compile_fx import select_decomp_table

    return aot_autograd(fw_compiler=fw_compiler, bw_compiler=bw_compiler, decompositions=select_decomp_table(),
                        partition_fn=functools.partial(min_cut_rematerialization_partition, compiler="inductor"))
