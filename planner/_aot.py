"""The one place that touches private PyTorch APIs (AOT autograd).

Capture needs the *joint* forward+backward ATen graph of a training step, traced with fake tensors
so no activation memory is used. ``aot_module_simplified`` builds exactly that graph and hands it to
a partition function; ours records it and stops compilation. AOT's input/output descriptors say
which placeholder is which parameter, buffer or user input, and which output is a buffer mutation
or a gradient. Verified on torch 2.14.
"""
from __future__ import annotations

import contextlib
import logging
import sys
from dataclasses import dataclass

import torch
import torch.fx
from torch._functorch._aot_autograd import descriptors as _desc
from torch._functorch.aot_autograd import aot_module_simplified
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.multiprocessing.reductions import StorageWeakRef

from planner.errors import CaptureError

FORWARD_TAG = "is_forward"  # partitioner tag of forward nodes; everything else is backward


@dataclass(frozen=True)
class InputRole:
    """What a joint-graph placeholder stands for."""

    kind: str  # "parameter" | "buffer" | "input" | "tangent"
    name: str  # fully qualified name for parameters and buffers, flat index for inputs
    index: int = -1


@dataclass(frozen=True)
class OutputRole:
    """What a joint-graph output is."""

    kind: str  # "mutation" (new value of a buffer or input) | "loss" | "gradient"
    target: str  # buffer, input ("input<i>") or parameter name; "" for the loss


class _JointGraphCaptured(Exception):
    def __init__(self, graph: torch.fx.GraphModule):
        self.graph = graph


def _keep_joint_graph(joint: torch.fx.GraphModule, _joint_inputs, **_kwargs):
    raise _JointGraphCaptured(joint)


def _no_compile(graph, _inputs):
    return graph


@contextlib.contextmanager
def _tracing_state():
    """``torch.compiler.is_compiling()`` is true while tracing, as in torch.export's non-strict mode.

    Libraries branch on it to skip eager-only checks that read tensor values, which a trace with
    fake tensors cannot do (transformers' mask helpers look for packed sequences in
    ``position_ids``); torch.compile, which the ``planner.backend`` runs under, sets it too.
    """
    previous = torch.compiler._is_compiling_flag
    torch.compiler._is_compiling_flag = True
    try:
        yield
    finally:
        torch.compiler._is_compiling_flag = previous


_TRACE_ONLY_KEYS = (torch._C.DispatchKey.CompositeImplicitAutograd, torch._C.DispatchKey.Autograd)


def _upsampling_ops() -> list[torch._ops.OpOverload]:
    return [getattr(packet, overload) for name in dir(torch.ops.aten) if "upsample" in name
            for packet in [getattr(torch.ops.aten, name)] for overload in packet.overloads()]


@contextlib.contextmanager
def _eager_kernels():
    """Trace the kernels eager runs where PyTorch replaces them while tracing.

    Under its Python dispatcher, which only tracing turns on, PyTorch swaps Python decompositions
    in for some ops' autograd (``py_impl``). Upsampling (``F.interpolate``) becomes index gathers
    and an index-put backward: bilinear and bicubic gradients then differ from eager's in the last
    bits, and the backward keeps index tensors eager does not. While tracing, those ops keep their
    C++ autograd kernels and derivative formulas (``upsample_*_backward``), as in eager.
    """
    removed = [(op, key, op.py_kernels.pop(key)) for op in _upsampling_ops() for key in _TRACE_ONLY_KEYS
               if key in op.py_kernels]
    for op, _, _ in removed:
        op._dispatch_cache.clear()
    try:
        yield
    finally:
        for op, key, kernel in removed:
            op.py_kernels[key] = kernel
            op._dispatch_cache.clear()


@contextlib.contextmanager
def _one_sequence_per_row(applies: bool):
    """transformers' mask helpers look for packed sequences in ``position_ids``. Eager reads the
    values and, for positions made by the model itself (an ``arange``: one sequence per row), lets
    SDPA apply causality (``is_causal=True``); under tracing they cannot read them, assume packing
    and materialize a causal mask, which runs another kernel (different last bits, slower on CPU)
    and holds the mask through the step. Where the caller passes no ``position_ids`` (``applies``)
    the trace is told what eager finds; passing them later changes the call, which re-plans."""
    masking = sys.modules.get("transformers.masking_utils")
    original = getattr(masking, "find_packed_sequence_indices", None)
    if not applies or original is None:
        yield
        return
    masking.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        masking.find_packed_sequence_indices = original


def trace_joint(module: torch.nn.Module, args: tuple, positions_from_model: bool = False) -> torch.fx.GraphModule:
    """Trace ``module(*args)`` (which must return a 1-tuple holding a scalar loss) with its backward.
    ``positions_from_model``: the model makes its own position ids (``_one_sequence_per_row``).

    Returns the joint fx graph; every call_function node has ``meta['val']`` (a FakeTensor or a
    tuple of them) and ``meta['partitioner_tag']``; placeholders and the output carry descriptors.
    """
    try:
        with _tracing_state(), _eager_kernels(), _one_sequence_per_row(positions_from_model), \
                _meta_as_cpu(module, args) as args:
            aot_module_simplified(
                module, args, fw_compiler=_no_compile, bw_compiler=_no_compile,
                partition_fn=_keep_joint_graph,
            )
    except _JointGraphCaptured as captured:
        return captured.graph
    raise CaptureError("the traced step produces no parameter gradient: does the loss depend on a "
                       "parameter with requires_grad=True?")


@contextlib.contextmanager
def _meta_as_cpu(module: torch.nn.Module, args: tuple):
    """A step on the meta device (a model planned without allocating it) is traced as on the CPU:
    fake tensors with the meta tensors' shapes and a CPU device, so that every op dispatches to the
    decomposition and autograd formula it has on a real device (on meta, ``nll_loss`` reaches a
    meta kernel without one, and the loss's backward vanished from the graph)."""
    named = {**dict(module.named_parameters(remove_duplicate=False)), **dict(module.named_buffers(remove_duplicate=False))}
    if not any(t.device.type == "meta" for t in (*named.values(), *args)):
        yield args
        return
    mode, cpu = FakeTensorMode(), torch.device("cpu")

    def fake(t: torch.Tensor) -> torch.Tensor:
        if t.device.type != "meta":
            return mode.from_tensor(t)
        return mode.fake_tensor_converter.from_meta_and_device(mode, t, cpu)  # memoized: tied names stay tied

    with torch.nn.utils.stateless._reparametrize_module(module, {name: fake(t) for name, t in named.items()}):
        yield tuple(fake(a) for a in args)


def _strip(name: str, prefix: str) -> str:
    return name[len(prefix):] if name.startswith(prefix) else name


def input_role(node: torch.fx.Node, prefix: str) -> InputRole:
    desc = node.meta.get("desc")
    if isinstance(desc, _desc.ParamAOTInput):
        return InputRole("parameter", _strip(desc.target, prefix))
    if isinstance(desc, _desc.BufferAOTInput):
        return InputRole("buffer", _strip(desc.target, prefix))
    if isinstance(desc, _desc.PlainAOTInput):
        return InputRole("input", f"input{desc.idx}", desc.idx)
    if isinstance(desc, _desc.TangentAOTInput):
        return InputRole("tangent", "loss_grad")
    raise RuntimeError(f"unexpected joint-graph input {node.name} described as {desc!r}")


def output_roles(output_node: torch.fx.Node, prefix: str) -> list[OutputRole | None]:
    """One role per output slot (``None`` for slots that carry no tensor)."""
    roles: list[OutputRole | None] = []
    for desc in output_node.meta["desc"]:
        if isinstance(desc, _desc.InputMutationAOTOutput):
            mutated = desc.mutated_input
            name = f"input{mutated.idx}" if isinstance(mutated, _desc.PlainAOTInput) else _strip(mutated.target, prefix)
            roles.append(OutputRole("mutation", name))
        elif isinstance(desc, _desc.PlainAOTOutput):
            roles.append(OutputRole("loss", ""))
        elif isinstance(desc, _desc.GradAOTOutput):
            grad_of = desc.grad_of
            name = f"input{grad_of.idx}" if isinstance(grad_of, _desc.PlainAOTInput) else _strip(grad_of.target, prefix)
            roles.append(OutputRole("gradient", name))
        else:
            roles.append(None)
    return roles


def storage_key(tensor: torch.Tensor) -> StorageWeakRef:
    """Identity of a tensor's storage: views and in-place results share one key."""
    return storage_ref(tensor.untyped_storage())


def storage_ref(storage: torch.UntypedStorage) -> StorageWeakRef:
    """Identity of a storage (what ``storage_key`` gives for any tensor in it)."""
    return StorageWeakRef(storage)


@contextlib.contextmanager
def quiet_torch_logs():
    """Silence torch's own error logging while tracing; failures surface as our exceptions."""
    logger = logging.getLogger("torch")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)
