"""Hugging Face transformer benchmark: store-all peak and fast mode's predicted overhead at 50% and
33% of it, for small GPT-2, BERT and Llama configs (random weights, no downloads).

Named ``hf_transformers.py``, not ``transformers.py``: a script's folder comes first on
``sys.path``, so a script named like the package would import itself instead of it.

Per model: one capture (fake tensors), the store-all peak simulated with the default cost model
(cpu roofline), ``planner.plan(graph, "50%")`` and ``"33%"`` (fast mode: overhead, peak,
algorithm, planning seconds), and one eager step under ``planner.measure_step`` for the peak plain
PyTorch really reaches (it differs from store-all where the traced step keeps transformers' explicit
causal mask, see docs/reliability.md).

Run from the repository root::

    python benchmarks/hf_transformers.py
    python benchmarks/hf_transformers.py --markdown docs/benchmarks.md

``--markdown PATH`` replaces the "## Transformers (issue 8)" section of PATH only.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402

import planner  # noqa: E402
from planner.units import format_bytes  # noqa: E402
from report import command_line, environment_line, publish  # noqa: E402

SECTION_HEADING = "## Transformers (issue 8)"
BUDGETS = ("50%", "33%")
LAYERS, WIDTH, HEADS, FFN, VOCAB = 8, 256, 4, 1024, 1024


class CausalLMWithLabels(torch.nn.Module):
    """The model computes its own next-token loss from ``labels`` and returns it."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, labels):
        return self.model(input_ids=input_ids, labels=labels).loss


def causal_lm_loss(output, labels):
    return F.cross_entropy(output.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())


def masked_lm_loss(output, labels):
    return F.cross_entropy(output.logits.flatten(0, 1), labels.flatten())


def build(name: str, batch: int, sequence: int):
    """(model, inputs, targets, loss_fn, description) under seed 0, dropout 0, train mode."""
    torch.manual_seed(0)
    ids = torch.randint(0, VOCAB, (batch, sequence))
    labels = ids.clone()
    if name == "gpt2":
        config = transformers.GPT2Config(n_layer=LAYERS, n_embd=WIDTH, n_head=HEADS, n_inner=FFN, vocab_size=VOCAB,
                                         n_positions=sequence, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                         use_cache=False, bos_token_id=0, eos_token_id=0)
        return (transformers.GPT2LMHeadModel(config).train(), (ids,), (labels,), causal_lm_loss,
                "GPT2LMHeadModel, next-token cross-entropy as loss_fn")
    if name == "bert":
        config = transformers.BertConfig(hidden_size=WIDTH, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                         intermediate_size=FFN, vocab_size=VOCAB, max_position_embeddings=sequence,
                                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        return (transformers.BertForMaskedLM(config).train(), (ids,), (labels,), masked_lm_loss,
                "BertForMaskedLM, cross-entropy on every token as loss_fn")
    if name == "llama":
        config = transformers.LlamaConfig(hidden_size=WIDTH, intermediate_size=FFN, num_hidden_layers=LAYERS,
                                          num_attention_heads=HEADS, num_key_value_heads=HEADS // 2,
                                          vocab_size=VOCAB, max_position_embeddings=sequence, use_cache=False,
                                          bos_token_id=0, eos_token_id=0, pad_token_id=0)
        return (CausalLMWithLabels(transformers.LlamaForCausalLM(config)).train(), (ids, labels), (),
                lambda loss: loss, "LlamaForCausalLM computing its own loss from labels (RMSNorm, rotary, GQA SDPA)")
    raise KeyError(name)


def measure(name: str, batch: int, sequence: int) -> dict:
    model, inputs, targets, loss_fn, description = build(name, batch, sequence)
    start = time.perf_counter()
    graph = planner.capture(model, inputs, loss_fn, targets=targets)
    capture_seconds = time.perf_counter() - start
    row = {"name": name, "description": description, "ops": len(graph.ops), "capture_seconds": capture_seconds,
           "parameters": sum(p.numel() for p in model.parameters())}
    store_all = planner.simulate(graph, planner.Schedule.store_all(graph))
    row["store_all"], row["resident"] = store_all.peak_bytes, graph.resident_bytes
    for budget in BUDGETS:
        start = time.perf_counter()
        try:
            chosen = planner.plan(graph, budget, op_variants=False)
            row[budget] = (chosen.overhead, chosen.predicted_peak_bytes, chosen.algorithm, time.perf_counter() - start)
        except planner.InfeasibleBudgetError as error:
            row[budget] = (None, error.min_feasible_bytes, "", time.perf_counter() - start)
    eager = copy.deepcopy(model)
    row["eager"] = planner.measure_step(eager, lambda: loss_fn(eager(*inputs), *targets).backward(),
                                        [*inputs, *targets]).peak_bytes
    return row


def render(rows: list[dict], batch: int, sequence: int, argv: list[str], seconds: float) -> str:
    lines = [f"```\n{command_line(argv)}\n```\n", environment_line() + f" transformers {transformers.__version__}.\n",
             f"Configs: {LAYERS} layers, width {WIDTH}, {HEADS} heads, feed-forward {FFN}, vocabulary {VOCAB}, "
             f"dropout 0, random weights; batch {batch}, sequence {sequence}. Peaks include parameters, `.grad`, "
             "the batch and activations (no optimizer state); overhead = simulated step time (cpu roofline) / "
             "store-all's − 1; fast mode is `planner.plan(graph, \"50%\")` etc. The eager column is one plain "
             f"PyTorch step measured by `planner.measure_step`. The whole run took {seconds:.0f} s.\n"]
    lines.append("| model | parameters | ops | store-all peak | eager measured peak | "
                 + " | ".join(f"fast mode at {b}" for b in BUDGETS) + " | capture s | plan s |")
    lines.append("|---|---:|---:|---:|---:|" + "---:|" * len(BUDGETS) + "---:|---:|")
    for row in rows:
        cells = []
        for budget in BUDGETS:
            overhead, peak, algorithm, _ = row[budget]
            cells.append(f"does not fit (lowest {peak / row['store_all']:.1%})" if overhead is None
                         else f"{overhead:+.1%} ({peak / row['store_all']:.1%}, `{algorithm}`)")
        plan_seconds = " / ".join(f"{row[b][3]:.2f}" for b in BUDGETS)
        lines.append(f"| {row['name']} | {row['parameters'] / 1e6:.1f}M | {row['ops']} | {format_bytes(row['store_all'])} | "
                     f"{format_bytes(row['eager'])} ({row['eager'] / row['store_all'] - 1:+.1%}) | "
                     + " | ".join(cells) + f" | {row['capture_seconds']:.2f} | {plan_seconds} |")
    lines.append("")
    lines.extend(f"- {row['name']}: {row['description']}" for row in rows)
    lines.append("\nCells: predicted overhead (simulated peak as % of store-all, winning algorithm). An eager peak "
                 "below store-all is transformers' explicit causal mask in the traced step, which the planned step "
                 "runs: kept where the model's forward takes no `position_ids` (the Llama wrapper here), replaced by "
                 "SDPA's `is_causal` as in eager where it does and the call leaves them unset (docs/reliability.md).")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["gpt2", "bert", "llama"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--sequence", type=int, default=256)
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args(argv[1:])
    start = time.perf_counter()
    rows = [measure(name, args.batch_size, args.sequence) for name in args.models]
    publish(SECTION_HEADING, render(rows, args.batch_size, args.sequence, argv, time.perf_counter() - start),
            args.markdown)


if __name__ == "__main__":
    main(sys.argv)
