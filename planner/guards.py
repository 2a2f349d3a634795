"""Guards: what a plan assumed about the model and its call, checked on every call of a planned
module, and the plans kept for the other states a training loop reaches.

A graph is traced for one state, as torch.compile's graphs are: the training flag of every module
(and its type, simple attributes and hooks, all baked into the trace), grad mode, autocast, the
parameters and buffers (names, shapes, dtypes, devices, ``requires_grad``, which names share one
tensor), and the call's form with each input's shape, dtype, device and ``requires_grad``.
``StepKey`` is that state, computed in one pass over the modules (no trace). Parameters and buffers
are bound by name at every call, so another tensor of the same shape (a new head, a swapped
parameter, FSDP's unsharded parameters) needs no new plan.

On a state no plan is cached for (``PlanCache.step_for``): under ``no_grad`` or with nothing to
differentiate, and in eval mode, the model runs eagerly (eager's results; nothing to plan); in
another training state the step is captured and planned again with the first plan's request
(``planner.planning.Replanner``: a byte budget stays bytes, a percentage is of the new store-all peak), keeping the
``config.cache_size_limit`` most recently used plans; a planned module built from a bare graph and
schedule has nothing to plan with and raises ``PlanMismatchError`` naming the change and the fix.
"""
from __future__ import annotations

import functools
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from planner.calls import CONSTANT_TYPES, PytreeForm
from planner.errors import PlanMismatchError

from planner.graph import TrainingGraph
from planner.schedule import Schedule

if TYPE_CHECKING:  # annotations only: the executor and the plans sit above the guards
    from planner.execute import StepRunner
    from planner.planning import Plan

#: plans a new state: (model, args, kwargs, loss targets or None, the graph planned before) -> Plan
Replan = Callable[[torch.nn.Module, tuple, dict, "tuple | None", TrainingGraph], "Plan"]

logger = logging.getLogger("planner")
_TORCH_LAYERS = "torch.nn.modules."  # the modules whose plain attributes are guarded


@dataclass
class GuardConfig:
    """``planner.config``: ``cache_size_limit`` plans per planned module (as
    ``torch._dynamo.config.cache_size_limit`` for compiled frames); the least recently used goes."""

    cache_size_limit: int = 8


config = GuardConfig()


@dataclass(frozen=True)
class StepKey:
    """The state a plan was made for; equal keys run the same plan."""

    ambient: tuple  # default dtype, autocast enabled and its dtype on the graph's device type
    modules: tuple  # per module: name, type, training, simple attributes, hook ids
    parameters: tuple  # per name: shape, dtype, device, requires_grad, first name of the same tensor
    buffers: tuple  # per name: shape, dtype, device
    call: tuple  # the call's form, then per input tensor: shape, dtype, device, requires_grad

    @property
    def training(self) -> bool:
        """Some module is in train mode (a model entirely in eval mode is validated, not trained)."""
        return any(module[2] for module in self.modules)

    @property
    def differentiable(self) -> bool:
        """Something requires grad: a parameter or an input."""
        return any(p[4] for p in self.parameters if len(p) > 2) or any(spec[3] for spec in self.call[2])


def ambient_state(device_type: str) -> tuple:
    try:
        autocast = (torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
    except RuntimeError:  # a device type without autocast (meta)
        autocast = (False, None)
    return (torch.get_default_dtype(), *autocast)


def _module_entry(name: str, module: torch.nn.Module) -> tuple:
    """What the trace of ``module`` baked in: its type, mode, hooks, and for PyTorch's own layers
    their public plain attributes (dropout's ``p``, BatchNorm's ``momentum`` and ``eps``). Other
    modules' attributes are often bookkeeping the step does not read (transformers' ``layer_idx``,
    which differs between layers ``plan_blocks`` plans once), so they are not guarded."""
    cls = _traced_class(type(module))
    attributes = tuple((k, v) for k, v in module.__dict__.items() if type(v) in CONSTANT_TYPES and k[0] != "_") \
        if cls.__module__.startswith(_TORCH_LAYERS) else ()
    hooks = tuple(tuple(key for key, hook in getattr(module, d).items() if not _distributed(hook))
                  for d in ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks"))
    return (name, cls, module.training, attributes, hooks)


def _distributed(hook: Callable) -> bool:
    """A hook of torch.distributed's wrappers (``fully_shard``'s unshard and reshard): they run
    around a planned block, not inside the traced step."""
    return getattr(getattr(hook, "func", hook), "__module__", "").startswith("torch.distributed")


@functools.cache
def _traced_class(cls: type) -> type:
    """The class whose forward runs: ``fully_shard`` swaps a module's class for a subclass of
    ``FSDPModule`` and it (``FSDPLlamaDecoderLayer``), which computes what it did."""
    fsdp = next((base for base in cls.__mro__ if base.__name__ == "FSDPModule"
                 and base.__module__.startswith("torch.distributed")), None)
    return cls if fsdp is None else cls.__mro__[cls.__mro__.index(fsdp) + 1]


def model_state(model: torch.nn.Module) -> tuple[tuple, tuple, tuple, dict[str, torch.Tensor]]:
    """One pass over the modules: their entries, the parameters' and buffers' entries, and every
    parameter and buffer by name (what the executor binds). O(modules + tensors)."""
    modules, parameters, buffers, named = [], [], [], {}
    first_name: dict[int, str] = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        modules.append(_module_entry(prefix, module))
        dot = f"{prefix}." if prefix else ""
        for name, p in module._parameters.items():
            if p is None:
                parameters.append((dot + name, None))
                continue
            named[dot + name] = p
            parameters.append((dot + name, p.shape, p.dtype, p.device, p.requires_grad,
                               first_name.setdefault(id(p), dot + name)))
        for name, b in module._buffers.items():
            if b is not None:
                named[dot + name] = b
            buffers.append((dot + name, None) if b is None else (dot + name, b.shape, b.dtype, b.device))
    return tuple(modules), tuple(parameters), tuple(buffers), named


def call_state(form: PytreeForm, tensors: tuple[torch.Tensor, ...]) -> tuple:
    """The call's structure, its constants with their types (``1``, ``1.0`` and ``True`` are equal
    in Python), and each tensor's shape, dtype, device and requires_grad."""
    return (form.spec, tuple((type(leaf), leaf) for leaf in form.leaves),
            tuple((t.shape, t.dtype, t.device, t.requires_grad) for t in tensors))


def step_key(model: torch.nn.Module, form: PytreeForm, tensors: tuple, device_type: str
             ) -> tuple[StepKey, dict[str, torch.Tensor]]:
    """The state of one call and the model's tensors by name. ResNet-50: about 0.3 ms
    (docs/benchmarks.md, "Guard cost")."""
    modules, parameters, buffers, named = model_state(model)
    return StepKey(ambient_state(device_type), modules, parameters, buffers, call_state(form, tensors)), named


_LABELS = {
    "modules": ("module", ("type", "training", "attributes", "hooks")),
    "parameters": ("parameter", ("shape", "dtype", "device", "requires_grad", "tied to")),
    "buffers": ("buffer", ("shape", "dtype", "device")),
}


def describe_change(planned: StepKey, now: StepKey) -> str:
    """What differs between two states, one phrase per part, for logs and errors."""
    changes = []
    if planned.ambient != now.ambient:
        changes.append("default dtype, autocast enabled, autocast dtype: {}, {}, {} (planned {}, {}, {})".format(
            *now.ambient, *planned.ambient))
    for part, (kind, labels) in _LABELS.items():
        old, new = getattr(planned, part), getattr(now, part)
        if old != new:
            changes.append(_entry_change(kind, labels, old, new))
    if planned.call[:2] != now.call[:2]:
        changes.append("another call form or constant (positional or keyword arguments, flags)")
    elif planned.call != now.call:
        i, (new, old) = next((i, pair) for i, pair in enumerate(zip(now.call[2], planned.call[2])) if pair[0] != pair[1])
        changes.append(f"input {i} of shape {tuple(new[0])}, {new[1]}, {new[2]}, requires_grad={new[3]} "
                       f"(planned {tuple(old[0])}, {old[1]}, {old[2]}, requires_grad={old[3]})")
    return "; ".join(changes)


def _entry_change(kind: str, labels: tuple[str, ...], old: tuple, new: tuple) -> str:
    """The first entry (name first, then fields) that differs."""
    for a, b in zip(old, new):
        if a == b:
            continue
        if a[0] != b[0] or len(a) != len(b):
            return f"{kind} {b[0]!r} where {a[0]!r} was planned"
        label, x, y = next((label, x, y) for label, x, y in zip(labels, a[1:], b[1:]) if x != y)
        shown = (lambda v: v.__name__) if label == "type" else repr
        return f"{kind} {b[0]!r}: {label} {shown(y)} (planned {shown(x)})"
    return f"{len(new)} {kind}s (planned {len(old)})"


@dataclass
class CachedStep:
    """A plan's runner, and the plan when there is one (a bare graph and schedule have none)."""

    runner: "StepRunner"
    plan: "Plan | None"


class PlanCache:
    """The plans of one planned module, by state, least recently used first."""

    def __init__(self, model: torch.nn.Module, first: CachedStep, replanner: Replan | None,
                 make_runner: Callable[["TrainingGraph", "Schedule", torch.nn.Module], "StepRunner"]):
        self.model = model
        self.make_runner = make_runner  # the executor's StepRunner: guards sit below the executor
        self.first_key: StepKey = first.runner.graph.assumptions
        self.replanner = replanner
        self.entries: OrderedDict[StepKey, CachedStep] = OrderedDict({self.first_key: first})
        self._said: set[str] = set()

    def step_for(self, key: StepKey, args: tuple, kwargs: dict, targets: tuple | None = None) -> CachedStep | None:
        """The step to run for ``key``; None: run the model eagerly. ``targets`` (``training_step``)
        must match the plan's loss targets too."""
        cached = self.entries.get(key)
        if cached is not None and (targets is None or _specs(targets) == _target_specs(cached.runner.graph)):
            self.entries.move_to_end(key)
            return cached
        if targets is None and not key.training:
            self._once("eval", logging.INFO, "the model is in eval mode: the planned module runs it eagerly "
                       "(to train in eval mode, plan it in eval mode)")
            return None
        change = describe_change(self.first_key, key)
        if self.replanner is None:
            raise PlanMismatchError(f"this planned module was made for another state ({change}) and does not plan "
                                    "again (built from a bare graph and schedule, or with apply(replan=False)): use "
                                    "planner.plan(model, budget, inputs).apply(model), which plans each new state "
                                    "automatically, or plan again for this state")
        like = (cached or next(reversed(self.entries.values()))).runner.graph
        plan = self.replanner(self.model, args, kwargs, targets, like)
        step = CachedStep(self.make_runner(plan.graph, plan.schedule, self.model), plan)
        self.entries[key] = step
        self.entries.move_to_end(key)
        logger.warning("planner: planned %s again for a new state (%s): %s", type(self.model).__name__, change,
                       f"peak {plan.predicted_peak_bytes} bytes, {len(self.entries)} plan(s) cached")
        while len(self.entries) > max(1, config.cache_size_limit):
            self.entries.popitem(last=False)
            self._once("evict", logging.WARNING, f"more states than planner.config.cache_size_limit="
                       f"{config.cache_size_limit}: the least recently used plans are dropped and planned again "
                       "when needed (raise the limit if this repeats)")
        return step

    def _once(self, what: str, level: int, message: str) -> None:
        if what not in self._said:
            self._said.add(what)
            logger.log(level, "planner: %s", message)

    def warn_once(self, what: str, message: str) -> None:
        self._once(what, logging.WARNING, message)

    @property
    def plans(self) -> tuple["Plan", ...]:
        return tuple(step.plan for step in self.entries.values() if step.plan is not None)


def _specs(tensors: tuple) -> tuple:
    return tuple((tuple(t.shape), t.dtype, str(t.device)) for t in tensors)


def _target_specs(graph: "TrainingGraph") -> tuple:
    return tuple((s.shape, s.dtype, s.device) for s in graph.input_specs[len(graph.inputs):])


def example_targets(like: "TrainingGraph", inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Loss targets for a call planned from the model's forward, where the real targets are not
    known: a target shaped like an input at plan time takes that input's new shape (language-model
    labels); else one whose first dimension was the batch takes the new batch (class labels);
    else it keeps its shape (class weights). Values are zeros: only shapes are traced."""
    planned = [s.shape for s in like.input_specs[: len(like.inputs)]]
    batch = (planned[0][:1], tuple(inputs[0].shape[:1])) if planned and planned[0] and inputs[0].dim() else None
    targets = []
    for spec in like.input_specs[len(like.inputs):]:
        shape = spec.shape
        if shape in planned:
            shape = tuple(inputs[planned.index(shape)].shape)
        elif batch is not None and shape and shape[:1] == batch[0]:
            shape = batch[1] + shape[1:]
        targets.append(torch.zeros(shape, dtype=spec.dtype, device=spec.device))
    return tuple(targets)
