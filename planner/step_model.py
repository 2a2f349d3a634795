"""The whole training step's memory when its blocks run planned: the simulator's verdict on it.

``plan_blocks`` plans each block (a transformer layer) on its own graph, but the peak of the step
depends on what every block keeps from its forward to its backward and on everything outside the
blocks (embeddings, the head, the loss). So the model is captured once more with each block call
replaced by two opaque ops: a forward op returning the block's outputs and one tensor standing for
what the block's plan keeps for its backward, and a backward op reading the block's inputs (the
plan holds them), that tensor, the outputs its backward reads and the outputs' gradients, and
returning its inputs' gradients. A block's plan gives those sizes and each op's transient memory
(``BlockProfile``, from the block's own simulation); ``whole_step`` writes them into a copy of the
graph (``GraphEditor``) and the simulator replays it, as it replays any step.

Sharded data parallel adds its buffers the same way, as tensors with their lifetimes
(``planner.fsdp``).
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from planner._torch import tree_unflatten
from planner.block_calls import Block, TensorSpec
from planner.capturing import LossFn, capture
from planner.cost import CostModel
from planner.errors import CaptureError
from planner.execute import lower
from planner.graph import OpCall, OpInfo, Phase, StorageInfo, TensorInfo, TensorKind, TrainingGraph
from planner.schedule import Free, Schedule
from planner.simulator import SimResult, simulate

_FORWARD_OP = "remat_planner.block_forward.default"
_BACKWARD_OP = "remat_planner.block_backward.default"


# ---- opaque block ops -------------------------------------------------------------------------
@dataclass(frozen=True)
class _OpaqueCall:
    outputs: tuple[TensorSpec, ...]
    grad_inputs: tuple[int, ...]  # positions of the inputs that get gradients (the anchor last)


_CALLS: list[_OpaqueCall] = []  # per planned block, while the whole step is traced (one trace at a time)


@torch.library.custom_op("remat_planner::block_forward", mutates_args=())
def _block_forward(inputs: list[torch.Tensor], block: int) -> list[torch.Tensor]:
    """A planned block's forward inside the traced whole step: its outputs, then a uint8 tensor
    standing for what its plan keeps for the backward (resized by ``whole_step``)."""
    raise RuntimeError("remat_planner::block_forward stands for a planned block in a traced step only")


@_block_forward.register_fake
def _(inputs: list[torch.Tensor], block: int) -> list[torch.Tensor]:
    outputs = [torch.empty_strided(s.shape, s.stride, dtype=s.dtype, device=s.device) for s in _CALLS[block].outputs]
    return outputs + [torch.empty(1, dtype=torch.uint8, device=inputs[0].device)]


@torch.library.custom_op("remat_planner::block_backward", mutates_args=())
def _block_backward(tensors: list[torch.Tensor], block: int) -> list[torch.Tensor]:
    """A planned block's backward: reads inputs, outputs, the kept tensor and the outputs'
    gradients (in that order); returns the gradients of the inputs that require grad."""
    raise RuntimeError("remat_planner::block_backward stands for a planned block in a traced step only")


@_block_backward.register_fake
def _(tensors: list[torch.Tensor], block: int) -> list[torch.Tensor]:
    return [torch.empty_like(tensors[i]) for i in _CALLS[block].grad_inputs]


def _setup(ctx, inputs: tuple, output: list[torch.Tensor]) -> None:
    tensors, ctx.block = inputs
    ctx.n_inputs = len(tensors)
    ctx.save_for_backward(*tensors, *output)


def _backward(ctx, grads: list[torch.Tensor]):
    saved = ctx.saved_tensors
    inputs, outputs = saved[: ctx.n_inputs], saved[ctx.n_inputs:]
    output_grads = [torch.zeros_like(o) if g is None else g for g, o in zip(grads, outputs[:-1])]
    input_grads = _block_backward([*inputs, *outputs, *output_grads], ctx.block)
    result: list = [None] * ctx.n_inputs
    for position, grad in zip(_CALLS[ctx.block].grad_inputs, input_grads):
        result[position] = grad
    return result, None


_block_forward.register_autograd(_backward, setup_context=_setup)


@contextlib.contextmanager
def _opaque(blocks: Sequence[Block]):
    """Each block's forward replaced by the opaque op while the whole step is traced."""
    def forward_of(index: int, block: Block) -> Callable:
        def forward(*args, **kwargs):
            tensors = block.call.tensors_at_paths(args, kwargs)
            if tensors is None:
                raise CaptureError(f"block {block.name} is called differently while tracing than when it was "
                                   "recorded: the whole step cannot be predicted")
            # one trainable parameter of the block (as traced) is the ops' anchor: the forward's outputs
            # require grad and the backward op is needed (for the anchor's gradient) even when nothing
            # before the block trains (frozen embeddings); ``capture_outer`` then empties that gradient
            anchor = [p for p in block.module.parameters() if p.requires_grad][:1]
            outputs = _block_forward([*tensors, *anchor], index)
            return tree_unflatten(list(outputs[:-1]), block.output_spec)
        return forward

    previous = [block.module.__dict__.get("forward") for block in blocks]
    _CALLS[:] = [_OpaqueCall(block.outputs, tuple(i for i, t in enumerate(block.call.tensors) if t.requires_grad)
                             + ((len(block.call.tensors),) if _trains(block) else ())) for block in blocks]
    for index, block in enumerate(blocks):
        block.module.forward = forward_of(index, block)
    try:
        yield
    finally:
        for block, forward in zip(blocks, previous):
            del block.module.forward
            if forward is not None:
                block.module.forward = forward


def _trains(block: Block) -> bool:
    return any(p.requires_grad for p in block.module.parameters())


@dataclass(frozen=True)
class OuterStep:
    """The whole step with every block call as an opaque forward and backward op."""

    graph: TrainingGraph
    blocks: tuple[int, ...]  # per call: which block
    forward_ops: tuple[int, ...]  # per call
    backward_ops: tuple[int, ...]
    block_parameters: tuple[tuple[int, ...], ...]  # per block: its parameters' tensors (read by no op here)

    def held(self, call: int) -> int:
        """The tensor standing for what call ``call``'s plan keeps for its backward."""
        return self.graph.ops[self.forward_ops[call]].outputs[-1]


def capture_outer(model: torch.nn.Module, blocks: Sequence[Block], inputs: tuple, loss_fn: LossFn | None,
                  targets: tuple) -> OuterStep:
    """Trace the whole step with the blocks opaque. Costs one capture of what is outside them."""
    with _opaque(blocks):
        graph = capture(model, inputs, loss_fn, targets=targets)
    forward_ops, backward_ops = [-1] * len(blocks), [-1] * len(blocks)
    for op, call in zip(graph.ops, graph.calls):
        if op.target in (_FORWARD_OP, _BACKWARD_OP):
            (forward_ops if op.target == _FORWARD_OP else backward_ops)[call.args[1]] = op.id
    if -1 in forward_ops or -1 in backward_ops:
        raise CaptureError("a planned block's output does not reach the loss: plan only blocks the loss depends on")
    editor = GraphEditor(graph)  # the anchors' gradients are the blocks' (their plans account for them)
    for gradient in [g for g in graph.gradients if graph.tensors[g].producer in backward_ops]:
        editor.resize(gradient, 0)
        del editor.gradients[gradient]
    graph = editor.build()
    parameters = tuple(tuple(graph.parameters[f"{block.name}.{name}"]
                             for name, _ in block.module.named_parameters(remove_duplicate=False))
                       for block in blocks)
    calls = sorted(range(len(blocks)), key=forward_ops.__getitem__)  # in the order the step calls them
    return OuterStep(graph, tuple(calls), tuple(forward_ops[b] for b in calls), tuple(backward_ops[b] for b in calls),
                     parameters)


# ---- what a planned block costs the step --------------------------------------------------------
@dataclass(frozen=True)
class BlockProfile:
    """A block plan's memory and time as seen from outside the block, from its own simulation.

    Bytes are beyond what the block's graph holds resident (its parameters, ``.grad``, inputs).
    """

    held_bytes: int  # kept from the end of its forward to its backward, besides its outputs
    forward_extra: int  # its forward's peak above the end of its forward (held + outputs)
    backward_extra: int  # its backward's peak above its start
    saved_outputs: tuple[int, ...]  # positions of the outputs its backward reads
    time: float  # seconds of its model ops (forward, recomputations, backward)
    gradient_bytes: int  # parameter gradients its backward produces (held to the end when ``gradients_held``)


def profile_block(graph: TrainingGraph, schedule: Schedule, cost_model: CostModel,
                  gradients_held: bool = False) -> BlockProfile:
    """``gradients_held``: parameter gradients stay from their production to the end of the
    block's backward (FSDP2 reduce-scatters them then), each copied once into its fresh ``.grad``
    (autograd clones a gradient it cannot steal), instead of being added into resident ``.grad``.
    Complexity: one or two simulations of the block."""
    lowered = lower(graph, schedule)
    n = len(schedule.steps)
    forward_end = n - len(lowered.backward) - len(lowered.loss)
    backward_start = n - len(lowered.backward)
    result = simulate(graph, schedule, cost_model)
    peaks = _step_peaks(graph, schedule, result, cost_model)
    resident = graph.resident_bytes
    after_forward = int(result.timeline[forward_end - 1]) - resident
    output_bytes = _distinct_bytes(graph, graph.model_outputs)
    if gradients_held:
        backward_graph, backward_schedule = _with_gradient_copies(graph, schedule)
        backward_result = simulate(backward_graph, backward_schedule, cost_model)
        backward_peaks = _step_peaks(backward_graph, backward_schedule, backward_result, cost_model)
    else:
        backward_result, backward_peaks = result, peaks
    times = np.asarray(cost_model.op_times(graph))
    model_ops = np.array([not op.in_loss for op in graph.ops])
    saved = set(lowered.saved_outputs)
    return BlockProfile(
        held_bytes=after_forward - output_bytes,
        forward_extra=int(peaks[:forward_end].max()) - resident - after_forward,
        backward_extra=int(backward_peaks[backward_start:].max() - backward_result.timeline[backward_start - 1]),
        saved_outputs=tuple(i for i, t in enumerate(graph.model_outputs) if t in saved),
        time=float((result.compute_counts * times)[model_ops].sum()),
        gradient_bytes=sum(graph.tensors[g].nbytes for g in graph.gradients),
    )


def _step_peaks(graph: TrainingGraph, schedule: Schedule, result: SimResult, cost_model: CostModel) -> np.ndarray:
    """Memory at each step with the running op's workspace (what the simulator's peak is the max of)."""
    is_compute, index = schedule.arrays
    workspace = np.asarray(cost_model.workspace_bytes(graph), dtype=np.int64)
    return result.timeline + np.where(is_compute, workspace[np.where(is_compute, index, 0)], 0)


def _distinct_bytes(graph: TrainingGraph, tensors: Iterable[int]) -> int:
    storages = {graph.tensors[t].storage for t in tensors} - graph.resident_storages
    return sum(graph.storages[s].nbytes for s in storages)


def _with_gradient_copies(graph: TrainingGraph, schedule: Schedule) -> tuple[TrainingGraph, Schedule]:
    """The block's graph where each parameter gradient also yields its ``.grad`` copy, alive to the
    end, and no ``.grad`` is resident: what the block holds when ``.grad`` is None before its
    backward (FSDP2 sets it so after every reduce-scatter)."""
    editor = GraphEditor(graph)
    copies = []
    for gradient in graph.gradients:
        copy = editor.add_tensor(f"{graph.tensors[gradient].name}.grad", graph.tensors[gradient].nbytes)
        editor.add_outputs(graph.tensors[gradient].producer, [copy])
        copies.append(copy)
    editor.gradients = {}
    edited = editor.build()
    return edited, Schedule(schedule.steps + tuple(Free(c) for c in copies), edited.fingerprint)


# ---- editing a graph for what-if simulations ------------------------------------------------------
class GraphEditor:
    """A copy of a graph's rows to resize storages, add tensors and ops, and rewire op inputs.

    The result is a graph for the simulator only (added ops have no call to run). Tensors added
    get a storage of their own.
    """

    def __init__(self, graph: TrainingGraph):
        self.graph = graph
        self.ops: list[OpInfo] = list(graph.ops)
        self.tensors: list[TensorInfo] = list(graph.tensors)
        self.storages: list[StorageInfo] = list(graph.storages)
        self.calls: list[OpCall] = list(graph.calls)
        self.gradients = dict(graph.gradients)

    def add_tensor(self, name: str, nbytes: int, kind: TensorKind = TensorKind.ACTIVATION) -> int:
        storage = len(self.storages)
        self.storages.append(StorageInfo(storage, int(nbytes)))
        self.tensors.append(TensorInfo(len(self.tensors), name, (int(nbytes),), torch.uint8, int(nbytes),
                                       storage, kind, None, ()))
        return len(self.tensors) - 1

    def add_op(self, name: str, inputs: Sequence[int] = (), outputs: Sequence[int] = (),
               phase: Phase = Phase.FORWARD, workspace: int = 0) -> int:
        op = len(self.ops)
        self.ops.append(OpInfo(op, name, name, phase, tuple(inputs), (), 0.0, 0, 0, is_view=False,
                               is_random=False, in_loss=False, workspace_bytes=int(workspace)))
        self.calls.append(OpCall(name, (), {}, (), True))
        self.add_outputs(op, outputs)
        return op

    def add_outputs(self, op: int, outputs: Sequence[int]) -> None:
        self.ops[op] = dataclasses.replace(self.ops[op], outputs=self.ops[op].outputs + tuple(outputs))
        for tensor in outputs:
            self.tensors[tensor] = dataclasses.replace(self.tensors[tensor], producer=op)

    def add_inputs(self, op: int, inputs: Sequence[int]) -> None:
        self.ops[op] = dataclasses.replace(self.ops[op], inputs=self.ops[op].inputs + tuple(inputs))

    def drop_inputs(self, op: int, dropped: set[int]) -> None:
        self.ops[op] = dataclasses.replace(self.ops[op], inputs=tuple(t for t in self.ops[op].inputs if t not in dropped))

    def resize(self, tensor: int, nbytes: int) -> None:
        storage = self.tensors[tensor].storage
        self.storages[storage] = StorageInfo(storage, int(nbytes))
        self.tensors[tensor] = dataclasses.replace(self.tensors[tensor], nbytes=int(nbytes))

    def set_workspace(self, op: int, nbytes: int) -> None:
        self.ops[op] = dataclasses.replace(self.ops[op], workspace_bytes=int(nbytes))

    def build(self) -> TrainingGraph:
        consumers: list[list[int]] = [[] for _ in self.tensors]
        for op in self.ops:
            for tensor in op.inputs:
                consumers[tensor].append(op.id)
        tensors = tuple(dataclasses.replace(t, consumers=tuple(c)) for t, c in zip(self.tensors, consumers))
        return dataclasses.replace(self.graph, ops=tuple(self.ops), tensors=tensors, storages=tuple(self.storages),
                                   calls=tuple(self.calls), gradients=self.gradients)


# ---- the whole step -----------------------------------------------------------------------------
@dataclass(frozen=True)
class StepPrediction:
    peak_bytes: int
    time: float  # seconds: the ops outside the blocks plus each block plan's own
    resident_bytes: int


@dataclass
class ProfiledStep:
    """The outer graph with each block call sized by its plan's profile, and the ops (added or
    inserted) to run before given ops of the outer graph."""

    editor: GraphEditor
    backward_peaks: tuple[int, ...]  # per call: the op standing for its backward's peak
    before: dict[int, list[int]] = field(default_factory=lambda: defaultdict(list))
    after: dict[int, list[int]] = field(default_factory=lambda: defaultdict(list))
    end: list[int] = field(default_factory=list)

    def order(self) -> list[int]:
        ops = range(len(self.editor.graph.ops))
        return [o for op in ops for o in (*self.before[op], op, *self.after[op])] + self.end


def with_block_profiles(outer: OuterStep, profiles: Sequence[BlockProfile]) -> ProfiledStep:
    """The outer graph with each call's opaque ops sized by its block's profile (one per call).

    A block's backward becomes two ops: its peak (reading everything the backward starts with,
    with the peak's rise as workspace), then its end (its input gradients; only what the plan
    holds to the end: inputs and the outputs it saved), so that what dies inside the backward
    (the kept tensors, the outputs' gradients) is not counted with what it produces."""
    editor = GraphEditor(outer.graph)
    peaks = []
    step = ProfiledStep(editor, ())
    for call, (forward, backward) in enumerate(zip(outer.forward_ops, outer.backward_ops)):
        profile = profiles[call]
        editor.resize(outer.held(call), profile.held_bytes)
        editor.set_workspace(forward, profile.forward_extra)
        outputs = outer.graph.ops[forward].outputs[:-1]
        unsaved = _aliases(outer.graph, [t for i, t in enumerate(outputs) if i not in profile.saved_outputs])
        editor.drop_inputs(backward, unsaved)
        peak = editor.add_op(f"block_backward_peak({call})", editor.ops[backward].inputs, (), Phase.BACKWARD,
                             profile.backward_extra)
        kept = _aliases(outer.graph, [*outer.graph.ops[forward].inputs, *outputs]) - unsaved
        editor.drop_inputs(backward, set(editor.ops[backward].inputs) - kept)
        step.before[backward].append(peak)
        peaks.append(peak)
    step.backward_peaks = tuple(peaks)
    return step


def _aliases(graph: TrainingGraph, tensors: Sequence[int]) -> set[int]:
    """Every tensor in the storages of ``tensors`` (the backward reads saved values through views)."""
    storages = {graph.tensors[t].storage for t in tensors}
    return {t.id for t in graph.tensors if t.storage in storages}


def simulate_step(step: ProfiledStep, cost_model: CostModel) -> SimResult:
    graph = step.editor.build()
    return simulate(graph, Schedule.from_order(graph, step.order()), cost_model)


def outside_time(outer: OuterStep, cost_model: CostModel) -> float:
    """Seconds of the step's ops outside the blocks (each computed once, as eager does)."""
    times = np.asarray(cost_model.op_times(outer.graph), dtype=np.float64)
    opaque = list(outer.forward_ops) + list(outer.backward_ops)
    return float(times.sum() - times[opaque].sum())


def whole_step(outer: OuterStep, profiles: Sequence[BlockProfile], block_resident_bytes: int,
               cost_model: CostModel) -> StepPrediction:
    """The step without sharding: every parameter and ``.grad`` resident. ``block_resident_bytes``:
    the blocks' ``.grad`` accumulators (their parameters are already resident in the outer graph)."""
    step = with_block_profiles(outer, profiles)
    step.editor.add_tensor("blocks' .grad", block_resident_bytes, TensorKind.BUFFER)
    result = simulate_step(step, cost_model)
    return StepPrediction(result.peak_bytes, outside_time(outer, cost_model) + sum(p.time for p in profiles),
                          result.resident_bytes)
