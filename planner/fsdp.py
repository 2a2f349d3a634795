"""FSDP2 (``fully_shard``) per rank: its parameter layout, its buffers in the whole step, and the
check that every rank planned the same blocks the same way.

Memory model (torch 2.14's FSDP2, ``fully_shard`` on each planned block and on the model, default
options: reshard after forward, implicit backward prefetch, no mixed precision). Each rank holds
throughout its shards of every parameter (dim 0 split over the ranks, padded to equal shards) and
of every gradient. The root (the model's own parameters, outside every block) is gathered in its
pre-forward and, as FSDP2 does for the root, kept gathered until its post-backward. Each block:

- forward: its parameters are all-gathered into a flat buffer (the size of its parameters, dim 0
  padded), copied out into unsharded parameters, which are freed after its forward; the flat
  buffer is freed only when the next block's all-gather has been issued (FSDP2 keeps it to overlap
  the next copy-out), the last one when the root's forward ends;
- backward: the block whose forward ran before it is prefetched (its flat buffer all-gathered) when
  this one's backward starts, and copied out when its own backward starts; the root prefetches the
  last block. Parameter gradients are fresh ``.grad`` tensors of the unsharded parameters, held
  until the block's post-backward, where they are copied into a flat reduce-scatter input that
  FSDP2 keeps until the next block's post-backward (the root's: until the end of the backward).

These buffers become tensors and ops of the whole step's graph (``planner.step_model``), whose
replay by the simulator gives each rank's peak. Buffers inside the collective backends (gloo's
copies, NCCL's workspace) are outside both the model and ``planner.measure``'s meter.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from planner.block_calls import Block
from planner.cost import CostModel
from planner.errors import CaptureError, RankMismatchError
from planner.graph import Phase, TensorKind
from planner.step_model import BlockProfile, OuterStep, StepPrediction, outside_time, simulate_step, with_block_profiles


@dataclass(frozen=True)
class ShardGroup:
    """The parameters of one ``fully_shard`` module as FSDP2 lays them out over the ranks."""

    padded_bytes: int  # the all-gather buffer, and the unsharded parameters (dim 0 padded)
    gradient_bytes: int  # the unsharded gradients (the parameters' own shapes)
    shard_bytes: int  # each rank's padded shard storage of the parameters
    rank_gradient_bytes: tuple[int, ...]  # each rank's sharded gradients (its rows, unpadded)

    @classmethod
    def of(cls, parameters: Sequence[torch.nn.Parameter], world_size: int) -> "ShardGroup":
        padded = gradients = shard = 0
        rank_gradients = [0] * world_size
        for p in parameters:
            rows = p.shape[0] if p.dim() else 1
            per_row = (p.numel() // rows if rows else 0) * p.element_size()
            chunk = -(-rows // world_size)  # torch.chunk's rows per rank
            padded += chunk * world_size * per_row
            shard += chunk * per_row
            if p.requires_grad:
                gradients += p.numel() * p.element_size()
                for rank in range(world_size):
                    rank_gradients[rank] += max(0, min(chunk, rows - rank * chunk)) * per_row
        return cls(padded, gradients, shard, tuple(rank_gradients))

    def resident_bytes(self, rank: int) -> int:
        return self.shard_bytes + self.rank_gradient_bytes[rank]


@dataclass(frozen=True)
class FSDPLayout:
    """Every sharded group of a model planned for ``fully_shard`` on each block and on the model."""

    world_size: int
    root: ShardGroup  # the model's parameters outside every block
    root_unpadded_bytes: int  # the root's parameters at their own sizes (the whole-step graph's)
    blocks: tuple[ShardGroup, ...]  # per planned block

    @classmethod
    def of(cls, model: torch.nn.Module, blocks: Sequence[Block], world_size: int | None = None) -> "FSDPLayout":
        if world_size is None:
            if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
                raise CaptureError("fsdp=True needs the number of ranks: initialize the process group first, "
                                   "or pass world_size=")
            world_size = torch.distributed.get_world_size()
        in_blocks = {id(p) for block in blocks for p in block.module.parameters()}
        root = [p for p in model.parameters() if id(p) not in in_blocks]
        return cls(world_size, ShardGroup.of(root, world_size), sum(p.numel() * p.element_size() for p in root),
                   tuple(ShardGroup.of(list(block.module.parameters()), world_size) for block in blocks))

    def resident_bytes(self, rank: int) -> int:
        """Sharded parameters and gradients, plus the root's padding (its gathered parameters are
        resident in the step's graph at their own sizes)."""
        shards = self.root.resident_bytes(rank) + sum(g.resident_bytes(rank) for g in self.blocks)
        return shards + self.root.padded_bytes - self.root_unpadded_bytes


def sharded_step(outer: OuterStep, profiles: Sequence[BlockProfile], layout: FSDPLayout, rank: int,
                 cost_model: CostModel) -> StepPrediction:
    """Rank ``rank``'s whole step under FSDP2: the outer graph with FSDP2's buffers as tensors
    (profiles made with ``gradients_held``). Complexity: one simulation of the outer step plus
    a few ops per block call."""
    graph = outer.graph
    step = with_block_profiles(outer, profiles)
    editor, before, after = step.editor, step.before, step.after
    for parameters in outer.block_parameters:  # gathered only around their block (below)
        for tensor in parameters:
            editor.resize(tensor, 0)
    root_gradients = list(graph.gradients)  # fresh .grad tensors, held until the root's post-backward
    editor.gradients = {}
    editor.add_tensor("sharded parameters and gradients", layout.resident_bytes(rank), TensorKind.BUFFER)

    def op(name: str, inputs: Sequence[int] = (), outputs: Sequence[int] = (), backward: bool = False) -> int:
        return editor.add_op(f"fsdp.{name}", inputs, outputs, Phase.BACKWARD if backward else Phase.FORWARD)

    def buffer(name: str, nbytes: int) -> int:
        return editor.add_tensor(f"fsdp.{name}", nbytes)

    def group(call: int) -> ShardGroup:
        return layout.blocks[outer.blocks[call]]

    calls = range(len(outer.forward_ops))  # in forward order
    gathered = buffer("all_gather(root)", layout.root.padded_bytes)
    before[0].append(op("all_gather(root)", outputs=[gathered]))
    for call in calls:
        flat, unsharded = buffer(f"all_gather({call})", group(call).padded_bytes), buffer(
            f"unsharded({call})", group(call).padded_bytes)
        forward = outer.forward_ops[call]
        before[forward] += [op(f"all_gather({call})", [gathered], [flat]), op(f"copy_out({call})", [flat], [unsharded])]
        editor.add_inputs(forward, [unsharded])
        gathered = flat
    last_model_forward = max(o.id for o in graph.ops if o.phase is Phase.FORWARD and not o.in_loss)
    after[last_model_forward].append(op("root_post_forward", [gathered]))

    prefetched: dict[int, int] = {}
    done: set[int] = set()

    def prefetch(call: int, where: list[int]) -> None:
        if 0 <= call and call not in done and call not in prefetched:
            prefetched[call] = buffer(f"all_gather_backward({call})", group(call).padded_bytes)
            where.append(op(f"all_gather_backward({call})", outputs=[prefetched[call]], backward=True))

    first_gradient_reader = min(c for t in graph.output_grads for c in graph.tensors[t].consumers)
    prefetch(len(calls) - 1, before[first_gradient_reader])
    reduce_input: list[int] = []
    for call in sorted(calls, key=lambda c: outer.backward_ops[c]):
        backward, peak = outer.backward_ops[call], step.backward_peaks[call]
        pre_backward: list[int] = []
        prefetch(call, pre_backward)  # not prefetched: its own all-gather
        unsharded = buffer(f"unsharded_backward({call})", group(call).padded_bytes)
        pre_backward.append(op(f"copy_out_backward({call})", [prefetched.pop(call)], [unsharded], True))
        done.add(call)
        prefetch(call - 1, pre_backward)
        before[backward][:0] = pre_backward  # before the block's backward peak
        editor.add_inputs(peak, [unsharded])
        editor.add_inputs(backward, [unsharded])
        gradients = buffer(f"gradients({call})", profiles[call].gradient_bytes)
        editor.add_outputs(backward, [gradients])
        after[backward].append(op("free_reduce_scatter_input", reduce_input, backward=True))
        reduce_input = [buffer(f"reduce_scatter({call})", group(call).padded_bytes)]
        after[backward].append(op(f"reduce_scatter({call})", [gradients], reduce_input, True))
    root_input = buffer("reduce_scatter(root)", layout.root.padded_bytes)
    step.end += [op("free_reduce_scatter_input", reduce_input + list(prefetched.values()), backward=True),
                 op("reduce_scatter(root)", root_gradients, [root_input], True),
                 op("end_of_backward", [root_input], backward=True)]
    result = simulate_step(step, cost_model)
    return StepPrediction(result.peak_bytes, outside_time(outer, cost_model) + sum(p.time for p in profiles),
                          result.resident_bytes)


def check_ranks_agree(plans: Any) -> None:
    """Compare what every rank planned (names, graph fingerprints, schedules) and raise
    ``RankMismatchError`` on every rank if any differs: ranks running different plans would compute
    different gradients. A no-op without an initialized process group. Collective: every rank calls it."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    gathered: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, plans)
    for rank, other in enumerate(gathered):
        if other != gathered[0]:
            differing = next((a[0] for a, b in zip(gathered[0], other) if a != b), "the number of blocks")
            raise RankMismatchError(f"rank {rank} planned {differing} differently from rank 0 (another batch shape, "
                                    "model or library version): give every rank the same model, shapes and versions")
