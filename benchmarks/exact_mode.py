"""Exact-mode benchmark: the MILP on HiGHS against fast mode, with its proven bound.

Why: issue 5 asks how close exact mode gets to a proven optimum in 60 s on this 2-core machine,
where Checkmate's and MONeT's Gurobi runs took hours. Per model (plan_quality's set: random
weights, train mode, captured once with fake tensors) and budget (50% and 33% of store-all):

- fast mode's predicted overhead (simulated time / store-all time - 1);
- exact mode (``planner.plan(graph, budget, mode="exact", time_limit=60)``): status, overhead,
  the proven lower bound on the overhead, the gap ((time - bound) / time, on the whole step),
  wall time from the call to the answer;
- the LP relaxation's bound (solved separately, not part of exact mode's time);
- the MILP's size (binaries).

Bounds are over *staged* schedules (forward once in graph order, whole coarsened nodes
recomputed before backward ops; see ``planner.algorithms.milp``); fast mode's reordered plans
can lie outside that set, which is why exact mode keeps fast mode's plan when it is faster.

Run from the repository root (about 12 minutes)::

    python benchmarks/exact_mode.py
    python benchmarks/exact_mode.py --models resnet50 --time-limit 60 --markdown docs/benchmarks.md
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import planner
from planner.algorithms.milp import formulate, lp_bound
from planner.algorithms.staging import build_problem
from planner.cost import default_cost_model
from planner.errors import InfeasibleBudgetError
from planner.simulator import simulate
from plan_quality import MODELS
from report import command_line, environment_line, publish

SECTION_HEADING = "## Exact mode (issue 5)"
BUDGETS = (50, 33)


def run_model(name: str, time_limit: float) -> list[str]:
    spec = MODELS[name]
    torch.manual_seed(0)
    model = spec.build().train()
    inputs = torch.randn(spec.input_shape)
    targets = (torch.randint(0, spec.classes, (spec.input_shape[0],)),) if spec.classes else ()
    graph = planner.capture(model, inputs, spec.loss_fn, targets=targets)
    cost_model = default_cost_model(graph)
    reference = simulate(graph, graph.store_all(), cost_model)
    rows = []
    for percent in BUDGETS:
        budget = int(reference.peak_bytes * percent / 100)
        cells = [name, f"{percent}%"]
        try:
            fast = planner.plan(graph, budget, op_variants=False)
            cells.append(f"{fast.overhead:+.2%}")
        except InfeasibleBudgetError:
            cells.append("does not fit")
        began = time.perf_counter()
        try:
            exact = planner.plan(graph, budget, mode="exact", time_limit=time_limit, op_variants=False)
        except InfeasibleBudgetError as error:
            status = f"infeasible (min {error.min_feasible_bytes / reference.peak_bytes:.1%})"
            rows.append("| " + " | ".join(cells + [status, "", "", "", f"{time.perf_counter() - began:.1f}", "", ""])
                        + " |")
            continue
        seconds = time.perf_counter() - began
        bound = (f"{exact.lower_bound / reference.time - 1:+.2%}" if exact.lower_bound is not None else "none")
        gap = f"{exact.gap:.2%}" if exact.gap is not None else "n/a"
        form = formulate(build_problem(graph, cost_model), budget)
        lp = lp_bound(form, 120.0)
        cells += [exact.status, f"{exact.overhead:+.2%}", bound, gap, f"{seconds:.1f}",
                  f"{(lp + form.problem.base_time) / reference.time - 1:+.2%}", str(form.n_columns)]
        rows.append("| " + " | ".join(cells) + " |")
        print(rows[-1], flush=True)
    return rows


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--time-limit", type=float, default=60.0)
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args(argv)
    rows = [row for name in args.models for row in run_model(name, args.time_limit)]
    body = "\n".join([
        f"Command: `{command_line(['benchmarks/exact_mode.py'] + argv)}`",
        "",
        environment_line(),
        "",
        "| model | budget | fast | exact status | exact | bound | gap | seconds | LP bound | binaries |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|",
        *rows,
    ])
    publish(SECTION_HEADING, body, args.markdown)


if __name__ == "__main__":
    main(sys.argv[1:])
