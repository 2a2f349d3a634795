"""Hierarchical fast mode benchmark (issue 15): plan quality, smallest feasible budget, planning
time, and large language models built on the meta device.

Every schedule is judged by the simulator with the default cost model of its graph (the cpu
roofline preset for CPU graphs, as in the plan-quality and exact-mode sections; for meta-device
LLMs, the a100 preset). Sections:

- ``quality``: ``planner.plan(graph, budget, op_variants=False)`` (stock ops, so that the cells
  compare with the staged MILP's proven bounds, which are over the stock graph) at 70%, 50% and
  33% of store-all, next to the segment DP it replaces (``dp_reorder``), fast mode with operator
  variants (the default), the issue's target, and, with ``--bounds``, exact mode's proven lower
  bound on staged schedules (``planner.algorithms.milp.exact_search``, 60 s a cell);
- ``smallest``: the smallest budget fast mode meets (``InfeasibleBudgetError.min_feasible_bytes``
  at a 1-byte budget, then planned at that value to confirm), against the segment DP's least-memory
  plan (``dp_memory``) and ``memory_lower_bound``;
- ``time``: planning wall time, warm process (one untimed call first, then the median of three),
  at 50% with the default options, and the planning process's resident-memory growth;
- ``llm``: GPT-2 (24 layers, width 1024, sequence 1024), a Llama-7B shape (32 layers, width 4096,
  sequence 4096) and an 80-layer Llama-70B shape on the meta device: capture and planning time,
  store-all peak, and plans at resident memory + 50% and + 25% of store-all's activations.

Run from the repository root::

    python benchmarks/fast_mode.py                              # every section but the bounds
    python benchmarks/fast_mode.py --sections quality --bounds   # + exact mode's bounds (15 min)
    python benchmarks/fast_mode.py --markdown docs/benchmarks.md
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import planner  # noqa: E402
from planner.algorithms import ALGORITHMS  # noqa: E402
from planner.algorithms.bounds import memory_lower_bound  # noqa: E402
from planner.cost import default_cost_model  # noqa: E402
from plan_quality import MODELS  # noqa: E402
from report import command_line, environment_line, publish  # noqa: E402

SECTION_HEADING = "## Hierarchical fast mode (issue 15)"
BUDGETS = (70, 50, 33)
QUALITY_TARGETS = {("resnet50", 33): 12.0, ("resnet50", 50): 6.5, ("transformer_encoder", 33): 15.0,
                   ("transformer_encoder", 50): 4.5, ("mobilenet_v2", 33): 7.0, ("vgg16", 70): 2.0,
                   ("densenet121", 33): 10.0}
SMALLEST_TARGETS = {"resnet50": 24.0, "densenet121": 13.0, "mobilenet_v2": 25.0, "transformer_encoder": 23.0}
TIME_TARGETS = {"resnet50": 0.4, "densenet121": 1.5, "gpt2-24": 1.5, "llama-7b": 3.0, "llama-70b": 8.0, "lstm": 1.0}
QUALITY_MODELS = ("resnet50", "transformer_encoder", "mobilenet_v2", "vgg16", "densenet121")


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---- graphs ---------------------------------------------------------------------------------------
def vision_graph(name: str) -> planner.TrainingGraph:
    spec = MODELS[name]
    torch.manual_seed(0)
    model = spec.build().train()
    x = torch.randn(spec.input_shape)
    if spec.classes:
        return planner.capture(model, x, spec.loss_fn, targets=torch.randint(0, spec.classes, (spec.input_shape[0],)))
    return planner.capture(model, x)


def next_token_loss(output, labels):
    return F.cross_entropy(output.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())


def llm_graph(name: str) -> planner.TrainingGraph:
    """A transformers causal LM with random weights on the meta device, batch 1."""
    import transformers

    if name == "gpt2-24":
        config = transformers.GPT2Config(n_layer=24, n_embd=1024, n_head=16, n_positions=1024, use_cache=False,
                                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        factory, sequence = transformers.GPT2LMHeadModel, 1024
    else:
        big = name == "llama-70b"
        config = transformers.LlamaConfig(
            hidden_size=8192 if big else 4096, intermediate_size=28672 if big else 11008,
            num_hidden_layers=80 if big else 32, num_attention_heads=64 if big else 32,
            num_key_value_heads=8 if big else 32, vocab_size=32000, max_position_embeddings=4096, use_cache=False)
        factory, sequence = transformers.LlamaForCausalLM, 4096
    with torch.device("meta"):
        model = factory(config).train()
        ids = torch.randint(0, config.vocab_size, (1, sequence))
    return planner.capture(model, ids, next_token_loss, targets=ids.clone())


def lstm_graph() -> planner.TrainingGraph:
    """A 2-layer nn.LSTM over 64 steps, unrolled (oneDNN off: one op per step and gate)."""
    class Classifier(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = torch.nn.LSTM(32, 64, num_layers=2, batch_first=True)
            self.head = torch.nn.Linear(64, 10)

        def forward(self, x):
            return self.head(self.lstm(x)[0][:, -1])

    torch.manual_seed(0)
    with torch.backends.mkldnn.flags(enabled=False):
        return planner.capture(Classifier().train(), torch.randn(8, 64, 32))


# ---- measuring ---------------------------------------------------------------------------------------
def overhead(result: planner.SimResult, reference: planner.SimResult) -> float:
    return result.time / reference.time - 1


def _rss() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class RssPeak:
    """The largest resident-set size while the block runs (sampled every 5 ms)."""

    def __enter__(self):
        self.start = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(0.005)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())

    @property
    def growth(self) -> int:
        return self.peak - self.start


def timed_plan(graph, budget, repeats: int = 3, **options) -> tuple[float, planner.Plan, int]:
    """Median seconds of ``repeats`` warm calls, the plan, and the largest RSS growth."""
    planner.plan(graph, budget, **options)  # compiles numba kernels, fills caches
    seconds, growth = [], 0
    for _ in range(repeats):
        with RssPeak() as rss:
            start = time.perf_counter()
            chosen = planner.plan(graph, budget, **options)
            seconds.append(time.perf_counter() - start)
        growth = max(growth, rss.growth)
    return statistics.median(seconds), chosen, growth


def lowest_peak(graph, **options) -> int:
    try:
        planner.plan(graph, 1, **options)
    except planner.InfeasibleBudgetError as error:
        return error.min_feasible_bytes
    raise AssertionError("a 1-byte budget fits")


# ---- sections ---------------------------------------------------------------------------------------
@dataclass
class Cell:
    fast: str
    fast_overhead: float | None
    segment_dp: str
    variants: str
    target: float | None
    bound: float | None


def _fits_text(result, reference, budget_bytes) -> str:
    if result.peak_bytes > budget_bytes:
        return f"does not fit ({result.peak_bytes / reference.peak_bytes:.1%})"
    return f"{overhead(result, reference):+.2%} ({result.peak_bytes / reference.peak_bytes:.1%})"


def quality_section(graphs: dict, with_bounds: bool, time_limit: float) -> str:
    rows = ["| model | budget | fast mode | segment DP (`dp_reorder`) | fast mode, variants | target | "
            "exact bound | fast − bound |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name in QUALITY_MODELS:
        graph = graphs[name]
        cost = default_cost_model(graph)
        reference = planner.simulate(graph, planner.Schedule.store_all(graph), cost)
        for percent in BUDGETS:
            budget = reference.peak_bytes * percent // 100
            cell = _quality_cell(name, graph, cost, reference, budget, percent, with_bounds, time_limit)
            target = f"≤ +{cell.target:g}%" if cell.target is not None else ""
            bound = f"{cell.bound:+.2%}" if cell.bound is not None else ("—" if with_bounds else "")
            distance = (f"{100 * (cell.fast_overhead - cell.bound):.2f} pp"
                        if cell.bound is not None and cell.fast_overhead is not None else "")
            rows.append(f"| {name} | {percent}% | **{cell.fast}** | {cell.segment_dp} | {cell.variants} | {target} | "
                        f"{bound} | {distance} |")
            _log(rows[-1])
    return "\n".join(rows)


def _quality_cell(name, graph, cost, reference, budget, percent, with_bounds, time_limit) -> Cell:
    try:
        chosen = planner.plan(graph, budget, op_variants=False)
        fast, fast_overhead = f"{chosen.overhead:+.2%} ({chosen.predicted_peak_bytes / reference.peak_bytes:.1%})", \
            chosen.overhead
    except planner.InfeasibleBudgetError as error:
        fast, fast_overhead = f"does not fit ({error.min_feasible_bytes / reference.peak_bytes:.1%})", None
    segment = planner.simulate(graph, ALGORITHMS["dp_reorder"](graph, cost, budget), cost)
    try:
        with_variants = planner.plan(graph, budget)
        variants = f"{with_variants.overhead:+.2%}"
    except planner.InfeasibleBudgetError:
        variants = "does not fit"
    bound = None
    if with_bounds and fast_overhead is not None:
        from planner.algorithms.milp import exact_search

        exact = exact_search(graph, cost, budget, time_limit)
        if exact.lower_bound is not None and exact.lower_bound > float("-inf"):
            bound = exact.lower_bound / reference.time - 1
    return Cell(fast, fast_overhead, _fits_text(segment, reference, budget), variants,
                QUALITY_TARGETS.get((name, percent)), bound)


def smallest_section(graphs: dict) -> str:
    rows = ["| model | fast mode | segment DP (`dp_memory`) | `memory_lower_bound` | target |", "|---|---:|---:|---:|---:|"]
    for name in QUALITY_MODELS:
        graph = graphs[name]
        cost = default_cost_model(graph)
        store_all = planner.simulate(graph, planner.Schedule.store_all(graph), cost).peak_bytes
        lowest = lowest_peak(graph, op_variants=False)
        planned = planner.plan(graph, lowest, op_variants=False)  # the minimum is a budget that works
        assert planned.predicted_peak_bytes <= lowest
        segment = planner.simulate(graph, ALGORITHMS["dp_memory"](graph, cost, 1), cost).peak_bytes
        bound = memory_lower_bound(graph, cost)
        target = f"≤ {SMALLEST_TARGETS[name]:g}%" if name in SMALLEST_TARGETS else ""
        rows.append(f"| {name} | **{lowest / store_all:.1%}** | {segment / store_all:.1%} | {bound / store_all:.1%} | "
                    f"{target} |")
        _log(rows[-1])
    return "\n".join(rows)


def store_all_activations(graph) -> tuple[planner.SimResult, int]:
    """The store-all step's simulation and the bytes of activations at its peak."""
    reference = planner.simulate(graph, planner.Schedule.store_all(graph), default_cost_model(graph))
    return reference, reference.peak_bytes - graph.resident_bytes


def activation_budget(graph, share: float, activations: int | None = None) -> int:
    """Resident memory plus ``share`` of the store-all step's activations, in bytes (a language
    model's parameters are most of its peak: a share of the whole would leave no activations)."""
    if activations is None:
        _, activations = store_all_activations(graph)
    return int(graph.resident_bytes + share * activations)


def load_graph(name: str) -> planner.TrainingGraph:
    """The captured graph of a benchmark model: vision, ``lstm`` or a language model on meta."""
    return vision_graph(name) if name in MODELS else lstm_graph() if name == "lstm" else llm_graph(name)


def timing_budget(name: str, graph) -> tuple[int | str, str]:
    """The budget the planning-time section plans ``name`` at, and how the table names it."""
    if name == "lstm":
        return "90%", "90%"
    if name in MODELS:
        return "50%", "50%"
    return activation_budget(graph, 0.5), "resident + 50% of activations"


def time_section(graphs: dict) -> str:
    rows = ["| graph | ops | budget | planning time (median of 3, warm) | RSS growth | target |",
            "|---|---:|---|---:|---:|---:|"]
    for name in ("resnet50", "densenet121", "gpt2-24", "llama-7b", "llama-70b", "lstm"):
        graph = graphs[name]
        budget, label = timing_budget(name, graph)
        seconds, chosen, growth = timed_plan(graph, budget)
        rows.append(f"| {name} | {len(graph.ops)} | {label} | **{seconds:.2f} s** | {growth / 2**20:.0f} MiB | "
                    f"≤ {TIME_TARGETS[name]:g} s |")
        _log(rows[-1])
    return "\n".join(rows)


def llm_section(graphs: dict, capture_seconds: dict) -> str:
    rows = ["| model | ops | capture | store-all peak | resident | budget | plan | overhead | planning |",
            "|---|---:|---:|---:|---:|---|---:|---:|---:|"]
    for name in ("gpt2-24", "llama-7b", "llama-70b"):
        graph = graphs[name]
        reference, activations = store_all_activations(graph)
        for share in (0.5, 0.25):
            seconds, chosen, _ = timed_plan(graph, activation_budget(graph, share, activations), repeats=1)
            rows.append(f"| {name} | {len(graph.ops)} | {capture_seconds[name]:.0f} s | "
                        f"{planner.format_bytes(reference.peak_bytes)} | {planner.format_bytes(graph.resident_bytes)} | "
                        f"resident + {share:.0%} of activations | {planner.format_bytes(chosen.predicted_peak_bytes)} | "
                        f"{chosen.overhead:+.2%} | {seconds:.2f} s |")
            _log(rows[-1])
    return "\n".join(rows)


# ---- report ------------------------------------------------------------------------------------------
def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sections", default="quality,smallest,time,llm")
    parser.add_argument("--bounds", action="store_true", help="exact mode's proven bound per quality cell")
    parser.add_argument("--time-limit", type=float, default=60.0)
    parser.add_argument("--markdown", type=Path, metavar="PATH")
    args = parser.parse_args(argv[1:])
    sections = args.sections.split(",")
    began = time.perf_counter()
    graphs, capture_seconds = {}, {}
    needed = set(QUALITY_MODELS) if {"quality", "smallest"} & set(sections) else set()
    if "time" in sections:
        needed |= {"resnet50", "densenet121", "gpt2-24", "llama-7b", "llama-70b", "lstm"}
    if "llm" in sections:
        needed |= {"gpt2-24", "llama-7b", "llama-70b"}
    for name in sorted(needed):
        start = time.perf_counter()
        graphs[name] = load_graph(name)
        capture_seconds[name] = time.perf_counter() - start
        _log(f"captured {name}: {graphs[name]} in {capture_seconds[name]:.1f} s")
    parts = [f"```\n{command_line(argv)}\n```\n", environment_line()]
    if "quality" in sections:
        parts += ["\n### Plan quality\n", "Predicted overhead (simulated step time / store-all − 1) and peak (% of "
                  "store-all) on the plan-quality section's models (ResNet-50 and MobileNet-v2 batch 64, DenseNet-121 "
                  "batch 32, 224×224; VGG16 batch 64; transformer encoder 6×512, batch 32×128), cpu roofline. "
                  "`exact bound`: exact mode's proven lower bound on the overhead of any staged schedule "
                  f"({args.time_limit:.0f} s of HiGHS a cell).\n", quality_section(graphs, args.bounds, args.time_limit)]
    if "smallest" in sections:
        parts += ["\n### Smallest feasible budget\n", "As % of store-all; stock ops.\n", smallest_section(graphs)]
    if "time" in sections:
        parts += ["\n### Planning time\n", "`planner.plan(graph, budget)`: 50% of store-all for the vision models, resident memory + 50% "
                  "of the activations for the language models (their parameters are most of the peak), 90% for the "
                  "LSTM (its smallest budget is 84%), "
                  "with the default options (operator variants weighed too), warm process, 2 cores; RSS growth: the "
                  "planning process's largest resident-memory increase during a call.\n", time_section(graphs)]
    if "llm" in sections:
        parts += ["\n### Large language models on the meta device\n", "Random weights, batch 1, next-token "
                  "cross-entropy; default cost model of a meta graph (a100 roofline).\n", llm_section(graphs, capture_seconds)]
    body = "\n".join(parts) + f"\n\nThe whole run took {(time.perf_counter() - began) / 60:.1f} min.\n"
    publish(SECTION_HEADING, body, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
