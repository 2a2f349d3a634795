"""The ``planner`` command line: plan, sweep, max-batch, show, run, exit codes and error lines.

Most tests call ``planner.cli.main([...])`` in-process (capsys reads what it prints); a few run the
real entry points (``python -m planner`` and the ``planner`` console script) in a subprocess.
Workloads are tiny: ``preset:transformer-tiny`` at batch 2, ``torchvision:resnet18`` at batch 2 and
32x32 (64x64 for max-batch, where batch 1 must be trainable with BatchNorm), and a small MLP from a
factory module written to a temporary folder. Plans that several tests read are made once per
module.
"""
from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import planner
from planner import InfeasibleBudgetError, Plan
from planner.cli import MAX_BATCH_ALGORITHMS, SWEEP_ALGORITHMS, main
from planner.units import format_bytes
from planner.zoo import load_workload

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FACTORY_MODULE = "cli_test_factories"
TINY = ["preset:transformer-tiny", "--batch-size", "2"]
RESNET = ["torchvision:resnet18", "--batch-size", "2", "--image-size", "32"]
MLP = [f"{FACTORY_MODULE}:mlp", "--batch-size", "64"]
MLP_WORKLOAD = [f"{FACTORY_MODULE}:mlp_workload", "--batch-size", "64"]
#: Plan's own table (str(plan)), then the command line's rows
PLAN_TEXT_LINES = ("algorithm", "cost model", "budget", "store-all peak", "predicted peak", "resident", "activations",
                   "predicted overhead", "operator variants", "peak breakdown", "kept for backward", "recomputed",
                   "time")

FACTORY_SOURCE = textwrap.dedent('''
    """Model factories for the CLI tests: narrow and deep, so activations outweigh parameters."""
    import torch
    from torch import nn
    import torch.nn.functional as F

    from planner.zoo import Workload

    CALLS = []  # (batch_size, image_size) of every call to mlp


    def _net():
        layers = [nn.Linear(16, 32), nn.ReLU()]
        for _ in range(6):
            layers += [nn.Linear(32, 32), nn.ReLU()]
        return nn.Sequential(*layers, nn.Linear(32, 4)).train()


    def mlp(batch_size, image_size=None):
        """(model, inputs): the CLI's loss is the sum of the output."""
        CALLS.append((batch_size, image_size))
        torch.manual_seed(1)
        return _net(), torch.randn(batch_size, 16)


    def mlp_workload(batch_size):
        """A Workload with a loss that takes targets."""
        torch.manual_seed(1)
        return Workload(_net(), (torch.randn(batch_size, 16),), (torch.randint(0, 4, (batch_size,)),),
                        F.cross_entropy)
''')


# ---- helpers --------------------------------------------------------------------------------------
def cli(capsys, *argv: str) -> tuple[int, str, str]:
    """Run ``planner ARGV`` in-process; return (exit code, stdout, stderr)."""
    capsys.readouterr()  # drop anything printed before
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def cli_captured(*argv: str) -> tuple[int, str, str]:
    """``cli`` for module-scoped fixtures, which cannot use capsys."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def visible_lines(stream: str) -> list[str]:
    """The non-blank lines a terminal shows for ``stream``: progress bars redraw themselves after a
    carriage return and erase themselves when done, so only what follows the last '\\r' counts."""
    return [line.rsplit("\r", 1)[-1].rstrip() for line in stream.split("\n") if line.rsplit("\r", 1)[-1].strip()]


def plan_labels(text: str) -> list[str]:
    """The left column of 'planner plan' text output."""
    return [re.split(r"\s{2,}", line.strip())[0] for line in text.splitlines() if line.strip()]


def assert_one_line_error(result: tuple[int, str, str], expected_code: int, *fragments: str) -> str:
    """Exit ``expected_code``, nothing on stdout, exactly one 'planner: error: ...' line on stderr."""
    code, out, err = result
    assert code == expected_code, (code, err)
    assert "Traceback" not in err, err
    lines = visible_lines(err)
    assert len(lines) == 1, f"expected one error line, got:\n{err}"
    assert lines[0].startswith("planner: error: "), lines[0]
    assert out == "", out
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def assert_valid_png(path: Path) -> None:
    """A real PNG, bigger than 200x200, that is not one flat colour."""
    import matplotlib.image

    data = Path(path).read_bytes()
    assert data[:8] == PNG_SIGNATURE, data[:16]
    image = matplotlib.image.imread(str(path))
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 200, image.shape
    assert float(np.std(image[..., :3])) > 0, "the picture is a single flat colour"


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


# ---- fixtures -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def factory_module(tmp_path_factory):
    """A model-factory module on sys.path for the whole module (plans made from it are run later)."""
    folder = tmp_path_factory.mktemp("factories")
    (folder / f"{FACTORY_MODULE}.py").write_text(FACTORY_SOURCE)
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(folder))
        sys.modules.pop(FACTORY_MODULE, None)
        yield importlib.import_module(FACTORY_MODULE)
        sys.modules.pop(FACTORY_MODULE, None)


@pytest.fixture(scope="module")
def tiny_plan(tmp_path_factory):
    """``planner --json plan preset:transformer-tiny --batch-size 2 --budget 80% --out``: payload, file."""
    path = tmp_path_factory.mktemp("plans") / "tiny.json"
    code, out, err = cli_captured("--json", "plan", *TINY, "--budget", "80%", "--out", path)
    assert code == 0, err
    return json.loads(out), path


@pytest.fixture(scope="module")
def mlp_plan(tmp_path_factory, factory_module):
    """``planner --json plan <factory>:mlp --batch-size 64 --budget 85% --out --run``: payload, file."""
    path = tmp_path_factory.mktemp("plans") / "mlp.json"
    code, out, err = cli_captured("--json", "plan", *MLP, "--budget", "85%", "--out", path, "--run")
    assert code == 0, err
    return json.loads(out), path


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    """``planner --json sweep`` of transformer-tiny at 100%, 80% and 10% (nothing fits 10%), with --png."""
    png = tmp_path_factory.mktemp("sweep") / "sweep.png"
    code, out, err = cli_captured("--json", "sweep", *TINY, "--budgets", "100%,80%,10%", "--png", png)
    assert code == 0, err
    return json.loads(out), png


# ---- plan -----------------------------------------------------------------------------------------
def test_plan_text_has_every_line(capsys):
    code, out, err = cli(capsys, "plan", *TINY, "--budget", "80%")
    assert code == 0, err
    labels = plan_labels(out)
    for label in PLAN_TEXT_LINES:
        assert label in labels, f"no {label!r} line in:\n{out}"
    assert "(feasible)" in next(line for line in out.splitlines() if line.startswith("algorithm"))


def test_plan_text_starts_with_the_plans_own(capsys, tiny_plan):
    """The command line prints the plan as ``str(Plan)`` does (one table, no second copy of it),
    then its own rows."""
    _, path = tiny_plan
    code, out, err = cli(capsys, "plan", *TINY, "--budget", "80%")
    assert code == 0, err
    own = str(Plan.load(path)).splitlines()
    assert out.splitlines()[: len(own)] == own


def test_plan_exact_mode_reports_status_and_bound(capsys):
    code, out, err = cli(capsys, "--json", "plan", *TINY, "--budget", "85%", "--mode", "exact", "--time-limit", "5")
    assert code == 0, err
    payload = json.loads(out)
    assert payload["status"] in ("optimal", "feasible", "fallback")
    assert payload["predicted_peak_bytes"] <= payload["budget_bytes"]
    assert payload["plan_seconds"] <= 5 + 3
    assert "exact mode" in payload["message"]


def test_plan_exact_mode_takes_the_solver(capsys):
    code, out, err = cli(capsys, "--json", "plan", *TINY, "--budget", "85%", "--mode", "exact", "--time-limit", "5",
                         "--solver", "cpsat")
    assert code == 0, err
    assert "cpsat" in json.loads(out)["message"]
    code, _, err = cli(capsys, "plan", *TINY, "--budget", "85%", "--solver", "cpsat")  # fast mode has no solver
    assert code != 0 and "mode=\"exact\"" in err


def test_plan_text_agrees_with_json(capsys, tiny_plan):
    """Same workload and budget: the text's predicted peak and store-all peak are the JSON's."""
    payload, _ = tiny_plan
    code, out, err = cli(capsys, "plan", *TINY, "--budget", "80%")
    assert code == 0, err
    lines = dict(zip(plan_labels(out), out.strip().splitlines()))
    assert format_bytes(payload["predicted_peak_bytes"]) in lines["predicted peak"]
    assert format_bytes(payload["store_all_peak_bytes"]) in lines["store-all peak"]
    assert format_bytes(payload["budget_bytes"]) in lines["budget"]


@pytest.mark.parametrize("workload", ["tiny", "resnet"])
def test_plan_json_accounting(capsys, tiny_plan, workload):
    if workload == "tiny":
        payload, _ = tiny_plan
    else:
        code, out, err = cli(capsys, "--json", "plan", *RESNET, "--budget", "99.5%")
        assert code == 0, err
        payload = json.loads(out)
    assert payload["status"] in ("optimal", "feasible")
    assert 0 < payload["predicted_peak_bytes"] <= payload["budget_bytes"]
    assert payload["store_all_peak_bytes"] >= payload["predicted_peak_bytes"]
    assert payload["store_all_peak_bytes"] > payload["predicted_peak_bytes"], "80%/99.5% should force recomputation"
    breakdown = payload["breakdown"]
    assert {"parameters", "gradients (.grad)", "activations"} <= set(breakdown)
    assert all(isinstance(v, int) and v >= 0 for v in breakdown.values()), breakdown
    assert sum(breakdown.values()) == payload["predicted_peak_bytes"], breakdown
    assert breakdown["parameters"] == breakdown["gradients (.grad)"] > 0
    assert payload["overhead"] > 0 and payload["recomputations"] > 0


def test_plan_budget_is_a_fraction_of_store_all(tiny_plan):
    payload, _ = tiny_plan
    assert abs(payload["budget_bytes"] - 0.8 * payload["store_all_peak_bytes"]) <= 1


def test_plan_out_round_trips(tiny_plan):
    payload, path = tiny_plan
    assert payload["saved"] == str(path)
    loaded = Plan.load(path)
    assert loaded.predicted_peak_bytes == payload["predicted_peak_bytes"]
    assert loaded.budget_bytes == payload["budget_bytes"]
    assert loaded.store_all_peak_bytes == payload["store_all_peak_bytes"]
    assert loaded.algorithm == payload["algorithm"]
    assert loaded.workload == {"model": "preset:transformer-tiny", "batch_size": 2, "image_size": None}


def test_plan_out_text_says_saved(capsys, tmp_path, factory_module):
    path = tmp_path / "p.json"
    code, out, err = cli(capsys, "plan", *MLP, "--budget", "90%", "--out", path)
    assert code == 0, err
    assert out.strip().splitlines()[-1] == f"saved {path}"
    assert Plan.load(path).workload == {"model": f"{FACTORY_MODULE}:mlp", "batch_size": 64, "image_size": None}


def test_plan_run_json_measures_within_one_percent(mlp_plan):
    payload, _ = mlp_plan
    run = payload["run"]
    assert run["predicted_peak_bytes"] == payload["predicted_peak_bytes"]
    assert abs(run["measured_peak_bytes"] / run["predicted_peak_bytes"] - 1) <= 0.01, run
    assert run["gradients_equal_to_eager"] is True
    assert run["measured_peak_bytes"] < run["eager_peak_bytes"], "the plan should use less than eager PyTorch"


def test_plan_run_text_with_targets_loss(capsys, factory_module):
    """A factory returning a Workload whose loss takes targets (cross-entropy)."""
    code, out, err = cli(capsys, "plan", *MLP_WORKLOAD, "--budget", "85%", "--run")
    assert code == 0, err
    assert "gradients identical to eager: True" in out, out
    assert "measured peak" in out and "predicted" in out


def test_plan_run_text_transformer_with_dropout(capsys):
    """transformer-tiny has dropout: the planned step replays the same random masks as eager
    PyTorch when both start from the same RNG state, so the gradients must be reported identical."""
    code, out, err = cli(capsys, "plan", *TINY, "--budget", "80%", "--run")
    assert code == 0, err
    assert "gradients identical to eager: True" in out, out


def test_plan_algorithm_is_honoured(capsys):
    code, out, err = cli(capsys, "--json", "plan", *RESNET, "--budget", "99.5%", "--algorithm", "chen_sqrt")
    assert code == 0, err
    payload = json.loads(out)
    assert payload["algorithm"] == "chen_sqrt"
    assert payload["predicted_peak_bytes"] <= payload["budget_bytes"]
    assert sum(payload["breakdown"].values()) == payload["predicted_peak_bytes"]


def test_plan_op_variants_choice(capsys):
    """Default: the planner may use variants (the tiny transformer's dropout masks); off: none."""
    code, out, err = cli(capsys, "--json", "plan", *TINY, "--budget", "70%")
    assert code == 0, err
    default = json.loads(out)
    assert default["variants"] and all(v.split("@")[0] in ("relu_packed", "dropout_packed") for v in default["variants"])
    code, out, err = cli(capsys, "--json", "plan", *TINY, "--budget", "70%", "--op-variants", "off")
    assert code == 0, err
    stock = json.loads(out)
    assert stock["variants"] == [] and stock["variants_summary"].startswith("none")
    assert default["overhead"] <= stock["overhead"] + 1e-12
    code, _, err = cli(capsys, "plan", *TINY, "--op-variants", "some")
    assert code == 2 and "--op-variants" in err


def test_plan_device_preset_is_honoured(capsys, factory_module):
    code, out, err = cli(capsys, "--json", "plan", *MLP, "--budget", "90%", "--device-preset", "a100")
    assert code == 0, err
    assert json.loads(out)["cost_model"] == "roofline:a100"


def test_factory_receives_batch_and_image_size(capsys, factory_module):
    factory_module.CALLS.clear()
    code, _, err = cli(capsys, "plan", f"{FACTORY_MODULE}:mlp", "--batch-size", "8", "--image-size", "5",
                       "--budget", "100%")
    assert code == 0, err
    assert factory_module.CALLS == [(8, 5)]


# ---- sweep ----------------------------------------------------------------------------------------
def test_sweep_json_rows(tiny_sweep, tiny_plan):
    payload, _ = tiny_sweep
    rows = payload["rows"]
    budgets = ["100%", "80%", "10%"]
    assert len(rows) == len(SWEEP_ALGORITHMS) * len(budgets)
    assert {(r["algorithm"], r["budget"]) for r in rows} == {(a, b) for a in SWEEP_ALGORITHMS for b in budgets}
    store_all_peak = tiny_plan[0]["store_all_peak_bytes"]  # same workload, planned by 'plan'
    for r in rows:
        assert r["budget_fraction"] == pytest.approx(float(r["budget"][:-1]) / 100)
        assert (r["overhead"] is None) == (r["peak_bytes"] is None), r
        if r["peak_bytes"] is not None:
            assert r["peak_bytes"] <= r["budget_fraction"] * store_all_peak + 1, r
            assert r["overhead"] >= -1e-9, r
    assert all(r["overhead"] is None for r in rows if r["budget"] == "10%"), "nothing fits 10%"


def test_sweep_fast_is_never_worse(tiny_sweep):
    rows = tiny_sweep[0]["rows"]
    cell = {(r["algorithm"], r["budget"]): r["overhead"] for r in rows}
    assert cell[("fast", "100%")] == pytest.approx(0.0, abs=1e-12)
    assert cell[("fast", "80%")] is not None
    for (algorithm, budget), overhead in cell.items():
        if overhead is None:
            continue
        assert cell[("fast", budget)] is not None, f"{algorithm} fits {budget} but fast does not"
        assert cell[("fast", budget)] <= overhead + 1e-9, (algorithm, budget, overhead, cell[("fast", budget)])


def test_sweep_png(tiny_sweep):
    payload, png = tiny_sweep
    assert payload["png"] == str(png)
    assert_valid_png(png)


def test_sweep_text_table(capsys):
    code, out, err = cli(capsys, "sweep", *TINY, "--budgets", "100%,10%", "--algorithms", "fast,chen_sqrt")
    assert code == 0, err
    lines = out.strip().splitlines()
    header = next(line for line in lines if line.startswith("algorithm"))
    assert header.split() == ["algorithm", "100%", "10%"]
    table = {line.split()[0]: line.split()[1:] for line in lines[lines.index(header) + 2:]}
    assert set(table) == {"fast", "chen_sqrt"}
    assert table["fast"] == ["+0.0%", "—"]
    assert len(table["chen_sqrt"]) == 2 and table["chen_sqrt"][0].endswith("%") and table["chen_sqrt"][1] == "—"


# ---- max-batch ------------------------------------------------------------------------------------
MAX_BATCH_SPEC, MAX_BATCH_IMAGE, MAX_BATCH_MEMORY, MAX_BATCH_LIMIT = "torchvision:resnet18", 64, "110MB", 256


def _graph(spec: str, batch: int, image_size: int | None):
    torch.manual_seed(0)
    work = load_workload(spec, batch, image_size)
    return planner.capture(work.model, work.inputs, work.loss_fn, targets=work.targets)


def _fits(graph, memory: str, algorithm: str | None) -> bool:
    try:
        planner.plan(graph, memory, algorithm=algorithm)
        return True
    except InfeasibleBudgetError:
        return False


def test_max_batch_resnet18(capsys):
    code, out, err = cli(capsys, "--json", "max-batch", MAX_BATCH_SPEC, "--image-size", MAX_BATCH_IMAGE,
                         "--memory", MAX_BATCH_MEMORY, "--limit", MAX_BATCH_LIMIT)
    assert code == 0, err
    payload = json.loads(out)
    assert payload["memory_bytes"] == 110_000_000
    best = payload["max_batch"]
    assert set(best) == set(MAX_BATCH_ALGORITHMS)
    assert all(isinstance(b, int) and 0 <= b <= MAX_BATCH_LIMIT for b in best.values()), best
    assert best["store_all"] >= 1, best
    assert all(best["store_all"] <= b for b in best.values()), best
    assert all(best["fast"] >= b for b in best.values()), best
    assert best["fast"] > best["store_all"], f"recomputation should buy a larger batch: {best}"

    # the claims hold: each reported batch fits, the next one does not
    for algorithm, planned_as in (("fast", None), ("store_all", "store_all")):
        batch = best[algorithm]
        assert _fits(_graph(MAX_BATCH_SPEC, batch, MAX_BATCH_IMAGE), MAX_BATCH_MEMORY, planned_as), (algorithm, batch)
        if batch < MAX_BATCH_LIMIT:
            graph = _graph(MAX_BATCH_SPEC, batch + 1, MAX_BATCH_IMAGE)
            with pytest.raises(InfeasibleBudgetError):
                planner.plan(graph, MAX_BATCH_MEMORY, algorithm=planned_as)


def test_max_batch_limit_and_text(capsys, factory_module):
    code, out, err = cli(capsys, "--json", "max-batch", f"{FACTORY_MODULE}:mlp", "--memory", "1MB",
                         "--algorithms", "store_all,fast", "--limit", "8")
    assert code == 0, err
    assert json.loads(out)["max_batch"] == {"store_all": 8, "fast": 8}

    code, out, err = cli(capsys, "max-batch", f"{FACTORY_MODULE}:mlp", "--memory", "10KB",
                         "--algorithms", "store_all,fast", "--limit", "8")
    assert code == 0, err
    assert out.startswith(f"largest batch of {FACTORY_MODULE}:mlp within ")
    rows = {line.split()[0]: " ".join(line.split()[1:]) for line in out.strip().splitlines()[3:]}
    assert rows == {"store_all": "none fits", "fast": "none fits"}


# ---- show -----------------------------------------------------------------------------------------
def test_show_writes_png(capsys, tiny_plan, tmp_path):
    _, path = tiny_plan
    png = tmp_path / "timeline.png"
    code, out, err = cli(capsys, "show", path, "--png", png)
    assert code == 0, err
    assert out.strip() == f"wrote {png}"
    assert_valid_png(png)


def test_show_json(capsys, mlp_plan, tmp_path):
    _, path = mlp_plan
    png = tmp_path / "timeline.png"
    code, out, err = cli(capsys, "--json", "show", path, "--png", png)
    assert code == 0, err
    assert json.loads(out) == {"png": str(png)}
    assert_valid_png(png)


# ---- run ------------------------------------------------------------------------------------------
def test_run_saved_plan_text(capsys, mlp_plan):
    payload, path = mlp_plan
    code, out, err = cli(capsys, "run", path, "--steps", "1")
    assert code == 0, err
    assert "measured peak" in out
    assert f"predicted {format_bytes(payload['predicted_peak_bytes'])}" in out
    assert "gradients identical to eager: True" in out


def test_run_saved_plan_json(capsys, mlp_plan):
    payload, path = mlp_plan
    code, out, err = cli(capsys, "--json", "run", path, "--steps", "2")
    assert code == 0, err
    run = json.loads(out)
    assert {"steps", "measured_peak_bytes", "predicted_peak_bytes", "seconds_per_step", "eager_peak_bytes",
            "eager_seconds_per_step", "gradients_equal_to_eager"} <= set(run)
    assert run["steps"] == 2
    assert run["predicted_peak_bytes"] == payload["predicted_peak_bytes"]
    assert abs(run["measured_peak_bytes"] / run["predicted_peak_bytes"] - 1) <= 0.01, run
    assert run["gradients_equal_to_eager"] is True
    assert run["seconds_per_step"] > 0 and run["eager_seconds_per_step"] > 0


def test_run_saved_transformer_plan(capsys, tiny_plan):
    """The saved transformer-tiny plan (dropout) runs, and its gradients match eager PyTorch's."""
    payload, path = tiny_plan
    code, out, err = cli(capsys, "--json", "run", path, "--steps", "1")
    assert code == 0, err
    run = json.loads(out)
    assert abs(run["measured_peak_bytes"] / payload["predicted_peak_bytes"] - 1) <= 0.01, run
    assert run["gradients_equal_to_eager"] is True, run


# ---- bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec, fragment", [
    ("nope:x", "nope:x"),
    ("torchvision:notamodel", "notamodel"),
    ("resnet18", "resnet18"),
    ("preset:notapreset", "notapreset"),
])
def test_unknown_model_spec(capsys, spec, fragment):
    assert_one_line_error(cli(capsys, "plan", spec, "--batch-size", "2"), 2, fragment)


def test_unknown_factory_attribute(capsys, factory_module):
    assert_one_line_error(cli(capsys, "plan", f"{FACTORY_MODULE}:nothing_here", "--batch-size", "2"), 2)


@pytest.mark.parametrize("budget", ["12 parsecs", "-5MB", "0", "0%"])
def test_bad_budget(capsys, budget):
    assert_one_line_error(cli(capsys, "plan", *TINY, f"--budget={budget}"), 2, repr(budget))


def test_bad_memory(capsys):
    assert_one_line_error(cli(capsys, "max-batch", *TINY[:1], "--memory", "12 parsecs"), 2)


def test_unknown_algorithm(capsys):
    assert_one_line_error(cli(capsys, "plan", *TINY, "--budget", "90%", "--algorithm", "nope"), 2, "nope")


@pytest.mark.parametrize("budgets", ["100,80", "100%,80", "", "1GB"])
def test_sweep_budgets_need_percent(capsys, budgets):
    assert_one_line_error(cli(capsys, "sweep", *TINY, f"--budgets={budgets}"), 2, "--budgets")


@pytest.mark.parametrize("command", ["show", "run"])
def test_missing_plan_file(capsys, tmp_path, command):
    extra = ["--png", tmp_path / "x.png"] if command == "show" else []
    missing = tmp_path / "missing.json"
    assert_one_line_error(cli(capsys, command, missing, *extra), 2, str(missing))
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("command", ["show", "run"])
def test_plan_path_is_a_directory(capsys, tmp_path, command):
    extra = ["--png", tmp_path / "x.png"] if command == "show" else []
    assert_one_line_error(cli(capsys, command, tmp_path, *extra), 2)


@pytest.mark.parametrize("damage", ["truncated", "not a plan", "a list", "empty plan", "binary"])
@pytest.mark.parametrize("command", ["show", "run"])
def test_corrupted_plan_file(capsys, tmp_path, mlp_plan, command, damage):
    _, good = mlp_plan
    bad = tmp_path / "bad.json"
    text = good.read_text()
    if damage == "truncated":
        bad.write_text(text[: len(text) // 2])
    elif damage == "not a plan":
        write_json(bad, {"model": "resnet18", "budget": "50%"})
    elif damage == "a list":
        write_json(bad, [1, 2, 3])
    elif damage == "empty plan":
        write_json(bad, {"format": 1, "plan": {}, "schedule": {}})
    else:
        bad.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe")
    extra = ["--png", tmp_path / "x.png"] if command == "show" else []
    assert_one_line_error(cli(capsys, command, bad, *extra), 2)
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("edit", ["fingerprint", "batch size"])
@pytest.mark.parametrize("command", ["show", "run"])
def test_plan_no_longer_matches_model(capsys, tmp_path, mlp_plan, command, edit):
    """A readable plan whose schedule is for another graph: exit 4, not a crash or a wrong run."""
    _, good = mlp_plan
    data = json.loads(good.read_text())
    if edit == "fingerprint":
        data["schedule"]["fingerprint"] = "0" * len(data["schedule"]["fingerprint"])
    else:
        data["plan"]["workload"]["batch_size"] = 32
    bad = write_json(tmp_path / "edited.json", data)
    extra = ["--png", tmp_path / "x.png"] if command == "show" else []
    assert_one_line_error(cli(capsys, command, bad, *extra), 4)
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("command", ["show", "run"])
def test_plan_with_edited_predictions_is_refused(capsys, tmp_path, mlp_plan, command):
    """A plan file whose recorded peak is not its schedule's: both commands take the plan's graph
    through ``Plan.graph_for``, the path ``Plan.apply`` takes, whose prediction check raises
    ``InvalidScheduleError`` (exit 2) before any picture or step (before, ``show`` drew it)."""
    _, good = mlp_plan
    data = json.loads(good.read_text())
    data["plan"]["predicted_peak_bytes"] -= 4096
    bad = write_json(tmp_path / "edited.json", data)
    extra = ["--png", tmp_path / "x.png"] if command == "show" else []
    with pytest.raises(planner.InvalidScheduleError, match="edited or damaged"):
        main(["--debug", command, str(bad), *map(str, extra)])
    assert_one_line_error(cli(capsys, command, bad, *extra), 2, "edited or damaged")
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("command", ["show", "run"])
def test_plan_without_workload(capsys, tmp_path, factory_module, command):
    model, inputs = factory_module.mlp(batch_size=8)
    path = tmp_path / "from_python.json"
    planner.plan(model, "100%", inputs).save(path)
    assert Plan.load(path).workload is None
    extra = ["--png", tmp_path / "x.png"] if command == "show" else []
    assert_one_line_error(cli(capsys, command, path, *extra), 2, str(path))


def test_infeasible_budget(capsys):
    line = assert_one_line_error(cli(capsys, "plan", *TINY, "--budget", "1KB"), 3)
    assert "smallest peak" in line


def test_infeasible_budget_with_algorithm(capsys):
    assert_one_line_error(cli(capsys, "plan", *TINY, "--budget", "1KB", "--algorithm", "chen_sqrt"), 3)


@pytest.mark.parametrize("batch_size", ["0", "-1"])
def test_bad_batch_size(capsys, batch_size):
    """A batch of no (or negative) examples is bad input, not a plan or a crash."""
    assert_one_line_error(cli(capsys, "plan", "preset:transformer-tiny", f"--batch-size={batch_size}",
                              "--budget", "90%"), 2)


def test_model_that_cannot_be_traced(capsys, tmp_path, monkeypatch):
    """Exit 4 with the one error line only: no traceback logged by torch while tracing."""
    (tmp_path / "cli_test_broken.py").write_text(textwrap.dedent("""
        import torch
        def mismatch(batch_size):
            return torch.nn.Linear(8, 4), torch.randn(batch_size, 5)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    line = assert_one_line_error(cli(capsys, "plan", "cli_test_broken:mismatch", "--batch-size", "2"), 4)
    assert "could not trace" in line


def test_factory_that_raises(capsys, tmp_path, monkeypatch):
    """A factory failing with its own exception still gets a one-line error, no traceback."""
    (tmp_path / "cli_test_raising.py").write_text(textwrap.dedent("""
        def boom(batch_size):
            raise RuntimeError("factory exploded")
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    code, out, err = cli(capsys, "plan", "cli_test_raising:boom", "--batch-size", "2")
    assert code in (2, 4)
    assert_one_line_error((code, out, err), code, "factory exploded")


@pytest.mark.parametrize("argv", [[], ["plan"], ["plan", "preset:transformer-tiny", "--device-preset", "tpu"],
                                  ["show", "x.json"], ["plan", "preset:transformer-tiny", "--batch-size", "two"]],
                         ids=repr)
def test_argument_errors_exit_2(capsys, argv):
    """Argument errors follow the same rule as every other bad input: one line, exit code 2."""
    assert_one_line_error(cli(capsys, *argv), 2)


@pytest.mark.parametrize("argv, error", [
    (["plan", *TINY, "--budget", "1KB"], InfeasibleBudgetError),
    (["plan", "nope:x", "--batch-size", "2"], ValueError),
    (["plan", *TINY, "--budget", "12 parsecs"], ValueError),
    (["run", "/nonexistent/plan.json"], FileNotFoundError),
])
def test_debug_propagates_the_exception(capsys, argv, error):
    with pytest.raises(error):
        main(["--debug", *argv])
    assert "planner: error:" not in capsys.readouterr().err


# ---- real entry points ----------------------------------------------------------------------------
def _console_script() -> str:
    beside = Path(sys.executable).with_name("planner")
    found = str(beside) if beside.exists() else shutil.which("planner")
    assert found, "the 'planner' console script is not installed"
    return found


def _subprocess(argv: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env, cwd=Path(__file__).parent)


def test_python_m_planner_help():
    done = _subprocess([sys.executable, "-m", "planner", "--help"])
    assert done.returncode == 0, done.stderr
    for word in ("plan", "sweep", "max-batch", "show", "run", "--json", "--debug"):
        assert word in done.stdout


def test_python_m_planner_exit_code():
    done = _subprocess([sys.executable, "-m", "planner", "plan", "resnet18"])
    assert done.returncode == 2, done.stderr
    assert_one_line_error((done.returncode, done.stdout, done.stderr), 2, "resnet18")


def test_console_script_plan_json():
    done = _subprocess([_console_script(), "--json", "plan", *TINY, "--budget", "80%"])
    assert done.returncode == 0, done.stderr
    payload = json.loads(done.stdout)
    assert payload["predicted_peak_bytes"] <= payload["budget_bytes"]
    assert sum(payload["breakdown"].values()) == payload["predicted_peak_bytes"]
