"""Planned models in distributed training: two processes on the gloo backend (CPU), each with its
own shard of the batch.

- ``DistributedDataParallel`` around a model planned whole (``plan``) or per block
  (``plan_blocks``): the all-reduced gradients of unplanned DDP, bit for bit. The executor hands
  each gradient to its parameter's ``AccumulateGrad`` node as it is produced, so DDP's reducer
  hooks fire and its buckets all-reduce during the planned backward, as in eager.
- FSDP2: a 4-layer Llama planned per layer (``plan_blocks(..., fsdp=True)``), then ``fully_shard``
  on every layer and the model: the loss and the gathered gradients (``full_tensor()``) of
  unplanned FSDP2 bit for bit over two optimizer steps, the same plans on both ranks, and each
  rank's measured peak within 2% of its prediction and below unplanned FSDP2's. The planned
  layers read their parameters when they run, inside FSDP2's hooks (docs/distributed.md).
"""
from __future__ import annotations

import copy
import faulthandler
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
from planner.blocks import planned_block_state

from _llama import causal_lm_loss, tiny_llama, token_batch
from conftest import ResidualNet

WORLD = 2
STEPS = 2
FSDP_BUDGET = "75%"  # of the step with every layer unplanned, per rank
#: measured vs predicted per-rank peak: the code outside the layers runs eagerly, its prediction is
#: its traced graph's (eager autograd frees some temporaries later); measured here: 12 bytes of 11 MB
PEAK_TOLERANCE = 0.02


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, worker, port: int, out_dir: str) -> None:
    """One rank: its process group, ``worker(rank, out_dir)``, and a fault log (``faulthandler``)
    so that a rank killed by a signal leaves its Python stacks for the failure message."""
    fault_log = open(Path(out_dir, f"fault{rank}.log"), "w")
    faulthandler.enable(fault_log, all_threads=True)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        worker(rank, out_dir)
    finally:
        dist.destroy_process_group()


def _spawn(worker, out_dir: Path) -> list[dict]:
    """Run ``worker`` on ``WORLD`` gloo ranks; each writes ``rank{r}.json``, returned in rank order."""
    try:
        mp.spawn(_rank_main, args=(worker, _free_port(), str(out_dir)), nprocs=WORLD, join=True)
    except mp.ProcessExitedException as error:
        logs = "\n".join(f"--- rank {r} ---\n{Path(out_dir, f'fault{r}.log').read_text()}" for r in range(WORLD)
                         if Path(out_dir, f"fault{r}.log").exists())
        raise AssertionError(f"{error}\nfault logs of the ranks:\n{logs}") from error
    return [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(WORLD)]


def _ddp_worker(rank: int, out_dir: str) -> None:
    torch.manual_seed(0)  # the same initial model on every rank
    model = ResidualNet().train()
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


def _local_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """This rank's own first-step gradient, without DDP: a sanity check that the shards differ
    (so all-reduce changed something)."""
    local = copy.deepcopy(model)
    F.cross_entropy(local(x), y).backward()
    return torch.cat([p.grad.flatten() for p in local.parameters()])


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_planned_ddp_gradients_equal_unplanned_ddp(tmp_path: Path) -> None:
    results = _spawn(_ddp_worker, tmp_path)
    for rank, result in enumerate(results):
        assert result["recomputations"] > 0, f"rank {rank}: the plan recomputes nothing"
        assert result["same_grads"] == [True] * STEPS, f"rank {rank}: all-reduced grads differ from DDP's"
        assert result["same_losses"] == [True] * STEPS, f"rank {rank}: losses differ"
        assert result["grads_equal_across_ranks"], f"rank {rank}: ranks disagree after all-reduce"
        assert result["local_grads_differ_from_average"], "the shards are identical: the test checks nothing"


# ---- plan_blocks: FSDP2 and DDP --------------------------------------------------------------------
def _shard(model: nn.Module) -> None:
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)


def _lm_step(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    loss = causal_lm_loss(model(ids), labels)
    loss.backward()
    return loss.detach()


def _fsdp_results(rank: int, ids: torch.Tensor, labels: torch.Tensor) -> dict:
    base = tiny_llama()
    planned, eager = copy.deepcopy(base), copy.deepcopy(base)
    chosen = planner.plan_blocks(planned, FSDP_BUDGET, ids, loss_fn=causal_lm_loss, targets=labels, fsdp=True)
    unsharded_same = bool(torch.equal(_lm_step(planned, ids, labels), _lm_step(eager, ids, labels)))
    for m in (planned, eager):  # a step before sharding: the plans must then find FSDP2's parameters
        m.zero_grad(set_to_none=True)
        _shard(m)
    peaks = {name: planner.measure_step(m, lambda m=m: _lm_step(m, ids, labels), [ids, labels]).peak_bytes
             for name, m in (("planned", planned), ("eager", eager))}
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (planned, eager)]
    same_losses, same_grads = [], []
    for _ in range(STEPS):
        losses = []
        for m, optimizer in zip((planned, eager), optimizers):
            optimizer.zero_grad()
            losses.append(_lm_step(m, ids, labels))
        grads = [[p.grad.full_tensor() for p in m.parameters()] for m in (planned, eager)]
        same_losses.append(bool(torch.equal(*losses)))
        same_grads.append(all(torch.equal(a, b) for a, b in zip(*grads)))
        if len(same_grads) == 1:
            first_step = torch.cat([g.flatten() for g in grads[0]])
        for optimizer in optimizers:
            optimizer.step()
    local = tiny_llama()
    _lm_step(local, ids, labels)
    plans = [planned_block_state(layer).plan for layer in planned.model.layers]
    return {
        "recomputations": chosen.recomputations, "distinct_plans": chosen.distinct_plans,
        "plan_keys": [[p.graph.fingerprint, str(hash(p.schedule.steps))] for p in plans],
        "predicted": chosen.rank_peak_bytes[rank], "store_all": chosen.store_all_peak_bytes,
        "budget": chosen.budget_bytes, "measured": peaks["planned"], "eager_measured": peaks["eager"],
        "same_losses": same_losses, "same_grads": same_grads, "loss": float(losses[0]),
        "unsharded_same": unsharded_same,
        "reduced": not torch.equal(first_step, torch.cat([p.grad.flatten() for p in local.parameters()])),
    }


def _ddp_blocks_results(rank: int) -> dict:
    torch.manual_seed(0)
    model = ResidualNet(deep=True).train()
    torch.manual_seed(100 + rank)
    x, y = torch.randn(256, 16), torch.randint(0, 5, (256,))
    planned_model, eager_model = copy.deepcopy(model), copy.deepcopy(model)
    chosen = planner.plan_blocks(planned_model, "100%", x, loss_fn=F.cross_entropy, targets=y, block_budget="80%")
    for ddp in (nn.parallel.DistributedDataParallel(planned_model), nn.parallel.DistributedDataParallel(eager_model)):
        F.cross_entropy(ddp(x), y).backward()
    same = all(torch.equal(a.grad, b.grad) for a, b in zip(planned_model.parameters(), eager_model.parameters()))
    try:  # each rank another batch size: other graphs, refused on every rank
        planner.plan_blocks(copy.deepcopy(model), "100%", x[: 128 * (rank + 1)], loss_fn=F.cross_entropy,
                            targets=y[: 128 * (rank + 1)], block_budget="80%")
        mismatch = "no error"
    except planner.RankMismatchError as error:
        mismatch = str(error)
    return {"ddp_recomputations": chosen.recomputations, "ddp_same_grads": same, "mismatch": mismatch}


def _blocks_worker(rank: int, out_dir: str) -> None:
    ids, labels = token_batch(100 + rank)  # each rank its own shard of the batch
    result = {**_fsdp_results(rank, ids, labels), **_ddp_blocks_results(rank)}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))


@pytest.fixture(scope="module")
def blocks_results(tmp_path_factory) -> list[dict]:
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("needs torch.distributed with gloo")
    pytest.importorskip("transformers")
    out = tmp_path_factory.mktemp("blocks")
    return _spawn(_blocks_worker, out)


def test_fsdp2_planned_layers_give_unplanned_fsdp2_loss_and_gradients(blocks_results) -> None:
    for rank, result in enumerate(blocks_results):
        assert result["recomputations"] > 0 and result["distinct_plans"] == 1, rank
        assert result["unsharded_same"], f"rank {rank}: the step before sharding differs from eager"
        assert result["same_losses"] == [True] * STEPS, f"rank {rank}: losses differ from FSDP2's"
        assert result["same_grads"] == [True] * STEPS, f"rank {rank}: gathered gradients differ from FSDP2's"
        assert result["loss"] > 3.0  # cross-entropy on random labels over 32 tokens: about log(32)
        assert result["reduced"], "the gathered gradients are this rank's own: nothing was reduced"
    assert blocks_results[0]["plan_keys"] == blocks_results[1]["plan_keys"], "the ranks planned differently"


def test_fsdp2_measured_peak_per_rank_is_predicted_and_below_unplanned(blocks_results) -> None:
    for rank, result in enumerate(blocks_results):
        assert result["predicted"] <= result["budget"]
        assert result["measured"] == pytest.approx(result["predicted"], rel=PEAK_TOLERANCE), rank
        assert result["measured"] < 0.8 * result["eager_measured"], rank


def test_ddp_around_a_model_planned_per_block_equals_unplanned_ddp(blocks_results) -> None:
    for result in blocks_results:
        assert result["ddp_recomputations"] > 0 and result["ddp_same_grads"]


def test_ranks_planning_different_shapes_are_refused_on_every_rank(blocks_results) -> None:
    for result in blocks_results:
        assert "rank 1 planned" in result["mismatch"], result["mismatch"]


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
    ddp = nn.parallel.DistributedDataParallel(ResidualNet().train())
    with pytest.raises(planner.CaptureError, match=r"ddp\.module.*DistributedDataParallel\(plan\.apply"):
        planner.plan(ddp, "60%", x, loss_fn=F.cross_entropy, targets=y)


def test_a_sharded_model_is_refused_naming_plan_blocks(single_process_group) -> None:
    """plan() traces the whole step into one graph, in which FSDP2's module hooks (its all-gathers
    and reduce-scatters) cannot run; plan_blocks plans the unsharded blocks, before fully_shard."""
    from torch.distributed.fsdp import fully_shard

    x, y = _batch()
    model = ResidualNet().train()
    fully_shard(model)
    F.cross_entropy(model(x), y).backward()  # eager FSDP2 itself runs here (CPU, gloo)
    with pytest.raises(planner.CaptureError, match=r"sharded.*plan_blocks\(model, budget, inputs, fsdp=True\)"):
        planner.plan(model, "60%", x, loss_fn=F.cross_entropy, targets=y)
    with pytest.raises(planner.CaptureError, match="already sharded: call plan_blocks.*on the unsharded model"):
        planner.plan_blocks(model, "60%", x, loss_fn=F.cross_entropy, targets=y, fsdp=True)
