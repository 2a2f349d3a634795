"""Which submodules are planned blocks, how the model calls them, and each block's own step.

``plan_blocks`` plans repeated blocks (transformer layers) one by one. This module finds them,
records how the model calls each (positional and keyword arguments: transformers' decoder layers
take ``hidden_states`` plus keywords such as ``position_embeddings``, a tuple of tensors) by running
the model's forward once, and captures each block's training step with its input activations
requiring grad, as the blocks see them inside the whole model's step.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from planner._torch import TreeSpec, tree_flatten, tree_flatten_with_path, tree_unflatten
from planner.capturing import capture
from planner.errors import CaptureError
from planner.graph import TrainingGraph

#: constants a block call may carry besides tensors; anything else (a KV cache) is state
_CONSTANT_TYPES = (type(None), bool, int, float, str, torch.dtype, torch.device)


@dataclass(frozen=True)
class TensorSpec:
    """One tensor argument of a block call, as the model passes it."""

    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    requires_grad: bool

    @classmethod
    def of(cls, tensor: torch.Tensor) -> "TensorSpec":
        return cls(tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype, tensor.device, tensor.requires_grad)

    @property
    def layout(self) -> tuple:
        return self.shape, self.stride, self.dtype, self.device

    def example(self) -> torch.Tensor:
        """A tensor of this layout for capture (which reads only metadata: values are zeros)."""
        value = torch.empty_strided(self.shape, self.stride, dtype=self.dtype, device=self.device).zero_()
        return value.requires_grad_(self.requires_grad)


@dataclass(frozen=True)
class BlockCall:
    """How a block is called: the structure of ``(args, kwargs)``, its tensors and its constants.

    A call matches another when structure, constants and tensor layouts are equal; whether a tensor
    requires grad is checked separately (a plan computes the gradients of the inputs it planned).
    """

    spec: TreeSpec
    tensor_positions: tuple[int, ...]  # which leaves of spec are tensors
    tensor_paths: tuple[tuple, ...]  # their pytree key paths (``[1]['position_embeddings'][0]``)
    tensors: tuple[TensorSpec, ...]
    constants: tuple[Any, ...]  # the other leaves, in order

    @classmethod
    def of(cls, args: tuple, kwargs: dict, where: str) -> "BlockCall":
        with_paths, spec = tree_flatten_with_path((tuple(args), dict(kwargs)))
        positions, paths, tensors, constants = [], [], [], []
        for i, (path, leaf) in enumerate(with_paths):
            if isinstance(leaf, torch.Tensor):
                positions.append(i)
                paths.append(tuple(path))
                tensors.append(TensorSpec.of(leaf))
            elif isinstance(leaf, _CONSTANT_TYPES):
                constants.append(leaf)
            else:
                raise CaptureError(f"{where} is called with a {type(leaf).__name__} argument, which the planner "
                                   "cannot treat as a constant (a cache or other state): call it with tensors and "
                                   "plain constants only (transformers: use_cache=False)")
        return cls(spec, tuple(positions), tuple(paths), tuple(tensors), tuple(constants))

    def split(self, args: tuple, kwargs: dict) -> tuple[torch.Tensor, ...] | None:
        """The call's tensors if it matches this one (structure, constants, tensor layouts; not
        whether they require grad), else None."""
        leaves, spec = tree_flatten((tuple(args), dict(kwargs)))
        if spec != self.spec:
            return None
        tensors = tuple(leaves[i] for i in self.tensor_positions)
        others = [leaf for i, leaf in enumerate(leaves) if i not in set(self.tensor_positions)]
        if others != list(self.constants) or not all(
                isinstance(t, torch.Tensor) and TensorSpec.of(t).layout == recorded.layout
                for t, recorded in zip(tensors, self.tensors)):
            return None
        return tensors

    def tensors_at_paths(self, args: tuple, kwargs: dict) -> tuple[torch.Tensor, ...] | None:
        """The tensors of another call of the same block at this call's tensor paths, or None where
        one is missing (a traced call may pass more tensors: transformers' explicit causal mask)."""
        found = {tuple(path): leaf for path, leaf in tree_flatten_with_path((tuple(args), dict(kwargs)))[0]}
        tensors = tuple(found.get(path) for path in self.tensor_paths)
        return tensors if all(isinstance(t, torch.Tensor) for t in tensors) else None

    def rebuild(self, tensors: Sequence[torch.Tensor]) -> tuple[tuple, dict]:
        """``(args, kwargs)`` with these tensors in the tensor positions."""
        leaves: list = []
        tensor_iter, constant_iter = iter(tensors), iter(self.constants)
        positions = set(self.tensor_positions)
        for i in range(self.spec.num_leaves):
            leaves.append(next(tensor_iter) if i in positions else next(constant_iter))
        args, kwargs = tree_unflatten(leaves, self.spec)
        return args, kwargs

    def describe(self) -> str:
        return ", ".join(f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}" for t in self.tensors)


@dataclass(frozen=True)
class Block:
    """A planned block: its name in the model, the module, how the model calls it, and the layouts
    of its outputs that require grad (the gradients its backward starts from)."""

    name: str
    module: torch.nn.Module
    call: BlockCall
    outputs: tuple[TensorSpec, ...]
    output_spec: TreeSpec  # the structure of what it returns; every leaf a tensor in ``outputs``


# ---- which modules are blocks -------------------------------------------------------------------
def find_blocks(model: torch.nn.Module, blocks=None) -> list[tuple[str, torch.nn.Module]]:
    """The blocks to plan, in ``named_modules`` order.

    ``blocks``: None for the repeated blocks (every child of a ``ModuleList`` or ``Sequential``
    whose two or more children share one class and hold parameters, outermost first: transformers'
    layers, ResNet stages' blocks); a module class or tuple of classes (their outermost instances);
    or an iterable of submodule names or modules. Complexity: O(modules).
    """
    named = [(name, module) for name, module in model.named_modules() if module is not model]
    if blocks is None:
        chosen = [child for _, container in named if _is_repeated(container) for child in container.children()]
    elif isinstance(blocks, type) or (isinstance(blocks, tuple) and all(isinstance(b, type) for b in blocks)):
        chosen = [module for _, module in named if isinstance(module, blocks)]
    else:
        by_name = dict(model.named_modules())
        chosen = []
        for item in blocks:
            if isinstance(item, str):
                if item not in by_name:
                    raise CaptureError(f"the model has no submodule {item!r}: name blocks as in model.named_modules()")
                chosen.append(by_name[item])
            elif isinstance(item, torch.nn.Module):
                chosen.append(item)
            else:
                raise TypeError(f"blocks must name submodules (str) or be modules, got {type(item).__name__}")
    wanted = {id(m) for m in chosen}
    result: list[tuple[str, torch.nn.Module]] = []
    for name, module in named:
        if id(module) in wanted and not any(name.startswith(outer + ".") for outer, _ in result):
            result.append((name, module))
    if not result:
        raise CaptureError("no blocks to plan: the model has no ModuleList or Sequential of two or more "
                           "modules of one class; pass blocks= (a class, or submodule names)")
    missing = wanted - {id(m) for _, m in result} - {id(m) for _, outer in result for m in outer.modules()}
    if missing:
        raise CaptureError("a module given in blocks= is not a submodule of the model")
    return result


def _is_repeated(container: torch.nn.Module) -> bool:
    if not isinstance(container, (torch.nn.ModuleList, torch.nn.Sequential)):
        return False
    children = list(container.children())
    return (len(children) >= 2 and len({type(c) for c in children}) == 1
            and any(p.requires_grad for p in children[0].parameters()))


# ---- how the model calls them ---------------------------------------------------------------------
def record_calls(model: torch.nn.Module, found: list[tuple[str, torch.nn.Module]], inputs: tuple) -> list[Block]:
    """Run ``model(*inputs)`` once and record each block's call, with which of its tensors require
    grad in training. Nothing the model computes is kept for a backward (saved tensors are dropped
    as autograd saves them), buffers (BatchNorm statistics) and the RNG are restored afterwards.
    """
    calls: dict[str, BlockCall] = {}
    outputs: dict[str, tuple[tuple[TensorSpec, ...], TreeSpec]] = {}
    active: list[str] = []

    def before(name: str):
        def hook(module, args, kwargs):
            if active:
                raise CaptureError(f"block {name} runs inside block {active[-1]}: plan one of them only")
            if name in calls:
                raise CaptureError(f"block {name} is called more than once per step (shared weights), which "
                                   "plan_blocks does not support: leave it out of blocks=")
            calls[name] = BlockCall.of(args, kwargs, f"block {name}")
            active.append(name)
        return hook

    def after(name: str):
        def hook(module, args, output):
            active.pop()
            leaves, spec = tree_flatten(output)
            if not all(isinstance(t, torch.Tensor) and t.requires_grad for t in leaves):
                raise CaptureError(f"block {name} returns values other than tensors that require grad "
                                   f"({[type(t).__name__ for t in leaves]}): plan a module that returns only "
                                   "differentiable tensors")
            outputs[name] = (tuple(TensorSpec(tuple(t.shape), tuple(t.contiguous().stride()), t.dtype, t.device, False)
                                   for t in leaves), spec)
        return hook

    handles = []
    for name, module in found:
        handles.append(module.register_forward_pre_hook(before(name), with_kwargs=True))
        handles.append(module.register_forward_hook(after(name)))
    try:
        with _side_effects_undone(model), torch.autograd.graph.saved_tensors_hooks(_drop, _never):
            model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    never = [name for name, _ in found if name not in calls]
    if never:
        raise CaptureError(f"block {never[0]} is not called by the model's forward: leave it out of blocks=")
    return [Block(name, module, calls[name], *outputs[name]) for name, module in found]


def _drop(tensor: torch.Tensor) -> None:
    return None


def _never(packed: None) -> torch.Tensor:
    raise RuntimeError("the recording forward of plan_blocks has no backward")


@contextlib.contextmanager
def _side_effects_undone(model: torch.nn.Module):
    """Buffers and the RNG as they were: the recording forward is not a training step."""
    saved = [(buffer, buffer.detach().clone()) for buffer in model.buffers()]
    with torch.random.fork_rng(devices=_rng_devices(model)):
        try:
            yield
        finally:
            with torch.no_grad():
                for buffer, value in saved:
                    buffer.copy_(value)


def _rng_devices(model: torch.nn.Module) -> list:
    return sorted({p.device for p in model.parameters() if p.device.type == "cuda"}, key=str)


# ---- each block's own step ------------------------------------------------------------------------
class BlockStep(torch.nn.Module):
    """A block called with its flat tensors, as capture calls models: ``step(*tensors)`` runs the
    block's own forward (not its module hooks, which stay the model's: FSDP's run around the plan).

    Its parameters are named ``block.<name in the block>``, so one plan serves every block of the same
    structure, and the executor finds each block's parameters by name when it runs.
    """

    def __init__(self, block: torch.nn.Module, call: BlockCall):
        super().__init__()
        self.block = block
        self.call = call

    def forward(self, *tensors: torch.Tensor):
        args, kwargs = self.call.rebuild(tensors)
        return original_forward(self.block)(*args, **kwargs)


def original_forward(block: torch.nn.Module) -> Callable:
    """The block's class forward (an installed plan replaces the instance's ``forward`` only)."""
    return type(block).forward.__get__(block)


def output_tangent_loss(output: Any, *tangents: torch.Tensor) -> torch.Tensor:
    """``sum(out * tangent)`` over the outputs: the block's backward then starts from one full
    gradient per output, as it does inside the whole model."""
    return sum((leaf * tangent).sum() for leaf, tangent in zip(tree_flatten(output)[0], tangents, strict=True))


def capture_block(block: Block) -> TrainingGraph:
    """The block's step as a graph: its recorded inputs (those requiring grad get gradients), its
    parameters, and ``output_tangent_loss`` on its outputs."""
    examples = tuple(spec.example() for spec in block.call.tensors)
    tangents = tuple(spec.example() for spec in block.outputs)
    return capture(BlockStep(block.module, block.call), examples, output_tangent_loss, targets=tangents,
                   input_grads=True)
