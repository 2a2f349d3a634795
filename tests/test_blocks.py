"""``plan_blocks`` on one process: a 4-layer Llama planned layer by layer gives eager PyTorch's loss
and gradients bit for bit, its measured peak is the predicted whole-step peak, and every state a
training loop reaches (copies, inference, another batch, eval mode, unplanning) gives eager's
results or a typed error.

Peaks are compared within 2%: the whole-step prediction is the simulator's, over the graph outside
the blocks with each block sized by its plan; the code outside the blocks runs eagerly, and eager
autograd frees some temporaries later than its traced graph does (here the final RMSNorm's backward,
the step's peak: 126 KiB of 11.2 MiB, 1.1%).
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import planner
from planner import CaptureError, InfeasibleBudgetError, PlanMismatchError
from planner.block_calls import find_blocks
from planner.blocks import CHECKPOINTING

from _llama import LAYERS, causal_lm_loss, tiny_llama, token_batch
from conftest import ResidualNet
from _workloads import one_intra_op_thread  # noqa: F401  (autouse fixture)

pytest.importorskip("transformers")

PEAK_TOLERANCE = 0.02
BUDGET = "75%"  # of the whole step with every layer unplanned: each layer recomputes


@pytest.fixture(scope="module")
def planned():
    """The model planned layer by layer, an unplanned copy, and the batch."""
    model = tiny_llama()
    eager = copy.deepcopy(model)
    ids, labels = token_batch(1)
    chosen = planner.plan_blocks(model, BUDGET, ids, loss_fn=causal_lm_loss, targets=labels)
    return model, eager, chosen, ids, labels


def _step(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    loss = causal_lm_loss(model(ids), labels)
    loss.backward()
    return loss.detach()


def test_identical_layers_share_one_plan_that_recomputes_within_budget(planned) -> None:
    model, _, chosen, _, _ = planned
    assert chosen.blocks == tuple(f"model.layers.{i}" for i in range(LAYERS))
    assert chosen.distinct_plans == 1
    assert chosen.recomputations > 0
    assert chosen.predicted_peak_bytes <= chosen.budget_bytes == int(0.75 * chosen.store_all_peak_bytes)


def test_loss_and_gradients_equal_eager_over_two_steps(planned) -> None:
    model, eager, _, ids, labels = planned
    model, eager = copy.deepcopy(model), copy.deepcopy(eager)  # a planned copy trains its own parameters
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, eager)]
    for _ in range(2):
        losses = []
        for m, optimizer in zip((model, eager), optimizers):
            optimizer.zero_grad()
            losses.append(_step(m, ids, labels))
        assert torch.equal(*losses) and losses[0] > 3.0  # cross-entropy on random labels: about log(32)
        for (name, got), (_, want) in zip(model.named_parameters(), eager.named_parameters(), strict=True):
            assert torch.equal(got.grad, want.grad), name
        for optimizer in optimizers:
            optimizer.step()


def test_measured_peak_is_the_predicted_whole_step_peak(planned) -> None:
    model, eager, chosen, ids, labels = planned
    model, eager = copy.deepcopy(model), copy.deepcopy(eager)
    measured = planner.measure_step(model, lambda: _step(model, ids, labels), [ids, labels])
    unplanned = planner.measure_step(eager, lambda: _step(eager, ids, labels), [ids, labels])
    assert measured.peak_bytes == pytest.approx(chosen.predicted_peak_bytes, rel=PEAK_TOLERANCE)
    assert measured.peak_bytes < 0.8 * unplanned.peak_bytes


def test_inference_runs_the_blocks_own_forward(planned) -> None:
    model, eager, _, ids, _ = planned
    with torch.no_grad():
        assert torch.equal(model(ids).logits, eager(ids).logits)


def test_another_batch_shape_or_eval_mode_is_refused_by_the_block(planned) -> None:
    model, _, _, ids, labels = planned
    model = copy.deepcopy(model)
    with pytest.raises(PlanMismatchError, match="plan_blocks again"):
        model(ids[:2])
    model.eval()
    with pytest.raises(PlanMismatchError, match="train"):
        model(ids)


def test_block_budget_plans_each_block_at_its_own_share_and_remove_unplans(planned) -> None:
    model, eager, _, ids, labels = planned
    model = copy.deepcopy(model)
    chosen = planner.plan_blocks(model, "100%", ids, loss_fn=causal_lm_loss, targets=labels, block_budget="80%")
    for layer_plan in chosen.plans:
        assert layer_plan.budget_bytes == int(0.8 * layer_plan.store_all_peak_bytes)
        assert layer_plan.predicted_peak_bytes <= layer_plan.budget_bytes
    assert chosen.predicted_peak_bytes < chosen.store_all_peak_bytes
    chosen.remove()
    assert all("forward" not in layer.__dict__ for layer in model.model.layers)
    model(ids[:2])  # any shape again
    assert torch.equal(_step(model, ids, labels), _step(copy.deepcopy(eager), ids, labels))


def test_low_budget_checkpoints_every_layer_and_still_equals_eager(planned) -> None:
    """At half the step, what each layer keeps for its backward adds up over the layers: a
    checkpointing baseline that keeps little wins over the fastest plan under a layer's own share."""
    model, eager, _, ids, labels = planned
    model, eager = copy.deepcopy(model), copy.deepcopy(eager)
    chosen = planner.plan_blocks(model, "50%", ids, loss_fn=causal_lm_loss, targets=labels)
    assert {p.algorithm for p in chosen.plans} <= set(CHECKPOINTING)
    measured = planner.measure_step(model, lambda: _step(model, ids, labels), [ids, labels])
    assert measured.peak_bytes == pytest.approx(chosen.predicted_peak_bytes, rel=PEAK_TOLERANCE)
    assert chosen.predicted_peak_bytes <= chosen.budget_bytes
    model.zero_grad(set_to_none=True)
    assert torch.equal(_step(model, ids, labels), _step(eager, ids, labels))
    for (name, got), (_, want) in zip(model.named_parameters(), eager.named_parameters(), strict=True):
        assert torch.equal(got.grad, want.grad), name


def test_budget_below_every_share_names_the_lowest_whole_step_peak(planned) -> None:
    model, _, _, ids, labels = planned
    model = copy.deepcopy(model)
    with pytest.raises(InfeasibleBudgetError) as error:
        planner.plan_blocks(model, "30%", ids, loss_fn=causal_lm_loss, targets=labels)
    lowest = error.value.min_feasible_bytes
    chosen = planner.plan_blocks(model, lowest, ids, loss_fn=causal_lm_loss, targets=labels)
    assert chosen.predicted_peak_bytes <= lowest


# ---- which modules are blocks ------------------------------------------------------------------
def test_repeated_blocks_are_found_by_structure_or_named() -> None:
    model = ResidualNet(d=16, classes=3, blocks=3, deep=True, d_in=8)
    assert [name for name, _ in find_blocks(model)] == ["blocks.0", "blocks.1", "blocks.2"]
    assert [name for name, _ in find_blocks(model, nn.LayerNorm)] == ["blocks.0.0", "blocks.1.0", "blocks.2.0"]
    assert [name for name, _ in find_blocks(model, ["blocks.1", "head"])] == ["blocks.1", "head"]
    with pytest.raises(CaptureError, match="no submodule"):
        find_blocks(model, ["blocks.7"])
    with pytest.raises(CaptureError, match="pass blocks="):
        find_blocks(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))


def test_small_residual_model_planned_per_block_equals_eager() -> None:
    torch.manual_seed(0)
    model = ResidualNet(d=16, classes=3, blocks=3, deep=True, d_in=8)
    eager = copy.deepcopy(model)
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    chosen = planner.plan_blocks(model, "100%", x, loss_fn=F.cross_entropy, targets=y, block_budget="80%")
    assert chosen.recomputations > 0
    for m in (model, eager):
        F.cross_entropy(m(x), y).backward()
    for (name, got), (_, want) in zip(model.named_parameters(), eager.named_parameters(), strict=True):
        assert torch.equal(got.grad, want.grad), name


def test_a_block_called_with_state_is_refused() -> None:
    class Stateful(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(Takes() for _ in range(2))

        def forward(self, x):
            cache = object()
            for layer in self.layers:
                x = layer(x, cache)
            return x

    class Takes(nn.Linear):
        def __init__(self):
            super().__init__(4, 4)

        def forward(self, x, cache):
            return super().forward(x)

    with pytest.raises(CaptureError, match="use_cache=False"):
        planner.plan_blocks(Stateful(), "100%", torch.randn(2, 4))


def test_inputs_or_parameters_other_than_planned_are_refused_when_the_block_runs() -> None:
    torch.manual_seed(0)
    model = ResidualNet(d=16, classes=3, blocks=3, deep=True, d_in=8)
    x = torch.randn(16, 8)
    model.inp.requires_grad_(False)  # the first block's input needs no gradient when planned
    eager = copy.deepcopy(model)
    planner.plan_blocks(model, "100%", x, block_budget="100%")
    for m in (model, eager):
        m(x).sum().backward()
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(model.blocks.parameters(), eager.blocks.parameters()))
    model.inp.requires_grad_(True)
    with pytest.raises(PlanMismatchError, match="requires grad but was planned without"):
        model(x)
    model.inp.requires_grad_(False)
    model.blocks[1][1].weight = nn.Parameter(model.blocks[1][1].weight.detach().double())
    with pytest.raises(PlanMismatchError, match="parameter 1.weight is a Parameter of shape .*float64"):
        model(x)
