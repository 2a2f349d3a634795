"""Bad input and hardening: each case gives a typed error (``planner.errors``) whose message names
the fix, and nothing runs wrongly; plans are reproducible across processes. docs/reliability.md
lists every case with the test that checks it (many live in test_plan, test_capture_errors, ...).
"""
from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import planner
from planner import (
    CaptureError, InvalidBudgetError, InvalidScheduleError, PlannerError, UnsupportedOperatorError,
)

from conftest import TinyCNN
from _workloads import one_intra_op_thread  # noqa: F401  (autouse fixture)


class ResidualMLP(nn.Module):
    """A few residual blocks: small, but with activations worth recomputing at 60%."""

    def __init__(self, d: int = 32, blocks: int = 4, out: int = 5):
        super().__init__()
        self.inp = nn.Linear(16, d)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
                                    for _ in range(blocks))
        self.head = nn.Linear(d, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h)
        return self.head(h)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[nn.Module, torch.Tensor, torch.Tensor, planner.Plan, dict]:
    torch.manual_seed(0)
    model = ResidualMLP().train()
    x, y = torch.randn(256, 16), torch.randint(0, 5, (256,))
    # the roofline, whose peak and time a re-applied plan is checked against (a profiled plan's
    # time cannot be recomputed without measuring: test_edited_peak_of_a_profiled_plan_is_refused)
    chosen = planner.plan(model, "60%", x, loss_fn=F.cross_entropy, targets=y, cost_model="cpu")
    path = tmp_path_factory.mktemp("plans") / "mlp.plan.json"
    chosen.save(path)
    return model, x, y, chosen, json.loads(path.read_text())


def _eager_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn=F.cross_entropy) -> list[torch.Tensor]:
    reference = copy.deepcopy(model)
    loss_fn(reference(x), y).backward()
    return [p.grad for p in reference.parameters()]


# ---- budgets -------------------------------------------------------------------------------------
@pytest.mark.parametrize("budget", [0, -1, -0.5, math.nan, math.inf, -math.inf, "0", "-5MB", "nan", "inf",
                                    "5 parsecs", "12 GiBs", "", "%", "0%", True, None, [1]], ids=repr)
def test_bad_budgets_are_typed_errors_naming_the_accepted_forms(budget) -> None:
    with pytest.raises(InvalidBudgetError) as caught:
        planner.parse_budget(budget, 10**6)
    assert isinstance(caught.value, ValueError) and isinstance(caught.value, PlannerError)
    assert "'6GiB'" in str(caught.value) and "'50%'" in str(caught.value)


def test_bad_budget_through_plan(saved) -> None:
    _, _, _, chosen, _ = saved
    with pytest.raises(InvalidBudgetError, match="parsecs.*'6GiB'"):
        planner.plan(chosen.graph, "5 parsecs")


# ---- models the planner cannot plan --------------------------------------------------------------
class DynamicShape(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x[x > 0].view(-1, 4))  # the number of rows depends on the values


class ControlFlowOperator(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return torch.cond(x.sum() > 0, lambda v: self.fc(v), lambda v: self.fc(-v), (x,))


class Sparse(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x.to_sparse().to_dense())


@pytest.mark.parametrize("model_type, error, match", [
    (DynamicShape, CaptureError, "dynamic shapes"),
    (ControlFlowOperator, UnsupportedOperatorError, "torch.where"),
    (Sparse, CaptureError, "dense"),
], ids=["dynamic-shape", "torch.cond", "sparse"])
def test_unplannable_models_raise_typed_errors(model_type, error, match) -> None:
    torch.manual_seed(0)
    with pytest.raises(error, match=match):
        planner.plan(model_type().train(), "90%", torch.randn(8, 4))


def test_model_without_floating_output_needs_a_loss_fn() -> None:
    model = nn.Linear(4, 4).to(torch.complex64)
    with pytest.raises(CaptureError, match="pass loss_fn"):
        planner.capture(model, torch.randn(2, 4, dtype=torch.complex64))


# ---- models that are planned correctly -----------------------------------------------------------
def test_model_in_eval_mode_is_planned_and_matches_eager() -> None:
    """Training in eval mode (frozen BatchNorm statistics) is a training step like any other."""
    torch.manual_seed(0)
    model = TinyCNN().eval()
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    chosen = planner.plan(model, "95%", x, loss_fn=F.cross_entropy, targets=y)
    want = _eager_grads(model, x, y)
    planned_model = copy.deepcopy(model)
    pm = chosen.apply(planned_model, F.cross_entropy)  # a copy: captured again, and it matches
    F.cross_entropy(pm(x), y).backward()
    assert all(torch.equal(p.grad, g) for p, g in zip(planned_model.parameters(), want, strict=True))
    assert torch.equal(planned_model.bn.running_mean, model.bn.running_mean)  # eval: statistics frozen


class Checkpointed(ResidualMLP):
    def forward(self, x):
        h = self.inp(x)
        for block in self.blocks:
            h = h + torch.utils.checkpoint.checkpoint(block, h, use_reentrant=False)
        return self.head(h)


def test_model_using_torch_checkpoint_is_planned_and_matches_eager() -> None:
    torch.manual_seed(0)
    model = Checkpointed().train()
    x, y = torch.randn(256, 16), torch.randint(0, 5, (256,))
    chosen = planner.plan(model, "60%", x, loss_fn=F.cross_entropy, targets=y)
    want = _eager_grads(model, x, y)
    F.cross_entropy(chosen.apply(model, F.cross_entropy)(x), y).backward()
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), want, strict=True))


class TwoOutputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        return self.a(x), self.b(x)


def test_outputs_get_their_own_gradients() -> None:
    """Two outputs of one shape whose gradients the backward meets in the other order (this swapped
    them, silently, before output gradients were paired by index)."""
    torch.manual_seed(0)
    model, x = TwoOutputs().train(), torch.randn(3, 4)

    def loss(out):
        return (out[0] * 2).sum() + (out[1] ** 2).sum()

    chosen = planner.plan(model, "100%", x, loss_fn=loss)
    want = _eager_grads(model, x, None, lambda out, _: loss(out))
    loss(chosen.apply(model, loss)(x)).backward()
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), want, strict=True))


class SequenceModel(nn.Module):
    def __init__(self, vocab: int = 16, d: int = 32, blocks: int = 4):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
                                    for _ in range(blocks))
        self.head = nn.Linear(d, vocab)

    def forward(self, ids):
        h = self.embed(ids)
        for block in self.blocks:
            h = h + block(h)
        return self.head(h)


def next_token_loss(logits, labels):
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())


class ReturnsItsLoss(SequenceModel):
    def forward(self, ids, labels):
        return next_token_loss(super().forward(ids), labels)


@pytest.mark.parametrize("kind", ["label-shift-in-loss", "model-returns-loss"])
def test_language_model_losses(kind: str) -> None:
    """Loss code that reads only the labels (the shift) is the loss's, not the model's; a model may
    compute and return its loss itself (``loss_fn=lambda loss: loss``). Both used to fail."""
    torch.manual_seed(0)
    ids = torch.randint(0, 16, (8, 64))
    labels = ids.clone()
    if kind == "label-shift-in-loss":
        model, inputs, targets, loss_fn = SequenceModel().train(), (ids,), (labels,), next_token_loss
    else:
        model, inputs, targets, loss_fn = ReturnsItsLoss().train(), (ids, labels), (), (lambda loss: loss)
    chosen = planner.plan(model, "60%", inputs, loss_fn=loss_fn, targets=targets)
    assert chosen.recomputations > 0
    reference = copy.deepcopy(model)
    want = loss_fn(reference(*inputs), *targets)
    want.backward()
    got = loss_fn(chosen.apply(model, loss_fn)(*inputs), *targets)
    got.backward()
    assert torch.equal(got, want)
    assert all(torch.equal(p.grad, r.grad) for p, r in zip(model.parameters(), reference.parameters(), strict=True))
    fused = copy.deepcopy(reference)
    for p in fused.parameters():
        p.grad = None
    assert torch.equal(chosen.apply(fused, loss_fn).training_step(inputs, targets), want.detach())


# ---- edited plan files ---------------------------------------------------------------------------
def _edits(data: dict, graph) -> dict[str, dict]:
    steps = data["schedule"]["steps"]
    first_free = next(i for i, s in enumerate(steps) if s[0] == "f")
    first_backward = next(i for i, s in enumerate(steps) if s[0] == "c" and graph.ops[s[1]].phase.value == "backward")
    produced = {t for s in steps[:1] for t in graph.ops[s[1]].outputs}
    consumer = next(i for i, s in enumerate(steps) if s[0] == "c" and produced & set(graph.ops[s[1]].inputs))

    def edited(change) -> dict:
        copy_ = json.loads(json.dumps(data))
        change(copy_, copy_["schedule"]["steps"])
        return copy_

    return {
        "negative-op-id": edited(lambda d, s: s.insert(0, ["c", -1])),
        "op-id-past-the-end": edited(lambda d, s: s.insert(0, ["c", len(graph.ops)])),
        "free-of-unknown-tensor": edited(lambda d, s: s.insert(0, ["f", len(graph.tensors) + 3])),
        "first-step-removed": edited(lambda d, s: s.pop(0)),
        "a-free-removed": edited(lambda d, s: s.pop(first_free)),
        "a-backward-op-removed": edited(lambda d, s: s.pop(first_backward)),
        "a-backward-op-twice": edited(lambda d, s: s.insert(first_backward, s[first_backward])),
        "consumer-before-producer": edited(lambda d, s: s.insert(0, s.pop(consumer))),
        "op-id-not-a-number": edited(lambda d, s: s.__setitem__(0, ["c", "x"])),
        "op-id-fractional": edited(lambda d, s: s.__setitem__(0, ["c", s[0][1] + 0.5])),
        "op-id-infinite": edited(lambda d, s: s.__setitem__(0, ["f", float("inf")])),
        "newer-plan-format": edited(lambda d, s: d.__setitem__("format", 2)),
        "newer-schedule-format": edited(lambda d, s: d["schedule"].__setitem__("format", 2)),
        "input-dtype-unknown": edited(lambda d, s: d["plan"]["input_specs"][0].__setitem__(1, "torch.float99")),
        "input-dtype-not-a-dtype": edited(lambda d, s: d["plan"]["input_specs"][0].__setitem__(1, "torch.nn")),
        "predicted-peak-edited": edited(lambda d, s: d["plan"].__setitem__("predicted_peak_bytes", 1000)),
        "predicted-time-edited": edited(lambda d, s: d["plan"].__setitem__("predicted_time", 1e-6)),
    }


EDITS = ["negative-op-id", "op-id-past-the-end", "free-of-unknown-tensor", "first-step-removed", "a-free-removed",
         "a-backward-op-removed", "a-backward-op-twice", "consumer-before-producer", "op-id-not-a-number",
         "op-id-fractional", "op-id-infinite",
         "newer-plan-format", "newer-schedule-format", "input-dtype-unknown", "input-dtype-not-a-dtype",
         "predicted-peak-edited", "predicted-time-edited"]


@pytest.mark.parametrize("edit", EDITS)
def test_edited_plan_file_is_refused_before_anything_runs(saved, tmp_path: Path, edit: str) -> None:
    model, x, y, chosen, data = saved
    path = tmp_path / "edited.plan.json"
    path.write_text(json.dumps(_edits(data, chosen.graph)[edit]))
    fresh = copy.deepcopy(model)
    with pytest.raises(InvalidScheduleError, match="plan again"):
        pm = planner.Plan.load(path).apply(fresh, F.cross_entropy)
        F.cross_entropy(pm(x), y).backward()
    assert all(p.grad is None for p in fresh.parameters()), "something ran before the error"


# ---- reproducibility -----------------------------------------------------------------------------
def test_edited_peak_of_a_profiled_plan_is_refused(tmp_path: Path) -> None:
    """A plan profiled on CPU (the default for a model) keeps its peak checkable at apply time."""
    torch.manual_seed(0)
    model = ResidualMLP().train()
    x, y = torch.randn(256, 16), torch.randint(0, 5, (256,))
    chosen = planner.plan(model, "60%", x, loss_fn=F.cross_entropy, targets=y)
    assert chosen.cost_model.startswith("profiled:cpu")
    path = tmp_path / "profiled.plan.json"
    chosen.save(path)
    planner.Plan.load(path).apply(copy.deepcopy(model), F.cross_entropy)  # unedited: accepted
    data = json.loads(path.read_text())
    data["plan"]["predicted_peak_bytes"] -= 1
    path.write_text(json.dumps(data))
    with pytest.raises(InvalidScheduleError, match="plan again"):
        planner.Plan.load(path).apply(copy.deepcopy(model), F.cross_entropy)


def test_same_plan_json_byte_for_byte_in_two_processes(tmp_path: Path) -> None:
    """The CLI plans the same model twice in fresh interpreters (different hash seeds)."""
    runs = {}
    for seed in ("1", "2"):  # at once: each is mostly the interpreter's and torch's start-up
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONWARNINGS": "ignore"}
        runs[seed] = subprocess.Popen([sys.executable, "-m", "planner", "plan", "preset:transformer-tiny", "--batch-size",
                                       "4", "--budget", "60%", "--out", str(tmp_path / f"plan{seed}.json")],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                      cwd=Path(__file__).parent)
    for run in runs.values():
        _, stderr = run.communicate(timeout=300)
        assert run.returncode == 0, stderr
    outputs = [(tmp_path / f"plan{seed}.json").read_bytes() for seed in runs]
    assert outputs[0] == outputs[1]
    assert json.loads(outputs[0])["plan"]["recomputations"] > 0
