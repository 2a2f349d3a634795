"""Exact-mode benchmark: the MILP on HiGHS against fast mode, with its proven bounds.

Why: issues 5 and 16 ask how close exact mode gets to a proven optimum in 60 s on this 2-core
machine, where Checkmate's and MONeT's Gurobi runs took hours. Per model (plan_quality's set:
random weights, train mode, captured once with fake tensors) and budget (% of store-all's peak, or
``min``: the least budget that both fast mode and some staged schedule fit):

- fast mode's predicted overhead (simulated time / store-all time - 1), stock ops;
- exact mode's search (``planner.algorithms.milp.exact_search`` with fast mode's plans as starts,
  as ``plan(mode="exact", time_limit=...)`` runs it): the MIP start that entered the solver, the
  MILP's incumbent, HiGHS's root and final bounds, the gap ((incumbent - bound) / incumbent, on
  the whole step), the status ``plan`` reports (``fallback`` where fast mode's plan is faster: it
  lies outside the staged class), wall time;
- the MILP's size (binaries);
- the universal bound (``planner.algorithms.bounds.recompute_lower_bound``: valid for every
  schedule, not just staged ones) and the gap of the plan ``plan`` returns (the faster of fast
  mode's and the MILP's) against it: a gap over every schedule;
- with ``--bounds-only``: the universal bound alone (no MILP), against fast mode's plan, with
  the seconds it took; ``min`` there is fast mode's least budget (no staged search).
- with ``--solver highs cpsat scip``: each cell once per solver, one after another (interleaved,
  so a busy machine slows them alike); CP-SAT and SCIP are the optional extras.
- with ``--window-share 0.3 0``: each cell once per share of the solver's time kept for the
  window search (``milp.WINDOW_SHARE``; 0: the rounds get all of it, and the window search only
  what they leave), interleaved the same way; ``--window-gap 0`` gives it that share in every
  cell, not only where the start is more than ``milp.WINDOW_GAP`` above the universal bound;
- with ``--whole-nonzeros 0 100000``: each cell once per ``milp.WHOLE_NONZEROS`` (the largest
  MILP solved at once rather than by rounds of phase rows), interleaved the same way.

The MILP's bounds are over *staged* schedules (``planner.algorithms.milp.SCHEDULE_CLASS``); the
universal bound is over every schedule.

Run from the repository root (about 2 minutes a cell)::

    python benchmarks/exact_mode.py --models resnet50 transformer_encoder --budgets 50 33
    python benchmarks/exact_mode.py --models vgg16 --budgets min --markdown docs/benchmarks.md
    python benchmarks/exact_mode.py --models resnet50 --budgets 33 --solver highs cpsat scip
    python benchmarks/exact_mode.py --bounds-only --budgets 50 33 min
"""
from __future__ import annotations

import argparse
import itertools
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import planner
from planner.algorithms.bounds import memory_lower_bound, recompute_lower_bound, step_time_lower_bound
from planner.algorithms import milp
from planner.algorithms.milp import exact_search, lowest_peak_search
from planner.algorithms.solvers import SOLVERS
from planner.cost import default_cost_model
from planner.errors import InfeasibleBudgetError
from planner.simulator import simulate
from plan_quality import MODELS
from report import command_line, environment_line, publish

SECTION_HEADING = "## Exact mode (issues 5 and 16)"


def capture_model(name: str) -> planner.TrainingGraph:
    spec = MODELS[name]
    torch.manual_seed(0)
    model = spec.build().train()
    inputs = torch.randn(spec.input_shape)
    targets = (torch.randint(0, spec.classes, (spec.input_shape[0],)),) if spec.classes else ()
    return planner.capture(model, inputs, spec.loss_fn, targets=targets)


@dataclass(frozen=True)
class Arm:
    """One setting a cell runs under: the solver and the two exact-search knobs the A/B options vary."""

    solver: str
    window_share: float
    whole_nonzeros: int

    def apply(self) -> None:
        milp.WINDOW_SHARE = self.window_share
        milp.WHOLE_NONZEROS = self.whole_nonzeros


# the settings an A/B can vary: column heading, ``Arm`` field, how its cells print it
ARM_SETTINGS = (("solver", "solver", str), ("window share", "window_share", "{:g}".format),
                ("whole MILP up to (non-zeros)", "whole_nonzeros", str))


def arms_of(solvers: list[str], shares: list[float], wholes: list[int]) -> tuple[list[Arm], list[tuple]]:
    """Every combination of the settings, and the ``ARM_SETTINGS`` that vary (their columns)."""
    arms = [Arm(*combo) for combo in itertools.product(solvers, shares, wholes)]
    varying = [setting for setting, values in zip(ARM_SETTINGS, (solvers, shares, wholes)) if len(values) > 1]
    return arms, varying


def budget_rows(name: str, graph: planner.TrainingGraph, budgets: list[str], time_limit: float,
                arms: list[Arm], varying: list[tuple]) -> list[str]:
    cost_model = default_cost_model(graph)
    reference = simulate(graph, planner.Schedule.store_all(graph), cost_model)

    def overhead(seconds: float | None) -> str:
        return f"{seconds / reference.time - 1:+.2%}" if seconds is not None and math.isfinite(seconds) else "none"

    rows = []
    for percent in budgets:
        budget, least_peak_starts = _budget(graph, reference, percent, time_limit)
        head = [name, f"{percent}%" if percent not in ("min", "least")
                else f"{percent} ({budget / reference.peak_bytes:.1%})"]
        try:
            fast = planner.plan(graph, budget, op_variants=False, cost_model=cost_model)
            head.append(f"{fast.overhead:+.2%}")
        except InfeasibleBudgetError:
            fast = None
            head.append("does not fit")
        universal = step_time_lower_bound(graph, cost_model, budget)  # exact_search's own, timed there
        for arm in arms:  # interleaved: one after another
            arm.apply()
            began = time.perf_counter()
            exact = exact_search(graph, cost_model, budget, time_limit,
                                 starts=([fast.schedule] if fast else []) + least_peak_starts, solver=arm.solver)
            seconds = time.perf_counter() - began
            if exact.schedule is None:
                status = "fallback" if fast is not None else "infeasible"
            elif fast is not None and fast.predicted_time < exact.time:
                status = "fallback"
            else:
                status = "optimal" if exact.optimal else "feasible"
            gap = (exact.time - exact.lower_bound) / exact.time \
                if exact.time and math.isfinite(exact.lower_bound) else None
            times = [t for t in (exact.time, fast.predicted_time if fast else None) if t is not None]
            chosen = min(times) if times else None  # what plan(mode="exact") returns
            cells = head + [show(getattr(arm, field)) for _, field, show in varying] + [
                status, overhead(exact.start_time), overhead(exact.time), overhead(exact.root_bound),
                overhead(exact.lower_bound), f"{gap:.2%}" if gap is not None else "n/a", overhead(universal),
                f"{(chosen - universal) / chosen:.2%}" if chosen else "n/a", f"{seconds:.1f}", str(exact.binaries)]
            rows.append("| " + " | ".join(cells) + " |")
            print(rows[-1], f"({exact.message})", flush=True)
    return rows


def bound_rows(name: str, graph: planner.TrainingGraph, budgets: list[str], time_limit: float) -> list[str]:
    """The universal bound alone (no MILP) against fast mode's plan; ``min``: fast mode's least
    budget; ``least``: exact mode's least staged peak, searched for ``time_limit``."""
    cost_model = default_cost_model(graph)
    reference = simulate(graph, planner.Schedule.store_all(graph), cost_model)
    recompute_lower_bound(graph, cost_model, reference.peak_bytes // 2)  # compiled (and SciPy imported) untimed
    rows = []
    for percent in budgets:
        budget = _fast_lowest(graph) if percent == "min" else _budget(graph, reference, percent, time_limit)[0]
        try:
            fast = planner.plan(graph, budget, op_variants=False, cost_model=cost_model)
        except InfeasibleBudgetError:
            fast = None
        began = time.perf_counter()
        bound = recompute_lower_bound(graph, cost_model, budget)
        seconds = time.perf_counter() - began
        universal = reference.time + bound.seconds
        label = f"{percent}%" if percent not in ("min", "least") else f"{percent} ({budget / reference.peak_bytes:.1%})"
        cells = [name, label,
                 f"{fast.overhead:+.2%}" if fast else "does not fit",
                 f"{bound.seconds / reference.time:+.2%}" if math.isfinite(bound.seconds) else "nothing fits",
                 f"{(fast.predicted_time - universal) / fast.predicted_time:.2%}" if fast else "n/a",
                 f"{bound.floor_bytes / reference.peak_bytes:.1%}",
                 f"{memory_lower_bound(graph, cost_model) / reference.peak_bytes:.1%}", f"{seconds:.3f}"]
        rows.append("| " + " | ".join(cells) + " |")
        print(rows[-1], flush=True)
    return rows


def _budget(graph, reference, percent: str, time_limit: float) -> tuple[int, list[planner.Schedule]]:
    """``percent`` of store-all's peak; ``min``: the least budget both fast mode and some staged
    schedule fit (fast mode's smallest, raised to the least staged peak found when above it);
    ``least``: the least staged peak exact mode finds (``lowest_peak_search``, untimed), with its
    schedule, the one start known to fit there."""
    if percent not in ("min", "least"):
        return int(reference.peak_bytes * float(percent) / 100), []
    fast = _fast_lowest(graph)
    plan = planner.plan(graph, fast, op_variants=False)
    staged = lowest_peak_search(graph, default_cost_model(graph), time_limit, starts=[plan.schedule])
    if percent == "least":
        return staged.peak_bytes, [staged.schedule]
    return max(fast, staged.peak_bytes or fast), []


def _fast_lowest(graph) -> int:
    try:
        planner.plan(graph, 1, op_variants=False)
    except InfeasibleBudgetError as error:
        return error.min_feasible_bytes
    raise AssertionError("a 1-byte budget fits")


def lowest_row(name: str, graph: planner.TrainingGraph, time_limit: float) -> str:
    """Exact mode's least peak (``lowest_peak_search``, from fast mode's least-peak plan) against
    fast mode's smallest budget and ``memory_lower_bound``, as % of store-all's peak."""
    cost_model = default_cost_model(graph)
    store_all = simulate(graph, planner.Schedule.store_all(graph), cost_model).peak_bytes
    fast = _fast_lowest(graph)
    fast_plan = planner.plan(graph, fast, op_variants=False, cost_model=cost_model)
    began = time.perf_counter()
    lowest = lowest_peak_search(graph, cost_model, time_limit, starts=[fast_plan.schedule])
    seconds = time.perf_counter() - began
    found = f"{lowest.peak_bytes / store_all:.1%}" if lowest.peak_bytes is not None else "none"
    row = (f"| {name} | {fast / store_all:.1%} | {found} | {lowest.lower_bound_bytes / store_all:.1%} | "
           f"{'optimal' if lowest.optimal else 'feasible'} | {memory_lower_bound(graph, cost_model) / store_all:.1%} | "
           f"{seconds:.1f} |")
    print(row, f"({lowest.message})", flush=True)
    return row


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--budgets", nargs="*", default=["50", "33"],
                        help="%% of store-all's peak, min (fast mode's least) or least (exact mode's)")
    parser.add_argument("--lowest", action="store_true", help="exact mode's least peak per model")
    parser.add_argument("--bounds-only", action="store_true", help="the universal bound alone, no MILP")
    parser.add_argument("--time-limit", type=float, default=60.0)
    parser.add_argument("--solver", nargs="+", default=["highs"], choices=list(SOLVERS),
                        help="the MILP solver(s); several run interleaved, cell by cell (cpsat, scip: extras)")
    parser.add_argument("--window-share", nargs="+", type=float, default=[milp.WINDOW_SHARE],
                        help="the solver's time kept for the window search (several: interleaved, cell by cell)")
    parser.add_argument("--whole-nonzeros", nargs="+", type=int, default=[milp.WHOLE_NONZEROS],
                        help="the most non-zeros of a MILP solved at once, not by rounds (several: interleaved)")
    parser.add_argument("--window-gap", type=float, default=milp.WINDOW_GAP,
                        help="how far above the universal bound a start must be for the window search to get time")
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args(argv)
    milp.WINDOW_GAP = args.window_gap
    arms, varying = arms_of(args.solver, args.window_share, args.whole_nonzeros)
    rows, lowest, bounds = [], [], []
    for name in args.models:
        graph = capture_model(name)
        if args.bounds_only:
            bounds += bound_rows(name, graph, args.budgets, args.time_limit)
            continue
        rows += budget_rows(name, graph, args.budgets, args.time_limit, arms, varying)
        if args.lowest:
            lowest.append(lowest_row(name, graph, args.time_limit))
    parts = [f"Command: `{command_line(['benchmarks/exact_mode.py'] + argv)}`", "", environment_line(), ""]
    if rows:
        columns = ["model", "budget", "fast", *(heading for heading, _, _ in varying), "exact status", "MIP start",
                   "MILP incumbent", "root bound", "final bound", "gap", "universal bound", "gap, every schedule",
                   "seconds", "binaries"]
        rules = ["---", "---", "---:", *(["---"] * len(varying)), "---", *(["---:"] * 9)]
        parts += ["| " + " | ".join(columns) + " |", "|" + "|".join(rules) + "|", *rows, ""]
    if lowest:
        parts += ["Lowest feasible budget, % of store-all's peak:", "",
                  "| model | fast mode | exact: least peak found | exact: proven bound | exact status | "
                  "`memory_lower_bound` | seconds |", "|---|---:|---:|---:|---|---:|---:|", *lowest]
    if bounds:
        parts += ["Universal bound alone (every schedule), overheads on store-all's step; peaks as % of "
                  "store-all's:", "",
                  "| model | budget | fast | universal bound | gap of fast mode's plan | universal least peak | "
                  "`memory_lower_bound` | bound seconds |", "|---|---|---:|---:|---:|---:|---:|---:|", *bounds]
    body = "\n".join(parts)
    publish(SECTION_HEADING, body, args.markdown)


if __name__ == "__main__":
    main(sys.argv[1:])
