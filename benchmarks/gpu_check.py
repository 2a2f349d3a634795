"""One command that validates everything CUDA, in at most ``--seconds`` (default 480).

    python3 benchmarks/gpu_check.py OUT_DIR                     # on a GPU machine
    python benchmarks/gpu_check.py OUT_DIR --device cpu --small  # the same code at test sizes (tests/test_gpu_check.py)
    python benchmarks/gpu_check.py --insert OUT_DIR/gpu_check.md --markdown docs/benchmarks.md

Writes ``OUT_DIR/gpu_check.md`` (a section for docs/benchmarks.md) and ``OUT_DIR/gpu_check.json``
after every stage, so a run stopped by a time limit still leaves what it measured. Needs no
installed project (``checkout.py`` imports this checkout) and no network. Stages, each isolated
(a failure is recorded and the next stage runs) and each given part of the time:

1. environment: Python, PyTorch, CUDA device, CuPy, how ``planner`` was imported, and the
   project's pinned torch against the one running.
2. install: CuPy (the ``[gpu]`` extra) from the wheels in ``--wheels`` (default ``.whl/`` in
   the checkout) with ``pip --isolated --no-index``, unless CuPy already imports; a failure is
   reported and the checks go on with the PyTorch twins.
3. gpu tests: ``pytest -m gpu`` (the CuPy kernels against the twins and stock CUDA ops).
4. kernels: every variant op against the stock op it replaces, timed interleaved (CUDA events),
   saying whether the CuPy kernel or the twin ran.
5. fidelity: ResNet-50 (batch 64, 224 px), GPT-2 (12 layers, sequence 1024) and a small Llama
   planned at store-all, 50% and 33% with the default cost model (profiled on this GPU); per
   plan the predicted peak against the meter, ``max_memory_allocated`` and
   ``max_memory_reserved`` (and the allocator-rounded prediction,
   ``planner.allocator.allocated_peak``), the predicted step time against CUDA-event time, and
   the gradients against eager (``cost_fidelity.measure_model``).
6. allocator: reserved and allocated against the simulator's live bytes for every plan, and the
   ``reserved_budget`` margin they call for.
7. versus: ``versus.compare`` on CUDA (inductor) for GPT-2, Llama, ResNet-50 and the UNet.

``--small`` runs stages 5 and 7 on one tiny model (store-all and the smallest feasible budget, one
compile setting) for one round.
"""
from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import platform
import re
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
import checkout  # noqa: E402

PLANNER_SOURCE = checkout.use_checkout()

import torch  # noqa: E402

from planner.allocator import allocated_peak  # noqa: E402
from planner.profiled_cost import choose_cost_model  # noqa: E402
from planner.units import format_bytes  # noqa: E402

import cost_fidelity  # noqa: E402
import versus  # noqa: E402
from bench_models import build  # noqa: E402
from realstep import interleaved  # noqa: E402
from report import write_section  # noqa: E402

SECTION_HEADING = "## GPU validation (issue 17)"
ROOT = checkout.ROOT
#: stages whose failure is reported without failing the check (no CuPy: the PyTorch twins run)
TOLERATED = {"install"}
#: share of the total time each stage may use at most (the rest is left to later stages)
ALLOTMENTS = {"environment": 0.02, "install": 0.08, "gpu tests": 0.15, "kernels": 0.08, "fidelity": 0.4,
              "allocator": 0.02, "versus": 1.0}


@dataclass
class Stage:
    name: str
    status: str = "not run"  # ok | failed | skipped
    seconds: float = 0.0
    summary: str = ""
    data: Any = None
    markdown: str = ""
    error: str = ""


@dataclass
class Check:
    out: Path
    device: str
    small: bool
    wheels: Path
    deadline: float
    argv: list[str]
    stages: list[Stage] = field(default_factory=list)
    fidelity: list = field(default_factory=list)  # cost_fidelity.ModelResult, for the allocator stage

    def run(self, name: str, body: Callable[["Check", Stage, float], None]) -> None:
        """Run one stage until its share of the remaining time ends; record, then write outputs."""
        stage = Stage(name)
        self.stages.append(stage)
        began = time.monotonic()
        stage_deadline = min(self.deadline, began + ALLOTMENTS[name] * max(0.0, self.deadline - began))
        if began >= self.deadline:
            stage.status, stage.summary = "skipped", "out of time"
        else:
            try:
                body(self, stage, stage_deadline)
                stage.status = "ok" if stage.status == "not run" else stage.status
            except Exception as error:  # a failed stage is a result; the next stage runs
                stage.status = "failed"
                stage.error = "".join(traceback.format_exception_only(type(error), error)).strip()[:2000]
                stage.summary = stage.summary or stage.error.splitlines()[-1][:300]
                print(traceback.format_exc(), file=sys.stderr)
        stage.seconds = time.monotonic() - began
        print(f"[gpu_check] {name}: {stage.status} in {stage.seconds:.0f} s {stage.summary}", file=sys.stderr, flush=True)
        self.write()

    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "gpu_check.json").write_text(json.dumps(
            {"argv": self.argv, "device": self.device, "small": self.small,
             "stages": [{k: v for k, v in s.__dict__.items() if k != "markdown"} for s in self.stages]},
            indent=1, default=str))
        (self.out / "gpu_check.md").write_text(f"{SECTION_HEADING}\n\n{render(self)}\n")


# ---- stages ----------------------------------------------------------------------------------------
def environment(check: Check, stage: Stage, deadline: float) -> None:
    pinned = re.search(r"^torch==(\S+)", (ROOT / "constraints.txt").read_text(), re.M)
    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cuda_available": torch.cuda.is_available(), "cpu_count": os.cpu_count(),
            "planner": PLANNER_SOURCE, "pinned_torch": pinned.group(1) if pinned else None,
            "device_name": torch.cuda.get_device_name() if check.device.startswith("cuda") else platform.processor(),
            "threads": torch.get_num_threads(),
            "allocator_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")}
    for package in ("torchvision", "transformers", "cupy", "numba", "scipy", "highspy"):
        try:
            info[package] = importlib.import_module(package).__version__
        except Exception as error:
            info[package] = f"missing ({type(error).__name__})"
    stage.data = info
    if info["pinned_torch"] and not torch.__version__.startswith(info["pinned_torch"]):
        stage.summary = f"torch {torch.__version__} runs; the project pins {info['pinned_torch']} (capture is verified there)"
    stage.markdown = "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in info.items())


def install(check: Check, stage: Stage, deadline: float) -> None:
    try:
        import cupy
        stage.summary = f"CuPy {cupy.__version__} already installed"
        return
    except ImportError:
        pass
    pinned = re.search(r"^(cupy-cuda\w+==\S+)", (ROOT / "constraints.txt").read_text(), re.M)
    requirement = pinned.group(1) if pinned else "cupy-cuda13x"
    if not check.wheels.is_dir():
        stage.status, stage.summary = "skipped", f"no wheels at {check.wheels}: CuPy not installed, the PyTorch twins run"
        return
    command = [sys.executable, "-m", "pip", "--isolated", "install", "--no-index", "--find-links", str(check.wheels),
               requirement]
    done = subprocess.run(command, capture_output=True, text=True, timeout=max(10, deadline - time.monotonic()))
    stage.data = {"command": command, "returncode": done.returncode, "output": (done.stdout + done.stderr)[-3000:]}
    if done.returncode != 0:
        stage.status = "failed"
        stage.summary = f"pip install {requirement} failed (exit {done.returncode}): the PyTorch twins run"
        return
    importlib.invalidate_caches()
    from planner.gpu import _cuda

    _cuda._cupy.cache_clear()
    stage.summary = f"installed {requirement}; kernels usable: {_cuda.kernels_available()}"


def gpu_tests(check: Check, stage: Stage, deadline: float) -> None:
    code = checkout.CHILD_PREFIX + "import pytest; sys.exit(pytest.main(sys.argv[1:]))"
    command = [sys.executable, "-c", code, "-m", "gpu", "-q", "-p", "no:cacheprovider", "-rs", "tests/test_gpu_kernels.py"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=max(10, deadline - time.monotonic()))
    output = (done.stdout + done.stderr).strip()
    counts = re.findall(r"(\d+) (passed|failed|skipped|error|errors)", output.splitlines()[-1] if output else "")
    stage.data = {"returncode": done.returncode, "counts": {kind: int(n) for n, kind in counts}, "tail": output[-3000:]}
    stage.summary = ", ".join(f"{n} {kind}" for n, kind in counts) or f"exit {done.returncode}"
    if done.returncode not in (0, 5):
        stage.status = "failed"
    stage.markdown = f"`pytest -m gpu tests/test_gpu_kernels.py`: {stage.summary}."


def kernel_cases(device: str, small: bool) -> list[tuple[str, Callable[[], object], Callable[[], object]]]:
    """(name, variant op, the stock op it replaces) on inputs of a realistic size (CNN activations)."""
    ops, aten = torch.ops.remat_planner, torch.ops.aten
    shape = (2, 8, 16, 16) if small else (64, 256, 56, 56)
    torch.manual_seed(0)
    x = torch.randn(shape, device=device)
    grad = torch.randn(shape, device=device)
    y, mask = ops.relu_packed(x)
    dropped, keep = ops.dropout_packed(x, 0.1, True)
    _, bool_mask = aten.native_dropout(x, 0.1, True)
    pool = ([3, 3], [2, 2], [1, 1], [1, 1], False)
    pooled, indices = aten.max_pool2d_with_indices(x, *pool)
    _, packed = ops.max_pool2d_packed(x, *pool)
    pool_grad = torch.randn_like(pooled)
    channels = shape[1]
    w, b = torch.randn(channels, device=device), torch.randn(channels, device=device)
    running = (torch.zeros(channels, device=device), torch.ones(channels, device=device))
    out, mean, rstd, _, _, fallback, chosen = ops.batch_norm_inverted(x, w, b, *running, 0.1, 1e-5)
    return [
        ("relu forward", lambda: ops.relu_packed(x), lambda: torch.relu(x)),
        ("relu backward", lambda: ops.relu_packed_backward(grad, mask), lambda: aten.threshold_backward(grad, y, 0)),
        ("dropout forward", lambda: ops.dropout_packed(x, 0.1, True), lambda: aten.native_dropout(x, 0.1, True)),
        ("dropout backward", lambda: ops.dropout_packed_backward(grad, keep, 1 / 0.9),
         lambda: aten.native_dropout_backward(grad, bool_mask, 1 / 0.9)),
        ("max_pool2d forward", lambda: ops.max_pool2d_packed(x, *pool), lambda: aten.max_pool2d_with_indices(x, *pool)),
        ("max_pool2d backward", lambda: ops.max_pool2d_packed_backward(pool_grad, packed, list(x.shape), *pool),
         lambda: aten.max_pool2d_with_indices_backward(pool_grad, x, *pool[:4], pool[4], indices)),
        ("batch_norm forward", lambda: ops.batch_norm_inverted(x, w, b, *running, 0.1, 1e-5),
         lambda: aten._native_batch_norm_legit_functional(x, w, b, *running, True, 0.1, 1e-5)),
        ("batch_norm backward",
         lambda: ops.batch_norm_inverted_backward(grad, out, w, b, mean, rstd, fallback, chosen, [True] * 3),
         lambda: aten.native_batch_norm_backward(grad, x, w, *running, mean, rstd, True, 1e-5, [True] * 3)),
    ]


def kernels(check: Check, stage: Stage, deadline: float) -> None:
    from planner.gpu import kernels_available

    ran = "CuPy kernel" if check.device.startswith("cuda") and kernels_available() else "PyTorch twin"
    rows = []
    repeats = 2 if check.small else 20
    for name, variant, stock in kernel_cases(check.device, check.small):
        timings = interleaved({"variant": variant, "stock": stock}, repeats, check.device, warmup=2, deadline=deadline)
        rows.append({"op": name, "ran": ran, "variant_s": timings["variant"].median, "stock_s": timings["stock"].median})
    stage.data = rows
    stage.summary = f"{len(rows)} ops timed ({ran})"
    stage.markdown = "\n".join(
        ["| op | implementation | variant ms | stock ms | variant / stock |", "|---|---|---:|---:|---:|"]
        + [f"| {r['op']} | {r['ran']} | {r['variant_s'] * 1e3:.3f} | {r['stock_s'] * 1e3:.3f} | "
           f"{r['variant_s'] / r['stock_s']:.2f}x |" for r in rows])


def for_each_model(check: Check, stage: Stage, names: Sequence[str], size: str, deadline: float,
                   measure: Callable) -> list:
    """``measure(bench, model_deadline)`` for each model, each given an equal share of the time
    left; a model that cannot be built, runs out of time or fails is listed, and the rest run
    (a failure marks the stage failed)."""
    results, notes = [], []
    for index, name in enumerate(names):
        if time.monotonic() > deadline:
            notes.append(f"{name}: out of time")
            continue
        try:
            bench = build(name, size, check.device)
        except LookupError as error:  # a model this checkout does not have yet (the UNet before issue 17 item 5)
            notes.append(f"{name}: {error}")
            continue
        try:
            results.append(measure(bench, time.monotonic() + (deadline - time.monotonic()) / (len(names) - index)))
        except Exception as error:
            stage.status = "failed"
            notes.append(f"{name}: {type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}")
            print(traceback.format_exc(), file=sys.stderr)
        del bench
        _release(check.device)
    stage.error = "\n".join(notes) if stage.status == "failed" else ""
    stage.summary = f"{len(results)} of {len(names)} models" + (f"; {'; '.join(notes)}" if notes else "")
    return results


def fidelity(check: Check, stage: Stage, deadline: float) -> None:
    names = ["gpt2"] if check.small else ["resnet50", "gpt2", "llama"]
    budgets = ["store-all", "min"] if check.small else ["store-all", "50%", "33%"]
    size, rounds = ("small", 1) if check.small else ("gpu", 5)

    def measure(bench, model_deadline):
        result = cost_fidelity.measure_model(bench, budgets, check.device, rounds, deadline=model_deadline)
        for row in result.rows:  # the allocator-rounded prediction, with the plan's own cost model
            cost = choose_cost_model(row.plan.graph, None, row.model, bench.inputs, bench.targets)
            row.allocated_prediction = allocated_peak(row.plan.graph, row.plan.schedule, cost)
            row.plan = row.model = None  # free the device memory before the next model
        return result

    check.fidelity = for_each_model(check, stage, names, size, deadline, measure)
    stage.data = [r.to_json() for r in check.fidelity]
    stage.summary = f"{sum(len(r.rows) for r in check.fidelity)} plans measured; {stage.summary}"
    stage.markdown = cost_fidelity.markdown(check.fidelity)


def allocator(check: Check, stage: Stage, deadline: float) -> None:
    rows = []
    for result in check.fidelity:
        for row in result.rows:
            peak = row.peak
            rows.append({"model": result.name, "budget": row.budget, "predicted": row.predicted_peak,
                         "rounded": row.allocated_prediction, "meter": peak.meter_bytes,
                         "allocated": peak.allocated_bytes, "reserved": peak.reserved_bytes})
    measured = [r for r in rows if r["reserved"]]
    margin = max((1 - r["predicted"] / r["reserved"] for r in measured), default=None)
    stage.data = {"rows": rows, "margin_needed": margin}
    stage.summary = (f"reserved needs a margin of {margin:.1%} of the budget" if margin is not None
                     else "no allocator on this device: rounded predictions only")

    def cell(value, of=None):
        return "—" if value is None else format_bytes(value) + (f" ({value / of - 1:+.2%})" if of else "")

    stage.markdown = "\n".join(
        ["| model | budget | predicted live | rounded to 512 B | meter | max allocated | max reserved |",
         "|---|---|---:|---:|---:|---:|---:|"]
        + [f"| {r['model']} | {r['budget']} | {cell(r['predicted'])} | {cell(r['rounded'], r['predicted'])} | "
           f"{cell(r['meter'], r['predicted'])} | {cell(r['allocated'], r['predicted'])} | "
           f"{cell(r['reserved'], r['predicted'])} |" for r in rows]
        + ["", f"Margin `planner.reserved_budget` needs to keep every plan above within its reserved bytes: "
               f"{'—' if margin is None else f'{margin:.1%}'}."])


def versus_stage(check: Check, stage: Stage, deadline: float) -> None:
    names = ["gpt2"] if check.small else ["gpt2", "llama", "resnet50", "unet"]
    size, rounds, budgets = ("small", 1, (0.5,)) if check.small else ("gpu", 3, (1.0, 0.5))
    comparisons = for_each_model(check, stage, names, size, deadline, lambda bench, model_deadline: versus.compare(
        bench, check.device, rounds, budgets, deadline=model_deadline))
    stage.data = [c.to_json() for c in comparisons]
    stage.markdown = versus.markdown(comparisons)


def _release(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def render(check: Check) -> str:
    lines = ["```\n" + " ".join(["python3", "benchmarks/gpu_check.py", *check.argv[1:]]) + "\n```", "",
             f"Run on {time.strftime('%Y-%m-%d')}, device {check.device}" + (" (--small)" if check.small else "") + ".",
             "", "| stage | status | seconds | summary |", "|---|---|---:|---|"]
    lines += [f"| {s.name} | {s.status} | {s.seconds:.0f} | {s.summary} |" for s in check.stages]
    for stage in check.stages:
        if stage.markdown:
            lines += ["", f"### {stage.name}", "", stage.markdown]
        if stage.error:
            lines += ["", f"{stage.name} failed:", "", "```", stage.error, "```"]
    return "\n".join(lines)


STAGES: list[tuple[str, Callable]] = [("environment", environment), ("install", install), ("gpu tests", gpu_tests),
                                      ("kernels", kernels), ("fidelity", fidelity), ("allocator", allocator),
                                      ("versus", versus_stage)]


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, nargs="?", help="folder for gpu_check.md and gpu_check.json")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="test sizes: one tiny model, one round")
    parser.add_argument("--seconds", type=float, default=480.0, help="total time the checks may take")
    parser.add_argument("--wheels", type=Path, default=ROOT / ".whl", help="where CuPy's wheels are, if not installed")
    parser.add_argument("--insert", type=Path, metavar="MD", help="write a gpu_check.md into --markdown and exit")
    parser.add_argument("--markdown", type=Path, metavar="PATH", help="also write the section into this file")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv if argv is None else argv)
    args = parse_args(argv[1:])
    if args.insert:
        body = args.insert.read_text().split("\n", 1)[1]
        write_section(args.markdown or ROOT / "docs" / "benchmarks.md", SECTION_HEADING, body)
        return 0
    if args.out is None:
        raise SystemExit("give the output folder: python3 benchmarks/gpu_check.py OUT_DIR")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --device cpu --small to check the code paths on CPU")
    check = Check(args.out, args.device, args.small, args.wheels, time.monotonic() + args.seconds, argv)
    for name, body in STAGES:
        check.run(name, body)
    if args.markdown:
        write_section(args.markdown, SECTION_HEADING, render(check))
    failed = [s.name for s in check.stages if s.status == "failed"]
    print(f"[gpu_check] wrote {args.out / 'gpu_check.md'} and gpu_check.json; failed stages: {failed or 'none'}",
          file=sys.stderr)
    return 1 if set(failed) - TOLERATED else 0


if __name__ == "__main__":
    sys.exit(main())
