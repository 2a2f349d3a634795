"""Command line: ``planner plan MODEL --batch-size N --budget B [--run]``."""
from __future__ import annotations

import argparse
import copy
import sys
import time

import torch

from planner.errors import PlannerError
from planner.units import format_bytes


def _plan_command(args: argparse.Namespace) -> int:
    from planner.capture import capture
    from planner.measure import measure_step, measure_training_step
    from planner.plan import plan
    from planner.simulate import simulate
    from planner.zoo import load_workload

    torch.manual_seed(args.seed)
    work = load_workload(args.model, args.batch_size, args.image_size)
    start = time.perf_counter()
    graph = capture(work.model, work.inputs, work.loss_fn, targets=work.targets)
    print(f"captured {args.model} batch {args.batch_size}: {len(graph.forward_ops)} forward + "
          f"{len(graph.backward_ops)} backward ops in {time.perf_counter() - start:.2f} s")
    for kind, nbytes in graph.summary().items():
        print(f"  {kind:<22} {format_bytes(nbytes)}")
    store_all = simulate(graph, graph.store_all())
    print(f"  {'activations (peak)':<22} {format_bytes(store_all.peak_activation_bytes)}")
    print(f"  {'store-all peak':<22} {format_bytes(store_all.peak_bytes)}\n")
    start = time.perf_counter()
    result = plan(graph, args.budget, mode=args.mode, algorithm=args.algorithm, cost_model=args.device_preset)
    print(f"planned in {time.perf_counter() - start:.2f} s\n{result}")
    if args.out:
        result.save(args.out)
        print(f"saved {args.out}")
    if args.run:
        _run_and_compare(work, result, measure_step, measure_training_step)
    return 0


def _run_and_compare(work, result, measure_step, measure_training_step) -> None:
    """Execute one planned step for real; compare peak with the prediction and grads with eager."""
    reference = copy.deepcopy(work.model)
    planned = result.apply(work.model, work.loss_fn)
    loss_fn = work.loss_fn or (lambda out: out.sum())
    measured = measure_step(work.model, lambda: loss_fn(planned(*work.inputs), *work.targets).backward(),
                            [*work.inputs, *work.targets])
    eager = measure_training_step(reference, work.inputs, work.loss_fn, work.targets)
    grads_equal = all(torch.equal(a.grad, b.grad) for a, b in zip(work.model.parameters(), reference.parameters()))
    print(f"\nran one planned training step: measured peak {format_bytes(measured.peak_bytes)} "
          f"(predicted {format_bytes(result.predicted_peak_bytes)}, "
          f"{measured.peak_bytes / result.predicted_peak_bytes - 1:+.2%}), "
          f"{measured.seconds:.2f} s; eager PyTorch {format_bytes(eager.peak_bytes)}, {eager.seconds:.2f} s; "
          f"gradients identical to eager: {grads_equal}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="planner", description="Plan PyTorch training under a memory budget.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("plan", help="capture a model, plan one training step under a budget")
    p.add_argument("model", help="torchvision:NAME or package.module:factory")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--budget", default="50%", help="bytes, '6GiB', '512MB' or '50%%' of the store-all peak")
    p.add_argument("--mode", default="fast")
    p.add_argument("--algorithm", default=None)
    p.add_argument("--device-preset", default=None, help="cost model preset: cpu, v100, a100, h100")
    p.add_argument("--out", default=None, help="save the plan as JSON")
    p.add_argument("--run", action="store_true", help="execute one planned step and measure it")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=_plan_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (PlannerError, ValueError, TypeError, FileNotFoundError) as error:
        if args.debug:
            raise
        print(f"planner: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
