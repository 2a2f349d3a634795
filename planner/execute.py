"""The executor: runs any schedule for real, with the loss and gradients of plain PyTorch.

A schedule is lowered once into three sections: the model's forward (run inside an
``autograd.Function``'s forward), the loss (run by the user's own code, or by ``run_step``), and
the model's backward (run inside the Function's backward). Each section is a flat list of steps
over a tensor slot table: compute an op, or drop a slot. Steps follow the schedule exactly, so the
memory the meter measures is the memory the simulator predicted.

What makes recomputation safe:
- gradients are accumulated into ``.grad`` the moment they are produced, by handing each one to
  the autograd engine at its parameter (eager's exact semantics: tensor hooks, in-place
  accumulation, post-accumulate hooks, DDP's hooks), never held to the end of the backward;
- new buffer values (BatchNorm running statistics) are copied into the buffers when first
  computed and discarded when recomputed, so statistics update exactly once;
- random ops that are recomputed replay the RNG state saved before their first run (saved per
  forward call, so several forwards may precede one backward).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch.utils._pytree import tree_unflatten

from planner.errors import InvalidScheduleError, PlanMismatchError
from planner.graph import Phase, TrainingGraph
from planner.runtime import initial_env, invoke, store_outputs
from planner.schedule import Compute, Schedule
from planner.simulate import simulate


@dataclass(frozen=True)
class _Run:
    """Compute one op. ``save_rng``/``replay_rng`` handle random ops that are recomputed."""

    op: int
    first: bool  # the op's first computation in the step (later ones are recomputations)
    save_rng: bool
    replay_rng: bool


@dataclass(frozen=True)
class _Drop:
    tensor: int


@dataclass(frozen=True)
class LoweredSchedule:
    """A schedule split at the loss: ``forward`` + ``loss`` + ``backward`` is the whole step."""

    forward: tuple[_Run | _Drop, ...]
    loss: tuple[_Run | _Drop, ...]
    backward: tuple[_Run | _Drop, ...]
    carried: tuple[int, ...]  # non-resident tensors live from the forward into the backward
    saved_outputs: tuple[int, ...]  # model outputs the backward reads (saved by autograd)


def lower(graph: TrainingGraph, schedule: Schedule) -> LoweredSchedule:
    """Split ``schedule`` into forward / loss / backward sections.

    Raises ``InvalidScheduleError`` if model ops are interleaved with loss ops (then the loss
    could not be left to the user's code).
    """
    schedule.check_graph(graph)
    recomputed_random = {op for op in schedule.recomputed_ops() if graph.ops[op].is_random}
    seen: set[int] = set()
    steps: list[_Run | _Drop] = []
    for step in schedule.steps:
        if isinstance(step, Compute):
            first = step.op not in seen
            seen.add(step.op)
            random = step.op in recomputed_random
            steps.append(_Run(step.op, first, save_rng=random and first, replay_rng=random and not first))
        else:
            steps.append(_Drop(step.tensor))
    loss_positions = [i for i, s in enumerate(steps) if isinstance(s, _Run) and graph.ops[s.op].in_loss]
    if loss_positions:
        start, end = loss_positions[0], loss_positions[-1] + 1
    else:  # the model returns the loss itself (loss_fn=lambda loss: loss): the loss section is empty
        backward = [i for i, s in enumerate(steps) if isinstance(s, _Run) and graph.ops[s.op].phase is Phase.BACKWARD]
        if not backward:
            raise InvalidScheduleError("the schedule computes neither a loss op nor a backward op")
        start = end = backward[0]
    while end < len(steps) and isinstance(steps[end], _Drop):
        end += 1  # frees right after the last loss op belong to the loss section
    middle = steps[start:end]
    stray = [graph.ops[s.op].name for s in middle if isinstance(s, _Run) and not graph.ops[s.op].in_loss]
    if stray:
        raise InvalidScheduleError(f"model ops {stray[:3]} are scheduled inside the loss computation; "
                                   "such a schedule cannot leave the loss to user code")
    outputs = set(graph.model_outputs)
    # the forward hands its outputs to the caller: a model output no loss op reads (the model
    # returns its loss) is freed by the caller, not inside the forward
    forward = tuple(s for s in steps[:start] if not (isinstance(s, _Drop) and s.tensor in outputs))
    backward = tuple(steps[end:])
    live = _live_after(graph, forward)
    needed_later = {t for s in backward if isinstance(s, _Run) for t in graph.ops[s.op].inputs}
    carried = tuple(sorted(t for t in live if t in needed_later and t not in outputs))
    saved_outputs = tuple(t for t in graph.model_outputs if t in needed_later and t in live)
    return LoweredSchedule(forward, tuple(middle), backward, carried, saved_outputs)


def _live_after(graph: TrainingGraph, steps: Sequence[_Run | _Drop]) -> set[int]:
    live: set[int] = set()
    for step in steps:
        if isinstance(step, _Run):
            live.update(graph.ops[step.op].outputs)
        else:
            live.discard(step.tensor)
    return live


class StepRunner:
    """Runs the sections of a lowered schedule for one model, over a slot table ``env``."""

    def __init__(self, graph: TrainingGraph, schedule: Schedule, model: torch.nn.Module):
        try:  # refuse an invalid schedule before anything runs
            simulate(graph, schedule)
        except InvalidScheduleError as error:
            raise InvalidScheduleError(f"{error}: this schedule is not a valid step of the graph (a damaged "
                                       "or edited plan?): plan again") from error
        self.graph = graph
        self.lowered = lower(graph, schedule)
        parameters = dict(model.named_parameters(remove_duplicate=False))
        buffers = dict(model.named_buffers(remove_duplicate=False))
        missing = (set(graph.parameters) - set(parameters)) | (set(graph.buffers) - set(buffers))
        if missing:
            raise PlanMismatchError(f"the model has no {sorted(missing)[:3]}: this plan is for another model")
        self.model = model

    def new_env(self, inputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor] = ()) -> list:
        return initial_env(self.graph, self.model, tuple(inputs), tuple(targets))

    def run(self, steps: Sequence[_Run | _Drop], env: list, rng_states: dict[int, Any], keep=()) -> None:
        """Execute ``steps``; ``rng_states`` carries saved RNG states from one section to a later
        one; tensors in ``keep`` stay in ``env`` for the caller (dropped by the caller after use)."""
        graph = self.graph
        for step in steps:
            if isinstance(step, _Drop):
                if step.tensor not in keep:
                    env[step.tensor] = None
                continue
            op = graph.ops[step.op]
            call = graph.calls[step.op]
            if step.replay_rng:
                with torch.random.fork_rng(devices=self._rng_devices()):
                    self._set_rng(rng_states[step.op])  # every recomputation replays the same draw
                    result = invoke(call, env)
            else:
                if step.save_rng:
                    rng_states[step.op] = self._get_rng()
                result = invoke(call, env)
            store_outputs(call, result, env)
            del result
            for tensor in op.outputs:
                if tensor in graph.gradients:  # its parameter as bound when this section began
                    self._accumulate(env[graph.gradients[tensor]], env[tensor])
                elif tensor in graph.buffer_updates and step.first:
                    env[graph.buffer_updates[tensor]].copy_(env[tensor])

    def _accumulate(self, parameter: torch.Tensor, grad: torch.Tensor) -> None:
        """Add ``grad`` into ``parameter.grad`` exactly as eager autograd does, hooks included. The
        parameter is the one the model holds when the section runs (FSDP2 swaps in unsharded ones)."""
        torch.autograd.backward([parameter], [grad])

    def _rng_devices(self) -> list:
        device = torch.device(self.graph.device)
        return [device] if device.type == "cuda" else []

    def _get_rng(self):
        device = torch.device(self.graph.device)
        return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()

    def _set_rng(self, state) -> None:
        device = torch.device(self.graph.device)
        if device.type == "cuda":
            torch.cuda.set_rng_state(state, device)
        else:
            torch.set_rng_state(state)

    def run_step(self, inputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        """The whole step in one call (forward, loss, backward); returns the detached loss."""
        env = self.new_env(inputs, targets)
        lowered, rng_states = self.lowered, {}
        with torch.no_grad():
            self.run(lowered.forward, env, rng_states)
            loss_box: list[torch.Tensor] = []
            self._run_capturing_loss(lowered.loss, env, loss_box, rng_states)
            if not loss_box:  # the model returns its loss: no loss section
                loss_box.append(env[self.graph.loss])
            self.run(lowered.backward, env, rng_states)
        return loss_box[0]

    def _run_capturing_loss(self, steps, env, loss_box: list, rng_states: dict) -> None:
        loss = self.graph.loss
        for step in steps:
            if isinstance(step, _Drop) and step.tensor == loss:
                loss_box.append(env[loss])
            self.run((step,), env, rng_states)


class _PlannedFunction(torch.autograd.Function):
    """Model forward and backward of a plan; the loss between them is the user's own code."""

    @staticmethod
    def forward(ctx, runner: StepRunner, anchor: torch.Tensor, box: list, *inputs: torch.Tensor):
        lowered = runner.lowered
        ctx.box = box  # where _HandOver leaves the gradients of the outputs
        env = runner.new_env(inputs)
        ctx.rng_states = {}
        runner.run(lowered.forward, env, ctx.rng_states)
        ctx.runner = runner
        ctx.inputs = inputs  # the backward reads them (e.g. the first layer's weight gradient)
        ctx.carried = {t: env[t] for t in lowered.carried}
        ctx.save_for_backward(*(env[t] for t in lowered.saved_outputs))
        ctx.n_inputs = len(inputs)
        outputs = tuple(env[t] for t in runner.graph.model_outputs)
        env.clear()
        return outputs

    @staticmethod
    def backward(ctx, *placeholders: torch.Tensor):
        del placeholders  # the real gradients of the outputs are in the box
        runner: StepRunner = ctx.runner
        graph, lowered = runner.graph, runner.lowered
        env: list = [None] * len(graph.tensors)
        # every value is put into env by _put, whose loop variables die with it: a loop variable
        # left here would hold its last tensor through the whole backward
        _put(env, ctx.carried.keys(), ctx.carried.values())
        ctx.carried = None  # the env now owns them: each is dropped after its last use
        _put(env, lowered.saved_outputs, ctx.saved_tensors)
        _put(env, range(len(graph.tensors)), runner.new_env(ctx.inputs))  # parameters, buffers, inputs, tangent
        ctx.inputs = None
        _put(env, graph.output_grads, ctx.box.pop())  # after the tangent: a model returning its loss gets its gradient
        with torch.no_grad():
            runner.run(lowered.backward, env, ctx.rng_states, keep=graph.input_gradients)
        input_grads = {tensor: env[grad] for grad, tensor in graph.input_gradients.items()}
        return (None, None, None) + tuple(input_grads.get(tensor) for tensor in graph.inputs)


def _put(env: list, tensors, values) -> None:
    for tensor, value in zip(tensors, values):
        if value is not None:
            env[tensor] = value


class _HandOver(torch.autograd.Function):
    """Stands between the plan's outputs and the user's loss, to free each output's gradient at
    its last use in the plan's backward, where the simulator frees it.

    The autograd engine holds the gradients it passes to a node until that node's backward
    returns: for ``_PlannedFunction`` that is the whole model backward, and a large output's
    gradient (a language model's logits) would stay for all of it. This node's backward returns
    at once: it leaves the gradients in a box that the plan's backward takes over, and passes on
    one-element placeholders, expanded to the outputs' shapes.
    """

    @staticmethod
    def forward(ctx, box: list, *outputs: torch.Tensor):
        ctx.box = box
        return tuple(output.detach() for output in outputs)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        placeholders = tuple(grad.new_zeros(()).expand(grad.shape) for grad in grads)
        ctx.box.append(grads)
        del grads
        return (None,) + placeholders


class PlannedModule(torch.nn.Module):
    """``model`` whose forward and backward follow a plan. Use it as the model itself:
    ``loss_fn(planned(x), y).backward()`` then any optimizer step.

    Inputs must have the shapes and dtypes the plan was made for.
    """

    def __init__(self, model: torch.nn.Module, graph: TrainingGraph, schedule: Schedule):
        super().__init__()
        self.model = model
        self.runner = StepRunner(graph, schedule, model)
        self._output_spec = graph.output_spec
        # an input that requires grad makes autograd call our backward; the parameters are not
        # Function inputs (their gradients reach them through the engine as they are produced)
        self._anchor = torch.empty(0, requires_grad=True)

    def forward(self, *inputs: torch.Tensor):
        if self._output_spec is None:
            raise PlanMismatchError("the model returns values other than tensors that require grad "
                                    "(e.g. integer tensors or constants), or outputs the loss does not "
                                    "use; the planned module cannot hand its output to autograd: use "
                                    "training_step(inputs, targets) instead, or return only what the loss uses")
        _check_inputs(self.runner.graph, inputs)
        box: list = []  # one per call: several forwards may precede their backwards
        outputs = _HandOver.apply(box, *_PlannedFunction.apply(self.runner, self._anchor, box, *inputs))
        return tree_unflatten(list(outputs), self._output_spec)

    def training_step(self, inputs, targets=()) -> torch.Tensor:
        """Forward, loss and backward as one planned call; returns the loss (detached)."""
        inputs = inputs if isinstance(inputs, (tuple, list)) else (inputs,)
        targets = targets if isinstance(targets, (tuple, list)) else (targets,)
        _check_inputs(self.runner.graph, tuple(inputs) + tuple(targets), include_targets=True)
        return self.runner.run_step(inputs, targets)


def _check_inputs(graph: TrainingGraph, values: Sequence[torch.Tensor], include_targets: bool = False) -> None:
    specs = graph.input_specs if include_targets else graph.input_specs[: len(graph.inputs)]
    got = [(tuple(v.shape), str(v.dtype), str(v.device)) if isinstance(v, torch.Tensor) else type(v).__name__ for v in values]
    want = [(s.shape, s.dtype, s.device) for s in specs]
    if got != want:
        raise PlanMismatchError(f"this plan was made for inputs {want} but got {got}: "
                                "plan again for this input shape (plans are shape-specific)")
