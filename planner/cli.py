"""The ``planner`` command: plan, sweep, max-batch, show, run.

Exit codes: 0 success; 2 bad input (arguments, model spec, budget, files); 3 the budget cannot be
met; 4 the model cannot be planned or the plan does not match it. Errors print one line; add
``--debug`` for the traceback.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from planner.algorithms.solvers import DEFAULT_SOLVER, SOLVERS
from planner.budgets import parse_budget
from planner.capturing import capture
from planner.cost import RooflineCostModel, default_cost_model
from planner.errors import CaptureError, InfeasibleBudgetError, PlanMismatchError, PlannerError
from planner.execute import lower
from planner.measure import measure_step
from planner.planning import Plan, plan
from planner.plots import sweep_png, timeline_png
from planner.schedule import Schedule
from planner.search import DEFAULT_TIME_LIMIT
from planner.simulator import simulate
from planner.units import format_bytes, labelled_rows
from planner.variants import ALL_VARIANTS, BITWISE_VARIANTS
from planner.zoo import load_workload

EXIT_BAD_INPUT, EXIT_INFEASIBLE, EXIT_CANNOT_PLAN = 2, 3, 4
SWEEP_ALGORITHMS = ("fast", "checkpoint_all", "chen_sqrt", "chen_greedy", "chen_sqrt_linear", "chen_greedy_linear")
MAX_BATCH_ALGORITHMS = ("store_all", "checkpoint_all", "chen_sqrt", "chen_greedy", "fast")


# ---- shared pieces ------------------------------------------------------------------------------
def _progress(iterable, total: int | None = None, desc: str = "", quiet: bool = False):
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, disable=quiet, leave=False, file=sys.stderr)


def _cost(args: argparse.Namespace):
    return RooflineCostModel(args.device_preset) if args.device_preset else None


def _workload_spec(args: argparse.Namespace, batch_size: int | None = None) -> dict:
    return {"model": args.model, "batch_size": args.batch_size if batch_size is None else batch_size,
            "image_size": args.image_size}


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _workload(spec: dict):
    """The model, batch and loss ``spec`` names, built under seed 0 (a plan's file keeps ``spec``)."""
    torch.manual_seed(0)
    return load_workload(spec["model"], spec["batch_size"], spec.get("image_size"))


def _capture(spec: dict, quiet: bool = False):
    work = _workload(spec)
    with _progress(None, total=1, desc=f"capture {spec['model']} batch {spec['batch_size']}", quiet=quiet) as bar:
        graph = capture(work.model, work.inputs, work.loss_fn, targets=work.targets)
        bar.update(1)
    return work, graph


def _plan(graph, budget, algorithm: str, cost_model, variants_choice: str, time_limit: float | None = None,
          quiet: bool = True, solver: str = DEFAULT_SOLVER):
    op_variants = _OP_VARIANTS[variants_choice]
    if algorithm == "fast":
        return plan(graph, budget, mode="fast", cost_model=cost_model, op_variants=op_variants, solver=solver)
    if algorithm == "exact":
        limit = DEFAULT_TIME_LIMIT if time_limit is None else time_limit
        with _progress(None, total=round(limit), desc="exact (incumbent/bound overhead)", quiet=quiet) as bar:
            def progress(incumbent: float, bound: float, elapsed: float) -> None:
                bar.update(min(round(elapsed), bar.total) - bar.n)
                bar.set_postfix_str(f"{incumbent / store_all - 1:+.2%} / {bound / store_all - 1:+.2%}")

            store_all = simulate(graph, Schedule.store_all(graph), cost_model).time
            return plan(graph, budget, mode="exact", time_limit=limit, cost_model=cost_model, progress=progress,
                        op_variants=op_variants, solver=solver)
    return plan(graph, budget, algorithm=algorithm, cost_model=cost_model, op_variants=op_variants, solver=solver)


def _emit(args: argparse.Namespace, payload: Any, text: str) -> None:
    print(json.dumps(payload, indent=2, default=str) if args.json else text)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


# ---- plan -----------------------------------------------------------------------------------------
def _breakdown(graph, result) -> dict[str, int]:
    """What the predicted peak is made of (the workspace: of the op running at the peak)."""
    summary = graph.summary()
    simulated = simulate(graph, result.schedule)
    workspace = int(simulated.peak_bytes - simulated.timeline[simulated.peak_step])
    return {
        "parameters": summary.get("parameter", 0),
        "gradients (.grad)": summary.get("gradient accumulators", 0),
        "buffers + batch": summary.get("buffer", 0) + summary.get("input", 0) + summary.get("tangent", 0),
        "activations": simulated.peak_bytes - graph.resident_bytes - workspace,
        "workspace": workspace,
    }


def _plan_payload(result, graph, capture_seconds: float, plan_seconds: float) -> dict:
    lowered = lower(graph, result.schedule)
    kept_bytes = sum(graph.storages[s].nbytes for s in {graph.tensors[t].storage for t in lowered.carried})
    return {
        "algorithm": result.algorithm, "status": result.status, "gap": result.gap,
        "lower_bound_seconds": result.lower_bound, "message": result.message,
        "budget_bytes": result.budget_bytes, "store_all_peak_bytes": result.store_all_peak_bytes,
        "predicted_peak_bytes": result.predicted_peak_bytes, "overhead": result.overhead,
        "recomputations": result.recomputations, "recomputed_ops": len(result.schedule.recomputed_ops()),
        "kept_tensors": len(lowered.carried), "kept_bytes": kept_bytes,
        "variants": list(result.variants), "variants_summary": result.variants_summary,
        "breakdown": _breakdown(graph, result), "cost_model": result.cost_model,
        "capture_seconds": capture_seconds, "plan_seconds": plan_seconds,
    }


def _plan_text(result: Plan, payload: dict) -> str:
    """The plan as it prints itself, then what the command line adds: the predicted peak's parts,
    what is kept and recomputed, and the time taken."""
    breakdown = ", ".join(f"{part} {format_bytes(n)}" for part, n in payload["breakdown"].items())
    return str(result) + "\n" + labelled_rows([
        ("peak breakdown", breakdown),
        ("kept for backward", f"{payload['kept_tensors']} tensors, {format_bytes(payload['kept_bytes'])}"),
        ("recomputed", f"{payload['recomputed_ops']} ops, {payload['recomputations']} extra computations"),
        ("time", f"capture {payload['capture_seconds']:.2f} s, planning {payload['plan_seconds']:.2f} s"),
    ])


def cmd_plan(args: argparse.Namespace) -> int:
    spec = _workload_spec(args)
    start = time.perf_counter()
    work, graph = _capture(spec)
    capture_seconds = time.perf_counter() - start
    start = time.perf_counter()
    result = _plan(graph, args.budget, args.algorithm or args.mode, _cost(args), args.op_variants, args.time_limit,
                   quiet=args.json, solver=args.solver)
    plan_seconds = time.perf_counter() - start
    result.workload = spec
    payload = _plan_payload(result, result.graph, capture_seconds, plan_seconds)
    if args.out:
        result.save(args.out)
        payload["saved"] = str(args.out)
    text = _plan_text(result, payload) + (f"\nsaved {args.out}" if args.out else "")
    if args.run:
        payload["run"] = _run(work, result, steps=1)
        text += "\n" + _run_text(payload["run"])
    _emit(args, payload, text)
    return 0


# ---- run ------------------------------------------------------------------------------------------
def _run(work, result, steps: int) -> dict:
    """Execute planned steps for real; compare peak with the prediction and grads with eager."""
    reference = copy.deepcopy(work.model)
    planned = result.apply(work.model, work.loss_fn, replan=False)  # run exactly this plan
    loss_fn = work.loss_fn or (lambda out: out.sum())
    def stepper(module):
        calls = iter(range(10**9))

        def step():  # the k-th step of either model draws the same random numbers (dropout)
            torch.manual_seed(next(calls))
            loss_fn(module(*work.inputs), *work.targets).backward()
        return step

    planned_step, eager_step = stepper(planned), stepper(reference)
    held = [*work.inputs, *work.targets]
    # one metered step each (the meter's dispatch hook slows it: not timed), then timed steps
    measured = measure_step(work.model, planned_step, held)
    eager = measure_step(reference, eager_step, held)
    planned_seconds, eager_seconds = _seconds(planned_step, steps), _seconds(eager_step, steps)
    grads_equal = all(torch.equal(a.grad, b.grad) for a, b in zip(work.model.parameters(), reference.parameters()))
    return {
        "steps": steps, "measured_peak_bytes": measured.peak_bytes,
        "predicted_peak_bytes": result.predicted_peak_bytes, "seconds_per_step": planned_seconds,
        "eager_peak_bytes": eager.peak_bytes, "eager_seconds_per_step": eager_seconds,
        "gradients_equal_to_eager": grads_equal,
    }


def _seconds(step, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def _run_text(run: dict) -> str:
    return (f"ran 1 metered + {run['steps']} timed planned step(s): measured peak {format_bytes(run['measured_peak_bytes'])} "
            f"(predicted {format_bytes(run['predicted_peak_bytes'])}, "
            f"{run['measured_peak_bytes'] / run['predicted_peak_bytes'] - 1:+.2%}), "
            f"{run['seconds_per_step']:.2f} s/step; eager PyTorch {format_bytes(run['eager_peak_bytes'])}, "
            f"{run['eager_seconds_per_step']:.2f} s/step; gradients identical to eager: "
            f"{run['gradients_equal_to_eager']}")


def _load_plan_with_workload(path: Path):
    if not path.exists():
        raise FileNotFoundError(f"no plan file {path}")
    result = Plan.load(path)
    if not result.workload:
        raise ValueError(f"{path} does not say which model it is for (it was not made by the CLI): "
                         "use Plan.load(...).apply(model) in Python")
    return result


def cmd_run(args: argparse.Namespace) -> int:
    result = _load_plan_with_workload(Path(args.plan))
    work = _workload(result.workload)  # apply() captures it and checks the plan against it
    payload = _run(work, result, args.steps)
    _emit(args, payload, _run_text(payload))
    return 0


# ---- show -----------------------------------------------------------------------------------------
def cmd_show(args: argparse.Namespace) -> int:
    result = _load_plan_with_workload(Path(args.plan))
    work = _workload(result.workload)
    graph = result.graph_for(work.model, work.loss_fn, work.inputs, work.targets)  # checked as apply() checks
    spec = result.workload
    title = (f"{spec['model']}, batch {spec['batch_size']}: {result.algorithm}, "
             f"budget {format_bytes(result.budget_bytes)}, overhead {result.overhead:+.1%}")
    timeline_png(graph, result.schedule, default_cost_model(graph), args.png, result.budget_bytes, title)
    _emit(args, {"png": str(args.png)}, f"wrote {args.png}")
    return 0


# ---- sweep ----------------------------------------------------------------------------------------
def _parse_budgets(text: str) -> list[str]:
    budgets = [b.strip() for b in text.split(",") if b.strip()]
    if not budgets or not all(b.endswith("%") for b in budgets):
        raise ValueError(f"--budgets takes percentages of the store-all peak, e.g. 100%,80%,60%; got {text!r}")
    return budgets


def cmd_sweep(args: argparse.Namespace) -> int:
    budgets = _parse_budgets(args.budgets)
    algorithms = args.algorithms.split(",") if args.algorithms else list(SWEEP_ALGORITHMS)
    _, graph = _capture(_workload_spec(args))
    cost_model = _cost(args)
    rows = []
    cells = [(a, b) for b in budgets for a in algorithms]
    for algorithm, budget in _progress(cells, desc="sweep", quiet=args.json):
        fraction = parse_budget(budget, 100) / 100
        try:
            result = _plan(graph, budget, algorithm, cost_model, args.op_variants)
            rows.append({"algorithm": algorithm, "budget": budget, "budget_fraction": fraction,
                         "overhead": result.overhead, "peak_bytes": result.predicted_peak_bytes})
        except InfeasibleBudgetError:
            rows.append({"algorithm": algorithm, "budget": budget, "budget_fraction": fraction,
                         "overhead": None, "peak_bytes": None})
    if args.png:
        sweep_png(rows, args.png, f"{args.model}, batch {args.batch_size}")
    table = _table(["algorithm", *budgets], [
        [a, *[(f"{r['overhead']:+.1%}" if r["overhead"] is not None else "—")
              for b in budgets for r in rows if r["algorithm"] == a and r["budget"] == b]]
        for a in algorithms])
    _emit(args, {"rows": rows, "png": args.png},
          "compute overhead at each budget (— : does not fit)\n" + table + (f"\nwrote {args.png}" if args.png else ""))
    return 0


# ---- max-batch ------------------------------------------------------------------------------------
def cmd_max_batch(args: argparse.Namespace) -> int:
    memory = parse_budget(args.memory)
    algorithms = args.algorithms.split(",") if args.algorithms else list(MAX_BATCH_ALGORITHMS)
    cost_model = _cost(args)
    graphs: dict[int, Any] = {}

    def fits(algorithm: str, batch: int) -> bool:
        if batch not in graphs:
            graphs[batch] = _capture(_workload_spec(args, batch))[1]
        try:
            _plan(graphs[batch], memory, algorithm, cost_model, args.op_variants)
            return True
        except InfeasibleBudgetError:
            return False

    best = {}
    for algorithm in _progress(algorithms, desc="max-batch", quiet=args.json):
        low, high = 0, 1
        while high <= args.limit and fits(algorithm, high):
            low, high = high, high * 2
        high = min(high, args.limit + 1)
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (middle, high) if fits(algorithm, middle) else (low, middle)
        best[algorithm] = low
    table = _table(["algorithm", "largest batch"], [[a, str(b) if b else "none fits"] for a, b in best.items()])
    _emit(args, {"memory_bytes": memory, "max_batch": best},
          f"largest batch of {args.model} within {format_bytes(memory)}\n{table}")
    return 0


# ---- parser ---------------------------------------------------------------------------------------
def _model_arguments(parser: argparse.ArgumentParser, batch_default: int | None = 32) -> None:
    parser.add_argument("model", help="torchvision:NAME, preset:transformer, preset:transformer-tiny, preset:unet, "
                        "preset:unet-tiny, or module:factory")
    if batch_default is not None:
        parser.add_argument("--batch-size", type=_positive, default=batch_default)
    parser.add_argument("--image-size", type=_positive, default=None, help="image side for vision models")
    parser.add_argument("--device-preset", choices=["cpu", "v100", "a100", "h100"], default=None,
                        help="roofline cost model (default: the graph's device)")
    parser.add_argument("--op-variants", choices=sorted(_OP_VARIANTS), default="on",
                        help="low-memory operator implementations: on (bitwise-stock gradients: "
                             f"{', '.join(sorted(BITWISE_VARIANTS))}; default), all (adds "
                             f"{', '.join(sorted(ALL_VARIANTS - BITWISE_VARIANTS))}), off (stock PyTorch ops only)")


_OP_VARIANTS = {"on": True, "all": "all", "off": False}  # --op-variants -> plan(op_variants=...)


class UsageError(ValueError):
    """Bad command-line arguments (reported in one line, exit code 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UsageError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="planner", description="Plan PyTorch training under a memory budget.",
                     epilog=__doc__.split("\n\n")[1])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("plan", help="plan one training step under a budget")
    _model_arguments(p)
    p.add_argument("--budget", default="50%", help="bytes, '6GiB', '512MB' or '50%%' of the store-all peak")
    p.add_argument("--mode", choices=["fast", "exact"], default="fast",
                   help="fast: about a second; exact: the MILP, optimal or with a proven gap")
    p.add_argument("--time-limit", type=float, default=None, help="seconds for exact mode (default 60)")
    p.add_argument("--solver", choices=list(SOLVERS), default=DEFAULT_SOLVER,
                   help="exact mode's MILP solver: highs (installed), cpsat or scip (the extras of the same names)")
    p.add_argument("--algorithm", default=None, help="one algorithm instead of a mode (see planner.algorithms)")
    p.add_argument("--out", type=Path, default=None, help="save the plan as JSON")
    p.add_argument("--run", action="store_true", help="execute one planned step and measure it")
    p.set_defaults(handler=cmd_plan)

    p = commands.add_parser("sweep", help="overhead against budget for several algorithms")
    _model_arguments(p)
    p.add_argument("--budgets", default="100%,90%,80%,70%,60%,50%,40%,30%,20%")
    p.add_argument("--algorithms", default=None, help=f"comma-separated (default: {','.join(SWEEP_ALGORITHMS)})")
    p.add_argument("--png", type=Path, default=None)
    p.set_defaults(handler=cmd_sweep)

    p = commands.add_parser("max-batch", help="largest batch each algorithm fits in a memory size")
    _model_arguments(p, batch_default=None)
    p.add_argument("--memory", required=True, help="device memory, e.g. 16GiB")
    p.add_argument("--algorithms", default=None, help=f"comma-separated (default: {','.join(MAX_BATCH_ALGORITHMS)})")
    p.add_argument("--limit", type=_positive, default=4096, help="largest batch size tried")
    p.set_defaults(handler=cmd_max_batch)

    p = commands.add_parser("show", help="picture of a saved plan's memory over the step")
    p.add_argument("plan", help="plan JSON written by 'planner plan --out'")
    p.add_argument("--png", type=Path, required=True)
    p.set_defaults(handler=cmd_show)

    p = commands.add_parser("run", help="execute a saved plan's training steps and measure them")
    p.add_argument("plan", help="plan JSON written by 'planner plan --out'")
    p.add_argument("--steps", type=_positive, default=2)
    p.set_defaults(handler=cmd_run)
    return parser


def _exit_code(error: Exception) -> int:
    if isinstance(error, InfeasibleBudgetError):
        return EXIT_INFEASIBLE
    if isinstance(error, (CaptureError, PlanMismatchError)):
        return EXIT_CANNOT_PLAN
    return EXIT_BAD_INPUT


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = build_parser().parse_args(argv)
        return args.handler(args)
    except (PlannerError, ValueError, TypeError, FileNotFoundError, IsADirectoryError) as error:
        if "--debug" in argv:
            raise
        print(f"planner: error: {error}", file=sys.stderr)
        return _exit_code(error)


if __name__ == "__main__":
    sys.exit(main())
