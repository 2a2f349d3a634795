"""A planned model inside ``DistributedDataParallel``: two processes on the gloo backend (CPU), each
with its own shard of the batch, give the all-reduced gradients of unplanned DDP, bit for bit.

The executor hands each gradient to its parameter's ``AccumulateGrad`` node as it is produced, so
DDP's reducer hooks fire and its buckets all-reduce during the planned backward, as in eager.
FSDP2 (``fully_shard``) is not supported: docs/reliability.md says why.
"""
from __future__ import annotations

import copy
import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import planner

WORLD = 2
STEPS = 2


class Net(nn.Module):
    """Residual MLP blocks with LayerNorm: enough activations to recompute."""

    def __init__(self, d: int = 32, classes: int = 5, blocks: int = 4):
        super().__init__()
        self.inp = nn.Linear(16, d)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d)) for _ in range(blocks))
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h)
        return self.head(h)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)  # the same initial model on every rank
        model = Net().train()
        torch.manual_seed(100 + rank)  # each rank its own shard
        x, y = torch.randn(256, 16), torch.randint(0, 5, (256,))
        chosen = planner.plan(model, "60%", x, loss_fn=F.cross_entropy, targets=y)
        planned_model, eager_model = copy.deepcopy(model), copy.deepcopy(model)
        planned = nn.parallel.DistributedDataParallel(chosen.apply(planned_model, F.cross_entropy))
        eager = nn.parallel.DistributedDataParallel(eager_model)
        optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (planned_model, eager_model)]
        same_grads, same_losses = [], []
        for _ in range(STEPS):  # a second step checks that DDP's reducer is reset properly
            losses = []
            for ddp, optimizer in zip((planned, eager), optimizers):
                optimizer.zero_grad()
                loss = F.cross_entropy(ddp(x), y)
                loss.backward()
                losses.append(loss.detach())
            grads = [[p.grad.clone() for p in m.parameters()] for m in (planned_model, eager_model)]
            same_grads.append(all(torch.equal(a, b) for a, b in zip(*grads)))
            if not same_losses:
                first_step = torch.cat([g.flatten() for g in grads[0]])
            same_losses.append(bool(torch.equal(*losses)))
            for optimizer in optimizers:
                optimizer.step()
        # the gradients are all-reduced: equal on every rank
        flat = torch.cat([p.grad.flatten() for p in planned_model.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(WORLD)]
        dist.all_gather(gathered, flat)
        result = {
            "recomputations": chosen.recomputations,
            "same_grads": same_grads, "same_losses": same_losses,
            "grads_equal_across_ranks": all(torch.equal(g, gathered[0]) for g in gathered),
            "local_grads_differ_from_average": not torch.equal(first_step, _local_grads(model, x, y)),
        }
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def _local_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """This rank's own first-step gradient, without DDP: a sanity check that the shards differ
    (so all-reduce changed something)."""
    local = copy.deepcopy(model)
    F.cross_entropy(local(x), y).backward()
    return torch.cat([p.grad.flatten() for p in local.parameters()])


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_planned_ddp_gradients_equal_unplanned_ddp(tmp_path: Path) -> None:
    mp.spawn(_ddp_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    for rank, result in enumerate(results):
        assert result["recomputations"] > 0, f"rank {rank}: the plan recomputes nothing"
        assert result["same_grads"] == [True] * STEPS, f"rank {rank}: all-reduced grads differ from DDP's"
        assert result["same_losses"] == [True] * STEPS, f"rank {rank}: losses differ"
        assert result["grads_equal_across_ranks"], f"rank {rank}: ranks disagree after all-reduce"
        assert result["local_grads_differ_from_average"], "the shards are identical: the test checks nothing"


# ---- what is refused, with the way out -------------------------------------------------------------
@pytest.fixture
def single_process_group():
    """A one-process gloo group in this process (FSDP2 needs one), destroyed afterwards."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("needs torch.distributed with gloo")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    return torch.randn(256, 16), torch.randint(0, 5, (256,))


def test_planning_a_ddp_wrapped_model_says_to_plan_the_inner_module(single_process_group) -> None:
    x, y = _batch()
    ddp = nn.parallel.DistributedDataParallel(Net().train())
    with pytest.raises(planner.CaptureError, match=r"ddp\.module.*DistributedDataParallel\(plan\.apply"):
        planner.plan(ddp, "60%", x, loss_fn=F.cross_entropy, targets=y)


def test_fsdp2_sharded_model_is_refused(single_process_group) -> None:
    """fully_shard replaces parameters by sharded DTensors and gathers them in module hooks, which
    the executor (running ATen ops on the parameters it captured) never calls."""
    from torch.distributed.fsdp import fully_shard

    x, y = _batch()
    model = Net().train()
    fully_shard(model)
    F.cross_entropy(model(x), y).backward()  # eager FSDP2 itself runs here (CPU, gloo)
    with pytest.raises(planner.CaptureError, match="sharded.*DistributedDataParallel"):
        planner.plan(model, "60%", x, loss_fn=F.cross_entropy, targets=y)
