"""A planned model is a drop-in (issue 13): every state a training loop puts it in gives eager
PyTorch's results, re-plans, or raises a typed error naming the fix.

Each section reproduces one numbered finding of the issue (its tests failed on the code before the
fix; ``test_no_grad_in_train_mode_runs_eagerly`` passed there and guards that behaviour) and
compares with eager PyTorch bit for bit: loss, every ``.grad``, every buffer. Findings 10 and 11
are checked in test_execute, test_dp and test_milp.
"""
from __future__ import annotations

import copy
import logging
import os

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import planner
from planner import InfeasibleBudgetError, PlanMismatchError, PlannerError

from _workloads import one_intra_op_thread  # noqa: F401  (autouse fixture)

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def mlp(classes: int = 5) -> nn.Sequential:
    """Four linear layers with GELUs; at batch 256, 70% of its store-all peak needs recomputation."""
    return nn.Sequential(nn.Linear(16, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 128),
                         nn.GELU(), nn.Linear(128, classes)).train()


def cnn() -> nn.Sequential:
    """Convolutions with BatchNorm and dropout; at batch 16, 16x16, 60% needs recomputation."""
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Dropout(0.2),
                         nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).train()


@pytest.fixture
def mlp_case():
    torch.manual_seed(0)
    model = mlp()
    x, y = torch.randn(256, 16), torch.randint(0, 5, (256,))
    return model, x, y


@pytest.fixture
def cnn_case():
    torch.manual_seed(0)
    model = cnn()
    x, y = torch.randn(16, 3, 16, 16), torch.randint(0, 10, (16,))
    return model, x, y


def step(module, x, y, seed: int = 1, loss_fn=F.cross_entropy) -> torch.Tensor:
    torch.manual_seed(seed)
    loss = loss_fn(module(x), y)
    loss.backward()
    return loss.detach()


def assert_same_state(got: nn.Module, want: nn.Module) -> None:
    """Every parameter, ``.grad`` and buffer bitwise equal (names too)."""
    got_params, want_params = dict(got.named_parameters()), dict(want.named_parameters())
    assert got_params.keys() == want_params.keys()
    for name, p in want_params.items():
        q = got_params[name]
        assert torch.equal(q, p), f"parameter {name} differs"
        assert (q.grad is None) == (p.grad is None), f"{name}: .grad presence differs from eager"
        if p.grad is not None:
            assert torch.equal(q.grad, p.grad), f"{name}.grad differs (max {(q.grad - p.grad).abs().max():.3e})"
    got_buffers, want_buffers = dict(got.named_buffers()), dict(want.named_buffers())
    assert got_buffers.keys() == want_buffers.keys()
    for name, b in want_buffers.items():
        assert torch.equal(got_buffers[name], b), f"buffer {name} differs"


def train_both(model, reference, pm, x, y, seed: int = 1, loss_fn=F.cross_entropy) -> None:
    assert torch.equal(step(pm, x, y, seed, loss_fn), step(reference, x, y, seed, loss_fn))
    assert_same_state(model, reference)


# ---- 1. train/eval switching -----------------------------------------------------------------------
def test_eval_mode_runs_the_model_eagerly_and_train_mode_the_plan_again() -> None:
    """resnet18 planned in train mode, then validated: eager eval outputs and BatchNorm statistics
    (before the fix: outputs off by up to 1.24 and num_batches_tracked moved in eval)."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).train()
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    reference = copy.deepcopy(model)
    pm = planner.plan(model, "100%", x, loss_fn=F.cross_entropy, targets=y).apply(model, F.cross_entropy)
    train_both(model, reference, pm, x, y)
    model.eval(), reference.eval()
    with torch.no_grad():
        assert torch.equal(pm(x), reference(x))
    with torch.inference_mode():
        assert torch.equal(pm(x), reference(x))
    out, want = pm(x), reference(x)  # eval with grad enabled (a validation pass without no_grad)
    assert torch.equal(out, want) and out.requires_grad
    assert_same_state(model, reference)  # running statistics untouched, as in eager eval
    model.train(), reference.train()
    train_both(model, reference, pm, x, y, seed=2)
    assert len(pm.plans) == 1, "train mode again is the state planned for: no re-plan"


def test_no_grad_in_train_mode_runs_eagerly(cnn_case) -> None:
    """A forward under no_grad in train mode (e.g. computing targets) updates BatchNorm statistics
    and draws dropout masks exactly as eager does."""
    model, x, y = cnn_case
    reference = copy.deepcopy(model)
    pm = planner.plan(model, "60%", x, loss_fn=F.cross_entropy, targets=y).apply(model, F.cross_entropy)
    torch.manual_seed(3)
    with torch.no_grad():
        got = pm(x)
    torch.manual_seed(3)
    with torch.no_grad():
        want = reference(x)
    assert torch.equal(got, want)
    assert_same_state(model, reference)
    train_both(model, reference, pm, x, y)


def _freeze_a_batchnorm(model: nn.Module) -> None:
    model[1].eval()


def _raise_dropout(model: nn.Module) -> None:
    model[6].p = 0.5


@pytest.mark.parametrize("change", [_freeze_a_batchnorm, _raise_dropout], ids=["batchnorm-eval", "dropout-p"])
def test_another_training_state_of_a_layer_re_plans(cnn_case, change) -> None:
    """Fine-tuning with a BatchNorm in eval mode inside a model in train mode, or a dropout
    probability changed (a PyTorch layer's plain attributes are baked into the trace): another
    training state, planned again."""
    model, x, y = cnn_case
    reference = copy.deepcopy(model)
    pm = planner.plan(model, "60%", x, loss_fn=F.cross_entropy, targets=y).apply(model, F.cross_entropy)
    for m in (model, reference):
        change(m)
    train_both(model, reference, pm, x, y)
    assert len(pm.plans) == 2


# ---- 2. parameters bound at call time ---------------------------------------------------------------
def test_replaced_head_and_swapped_parameter_receive_their_gradients(mlp_case) -> None:
    model, x, y = mlp_case
    reference = copy.deepcopy(model)
    pm = planner.plan(model, "70%", x, loss_fn=F.cross_entropy, targets=y).apply(model, F.cross_entropy)
    torch.manual_seed(5)
    model[6] = nn.Linear(128, 5)  # a new head of the same shape
    reference[6] = copy.deepcopy(model[6])
    model[0].weight = nn.Parameter(torch.randn(128, 16))  # a swapped parameter
    reference[0].weight = nn.Parameter(model[0].weight.detach().clone())
    train_both(model, reference, pm, x, y)
    assert model[6].weight.grad is not None and model[0].weight.grad is not None
    assert len(pm.plans) == 1, "same shapes: the plan holds, bound to the new tensors by name"


def test_head_of_another_shape_re_plans(mlp_case) -> None:
    model, x, _ = mlp_case
    reference = copy.deepcopy(model)
    pm = planner.plan(model, "70%", x, loss_fn=F.cross_entropy, targets=torch.randint(0, 5, (256,))).apply(model)
    torch.manual_seed(5)
    model[6] = nn.Linear(128, 7)
    reference[6] = copy.deepcopy(model[6])
    train_both(model, reference, pm, x, torch.randint(0, 7, (256,)))
    assert len(pm.plans) == 2


@pytest.mark.parametrize("change", ["freeze", "unfreeze"])
def test_freezing_and_unfreezing_re_plan(mlp_case, change: str) -> None:
    """Before the fix: freezing crashed (element 0 of tensors does not require grad), unfreezing
    left the layer without gradients."""
    model, x, y = mlp_case
    if change == "unfreeze":
        model[0].requires_grad_(False)
    reference = copy.deepcopy(model)
    pm = planner.plan(model, "80%", x, loss_fn=F.cross_entropy, targets=y).apply(model, F.cross_entropy)
    for m in (model, reference):
        m[0].requires_grad_(change == "unfreeze")
    train_both(model, reference, pm, x, y)
    assert (model[0].weight.grad is None) == (change == "freeze")


class Tied(nn.Module):
    def __init__(self, vocab: int = 32, d: int = 64):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.body = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(self.body(self.embed(ids)))


def test_untying_weights_re_plans() -> None:
    torch.manual_seed(0)
    model, ids = Tied().train(), torch.randint(0, 32, (8, 64))
    loss_fn = lambda out, labels: F.cross_entropy(out.flatten(0, 1), labels.flatten())  # noqa: E731
    reference = copy.deepcopy(model)
    pm = planner.plan(model, "100%", ids, loss_fn=loss_fn, targets=ids).apply(model, loss_fn)
    train_both(model, reference, pm, ids, ids, loss_fn=loss_fn)
    for m in (model, reference):
        m.head.weight = nn.Parameter(m.embed.weight.detach().clone())
    train_both(model, reference, pm, ids, ids, seed=2, loss_fn=loss_fn)
    assert len(pm.plans) == 2


# ---- 3. autocast -------------------------------------------------------------------------------------
def _mixed_precision_step(module, x, y, seed: int) -> torch.Tensor:
    """The usual AMP loop: forward and loss under autocast, backward outside it."""
    torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(module(x), y)
    loss.backward()
    return loss.detach()


def test_autocast_is_part_of_the_plan(mlp_case) -> None:
    """Planned in float32 and run under bfloat16 autocast (crashed: expected m1 and m2 to have the
    same dtype), planned under autocast and run without it (silently ran in bfloat16): each state
    gets its own plan, and eager's results."""
    model, x, y = mlp_case
    reference = copy.deepcopy(model)
    pm = planner.plan(model, "85%", x, loss_fn=F.cross_entropy, targets=y).apply(model, F.cross_entropy)
    assert torch.equal(_mixed_precision_step(pm, x, y, 1), _mixed_precision_step(reference, x, y, 1))
    assert_same_state(model, reference)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert pm(x).dtype == torch.bfloat16
    assert pm(x).dtype == torch.float32
    assert len(pm.plans) == 2

    with torch.autocast("cpu", dtype=torch.bfloat16):
        planned_in_bf16 = planner.plan(model, "85%", x, loss_fn=F.cross_entropy, targets=y)
    pm = planned_in_bf16.apply(model, F.cross_entropy)
    assert pm(x).dtype == torch.float32
    train_both(model, reference, pm, x, y, seed=2)


# ---- 4. the last, smaller batch ----------------------------------------------------------------------
# 85%: a budget every batch size below fits (at batch 50 the lowest peak is 85% of store-all)
def test_smaller_last_batch_re_plans_and_the_full_batch_reuses_its_plan(mlp_case) -> None:
    model, x, y = mlp_case
    reference = copy.deepcopy(model)
    pm = planner.plan(model, "85%", x, loss_fn=F.cross_entropy, targets=y).apply(model, F.cross_entropy)
    train_both(model, reference, pm, x, y)
    train_both(model, reference, pm, x[:100], y[:100], seed=2)  # drop_last=False: 100 left over
    train_both(model, reference, pm, x, y, seed=3)
    assert len(pm.plans) == 2
    last, full = pm.plans  # least recently used first
    assert full.input_specs[0].shape == (256, 16)
    assert last.budget_bytes == int(0.85 * last.store_all_peak_bytes), "a percentage is of the new store-all peak"
    assert last.input_specs[0].shape == (100, 16) and last.input_specs[1].shape == (100,)


def test_byte_budget_stays_bytes_when_re_planned(mlp_case) -> None:
    model, x, y = mlp_case
    first = planner.plan(model, "70%", x, loss_fn=F.cross_entropy, targets=y)
    pm = planner.plan(model, first.budget_bytes, x, loss_fn=F.cross_entropy, targets=y).apply(model)
    step(pm, x[:100], y[:100])
    assert [p.budget_bytes for p in pm.plans] == [first.budget_bytes] * 2


def test_plan_cache_keeps_the_most_recent_states(mlp_case, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(planner.config, "cache_size_limit", 2)
    model, x, y = mlp_case
    reference = copy.deepcopy(model)
    pm = planner.plan(model, "85%", x, loss_fn=F.cross_entropy, targets=y).apply(model, F.cross_entropy)
    for seed, rows in enumerate((100, 128, 256, 100), start=1):
        train_both(model, reference, pm, x[:rows], y[:rows], seed=seed)
        assert len(pm.plans) <= 2
    assert [p.input_specs[0].shape[0] for p in pm.plans] == [256, 100]


def test_training_step_re_plans_with_its_targets(mlp_case) -> None:
    model, x, y = mlp_case
    reference = copy.deepcopy(model)
    pm = planner.plan(model, "85%", x, loss_fn=F.cross_entropy, targets=y).apply(model, F.cross_entropy)
    torch.manual_seed(1)
    loss = pm.training_step(x[:100], y[:100])
    assert torch.equal(loss, step(reference, x[:100], y[:100]))
    assert_same_state(model, reference)


def test_schedule_without_a_plan_names_the_fix(mlp_case) -> None:
    """A ``PlannedModule`` built from a bare graph and schedule has nothing to re-plan with."""
    model, x, y = mlp_case
    graph = planner.capture(model, x, F.cross_entropy, targets=y)
    pm = planner.PlannedModule(model, graph, planner.Schedule.store_all(graph))
    with pytest.raises(PlanMismatchError, match="planner.plan"):
        pm(x[:100])


# ---- 5. keyword inputs -------------------------------------------------------------------------------
class Masked(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = mlp(classes=16)

    def forward(self, x, mask=None, scale: float = 1.0):
        out = self.body(x) * scale
        return out if mask is None else out * mask


def test_keyword_inputs_and_constants_are_part_of_the_call() -> None:
    torch.manual_seed(0)
    model = Masked().train()
    x, mask = torch.randn(256, 16), (torch.rand(256, 16) > 0.5).float()
    reference = copy.deepcopy(model)
    batch = {"x": x, "mask": mask, "scale": 2.0}
    pm = planner.plan(model, "70%", batch, loss_fn=lambda out: out.pow(2).mean()).apply(model)
    for seed, call in enumerate([batch, {**batch, "scale": 3.0}, {"x": x, "scale": 2.0}], start=1):
        torch.manual_seed(seed)
        got = pm(**call).pow(2).mean()
        got.backward()
        torch.manual_seed(seed)
        want = reference(**call).pow(2).mean()
        want.backward()
        assert torch.equal(got, want)
        assert_same_state(model, reference)
    assert len(pm.plans) == 3, "another constant, another keyword set: another plan each"
    with pytest.raises(TypeError, match="pass tensors, or constants"):
        planner.plan(model, "70%", {"x": x, "mask": object()})


def test_transformers_model_called_with_a_batch_dict() -> None:
    """``model(**batch)`` with input_ids, attention_mask and labels; the model returns its loss."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=256, n_positions=64,
                                     use_cache=False, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config).train()
    ids = torch.randint(0, 256, (4, 64))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    reference = copy.deepcopy(model)
    pm = planner.plan(model, "60%", batch, loss_fn=lambda out: out.loss).apply(model)
    torch.manual_seed(1)
    out = pm(**batch)
    out.loss.backward()
    torch.manual_seed(1)
    want = reference(**batch)
    want.loss.backward()
    assert torch.equal(out.loss, want.loss) and torch.equal(out.logits, want.logits)
    assert_same_state(model, reference)


# ---- 6. Hugging Face defaults ------------------------------------------------------------------------
def _default_config_models():
    transformers = pytest.importorskip("transformers")
    gpt2 = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=256, n_positions=64,
                                   bos_token_id=0, eos_token_id=0)
    llama = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                     bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return {"gpt2": (transformers.GPT2LMHeadModel, gpt2), "llama": (transformers.LlamaForCausalLM, llama)}


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_transformers_default_config_captures_and_trains_like_eager(name: str, caplog) -> None:
    """use_cache=True (what from_pretrained gives): the output holds a Cache object; its tensors
    are constants created in forward (before the fix: 'a higher-order operator's subgraph')."""
    cls, config = _default_config_models()[name]
    assert config.use_cache
    torch.manual_seed(0)
    model = cls(config).train()
    ids = torch.randint(0, 256, (4, 64))
    batch = {"input_ids": ids, "labels": ids.clone()}
    reference = copy.deepcopy(model)
    chosen = planner.plan(model, "60%", batch, loss_fn=lambda out: out.loss)
    assert chosen.recomputations > 0
    pm = chosen.apply(model)
    torch.manual_seed(1)  # the default configs have dropout 0.1 (GPT-2) and 0 (Llama)
    with caplog.at_level(logging.WARNING, logger="planner"):
        out = pm(**batch)
    assert out.past_key_values is None and "use_cache=False" in caplog.text
    out.loss.backward()
    from planner._aot import _tracing_state

    torch.manual_seed(1)
    with _tracing_state():  # eager on the traced code path (explicit causal mask), as test_transformers
        want = reference(**batch)
    want.loss.backward()
    assert torch.equal(out.loss, want.loss)
    assert_same_state(model, reference)


def test_transformers_model_on_the_meta_device_plans_like_on_cpu() -> None:
    """Planning without allocating the model (``torch.device("meta")``), default config, the
    model's own loss from ``labels``: the plan made on the CPU (before the fix: the constants
    failed capture, and on meta the loss's backward vanished from the graph)."""
    cls, config = _default_config_models()["gpt2"]
    torch.manual_seed(0)
    ids = torch.randint(0, 256, (4, 64))
    loss_fn = lambda out: out.loss  # noqa: E731
    on_cpu = planner.plan(cls(config).train(), "60%", {"input_ids": ids, "labels": ids}, loss_fn=loss_fn,
                          cost_model="cpu")
    with torch.device("meta"):
        model = cls(config).train()
        meta_ids = torch.zeros(4, 64, dtype=torch.long)
    on_meta = planner.plan(model, "60%", {"input_ids": meta_ids, "labels": meta_ids}, loss_fn=loss_fn,
                           cost_model="cpu")
    assert on_meta.store_all_peak_bytes == on_cpu.store_all_peak_bytes
    assert on_meta.predicted_peak_bytes == on_cpu.predicted_peak_bytes
    assert on_meta.schedule.steps == on_cpu.schedule.steps


# ---- 7. side-effect-only operators -------------------------------------------------------------------
class OneHotInside(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = mlp(classes=4)

    def forward(self, x, labels):
        return self.body(x) * F.one_hot(labels, 4)


@pytest.mark.parametrize("where", ["loss", "model"])
def test_one_hot_plans_and_trains_like_eager(mlp_case, where: str) -> None:
    """F.one_hot checks its classes with aten._assert_async (before the fix: KeyError 'val')."""
    _, x, _ = mlp_case
    torch.manual_seed(0)
    labels = torch.randint(0, 4, (256,))
    if where == "loss":
        model = mlp(classes=4)
        loss_fn = lambda out, y: F.mse_loss(out, F.one_hot(y, 4).float())  # noqa: E731
        inputs, targets = x, labels
    else:
        model = OneHotInside().train()
        loss_fn = lambda out, _: out.pow(2).mean()  # noqa: E731
        inputs, targets = (x, labels), labels
    reference = copy.deepcopy(model)
    pm = planner.plan(model, "70%", inputs, loss_fn=loss_fn, targets=targets).apply(model, loss_fn)
    call = (lambda m: m(x)) if where == "loss" else (lambda m: m(x, labels))
    for module in (pm, reference):
        torch.manual_seed(1)
        loss_fn(call(module), labels).backward()
    assert_same_state(model, reference)


# ---- 8. several backward passes ----------------------------------------------------------------------
def test_retain_graph_then_a_second_backward(cnn_case) -> None:
    model, x, y = cnn_case
    reference = copy.deepcopy(model)
    pm = planner.plan(model, "60%", x, loss_fn=F.cross_entropy, targets=y).apply(model, F.cross_entropy)
    assert pm.plans[0].recomputations > 0
    for module in (pm, reference):
        torch.manual_seed(1)
        loss = F.cross_entropy(module(x), y)
        loss.backward(retain_graph=True)
        loss.backward()
    assert_same_state(model, reference)


def test_two_losses_with_separate_backward_calls(cnn_case) -> None:
    model, x, y = cnn_case
    reference = copy.deepcopy(model)
    pm = planner.plan(model, "60%", x, loss_fn=F.cross_entropy, targets=y).apply(model, F.cross_entropy)
    for module in (pm, reference):
        torch.manual_seed(1)
        out = module(x)
        F.cross_entropy(out, y).backward(retain_graph=True)
        out.pow(2).mean().backward()
    assert_same_state(model, reference)


def test_a_second_backward_without_retain_graph_is_a_typed_error(cnn_case) -> None:
    """As in eager, whose error is a RuntimeError too (a loss holding saved tensors of its own,
    such as cross-entropy, raises eager's error before the planned step is reached)."""
    model, x, y = cnn_case
    pm = planner.plan(model, "60%", x, loss_fn=F.cross_entropy, targets=y).apply(model, F.cross_entropy)
    loss = pm(x).sum()
    loss.backward()
    with pytest.raises(planner.BackwardError, match="retain_graph=True"):
        loss.backward()


def test_autograd_grad_returns_eager_gradients_and_leaves_grad_alone(cnn_case) -> None:
    model, x, y = cnn_case
    reference = copy.deepcopy(model)
    pm = planner.plan(model, "60%", x, loss_fn=F.cross_entropy, targets=y).apply(model, F.cross_entropy)
    results = []
    for module, owner in ((pm, model), (reference, reference)):
        torch.manual_seed(1)
        results.append(torch.autograd.grad(F.cross_entropy(module(x), y), list(owner.parameters())))
    for got, want in zip(*results, strict=True):
        assert torch.equal(got, want)
    assert all(p.grad is None for p in model.parameters())
    assert_same_state(model, reference)  # buffers too


def test_backward_with_inputs_accumulates_only_those(cnn_case) -> None:
    model, x, y = cnn_case
    reference = copy.deepcopy(model)
    pm = planner.plan(model, "60%", x, loss_fn=F.cross_entropy, targets=y).apply(model, F.cross_entropy)
    for module, owner in ((pm, model), (reference, reference)):
        torch.manual_seed(1)
        F.cross_entropy(module(x), y).backward(inputs=[owner[-1].weight])
    assert model[0].weight.grad is None and model[-1].weight.grad is not None
    assert_same_state(model, reference)


def test_output_modified_in_place_before_the_backward_is_a_typed_error() -> None:
    """Eager refuses it (tanh's backward reads the output it saved); so does the plan, which keeps
    that output as a version-checked alias rather than through autograd's saved tensors."""
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(16, 16), nn.Tanh()).train(), torch.randn(8, 16)
    reference = copy.deepcopy(model)
    pm = planner.plan(model, "100%", x).apply(model)
    out = reference(x)
    out.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()
    out = pm(x)
    out.mul_(2)
    with pytest.raises(planner.BackwardError, match="clone"):
        out.sum().backward()


def test_parameter_modified_in_place_before_the_backward_is_a_typed_error() -> None:
    """An update between a forward and its backward: eager refuses it where autograd saved the
    weight; the plan, whose recomputations would read the new weight, refuses it too."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Tanh(), nn.Conv2d(8, 4, 3), nn.Flatten(), nn.LazyLinear(4))
    x = torch.randn(8, 3, 8, 8)
    model(x)  # materialise the lazy layer
    reference = copy.deepcopy(model)
    pm = planner.plan(model, "100%", x).apply(model)
    y = torch.arange(8) % 4
    loss = F.cross_entropy(reference(x), y)
    with torch.no_grad():
        reference[2].weight.add_(0.5)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    loss = F.cross_entropy(pm(x), y)
    with torch.no_grad():
        model[2].weight.add_(0.5)
    with pytest.raises(planner.BackwardError, match="optimizer step"):
        loss.backward()


def test_higher_order_gradients_are_a_typed_error(cnn_case) -> None:
    model, x, y = cnn_case
    pm = planner.plan(model, "60%", x, loss_fn=F.cross_entropy, targets=y).apply(model, F.cross_entropy)
    loss = F.cross_entropy(pm(x), y)
    with pytest.raises(planner.BackwardError, match="create_graph"):
        torch.autograd.grad(loss, list(model.parameters()), create_graph=True)


# ---- 9. the torch.compile backend --------------------------------------------------------------------
def test_backend_raises_the_planners_own_error() -> None:
    torch._dynamo.reset()
    compiled = torch.compile(cnn(), backend=planner.backend(budget=1000))
    with pytest.raises(InfeasibleBudgetError) as caught:
        compiled(torch.randn(16, 3, 16, 16))
    assert isinstance(caught.value, PlannerError) and caught.value.min_feasible_bytes > 1000


def test_backend_plans_are_inspectable_and_measured(cnn_case) -> None:
    """The meter sees the compiled planned step (before the fix it measured eager, whose peak is
    the store-all peak)."""
    model, x, y = cnn_case
    torch._dynamo.reset()
    reference = copy.deepcopy(model)
    backend = planner.backend(budget="60%")
    compiled = torch.compile(model, backend=backend)
    train_both(model, reference, compiled, x, y)
    assert len(backend.plans) == 1
    chosen = backend.plans[0]
    assert chosen.recomputations > 0 and chosen.predicted_peak_bytes <= chosen.budget_bytes
    measured = planner.measure_step(model, lambda: F.cross_entropy(compiled(x), y).backward(), [x, y])
    eager = planner.measure_step(reference, lambda: F.cross_entropy(reference(x), y).backward(), [x, y])
    assert measured.peak_bytes < eager.peak_bytes
    assert measured.peak_bytes == pytest.approx(chosen.predicted_peak_bytes, rel=0.01)
