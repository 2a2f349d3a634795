"""Hugging Face models and ``nn.TransformerEncoder`` planned in fast mode at half their store-all
peak: loss and gradients equal plain PyTorch's, and the measured peak is the simulated one.

Small configs with random weights (no downloads; ``HF_HUB_OFFLINE=1``), batch 4, sequence 128, so
that activations dominate and 50% is reachable. Dropout is 0 where peaks are compared (CPU eager
dropout keeps a float noise tensor, docs/budgets.md); one GPT-2 case keeps dropout 0.1 to check
that recomputed dropout masks replay.

Under tracing, transformers builds the causal mask explicitly where eager PyTorch passes
``is_causal=True`` to SDPA (capture traces with ``torch.compiler.is_compiling()`` true, as
torch.export does), unless the model is called without ``position_ids`` (``_aot``'s
``_one_sequence_per_row``). The Llama here is wrapped in a module that computes its loss from
``labels``, whose forward has no ``position_ids`` parameter, so its trace keeps the mask: its
reference is eager PyTorch on the same code path (``_tracing_state``), bitwise equal, and against
plain eager its gradients agree to float32 rounding (~4e-9 absolute). GPT-2's and BERT's are
bitwise equal to plain eager.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

import planner  # noqa: E402
from planner import PlanMismatchError  # noqa: E402
from planner._aot import _tracing_state  # noqa: E402

from conftest import make_transformer  # noqa: E402
from _workloads import one_intra_op_thread, projection_loss  # noqa: E402,F401  (autouse fixture)

VOCAB, BATCH, SEQUENCE = 256, 4, 128
PEAK_TOLERANCE = 0.01  # measured peak vs simulated, relative


def causal_lm_loss(output, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy on the logits: the label shift is loss code reading only targets."""
    return F.cross_entropy(output.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())


def masked_lm_loss(output, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(output.logits.flatten(0, 1), labels.flatten())


def returned_loss(loss: torch.Tensor) -> torch.Tensor:
    """For a model that computes its own loss and returns it."""
    return loss


class CausalLMWithLabels(nn.Module):
    """A causal LM computing its own loss from ``labels`` (transformers' ``.loss``), called with
    tensors in order as the planner calls models: ``model(input_ids, labels)``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, labels=labels).loss


def gpt2(dropout: float = 0.0) -> nn.Module:
    config = transformers.GPT2Config(
        n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=SEQUENCE, use_cache=False,
        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def bert() -> nn.Module:
    config = transformers.BertConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
        vocab_size=VOCAB, max_position_embeddings=SEQUENCE, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0)
    return transformers.BertForMaskedLM(config)


def llama() -> nn.Module:
    """Llama layout: RMSNorm, rotary embeddings, grouped-query SDPA attention, SwiGLU."""
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=SEQUENCE, use_cache=False,
        bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return CausalLMWithLabels(transformers.LlamaForCausalLM(config))


@dataclass
class Case:
    """A model in train mode, its batch, the loss the plan is made with, and a planned step."""

    model: nn.Module
    inputs: tuple[torch.Tensor, ...]
    targets: tuple[torch.Tensor, ...]
    loss_fn: Callable
    same_path_only: bool  # bitwise equal to eager on the traced code path only (explicit causal mask)

    def step(self, module: nn.Module) -> torch.Tensor:
        loss = self.loss_fn(module(*self.inputs), *self.targets)
        loss.backward()
        return loss.detach()


def _token_batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (BATCH, SEQUENCE))
    return ids, ids.clone()  # labels: the same tokens, in a tensor of their own


def build_case(name: str) -> Case:
    torch.manual_seed(0)
    ids, labels = _token_batch()
    if name == "gpt2":
        return Case(gpt2().train(), (ids,), (labels,), causal_lm_loss, False)
    if name == "gpt2-dropout":
        return Case(gpt2(dropout=0.1).train(), (ids,), (labels,), causal_lm_loss, False)
    if name == "bert":
        return Case(bert().train(), (ids,), (labels,), masked_lm_loss, False)
    if name == "llama":
        return Case(llama().train(), (ids, labels), (), returned_loss, True)
    if name == "transformer_encoder":
        model = make_transformer(d_model=32, nhead=4, ff=64, layers=6, dropout=0.0)
        shape = (BATCH, SEQUENCE, 32)  # a random projection: a post-norm output sums to ~0
        return Case(model, (torch.randn(shape),), (torch.randn(shape),), projection_loss, False)
    raise KeyError(name)


@pytest.fixture(scope="module", params=["gpt2", "gpt2-dropout", "bert", "llama", "transformer_encoder"])
def planned(request) -> tuple[Case, planner.Plan]:
    case = build_case(request.param)
    chosen = planner.plan(case.model, "50%", case.inputs, loss_fn=case.loss_fn, targets=case.targets, mode="fast")
    return case, chosen


def test_half_budget_plan_recomputes_and_fits(planned) -> None:
    case, chosen = planned
    assert chosen.budget_bytes == int(0.5 * chosen.store_all_peak_bytes)
    assert chosen.predicted_peak_bytes <= chosen.budget_bytes
    assert chosen.recomputations > 0 and chosen.overhead > 0


def test_loss_and_gradients_equal_eager(planned) -> None:
    case, chosen = planned
    model, reference, plain = (copy.deepcopy(case.model) for _ in range(3))
    pm = chosen.apply(model, case.loss_fn)
    torch.manual_seed(1)
    loss = case.step(pm)
    torch.manual_seed(1)
    with _tracing_state():  # eager PyTorch on the code path the capture traced
        want = case.step(reference)
    assert torch.equal(loss, want)
    for (name, got), (_, ref) in zip(model.named_parameters(), reference.named_parameters(), strict=True):
        assert torch.equal(got.grad, ref.grad), f"{name}: max abs diff {(got.grad - ref.grad).abs().max():.3e}"
    torch.manual_seed(1)
    plain_loss = case.step(plain)  # plain eager: its own causal-mask path
    for (name, got), (_, ref) in zip(model.named_parameters(), plain.named_parameters(), strict=True):
        if case.same_path_only:
            torch.testing.assert_close(got.grad, ref.grad, rtol=1e-5, atol=1e-7, msg=name)
        else:
            assert torch.equal(got.grad, ref.grad), name
    assert torch.equal(loss, plain_loss) or case.same_path_only


def test_measured_peak_is_the_simulated_peak(planned) -> None:
    case, chosen = planned
    model = copy.deepcopy(case.model)
    pm = chosen.apply(model, case.loss_fn)
    measured = planner.measure_step(model, lambda: case.step(pm), [*case.inputs, *case.targets])
    assert measured.peak_bytes == pytest.approx(chosen.predicted_peak_bytes, rel=PEAK_TOLERANCE)
    assert measured.peak_bytes < 0.51 * chosen.store_all_peak_bytes


def test_model_output_the_loss_ignores() -> None:
    """transformers' output object with ``.loss`` and ``.logits``, planned with ``loss_fn=lambda
    out: out.loss``: the planned module returns both (the logits get no gradient, as the plan's
    loss ignores them) and trains like eager; a loss that uses the logits after all is refused
    at its backward, naming the fix; ``training_step`` runs the whole step too."""

    class FullOutput(nn.Module):
        def __init__(self, model: nn.Module):
            super().__init__()
            self.model = model

        def forward(self, input_ids, labels):
            return self.model(input_ids=input_ids, labels=labels)

    torch.manual_seed(0)
    model = FullOutput(gpt2()).train()
    ids, labels = _token_batch()
    chosen = planner.plan(model, "60%", (ids, labels), loss_fn=lambda out: out.loss)
    reference, fused = copy.deepcopy(model), copy.deepcopy(model)
    pm = chosen.apply(model, lambda out: out.loss)
    out = pm(ids, labels)
    out.loss.backward()
    want = reference(ids, labels)
    want.loss.backward()
    assert torch.equal(out.loss, want.loss) and torch.equal(out.logits, want.logits)
    for got, ref in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(got.grad, ref.grad)
    with pytest.raises(PlanMismatchError, match="loss_fn"):
        pm(ids, labels).logits.sum().backward()
    loss = chosen.apply(fused, lambda out: out.loss).training_step((ids, labels))
    assert torch.equal(loss, want.loss.detach())
    for got, ref in zip(fused.parameters(), reference.parameters(), strict=True):
        assert torch.equal(got.grad, ref.grad)


def _sdpa_inputs(graph: planner.TrainingGraph) -> list[int]:
    return [len(op.inputs) for op in graph.ops if op.name.startswith("_scaled_dot_product") and "backward" not in op.name]


@pytest.mark.parametrize("factory", ["gpt2", "llama"])
def test_model_numbering_its_own_positions_is_traced_with_is_causal(factory: str) -> None:
    """Called without ``position_ids``, a transformers model numbers positions itself (one
    sequence per row): the trace passes ``is_causal`` to SDPA as eager does, with no mask tensor,
    and the plan's step equals plain eager bit for bit; passed ``position_ids`` (which could pack
    sequences) keep the explicit mask."""
    torch.manual_seed(0)
    model = gpt2() if factory == "gpt2" else llama().model
    ids, labels = _token_batch()
    graph = planner.capture(model, ids, loss_fn=causal_lm_loss, targets=labels)
    assert _sdpa_inputs(graph) and all(n == 3 for n in _sdpa_inputs(graph)), _sdpa_inputs(graph)
    positions = torch.arange(SEQUENCE).expand(BATCH, -1)
    packed = planner.capture(model, {"input_ids": ids, "position_ids": positions}, loss_fn=causal_lm_loss,
                             targets=labels)
    assert all(n == 4 for n in _sdpa_inputs(packed)), _sdpa_inputs(packed)
    chosen = planner.plan(graph, "50%")
    planned, plain = copy.deepcopy(model), copy.deepcopy(model)
    loss = causal_lm_loss(chosen.apply(planned, causal_lm_loss)(ids), labels)
    loss.backward()
    want = causal_lm_loss(plain(ids), labels)
    want.backward()
    assert torch.equal(loss, want)
    for (name, got), (_, ref) in zip(planned.named_parameters(), plain.named_parameters(), strict=True):
        assert torch.equal(got.grad, ref.grad), name
