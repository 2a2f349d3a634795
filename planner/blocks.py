"""``plan_blocks``: plan a model's repeated blocks (transformer layers) one by one.

Each block is captured with its real input activations requiring grad (``planner.block_calls``),
planned under its share of the budget, and its ``forward`` replaced by its plan, so the rest of
the model, and any wrapper around the blocks (``fully_shard``, ``DistributedDataParallel``), stay
ordinary PyTorch. Blocks whose graphs have the same fingerprint share one plan. The whole step's
peak is predicted by the simulator with every block as an opaque op sized by its plan
(``planner.step_model``), and with FSDP2's buffers per rank when planned for ``fully_shard``
(``planner.fsdp``).
"""
from __future__ import annotations

import hashlib
import math
import types
from dataclasses import dataclass, field
from typing import Collection, Sequence

import torch

from planner.block_calls import Block, BlockCall, BlockStep, capture_block, find_blocks, original_forward, record_calls
from planner.budgets import parse_budget
from planner.calls import as_tuple
from planner.capturing import LossFn
from planner.cost import CostModel, RooflineCostModel, default_cost_model
from planner.errors import CaptureError, InfeasibleBudgetError, PlanMismatchError
from planner.execute import PlannedModule
from planner.fsdp import FSDPLayout, check_ranks_agree, sharded_step
from planner.graph import TrainingGraph
from planner.planning import Plan, plan
from planner.step_model import BlockProfile, OuterStep, StepPrediction, capture_outer, profile_block, whole_step
from planner.units import format_bytes

_STATE = "_remat_planned_block"  # the attribute of a planned block holding its plan
BISECTION_STEPS = 8  # share of the budget, to 1/256 of each block's activations
#: baselines that keep little of a block for its backward (a few tensors at its articulation points)
CHECKPOINTING = ("checkpoint_all", "chen_sqrt", "chen_sqrt_linear")


@dataclass
class BlockPlan:
    """Plans for a model's blocks and what the simulator predicts for the whole step.

    ``rank_peak_bytes``: the predicted peak of each rank (one entry without FSDP);
    ``predicted_peak_bytes`` is their maximum. Budgets in percent are of ``store_all_peak_bytes``,
    the whole step with every block run unplanned by the executor (eager autograd can hold a few
    percent more or less, docs/distributed.md).
    """

    blocks: tuple[str, ...]
    plans: tuple[Plan, ...]  # per block; blocks with one fingerprint share one Plan
    budget_bytes: int
    predicted_peak_bytes: int
    rank_peak_bytes: tuple[int, ...]
    store_all_peak_bytes: int
    predicted_time: float
    store_all_time: float
    recomputations: int  # ops recomputed per step, over every block call
    world_size: int = 1
    _modules: tuple[torch.nn.Module, ...] = field(default=(), repr=False)

    @property
    def distinct_plans(self) -> int:
        return len({id(p) for p in self.plans})

    @property
    def overhead(self) -> float:
        return self.predicted_time / self.store_all_time - 1.0 if self.store_all_time else 0.0

    def remove(self) -> None:
        """Give every block its own forward back (the model is plain PyTorch again)."""
        for module in self._modules:
            _uninstall(module)

    def __str__(self) -> str:
        rows = [
            ("blocks", f"{len(self.blocks)} ({self.blocks[0]} ... {self.blocks[-1]}), "
                       f"{self.distinct_plans} distinct plan(s)"),
            ("budget", format_bytes(self.budget_bytes) + (" per rank" if self.world_size > 1 else "")),
            ("store-all peak", format_bytes(self.store_all_peak_bytes)),
            ("predicted peak", f"{format_bytes(self.predicted_peak_bytes)} "
                               f"({self.predicted_peak_bytes / self.store_all_peak_bytes:.1%} of store-all)"),
            ("predicted overhead", f"{self.overhead:+.1%} compute time ({self.recomputations} ops recomputed)"),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def plan_blocks(
    model: torch.nn.Module,
    budget: int | float | str,
    inputs: torch.Tensor | Sequence[torch.Tensor],
    *,
    loss_fn: LossFn | None = None,
    targets: torch.Tensor | Sequence[torch.Tensor] | None = None,
    blocks=None,
    block_budget: int | float | str | None = None,
    fsdp: bool = False,
    world_size: int | None = None,
    mode: str = "fast",
    cost_model: CostModel | str | None = None,
    op_variants: bool | str | Collection[str] = True,
) -> BlockPlan:
    """Plan every block of ``model`` and install the plans: each block's ``forward`` runs its plan.

    Parameters
    ----------
    model, inputs, loss_fn, targets: as ``planner.plan`` (one example batch: per rank under FSDP).
    budget: the whole step's peak (per rank under FSDP): bytes, ``"6GiB"``, or ``"50%"`` of the
        step with every block unplanned. The fastest fitting of: every block at the same share of
        its own activations (bisection over the share, ``BISECTION_STEPS`` probes), or every block
        checkpointed by one of ``CHECKPOINTING`` (they keep little for the backward, which matters
        when many blocks each hold what they keep).
    blocks: which submodules to plan (``planner.block_calls.find_blocks``): None for the repeated
        blocks (every ``LlamaDecoderLayer``, ``GPT2Block``, ...), a class, or submodule names.
    block_budget: plan every block at this budget of its own step instead (bytes, or a percentage
        of its own store-all peak); ``budget`` is then only checked against the prediction.
    fsdp: the blocks and the model will each be wrapped in ``fully_shard`` (FSDP2) after planning,
        over ``world_size`` ranks (default: the default process group's size). Plans are made from
        the unsharded shapes and are the same on every rank; peaks are predicted per rank with the
        sharded parameters and gradients resident and FSDP2's gathered parameters, prefetches and
        reduce-scatter buffers where FSDP2 holds them. When a process group is initialized, every
        rank must call ``plan_blocks``: the ranks' plans are compared (``RankMismatchError``).
    mode, cost_model, op_variants: as ``planner.plan``, for each block.

    Raises
    ------
    CaptureError: no blocks, a block called with state (a KV cache), blocks already sharded.
    InfeasibleBudgetError: no candidate fits; ``min_feasible_bytes`` is the whole step's lowest peak.
    RankMismatchError: ranks planned differently (different shapes, model or library versions).
    """
    inputs, targets = as_tuple(inputs, "inputs"), as_tuple(targets, "targets")
    _refuse_sharded(model)
    for module in model.modules():
        _uninstall(module)
    found = record_calls(model, find_blocks(model, blocks), inputs)
    graphs = [capture_block(block) for block in found]
    outer = capture_outer(model, found, inputs, loss_fn, targets)
    if isinstance(cost_model, str):
        cost_model = RooflineCostModel(cost_model)
    cost_model = cost_model or default_cost_model(graphs[0])
    layout = FSDPLayout.of(model, found, world_size) if fsdp else None
    search = _Planner(graphs, outer, cost_model, layout, dict(mode=mode, op_variants=op_variants))
    reference = search.predict(search.store_all())
    budget_bytes = parse_budget(budget, max(reference.rank_peaks))
    chosen = search.within(budget_bytes) if block_budget is None else search.at_block_budget(block_budget)
    prediction = search.predict(chosen)
    if max(prediction.rank_peaks) > budget_bytes:
        raise InfeasibleBudgetError(budget_bytes, max(prediction.rank_peaks), f"every block at block_budget={block_budget!r}")
    check_ranks_agree([(b.name, p.graph.fingerprint, _steps_key(p)) for b, p in zip(found, chosen)])
    for block, chosen_plan in zip(found, chosen):
        _install(block, chosen_plan)
    return BlockPlan(
        blocks=tuple(b.name for b in found), plans=tuple(chosen), budget_bytes=budget_bytes,
        predicted_peak_bytes=max(prediction.rank_peaks), rank_peak_bytes=prediction.rank_peaks,
        store_all_peak_bytes=max(reference.rank_peaks), predicted_time=prediction.time,
        store_all_time=reference.time,
        recomputations=sum(chosen[outer.blocks[c]].recomputations for c in range(len(outer.blocks))),
        world_size=layout.world_size if layout else 1, _modules=tuple(b.module for b in found))


def _steps_key(chosen: Plan) -> str:
    """A hash of the schedule's steps (its ``fingerprint`` is the graph's)."""
    return hashlib.sha256(repr(chosen.schedule.steps).encode()).hexdigest()[:32]


def _refuse_sharded(model: torch.nn.Module) -> None:
    try:
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.tensor import DTensor
    except ImportError:
        return
    sharded = [n or "the model" for n, m in model.named_modules() if isinstance(m, FSDPModule)]
    sharded += [n for n, p in model.named_parameters() if isinstance(p, DTensor)]
    if sharded:
        raise CaptureError(f"{sharded[0]} is already sharded: call plan_blocks(model, ..., fsdp=True) on the "
                           "unsharded model, then fully_shard each planned block and the model")


@dataclass(frozen=True)
class _Prediction:
    rank_peaks: tuple[int, ...]
    time: float


class _Planner:
    """Plans the distinct block graphs and predicts whole steps; caches both by budget."""

    def __init__(self, graphs: list[TrainingGraph], outer: OuterStep, cost_model: CostModel, layout, options: dict):
        self.outer, self.cost_model, self.layout, self.options = outer, cost_model, layout, options
        self.distinct: dict[str, TrainingGraph] = {}
        for graph in graphs:
            self.distinct.setdefault(graph.fingerprint, graph)
        self.key_of = [graph.fingerprint for graph in graphs]
        self._plans: dict[tuple[str, int], Plan] = {}
        self._profiles: dict[int, BlockProfile] = {}
        self._store_all = {key: plan(g, "100%", algorithm="store_all", cost_model=cost_model, op_variants=False)
                           for key, g in self.distinct.items()}

    def store_all(self) -> list[Plan]:
        return [self._store_all[key] for key in self.key_of]

    def _plan(self, key: str, budget_bytes: int) -> Plan:
        if (key, budget_bytes) not in self._plans:
            self._plans[key, budget_bytes] = plan(self.distinct[key], budget_bytes, cost_model=self.cost_model,
                                                  **self.options)
        return self._plans[key, budget_bytes]

    def at_block_budget(self, block_budget) -> list[Plan]:
        by_key = {key: self._plan(key, parse_budget(block_budget, self._store_all[key].store_all_peak_bytes))
                  for key in self.distinct}
        return [by_key[key] for key in self.key_of]

    def at_share(self, share: float) -> list[Plan]:
        """Every block planned at ``resident + share x its store-all activations``."""
        by_key = {}
        for key, reference in self._store_all.items():
            activations = reference.store_all_peak_bytes - reference.resident_bytes
            by_key[key] = self._plan(key, reference.resident_bytes + math.ceil(share * activations))
        return [by_key[key] for key in self.key_of]

    def lowest_share(self) -> float:
        """The smallest share at which every block has a plan (its lowest reachable peak)."""
        share = 0.0
        for key, reference in self._store_all.items():
            try:
                self._plan(key, reference.resident_bytes + 1)
                continue
            except InfeasibleBudgetError as error:
                lowest = error.min_feasible_bytes
            activations = reference.store_all_peak_bytes - reference.resident_bytes
            share = max(share, (lowest - reference.resident_bytes) / activations)
        return share

    def checkpointing(self, name: str) -> list[Plan]:
        """Every block planned by the checkpointing baseline ``name``, whatever its own peak."""
        by_key = {key: plan(graph, "100%", algorithm=name, cost_model=self.cost_model, op_variants=False)
                  for key, graph in self.distinct.items()}
        return [by_key[key] for key in self.key_of]

    def within(self, budget_bytes: int) -> list[Plan]:
        """The fastest plans found whose whole step fits.

        Two families: each block at the same share of its activations (the fastest plan under
        that budget of its own step; bisection over the share), and each block checkpointed by a
        baseline that keeps little from its forward to its backward (``CHECKPOINTING``). A block's
        own budget bounds its own peak, but the whole step also holds what every other block keeps
        for its backward, so where many blocks are planned the second family reaches lower."""
        tried = [self.store_all()] + [self.checkpointing(name) for name in CHECKPOINTING]
        low = self.lowest_share()
        tried.append(self.at_share(low))
        high = 1.0
        if self._fits(tried[-1], budget_bytes):
            for _ in range(BISECTION_STEPS):
                middle = (low + high) / 2
                tried.append(self.at_share(middle))
                low, high = (middle, high) if self._fits(tried[-1], budget_bytes) else (low, middle)
        fitting = [plans for plans in tried if self._fits(plans, budget_bytes)]
        if not fitting:
            lowest = min(max(self.predict(plans).rank_peaks) for plans in tried)
            raise InfeasibleBudgetError(budget_bytes, lowest, "every block at its lowest peak, and checkpointed by "
                                        + ", ".join(CHECKPOINTING))
        return min(fitting, key=lambda plans: self.predict(plans).time)

    def _fits(self, plans: list[Plan], budget_bytes: int) -> bool:
        return max(self.predict(plans).rank_peaks) <= budget_bytes

    def _profile(self, chosen: Plan) -> BlockProfile:
        if id(chosen) not in self._profiles:
            self._profiles[id(chosen)] = profile_block(chosen.graph, chosen.schedule, self.cost_model,
                                                       gradients_held=self.layout is not None)
        return self._profiles[id(chosen)]

    def predict(self, plans: list[Plan]) -> _Prediction:
        profiles = [self._profile(plans[block]) for block in self.outer.blocks]
        if self.layout is None:
            accumulators = sum(g.grad_accumulator_bytes for g in (plans[i].graph for i in range(len(plans))))
            step: StepPrediction = whole_step(self.outer, profiles, accumulators, self.cost_model)
            return _Prediction((step.peak_bytes,), step.time)
        steps = [sharded_step(self.outer, profiles, self.layout, rank, self.cost_model)
                 for rank in range(self.layout.world_size)]
        return _Prediction(tuple(s.peak_bytes for s in steps), steps[0].time)


# ---- the installed plan ---------------------------------------------------------------------------
class _PlannedBlock:
    """What a planned block's ``forward`` runs. A copy of the block (``copy.deepcopy``) gets a copy
    of this state, sharing the graph and schedule, with its own executor for its own parameters."""

    def __init__(self, name: str, call: BlockCall, graph: TrainingGraph, chosen: Plan, training: bool):
        self.name, self.call, self.graph, self.plan, self.training = name, call, graph, chosen, training
        self._planned = None  # PlannedModule over this block, made at the first call
        self._planned_for: type | None = None  # the block's class then

    def __deepcopy__(self, memo) -> "_PlannedBlock":
        return _PlannedBlock(self.name, self.call, self.graph, self.plan, self.training)

    def run(self, block: torch.nn.Module, args: tuple, kwargs: dict):
        if not torch.is_grad_enabled():  # no backward will run: the block's own forward is eager's
            return original_forward(block)(*args, **kwargs)
        tensors = self.call.split(args, kwargs)
        if tensors is None:
            raise PlanMismatchError(f"block {self.name} was planned for calls with tensors {self.call.describe()} "
                                    "(layouts and constants as recorded); it got another call: plan_blocks again for it")
        if block.training != self.training:
            raise PlanMismatchError(f"block {self.name} was planned in {'train' if self.training else 'eval'} mode: "
                                    "switch it back, or plan_blocks again in this mode")
        graded = {self.graph.inputs.index(t) for t in self.graph.input_gradients.values()}
        needs = [i for i, t in enumerate(tensors) if t.requires_grad and i not in graded]
        if needs:
            raise PlanMismatchError(f"input {needs[0]} of block {self.name} requires grad but was planned without "
                                    "a gradient: plan_blocks again with the model as it trains")
        self._check_parameters(block)
        if self._planned is None or self._planned_for is not type(block):
            # made again when the block's class changes: fully_shard swaps in a subclass of its own
            self._planned = PlannedModule(BlockStep(block, self.call), self.graph, self.plan.schedule)
            self._planned_for = type(block)
        return self._planned(*tensors)

    def _check_parameters(self, block: torch.nn.Module) -> None:
        """The parameters the plan will read, as they are when it runs (FSDP2 swaps in its unsharded
        ones in its pre-forward and pre-backward hooks)."""
        for name, parameter in block.named_parameters(remove_duplicate=False):
            tensor = self.graph.parameters.get(f"block.{name}")
            info = self.graph.tensors[tensor] if tensor is not None else None
            if info is None or tuple(parameter.shape) != info.shape or parameter.dtype != info.dtype \
                    or type(parameter) not in (torch.nn.Parameter, torch.Tensor):
                raise PlanMismatchError(
                    f"block {self.name}'s parameter {name} is a {type(parameter).__name__} of shape "
                    f"{tuple(parameter.shape)} {parameter.dtype}, not the plan's: call the block through its module "
                    "(FSDP2 unshards in its hooks), without mixed precision or tensor parallelism, or plan_blocks again")


def _planned_forward(self: torch.nn.Module, *args, **kwargs):
    return self.__dict__[_STATE].run(self, args, kwargs)


def _install(block: Block, chosen: Plan) -> None:
    module = block.module
    if "forward" in module.__dict__:
        raise CaptureError(f"block {block.name} has a forward of its own instance (patched?): plan its class's")
    module.__dict__[_STATE] = _PlannedBlock(block.name, block.call, chosen.graph, chosen, module.training)
    module.forward = types.MethodType(_planned_forward, module)


def _uninstall(module: torch.nn.Module) -> None:
    if _STATE in module.__dict__:
        del module.__dict__[_STATE]
        del module.forward


def planned_block_state(module: torch.nn.Module) -> _PlannedBlock | None:
    """The installed plan of a block, or None."""
    return module.__dict__.get(_STATE)
