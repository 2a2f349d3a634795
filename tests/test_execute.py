"""The executor (``PlannedModule``): eager PyTorch's semantics under recomputation.

Dropout recomputed with the same masks, BatchNorm statistics updated exactly once, gradients
accumulated across steps and optimizers, the fused ``training_step``, parameter hooks, and the
errors for a schedule, model or input that does not belong to the plan.
"""
from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import planner
from planner import Compute, InvalidScheduleError, Phase, PlanMismatchError, Schedule
from planner.algorithms import ALGORITHMS

from _workloads import (
    Workload, assert_same_parameters, assert_same_step, build_workload, eager_step, planned_step,
    snapshot,
)
from _workloads import one_intra_op_thread  # noqa: F401  (autouse fixture)

RECOMPUTING = ("checkpoint_all", "chen_sqrt", "chen_sqrt_linear", "chen_greedy", "chen_greedy_linear")


@pytest.fixture(scope="module")
def resnet() -> Workload:
    """torchvision resnet18, batch 2 at 64x64, cross-entropy on random labels."""
    return build_workload("resnet18")


@pytest.fixture(scope="module")
def transformer() -> Workload:
    """2-layer TransformerEncoder with dropout 0.1, input 2x16x32, a fixed random projection as loss."""
    return build_workload("transformer")


@pytest.fixture(params=["resnet18", "transformer"])
def workload(request: pytest.FixtureRequest) -> Workload:
    return request.getfixturevalue({"resnet18": "resnet", "transformer": "transformer"}[request.param])


def _random_recomputed(workload: Workload, schedule: Schedule) -> list[int]:
    return [op for op in schedule.recomputed_ops() if workload.graph.ops[op].is_random]


def _batchnorm_recomputed(workload: Workload, schedule: Schedule) -> list[int]:
    return [op for op in schedule.recomputed_ops() if "batch_norm" in workload.graph.ops[op].target]


# ---- dropout ---------------------------------------------------------------------------------------
def test_dropout_makes_the_step_depend_on_the_seed(transformer: Workload) -> None:
    """So that equality with eager under the same seed below is not vacuous: other masks change the
    loss by far more than float rounding (with the sum of the post-norm output as the loss, the loss
    was ~7.6e-06 whatever the masks, and this failed on a clean machine)."""
    assert any(op.is_random for op in transformer.graph.ops)
    first, second = transformer.reference(seed=1).loss, transformer.reference(seed=2).loss
    assert abs(first - second) > 0.1, (first.item(), second.item())


def test_transformer_gradients_carry_signal(transformer: Workload) -> None:
    """Every gradient compared in this suite is far above float noise: the encoder's first weight
    gets gradients of order 1 (with the sum of the post-norm output as the loss it was 5.5e-08,
    float noise, and every "gradients equal" check compared noise)."""
    reference = transformer.reference(seed=1)
    first = reference.grads["layers.0.self_attn.in_proj_weight"]
    assert first.abs().max() > 1e-4, first.abs().max().item()


@pytest.mark.parametrize("algorithm", RECOMPUTING)
def test_recomputed_dropout_replays_its_masks(transformer: Workload, algorithm: str) -> None:
    schedule = transformer.schedule(algorithm)
    assert _random_recomputed(transformer, schedule), f"{algorithm} recomputes no random op"
    model, pm = transformer.planned(algorithm)
    got = planned_step(model, pm, transformer.x, transformer.loss, seed=1)
    # loss, every .grad, and the RNG state the next step starts from
    assert_same_step(got, transformer.reference(seed=1))


def test_dropout_recomputed_twice_replays_the_same_mask_each_time(transformer: Workload) -> None:
    """Exact mode's plans can recompute a dropout before two stages; each replay draws the mask
    the forward drew (the saved RNG state is kept for every replay, not used up by the first)."""
    graph = transformer.graph
    dropout = next(op.id for op in graph.ops if op.is_random)
    outputs = set(graph.ops[dropout].outputs)
    reader = next(c for t in outputs for c in graph.tensors[t].consumers if graph.ops[c].phase is Phase.BACKWARD)
    order = []
    for op in (c.op for c in Schedule.store_all(graph).computes):
        order += [dropout, dropout, op] if op == reader else [op]  # the first recomputation is dropped unused
    schedule = Schedule.from_order(graph, order)
    assert Counter(c.op for c in schedule.computes)[dropout] == 3
    model = transformer.fresh_copy()
    planned = planner.PlannedModule(model, graph, schedule)
    assert_same_step(planned_step(model, planned, transformer.x, transformer.loss, seed=4), transformer.reference(seed=4))


@pytest.mark.parametrize("seed", [2, 3])
def test_recomputed_dropout_matches_eager_under_other_seeds(transformer: Workload, seed: int) -> None:
    model, pm = transformer.planned("checkpoint_all")
    assert_same_step(planned_step(model, pm, transformer.x, transformer.loss, seed=seed),
                     transformer.reference(seed=seed))


# ---- BatchNorm -------------------------------------------------------------------------------------
@pytest.mark.parametrize("algorithm", ["checkpoint_all", "chen_sqrt", "chen_greedy"])
def test_recomputed_batchnorm_updates_statistics_once(resnet: Workload, algorithm: str) -> None:
    schedule = resnet.schedule(algorithm)
    assert _batchnorm_recomputed(resnet, schedule), f"{algorithm} recomputes no batch norm"
    model, pm = resnet.planned(algorithm)
    before = {n: b.clone() for n, b in model.named_buffers()}
    got = planned_step(model, pm, resnet.x, resnet.loss, seed=1)
    counters = [n for n in before if n.endswith("num_batches_tracked")]
    assert counters
    for name in counters:
        assert got.buffers[name].item() == before[name].item() + 1, f"{name} not increased by exactly 1"
    for name in before:
        if name.endswith(("running_mean", "running_var")):
            assert not torch.equal(got.buffers[name], before[name]), f"{name} was not updated"
    assert_same_step(got, resnet.reference(seed=1))


def test_batchnorm_statistics_after_three_recomputing_steps(resnet: Workload) -> None:
    model, pm = resnet.planned("checkpoint_all")
    reference = resnet.fresh_copy()
    for step in range(3):
        planned_step(model, pm, resnet.x, resnet.loss, seed=step)
        eager_step(reference, resnet.x, resnet.loss, seed=step)
    tracked = dict(model.named_buffers())
    assert all(tracked[n].item() == 3 for n in tracked if n.endswith("num_batches_tracked"))
    assert_same_parameters(model, reference)


# ---- gradient accumulation and optimizers ----------------------------------------------------------
def test_two_steps_accumulate_twice_the_gradient(resnet: Workload) -> None:
    """resnet18 in train mode is deterministic (BatchNorm normalizes with batch statistics), so
    the second step adds exactly the first step's gradient: g + g == 2 * g bitwise."""
    model, pm = resnet.planned("chen_sqrt")
    first = planned_step(model, pm, resnet.x, resnet.loss, seed=1)
    second = planned_step(model, pm, resnet.x, resnet.loss, seed=1)
    for name, grad in first.grads.items():
        assert torch.equal(second.grads[name], 2 * grad), f"{name}.grad is not twice one step's"

    reference = resnet.fresh_copy()
    eager_step(reference, resnet.x, resnet.loss, seed=1)
    assert_same_step(second, eager_step(reference, resnet.x, resnet.loss, seed=1))


@pytest.mark.parametrize("algorithm", ["checkpoint_all", "chen_greedy_linear"])
def test_two_steps_without_zeroing_match_eager_with_dropout(transformer: Workload, algorithm: str) -> None:
    model, pm = transformer.planned(algorithm)
    reference = transformer.fresh_copy()
    for seed in (1, 2):  # different dropout masks in each step
        got = planned_step(model, pm, transformer.x, transformer.loss, seed=seed)
        want = eager_step(reference, transformer.x, transformer.loss, seed=seed)
    assert_same_step(got, want)


class _TiedEmbedding(nn.Module):
    def __init__(self, vocab: int = 64, width: int = 16):
        super().__init__()
        self.embed, self.mix, self.head = nn.Embedding(vocab, width), nn.Linear(width, width), nn.Linear(width, vocab)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.mix(self.embed(ids))))


@pytest.mark.parametrize("algorithm", ["store_all", "checkpoint_all"])
def test_tied_weights_accumulate_as_eager(algorithm: str) -> None:
    """A parameter used under two names gets one gradient, summed before it reaches ``.grad`` as
    eager's autograd sums it: added one by one, ``(g + a) + b`` differed from eager's ``g + (a + b)``
    from the second accumulated step on."""
    torch.manual_seed(0)
    model, ids, labels = _TiedEmbedding().train(), torch.randint(0, 64, (4, 12)), torch.randint(0, 64, (4, 12))
    loss = lambda out: F.cross_entropy(out.flatten(0, 1), labels.flatten())  # noqa: E731
    graph = planner.capture(model, ids, lambda out, y: F.cross_entropy(out.flatten(0, 1), y.flatten()), targets=labels)
    assert len(graph.gradients) == len(list(model.parameters())) == 4  # one gradient for the tied weight
    schedule = ALGORITHMS[algorithm](graph, planner.RooflineCostModel("cpu"), 10**9)
    planned_model, reference = copy.deepcopy(model), copy.deepcopy(model)
    pm = planner.PlannedModule(planned_model, graph, schedule)
    for seed in (1, 2, 3):  # accumulate without zeroing, as gradient accumulation does
        got = planned_step(planned_model, pm, ids, loss, seed)
        want = eager_step(reference, ids, loss, seed)
    assert_same_step(got, want)


def test_steady_state_step_accumulates_into_existing_grad(resnet: Workload) -> None:
    """With .grad already allocated (steady state) the gradient is added in place, as eager does."""
    model, pm = resnet.planned("checkpoint_all")
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    storages = [p.grad.data_ptr() for p in model.parameters()]
    reference = resnet.fresh_copy()
    for p in reference.parameters():
        p.grad = torch.full_like(p, 0.5)
    got = planned_step(model, pm, resnet.x, resnet.loss, seed=1)
    assert [p.grad.data_ptr() for p in model.parameters()] == storages
    assert_same_step(got, eager_step(reference, resnet.x, resnet.loss, seed=1))


@pytest.mark.parametrize("workload_name, algorithm", [("resnet18", "chen_greedy"), ("transformer", "chen_sqrt")])
def test_sgd_momentum_training_loop_matches_eager(request: pytest.FixtureRequest, workload_name: str,
                                                  algorithm: str) -> None:
    workload = request.getfixturevalue({"resnet18": "resnet", "transformer": "transformer"}[workload_name])
    model, pm = workload.planned(algorithm)
    reference = workload.fresh_copy()
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for m in (model, reference)]
    for step in range(3):
        losses = []
        for module, runner, optimizer in zip((model, reference), (pm, reference), optimizers):
            optimizer.zero_grad()
            torch.manual_seed(100 + step)
            loss = workload.loss(runner(workload.x))
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
        assert torch.equal(losses[0], losses[1]), f"step {step}: loss differs from eager"
    assert_same_parameters(model, reference)
    for a, b in zip(optimizers[0].state.values(), optimizers[1].state.values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])


# ---- training_step ---------------------------------------------------------------------------------
@pytest.mark.parametrize("algorithm", ["store_all", "checkpoint_all", "chen_greedy"])
def test_training_step_matches_eager(workload: Workload, algorithm: str) -> None:
    model, pm = workload.planned(algorithm)
    torch.manual_seed(1)
    loss = pm.training_step(workload.x, workload.y)
    assert loss.dim() == 0 and not loss.requires_grad
    assert_same_step(snapshot(model, loss), workload.reference(seed=1))


def test_training_step_accepts_tuples(resnet: Workload) -> None:
    model, pm = resnet.planned("chen_sqrt")
    torch.manual_seed(1)
    loss = pm.training_step((resnet.x,), (resnet.y,))
    assert_same_step(snapshot(model, loss), resnet.reference(seed=1))


def test_training_step_then_autograd_step_accumulate(transformer: Workload) -> None:
    model, pm = transformer.planned("chen_sqrt")
    reference = transformer.fresh_copy()
    torch.manual_seed(1)
    pm.training_step(transformer.x, transformer.y)
    got = planned_step(model, pm, transformer.x, transformer.loss, seed=2)
    eager_step(reference, transformer.x, transformer.loss, seed=1)
    assert_same_step(got, eager_step(reference, transformer.x, transformer.loss, seed=2))


# ---- using the planned module like the model -------------------------------------------------------
def test_planned_module_forward_output_matches_eager(resnet: Workload) -> None:
    model, pm = resnet.planned("chen_sqrt")
    reference = resnet.fresh_copy()
    torch.manual_seed(0)
    out = pm(resnet.x)
    torch.manual_seed(0)
    want = reference(resnet.x)
    assert out.shape == want.shape and out.requires_grad
    assert torch.equal(out, want)


def _two_forwards_then_one_backward(workload: Workload) -> None:
    model, pm = workload.planned("checkpoint_all")
    reference = workload.fresh_copy()
    x2 = torch.flip(workload.x, dims=[0])
    results = []
    for module, runner in ((model, pm), (reference, reference)):
        torch.manual_seed(1)
        loss = workload.loss(runner(workload.x)) + workload.loss(runner(x2))
        loss.backward()
        results.append(snapshot(module, loss))
    assert_same_step(*results)


def test_two_forwards_then_one_backward_match_eager_resnet(resnet: Workload) -> None:
    """Two planned forwards feeding one loss: BatchNorm statistics update twice, gradients add up."""
    _two_forwards_then_one_backward(resnet)


def test_two_forwards_then_one_backward_match_eager_dropout(transformer: Workload) -> None:
    """Each forward draws its own dropout masks; each backward must replay its own forward's."""
    assert _random_recomputed(transformer, transformer.schedule("checkpoint_all"))
    _two_forwards_then_one_backward(transformer)


@pytest.mark.parametrize("activation, algorithm", [
    (nn.ReLU, "store_all"), (nn.Sigmoid, "store_all"), (lambda: nn.Softmax(dim=-1), "checkpoint_all"),
], ids=["relu-store_all", "sigmoid-store_all", "softmax-checkpoint_all"])
def test_model_whose_output_is_saved_for_backward(activation, algorithm: str) -> None:
    """The last op's backward reads the op's own output (relu, sigmoid, softmax): autograd saves
    it through a detach that capture places after the model-output marker."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8), activation()).train()
    x, y = torch.randn(4, 8), torch.randint(0, 8, (4,))
    graph = planner.capture(model, x, F.cross_entropy, targets=y)
    schedule = ALGORITHMS[algorithm](graph, planner.RooflineCostModel("cpu"), 10**9)
    planned_model, reference = copy.deepcopy(model), copy.deepcopy(model)
    pm = planner.PlannedModule(planned_model, graph, schedule)
    loss = lambda out: F.cross_entropy(out, y)  # noqa: E731
    assert_same_step(planned_step(planned_model, pm, x, loss, seed=1), eager_step(reference, x, loss, seed=1))


class _LastStep(nn.Module):
    """A 2-layer LSTM classifying a sequence from its last step."""

    def __init__(self):
        super().__init__()
        self.lstm, self.head = nn.LSTM(8, 16, num_layers=2, batch_first=True), nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.lstm(x)[0][:, -1])


@pytest.mark.parametrize("algorithm", ["store_all", "checkpoint_all"])
def test_cpu_lstm_runs_with_its_training_workspace(algorithm: str) -> None:
    """oneDNN's LSTM layer computes the workspace its backward reads only under grad mode, which
    the plan's forward (an autograd.Function) turns off: the backward failed on a missing tensor."""
    if not torch.backends.mkldnn.is_available():
        pytest.skip("this PyTorch build has no oneDNN: its CPU LSTM is not mkldnn_rnn_layer")
    torch.manual_seed(0)
    model, x, y = _LastStep().train(), torch.randn(2, 5, 8), torch.randint(0, 4, (2,))
    graph = planner.capture(model, x, F.cross_entropy, targets=y)
    assert any(op.target == "aten.mkldnn_rnn_layer.default" for op in graph.ops)
    schedule = ALGORITHMS[algorithm](graph, planner.RooflineCostModel("cpu"), 10**9)
    planned_model, reference = copy.deepcopy(model), copy.deepcopy(model)
    pm = planner.PlannedModule(planned_model, graph, schedule)
    loss = lambda out: F.cross_entropy(out, y)  # noqa: E731
    assert_same_step(planned_step(planned_model, pm, x, loss, seed=1), eager_step(reference, x, loss, seed=1))


def test_dict_output_and_frozen_parameter() -> None:
    class Heads(nn.Module):
        def __init__(self):
            super().__init__()
            self.trunk = nn.Linear(8, 8)
            self.p = nn.Linear(8, 4)
            self.q = nn.Linear(8, 4)
            self.trunk.bias.requires_grad_(False)

        def forward(self, x):
            h = F.gelu(self.trunk(x))
            return {"p": self.p(h), "q": self.q(h)}

    torch.manual_seed(0)
    model, x = Heads().train(), torch.randn(4, 8)
    graph = planner.capture(model, x)
    loss = lambda out: out["p"].sum() + out["q"].sum()  # noqa: E731
    for algorithm in ("store_all", "checkpoint_all"):
        planned_model, reference = copy.deepcopy(model), copy.deepcopy(model)
        schedule = ALGORITHMS[algorithm](graph, planner.RooflineCostModel("cpu"), 10**9)
        pm = planner.PlannedModule(planned_model, graph, schedule)
        got = planned_step(planned_model, pm, x, loss, seed=1)
        assert got.grads["trunk.bias"] is None
        assert_same_step(got, eager_step(reference, x, loss, seed=1))


# ---- parameter hooks -------------------------------------------------------------------------------
def _hooked_step(model: nn.Module, runner, workload: Workload, register) -> list:
    calls: list = []
    register(model, calls)
    torch.manual_seed(1)
    workload.loss(runner(workload.x)).backward()
    return calls


def test_post_accumulate_grad_hook_runs_once_per_step(transformer: Workload) -> None:
    """Gradients go through each parameter's own AccumulateGrad node: its hooks run as in eager."""
    def register(model, calls):
        for name, p in model.named_parameters():
            p.register_post_accumulate_grad_hook(lambda t, name=name: calls.append(name))

    model, pm = transformer.planned("checkpoint_all")
    planned_calls = _hooked_step(model, pm, transformer, register)
    reference = transformer.fresh_copy()
    eager_calls = _hooked_step(reference, reference, transformer, register)
    eager_counts, planned_counts = Counter(eager_calls), Counter(planned_calls)
    assert set(eager_counts.values()) == {1}
    assert planned_counts == eager_counts, f"hook calls per parameter: {dict(planned_counts)}"


def test_parameter_tensor_hook_sees_and_rewrites_the_gradient(transformer: Workload) -> None:
    """``p.register_hook`` (e.g. per-parameter clipping or scaling) gets the real gradient and its
    return value is what lands in ``.grad``, as in eager."""
    def register(model, calls):
        p = model.layers[0].linear1.weight
        p.register_hook(lambda g: (calls.append(None if g is None else g.clone()), None if g is None else 2 * g)[1])

    model, pm = transformer.planned("checkpoint_all")
    planned_calls = _hooked_step(model, pm, transformer, register)
    reference = transformer.fresh_copy()
    eager_calls = _hooked_step(reference, reference, transformer, register)
    assert len(planned_calls) == len(eager_calls) == 1
    assert planned_calls[0] is not None and torch.equal(planned_calls[0], eager_calls[0])
    assert torch.equal(model.layers[0].linear1.weight.grad, reference.layers[0].linear1.weight.grad)


# ---- what does not belong to the plan --------------------------------------------------------------
def test_schedule_of_another_model_is_refused(resnet: Workload, transformer: Workload) -> None:
    with pytest.raises(PlanMismatchError):
        planner.PlannedModule(resnet.fresh_copy(), resnet.graph, transformer.schedule("store_all"))
    with pytest.raises(PlanMismatchError):
        planner.PlannedModule(transformer.fresh_copy(), transformer.graph, resnet.schedule("chen_sqrt"))


def test_schedule_of_another_batch_size_is_refused(resnet: Workload) -> None:
    graph_batch1 = planner.capture(resnet.model, resnet.x[:1], F.cross_entropy, targets=resnet.y[:1])
    assert graph_batch1.fingerprint != resnet.graph.fingerprint
    with pytest.raises(PlanMismatchError):
        planner.PlannedModule(resnet.fresh_copy(), resnet.graph, Schedule.store_all(graph_batch1))
    with pytest.raises(PlanMismatchError):
        planner.PlannedModule(resnet.fresh_copy(), graph_batch1, resnet.schedule("checkpoint_all"))


def test_model_without_the_graphs_parameters_is_refused(resnet: Workload, transformer: Workload) -> None:
    with pytest.raises(PlanMismatchError):
        planner.PlannedModule(transformer.fresh_copy(), resnet.graph, resnet.schedule("store_all"))


@pytest.mark.parametrize("make_input", [
    lambda x: x[:1],  # another batch size
    lambda x: torch.randn(2, 3, 32, 32),  # another image size
    lambda x: x.double(),  # another dtype
], ids=["batch", "shape", "dtype"])
def test_input_of_another_shape_is_refused(resnet: Workload, make_input) -> None:
    model, pm = resnet.planned("chen_sqrt")
    with pytest.raises(PlanMismatchError):
        pm(make_input(resnet.x))
    with pytest.raises(PlanMismatchError):
        pm.training_step(make_input(resnet.x), resnet.y)
    assert all(p.grad is None for p in model.parameters())


def test_wrong_number_of_inputs_or_targets_is_refused(resnet: Workload) -> None:
    _, pm = resnet.planned("chen_sqrt")
    with pytest.raises(PlanMismatchError):
        pm(resnet.x, resnet.x)
    with pytest.raises(PlanMismatchError):
        pm.training_step(resnet.x)  # the plan's loss takes labels
    with pytest.raises(PlanMismatchError):
        pm.training_step(resnet.x, resnet.y[:1])


def test_schedule_of_other_implementations_is_refused(resnet: Workload) -> None:
    """Implementations live in the graph: a schedule of the graph with low-memory variants is
    refused on the stock graph, and the other way round."""
    from planner.variants import apply_variants, variant_sites

    variant = apply_variants(resnet.graph, variant_sites(resnet.graph))
    with pytest.raises(PlanMismatchError):
        planner.PlannedModule(resnet.fresh_copy(), resnet.graph, Schedule.store_all(variant))
    with pytest.raises(PlanMismatchError):
        planner.PlannedModule(resnet.fresh_copy(), variant, Schedule.store_all(resnet.graph))


def test_model_op_inside_the_loss_is_refused(resnet: Workload) -> None:
    """A schedule that recomputes a model op between two loss ops cannot leave the loss to user code."""
    graph = resnet.graph
    order = list(range(len(graph.ops)))
    loss_forward = [op for op in graph.forward_ops if graph.ops[op].in_loss]
    assert len(loss_forward) >= 2
    first_model_op = next(op for op in graph.forward_ops if not graph.ops[op].in_loss
                          and not graph.ops[op].is_view)
    order.insert(order.index(loss_forward[1]), first_model_op)
    schedule = Schedule.from_order(graph, order)
    with pytest.raises(InvalidScheduleError):
        planner.PlannedModule(resnet.fresh_copy(), graph, schedule)


@pytest.mark.parametrize("damage", ["skip-a-gradient", "free-too-early"])
def test_invalid_schedule_is_refused_before_it_runs(resnet: Workload, damage: str) -> None:
    """A schedule with the right fingerprint that is not a valid step (as ``simulate`` judges it)
    must not run: skipping a backward op would silently leave a parameter without its gradient."""
    graph, steps = resnet.graph, list(resnet.schedule("checkpoint_all").steps)
    if damage == "skip-a-gradient":
        index = next(i for i, s in enumerate(steps)
                     if isinstance(s, Compute) and set(graph.ops[s.op].outputs) & set(graph.gradients))
        del steps[index]
    else:  # free a kept activation just before the backward op that reads it
        recomputed = resnet.schedule("checkpoint_all").recomputed_ops()
        loss_end = max(i for i, s in enumerate(steps) if isinstance(s, Compute) and graph.ops[s.op].in_loss)
        for position in range(loss_end + 1, len(steps)):
            step = steps[position]
            producer = None if isinstance(step, Compute) else graph.tensors[step.tensor].producer
            if producer in graph.forward_ops and producer not in recomputed and not graph.ops[producer].in_loss:
                break
        else:
            raise AssertionError("checkpoint_all keeps no activation for the backward")
        tensor = steps[position].tensor
        reader = next(i for i in range(loss_end + 1, position)
                      if isinstance(steps[i], Compute) and tensor in graph.ops[steps[i].op].inputs)
        steps.insert(reader, steps.pop(position))
    schedule = Schedule(tuple(steps), graph.fingerprint)
    with pytest.raises(InvalidScheduleError):
        planner.simulate(graph, schedule)  # the judge refuses it ...
    model = resnet.fresh_copy()
    with pytest.raises(InvalidScheduleError):  # ... and so must the executor, at construction or call
        pm = planner.PlannedModule(model, graph, schedule)
        resnet.loss(pm(resnet.x)).backward()
