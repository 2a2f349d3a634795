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

The planned module is a drop-in for the model: ``planner.guards`` checks on every call that the
state (modes, autocast, parameters, the call) is the one planned, runs the model eagerly in eval
mode or without grad, and plans new states. Parameters and buffers are bound by name at every
forward and backward. Under ``torch.autograd.grad`` gradients are returned instead of accumulated;
``retain_graph=True`` keeps what the backward would free, so it can run again.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from planner._torch import backward_retains_graph, tensor_version
from planner.calls import as_tuple, call_arguments, split_call
from planner.errors import BackwardError, InvalidScheduleError, PlanMismatchError
from planner.graph import Phase, TrainingGraph
from planner.guards import CachedStep, PlanCache, Replan, model_state, step_key
from planner.runtime import initial_env, invoke, store_outputs
from planner.schedule import Compute, Schedule
from planner.simulator import simulate


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
    saved_outputs: tuple[int, ...]  # model outputs the backward reads (kept as aliases, version-checked)
    read_parameters: tuple[int, ...]  # parameters the backward reads (version-checked)


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
    # an output the schedule frees after the loss and recomputes in the backward is not saved:
    # holding autograd's copy through the backward would keep what the plan freed
    freed_after_loss = {s.tensor for s in middle if isinstance(s, _Drop)}
    saved_outputs = tuple(t for t in graph.model_outputs
                          if t in needed_later and t in live and t not in freed_after_loss)
    read_parameters = tuple(sorted(t for t in set(graph.parameters.values()) if t in needed_later))
    return LoweredSchedule(forward, tuple(middle), backward, carried, saved_outputs, read_parameters)


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
        missing = (set(graph.parameters) | set(graph.buffers)) - set(model_state(model)[3])
        if missing:
            raise PlanMismatchError(f"the model has no {sorted(missing)[:3]}: this plan is for another model")
        self.model = model
        self.segments = _segments(graph, self.lowered.backward)
        self.device_type = torch.device(graph.device).type

    def new_env(self, named: dict, inputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor] = ()) -> list:
        return initial_env(self.graph, named, tuple(inputs), tuple(targets))

    def run(self, steps: Sequence[_Run | _Drop], env: list, rng_states: dict[int, Any], keep=(),
            on_gradient: Callable[[int, torch.Tensor], None] | None = None) -> None:
        """Execute ``steps``; ``rng_states`` carries saved RNG states from one section to a later
        one; tensors in ``keep`` stay in ``env`` for the caller (dropped by the caller after use);
        ``on_gradient(parameter, gradient)`` receives each parameter gradient when produced."""
        graph = self.graph
        with self.explicit_dtypes():
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
                    if tensor in graph.gradients:
                        on_gradient(graph.gradients[tensor], env[tensor])
                    elif tensor in graph.buffer_updates and step.first:
                        env[graph.buffer_updates[tensor]].copy_(env[tensor])

    def explicit_dtypes(self):
        """Autocast off: a graph traced under autocast holds its casts as ops, and one traced
        without it must not be cast again."""
        if self.device_type == "meta":
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, enabled=False)

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

    def run_step(self, named: dict, inputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        """The whole step in one call (forward, loss, backward); returns the detached loss."""
        env = self.new_env(named, inputs, targets)
        lowered, rng_states = self.lowered, {}
        accumulate = _accumulator(env)
        with torch.no_grad():
            self.run(lowered.forward, env, rng_states)
            loss_box: list[torch.Tensor] = []
            self._run_capturing_loss(lowered.loss, env, loss_box, rng_states, accumulate)
            if not loss_box:  # the model returns its loss: no loss section
                loss_box.append(env[self.graph.loss])
            self.run(lowered.backward, env, rng_states, on_gradient=accumulate)
        return loss_box[0]

    def _run_capturing_loss(self, steps, env, loss_box: list, rng_states: dict, accumulate) -> None:
        loss = self.graph.loss
        for step in steps:
            if isinstance(step, _Drop) and step.tensor == loss:
                loss_box.append(env[loss])
            self.run((step,), env, rng_states, on_gradient=accumulate)


def _accumulator(env: list) -> Callable[[int, torch.Tensor], None]:
    """Add each gradient into its parameter's ``.grad`` exactly as eager autograd does (hooks
    included): through the parameter's own AccumulateGrad node."""
    return lambda parameter, grad: torch.autograd.backward([env[parameter]], [grad])


@dataclass(frozen=True)
class _Segment:
    """Backward steps up to and including the ops that produce the gradients of ``parameters``
    (and the frees right after them)."""

    steps: tuple[_Run | _Drop, ...]
    parameters: tuple[int, ...]  # parameter tensor ids, in the order their gradients are returned


def _segments(graph: TrainingGraph, backward: Sequence[_Run | _Drop]) -> tuple[_Segment, ...]:
    """The model backward cut after every op producing a parameter gradient: each piece becomes
    one autograd node with edges to those parameters, so the engine accumulates each gradient
    the moment its piece returns (hooks, DDP's reducer), and ``torch.autograd.grad`` and
    ``backward(inputs=...)`` reach the parameters as in eager. Trailing steps join the last piece."""
    segments: list[_Segment] = []
    steps: list = []
    parameters: list[int] = []
    for step in backward:
        if isinstance(step, _Run) and parameters:
            segments.append(_Segment(tuple(steps), tuple(parameters)))
            steps, parameters = [], []
        steps.append(step)
        if isinstance(step, _Run):
            parameters += [graph.gradients[t] for t in graph.ops[step.op].outputs if t in graph.gradients]
    if parameters or not segments:
        segments.append(_Segment(tuple(steps), tuple(parameters)))
    else:
        last = segments.pop()
        segments.append(_Segment(last.steps + tuple(steps), last.parameters))
    return tuple(segments)


@dataclass
class _Pending:
    """One planned forward, for its backward: the tensors carried across, the RNG states of
    recomputed random ops, and, while a backward runs, its slot table."""

    runner: StepRunner
    box: list  # where _HandOver leaves the gradients of the outputs
    inputs: tuple
    carried: dict
    rng_states: dict
    saved: tuple = ()  # aliases of the model outputs the backward reads
    parameters: tuple = ()  # the forward's parameters that the backward reads (recomputations too)
    env: list | None = None
    versions: tuple = ()  # of ``_kept`` at the forward's end: in-place changes since are refused
    done: bool = False  # a backward ran without retain_graph and released what it kept


class _PlannedSegment(torch.autograd.Function):
    """One piece of the plan's backward as an autograd node. The pieces form a chain from the
    model's inputs to its outputs: piece 0 returns the outputs, so the engine runs it first, then
    piece 1, ... (the forward itself ran before, in ``PlannedModule.forward``). Each piece's
    autograd inputs are the previous piece's token (the last piece: the model's inputs), then the
    parameters whose gradients it returns."""

    @staticmethod
    def forward(ctx, pending: _Pending, index: int, n_upstream: int, *tensors: torch.Tensor):
        ctx.pending, ctx.index, ctx.n_upstream = pending, index, n_upstream
        ctx.set_materialize_grads(False)  # an output the loss ignores gets no gradient, not zeros
        if index == 0:
            graph = pending.runner.graph
            # aliases, not save_for_backward: autograd would hold a saved output until this
            # piece's backward ends, past where the plan frees it; the version is checked instead
            pending.saved = tuple(output.detach() for output in pending.saved)
            pending.versions = tuple(tensor_version(t) for _, t, _ in _kept(pending))
            return tuple(pending.env[t] for t in graph.model_outputs)
        return torch.empty(())  # a token: the next piece's backward runs after this one's

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        pending: _Pending = ctx.pending
        runner = pending.runner
        graph, segment = runner.graph, runner.segments[ctx.index]
        if ctx.index == 0:
            _check_backward(pending)
            _begin_backward(pending)
        env = pending.env
        returned: dict[int, torch.Tensor] = {}

        def collect(parameter: int, grad: torch.Tensor) -> None:
            returned[parameter] = grad if parameter not in returned else returned[parameter] + grad

        last = ctx.index == len(runner.segments) - 1
        with torch.no_grad():
            runner.run(segment.steps, env, pending.rng_states, keep=graph.input_gradients, on_gradient=collect)
        upstream: tuple = (None,) * ctx.n_upstream
        if last:
            input_grads = {tensor: env[grad] for grad, tensor in graph.input_gradients.items()}
            upstream = tuple(input_grads.get(tensor) for tensor in graph.inputs)
            pending.env = None
        parameter_grads = tuple(returned.pop(p, None) for p in segment.parameters)
        return (None, None, None) + upstream + parameter_grads


def _check_backward(pending: _Pending) -> None:
    if torch.is_grad_enabled():
        raise BackwardError("create_graph=True (higher-order gradients, e.g. a gradient penalty) cannot run "
                            "through a planned step, whose backward is not differentiable: compute that loss "
                            "with the model itself (planned.model)")
    if pending.done:
        raise BackwardError("the planned step's backward already ran and freed what it kept, as eager PyTorch "
                            "frees its saved tensors: pass retain_graph=True to the first backward to run "
                            "it again")


_ALIASED_FIX = ("through a model output or input that shares its memory: modify a clone instead "
                "(output.clone()), as eager PyTorch also requires")
_PARAMETER_FIX = ("(an optimizer step or a no_grad update between the forward and its backward?): run the "
                  "backward first; eager PyTorch refuses this too wherever autograd saved the parameter, and "
                  "a plan's recomputations read every parameter the backward reads")


def _kept(pending: _Pending) -> tuple[tuple[str, torch.Tensor, str], ...]:
    """What a forward leaves for its backward that user code can reach and modify in place: the
    inputs, the carried tensors and saved outputs (which may share an output's memory) and the
    parameters the backward reads, each with its name and the fix to name if it changes."""
    graph, lowered = pending.runner.graph, pending.runner.lowered
    inputs = (t for t in pending.inputs if isinstance(t, torch.Tensor))
    # parameters first: a carried view of one (a linear layer's transposed weight) changes with it
    return (*((f"parameter {graph.tensors[p].name}", value, _PARAMETER_FIX)
              for p, value in zip(lowered.read_parameters, pending.parameters)),
            *((f"input {i}", t, _ALIASED_FIX) for i, t in enumerate(inputs)),
            *((graph.tensors[t].name, value, _ALIASED_FIX) for t, value in pending.carried.items()),
            *((graph.tensors[t].name, value, _ALIASED_FIX) for t, value in zip(lowered.saved_outputs, pending.saved)))


def _begin_backward(pending: _Pending) -> None:
    """The slot table of a backward: carried tensors, saved outputs, the model's parameters and
    buffers by name now (FSDP swaps them between forward and backward), the outputs' gradients."""
    runner = pending.runner
    graph, lowered = runner.graph, runner.lowered
    for (name, kept, fix), version in zip(_kept(pending), pending.versions):
        if tensor_version(kept) != version:  # what autograd's check of its saved tensors refuses
            raise BackwardError(f"a tensor the backward reads ({name!r}) was modified in place after the forward, {fix}")
    env: list = [None] * len(graph.tensors)
    # every value is put into env by _put, whose loop variables die with it: a loop variable
    # left here would hold its last tensor through the whole backward
    _put(env, pending.carried.keys(), pending.carried.values())
    _put(env, lowered.saved_outputs, pending.saved)
    _put(env, range(len(graph.tensors)), runner.new_env(model_state(runner.model)[3], pending.inputs))
    if not backward_retains_graph():  # the env owns them now
        pending.carried, pending.inputs, pending.saved, pending.parameters, pending.done = {}, (), (), (), True
    _put_output_grads(env, graph, pending.box.pop())  # after the tangent: a model returning its loss gets its gradient
    pending.env = env


def _put(env: list, tensors, values) -> None:
    for tensor, value in zip(tensors, values):
        if value is not None:
            env[tensor] = value


def _put_output_grads(env: list, graph: TrainingGraph, grads: tuple) -> None:
    """Each output's gradient where the plan's backward starts. An output the loss left out gets
    zeros; one the plan's loss ignored cannot start any backward op: a loss that uses it is refused."""
    for index, (grad_tensor, grad) in enumerate(zip(graph.output_grads, grads)):
        if grad_tensor is None:
            if grad is not None:
                raise PlanMismatchError(
                    f"the loss uses the model's output tensor {index} ({graph.tensors[graph.model_outputs[index]].name}),"
                    " which the loss the plan was made with does not: plan with this loss (loss_fn=...)")
            continue
        if grad is None:
            info = graph.tensors[grad_tensor]
            grad = torch.zeros(info.shape, dtype=info.dtype, device=graph.device)
        env[grad_tensor] = grad


def _planned_forward(runner: StepRunner, named: dict, inputs: tuple) -> tuple:
    """Run the plan's forward section, then chain its backward pieces to it: ``(box, *outputs)``
    for ``_HandOver``. One box per call: several forwards may precede their backwards."""
    graph, lowered = runner.graph, runner.lowered
    env = runner.new_env(named, inputs)
    rng_states: dict = {}
    with torch.no_grad():
        runner.run(lowered.forward, env, rng_states)
    box: list = []
    # the backward reads the inputs (e.g. the first layer's weight gradient)
    pending = _Pending(runner, box, inputs, {t: env[t] for t in lowered.carried}, rng_states,
                       tuple(env[t] for t in lowered.saved_outputs),
                       tuple(named[graph.tensors[p].name] for p in lowered.read_parameters), env)
    upstream = inputs
    for index in reversed(range(len(runner.segments))):
        parameters = tuple(named[graph.tensors[p].name] for p in runner.segments[index].parameters)
        upstream = _PlannedSegment.apply(pending, index, len(upstream), *upstream, *parameters)
        upstream = upstream if index == 0 else (upstream,)
    pending.env = None  # the outputs hold what they need
    env.clear()
    return (box, *upstream)


class _HandOver(torch.autograd.Function):
    """Stands between the plan's outputs and the user's loss, to free each output's gradient at
    its last use in the plan's backward, where the simulator frees it.

    The autograd engine holds the gradients it passes to a node until that node's backward
    returns: for the plan's first backward piece that is up to the first parameter gradient, and a large output's
    gradient (a language model's logits) would stay for all of it. This node's backward returns
    at once: it leaves the gradients in a box that the plan's backward takes over, and passes on
    one-element placeholders, expanded to the outputs' shapes (``None`` for an output the loss
    does not use).
    """

    @staticmethod
    def forward(ctx, box: list, *outputs: torch.Tensor):
        ctx.set_materialize_grads(False)
        ctx.box = box
        return tuple(output.detach() for output in outputs)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        placeholders = tuple(None if grad is None else grad.new_zeros(()).expand(grad.shape) for grad in grads)
        ctx.box.append(grads)
        del grads
        return (None,) + placeholders


class PlannedModule(torch.nn.Module):
    """``model`` whose forward and backward follow a plan. Use it as the model itself:
    ``loss_fn(planned(x), y).backward()`` then any optimizer step; call it as the model is called
    (``planned(**batch)``).

    Every call checks the state the plan assumed (``planner.guards``): in eval mode or without
    grad the model runs eagerly; another training state is planned again by ``replanner`` (what
    ``Plan.apply`` gives), or raises ``PlanMismatchError`` without one. ``plans`` lists the plans
    in use, least recently used first.
    """

    def __init__(self, model: torch.nn.Module, graph: TrainingGraph, schedule: Schedule, *,
                 plan=None, replanner: Replan | None = None):
        super().__init__()
        self.model = model
        self.runner = StepRunner(graph, schedule, model)
        self.cache = PlanCache(model, CachedStep(self.runner, plan), replanner, StepRunner)

    @property
    def plans(self) -> tuple:
        return self.cache.plans

    def forward(self, *args, **kwargs):
        if not torch.is_grad_enabled():  # no backward to plan for: eager's results
            return self.model(*args, **kwargs)
        form, tensors = split_call(args, kwargs)
        key, named = step_key(self.model, form, tensors, self.runner.device_type)
        step = self.cache.step_for(key, args, kwargs) if key.differentiable else None
        if step is None:
            return self.model(*args, **kwargs)
        graph = step.runner.graph
        outputs = _HandOver.apply(*_planned_forward(step.runner, named, tensors))
        if graph.output_form.dropped:
            self.cache.warn_once("dropped", f"the model returns {', '.join(graph.output_form.dropped)}, not tensors: "
                                 "the planned module returns None in its place (as transformers does with gradient "
                                 "checkpointing); pass use_cache=False to a transformers model to silence this")
        return graph.output_form.fill(outputs)

    def training_step(self, inputs, targets=()) -> torch.Tensor:
        """Forward, loss and backward as one planned call; returns the loss (detached). ``inputs``
        as for ``plan``: a tensor, a tuple, or a dict of keyword arguments."""
        args, kwargs = call_arguments(inputs)
        targets = as_tuple(targets, "targets")
        form, tensors = split_call(args, kwargs)
        key, named = step_key(self.model, form, tensors, self.runner.device_type)
        step = self.cache.step_for(key, args, kwargs, targets)
        return step.runner.run_step(named, tensors, targets)
