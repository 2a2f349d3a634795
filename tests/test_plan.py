"""``planner.plan`` and ``Plan``: budgets, the choice among baselines, printing, saving and loading,
applying to the right model (and refusing the wrong one), and infeasible or unreadable budgets.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision

import planner
from planner import InfeasibleBudgetError, InvalidScheduleError, Plan, PlanMismatchError
from planner.algorithms import ALGORITHMS

from _workloads import Workload, assert_same_step, build_workload, eager_step, planned_step, snapshot
from _workloads import one_intra_op_thread  # noqa: F401  (autouse fixture)

CPU = planner.RooflineCostModel("cpu")  # what plan() uses for a CPU graph when given no cost model


@pytest.fixture(scope="module")
def transformer() -> Workload:
    """Activations are ~56% of its store-all peak: budgets down to ~70% are feasible."""
    return build_workload("transformer")


@pytest.fixture(scope="module")
def resnet() -> Workload:
    """resnet18, batch 2 at 64x64, cross-entropy: parameters dominate (~97% is the lowest peak)."""
    return build_workload("resnet18")


def _lowest_baseline_peak(graph, budget_bytes: int) -> int:
    return min(planner.simulate(graph, fn(graph, CPU, budget_bytes), CPU).peak_bytes for fn in ALGORITHMS.values())


def _resnet_budget(resnet: Workload) -> int:
    """Halfway between the lowest baseline peak and store-all: feasible, and needs recomputation."""
    return (resnet.store_all_peak + _lowest_baseline_peak(resnet.graph, resnet.store_all_peak)) // 2


@pytest.fixture(scope="module")
def saved_resnet_plan(resnet: Workload, tmp_path_factory: pytest.TempPathFactory) -> tuple[Plan, Path]:
    model = resnet.fresh_copy()
    chosen = planner.plan(model, _resnet_budget(resnet), resnet.x, loss_fn=F.cross_entropy, targets=resnet.y)
    path = tmp_path_factory.mktemp("plans") / "resnet18.plan.json"
    chosen.save(path)
    return chosen, path


# ---- budgets and predictions -----------------------------------------------------------------------
@pytest.mark.parametrize("budget", ["int95", "95%", "80%", "1GiB"])
def test_plan_fits_budget_and_agrees_with_simulator(transformer: Workload, budget) -> None:
    store_all = transformer.store_all_peak
    if budget == "int95":
        budget = int(0.95 * store_all)
    chosen = planner.plan(transformer.graph, budget)

    expected_bytes = {"95%": 0.95 * store_all, "80%": 0.80 * store_all, "1GiB": 2**30}.get(budget, budget)
    assert abs(chosen.budget_bytes - expected_bytes) <= 1
    assert isinstance(chosen.budget_bytes, int)
    assert chosen.predicted_peak_bytes <= chosen.budget_bytes

    assert chosen.graph.variants == chosen.variants  # the stock graph, or it with the variants chosen
    assert chosen.graph is transformer.graph or chosen.variants
    result = planner.simulate(chosen.graph, chosen.schedule, CPU)
    assert chosen.predicted_peak_bytes == result.peak_bytes
    assert chosen.predicted_time == pytest.approx(result.time, rel=1e-12)
    assert chosen.resident_bytes == result.resident_bytes == transformer.graph.resident_bytes
    assert chosen.recomputations == result.recomputations
    assert chosen.store_all_peak_bytes == store_all
    assert chosen.store_all_time == pytest.approx(transformer.sim("store_all").time, rel=1e-12)
    assert chosen.algorithm in ALGORITHMS
    assert chosen.status == "feasible"
    assert chosen.cost_model == CPU.name
    # nothing beats store-all on the plan's own graph (with variants it can beat plain PyTorch's)
    assert chosen.predicted_time >= planner.simulate(chosen.graph, planner.Schedule.store_all(chosen.graph), CPU).time * (1 - 1e-12)
    assert "predicted peak" in str(chosen)
    if budget == "80%":
        assert chosen.recomputations > 0
        assert chosen.predicted_peak_bytes < store_all


def test_fast_mode_returns_the_fastest_baseline_in_budget(transformer: Workload) -> None:
    graph = transformer.graph
    budget = int(0.8 * transformer.store_all_peak)
    results = {name: planner.simulate(graph, fn(graph, CPU, budget), CPU) for name, fn in ALGORITHMS.items()}
    fitting = {name: r for name, r in results.items() if r.peak_bytes <= budget}
    assert fitting and len(fitting) < len(results)  # the budget is binding
    chosen = planner.plan(graph, budget, mode="fast", op_variants=False)
    assert chosen.algorithm in fitting
    assert chosen.predicted_time == pytest.approx(min(r.time for r in fitting.values()), rel=1e-12)


def test_full_budget_plans_no_recomputation(transformer: Workload) -> None:
    """At the store-all budget nothing needs recomputing; fast mode may still reorder."""
    chosen = planner.plan(transformer.graph, "100%", op_variants=False)
    assert sorted(c.op for c in chosen.schedule.computes) == sorted(c.op for c in planner.Schedule.store_all(transformer.graph).computes)
    assert chosen.recomputations == 0
    assert chosen.overhead == 0
    assert chosen.predicted_peak_bytes <= chosen.store_all_peak_bytes


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_explicit_algorithm_is_used(transformer: Workload, algorithm: str) -> None:
    budget = transformer.store_all_peak
    chosen = planner.plan(transformer.graph, budget, algorithm=algorithm, op_variants=False)
    assert chosen.algorithm == algorithm
    assert chosen.schedule == ALGORITHMS[algorithm](transformer.graph, CPU, budget)
    assert chosen.predicted_peak_bytes <= budget


def test_cost_model_preset_by_name(transformer: Workload) -> None:
    chosen = planner.plan(transformer.graph, "80%", cost_model="a100")
    assert chosen.cost_model == "roofline:a100"
    a100 = planner.RooflineCostModel("a100")
    assert chosen.predicted_time == pytest.approx(planner.simulate(chosen.graph, chosen.schedule, a100).time)
    with pytest.raises(ValueError):
        planner.plan(transformer.graph, "80%", cost_model="abacus")


def test_plan_from_model_equals_plan_from_graph(transformer: Workload) -> None:
    # the same cost model for both (a model alone would be profiled: tests/test_cost.py)
    from_model = planner.plan(transformer.model, "80%", transformer.x, loss_fn=transformer.loss_fn,
                              targets=transformer.y, cost_model="cpu")
    from_graph = planner.plan(transformer.graph, "80%")
    assert from_model.graph.fingerprint == from_graph.graph.fingerprint
    assert from_model.schedule == from_graph.schedule
    assert from_model.predicted_peak_bytes == from_graph.predicted_peak_bytes
    assert from_model.input_specs == transformer.graph.input_specs and from_model.n_inputs == 1


def test_plan_of_a_model_needs_inputs(transformer: Workload) -> None:
    with pytest.raises(TypeError):
        planner.plan(transformer.model, "80%")


# ---- running a plan --------------------------------------------------------------------------------
def test_apply_to_the_planned_model(resnet: Workload) -> None:
    model = resnet.fresh_copy()
    chosen = planner.plan(model, _resnet_budget(resnet), resnet.x, loss_fn=F.cross_entropy, targets=resnet.y)
    assert chosen.recomputations > 0
    pm = chosen.apply(model, F.cross_entropy)
    assert pm.runner.graph is chosen.graph  # the model it was planned for: no capture again
    assert_same_step(planned_step(model, pm, resnet.x, resnet.loss, seed=1), resnet.reference(seed=1))


def test_graph_plan_applies_to_a_model(transformer: Workload) -> None:
    chosen = planner.plan(transformer.graph, "80%")
    model = transformer.fresh_copy()
    pm = chosen.apply(model, transformer.loss_fn)
    assert_same_step(planned_step(model, pm, transformer.x, transformer.loss, seed=1), transformer.reference(seed=1))


def test_saved_plan_round_trips(saved_resnet_plan: tuple[Plan, Path]) -> None:
    original, path = saved_resnet_plan
    loaded = Plan.load(path)
    assert loaded.graph is None
    assert loaded.schedule == original.schedule
    assert loaded.input_specs == original.input_specs
    for name in ("budget_bytes", "predicted_peak_bytes", "predicted_time", "store_all_peak_bytes",
                 "store_all_time", "resident_bytes", "recomputations", "algorithm", "status",
                 "cost_model", "gap", "lower_bound", "message", "n_inputs"):
        assert getattr(loaded, name) == getattr(original, name), name
    assert str(loaded) == str(original)


def test_loaded_plan_applies_to_a_fresh_model(resnet: Workload, saved_resnet_plan: tuple[Plan, Path]) -> None:
    _, path = saved_resnet_plan
    model = resnet.fresh_copy()
    pm = Plan.load(path).apply(model, loss_fn=F.cross_entropy)
    assert_same_step(planned_step(model, pm, resnet.x, resnet.loss, seed=1), resnet.reference(seed=1))
    # and the fused step
    model = resnet.fresh_copy()
    pm = Plan.load(path).apply(model, loss_fn=F.cross_entropy)
    torch.manual_seed(1)
    loss = pm.training_step(resnet.x, resnet.y)
    assert_same_step(snapshot(model, loss), resnet.reference(seed=1))


@pytest.mark.parametrize("make_model", [
    lambda: torchvision.models.resnet34(),
    lambda: torchvision.models.resnet18(num_classes=10),
    lambda: torchvision.models.resnet18().eval(),
], ids=["resnet34", "resnet18-10-classes", "resnet18-eval-mode"])
def test_loaded_plan_refuses_another_model(saved_resnet_plan: tuple[Plan, Path], make_model) -> None:
    _, path = saved_resnet_plan
    model = make_model()
    with pytest.raises(PlanMismatchError):
        Plan.load(path).apply(model, loss_fn=F.cross_entropy)


def test_plan_applied_to_its_own_model_switched_to_eval_runs_it_eagerly(resnet: Workload) -> None:
    """Before issue 13 this was refused at apply; eval mode now runs the model eagerly (eager's
    outputs, statistics untouched), and train mode the plan."""
    model = resnet.fresh_copy()
    chosen = planner.plan(model, _resnet_budget(resnet), resnet.x, loss_fn=F.cross_entropy, targets=resnet.y)
    model.eval()
    pm = chosen.apply(model, F.cross_entropy)
    reference = resnet.fresh_copy().eval()
    with torch.no_grad():
        assert torch.equal(pm(resnet.x), reference(resnet.x))
    model.train()
    assert_same_step(planned_step(model, pm, resnet.x, resnet.loss, seed=1), resnet.reference(seed=1))


@pytest.mark.parametrize("source", ["in-memory", "loaded"])
def test_planned_module_plans_another_input_shape(resnet: Workload, saved_resnet_plan: tuple[Plan, Path],
                                                  source: str) -> None:
    """A batch of another size (the last, smaller one of an epoch) is planned again with the same
    budget request, for a plan made in this process or loaded from a file (before issue 13:
    PlanMismatchError)."""
    original, path = saved_resnet_plan
    chosen = original if source == "in-memory" else Plan.load(path)
    model = resnet.fresh_copy()
    pm = chosen.apply(model, F.cross_entropy)
    x, y = resnet.x[:1], resnet.y[:1]
    got = planned_step(model, pm, x, lambda out: F.cross_entropy(out, y), seed=1)
    want = eager_step(resnet.fresh_copy(), x, lambda out: F.cross_entropy(out, y), seed=1)
    assert_same_step(got, want)
    assert len(pm.plans) == 2 and pm.plans[-1].input_specs[0].shape == (1, 3, 64, 64)
    assert pm.plans[-1].budget_bytes == original.budget_bytes  # a byte budget stays bytes


# ---- damaged plan files ----------------------------------------------------------------------------
def _damaged(text: str) -> dict[str, str]:
    data = json.loads(text)
    return {
        "truncated-half": text[: len(text) // 2],
        "truncated-last-char": text[:-1],
        "truncated-to-nothing": "",
        "not-a-plan": "[1, 2, 3]",
        "other-format": json.dumps({**data, "format": 99}),
        "no-schedule": json.dumps({k: v for k, v in data.items() if k != "schedule"}),
        "schedule-step-garbled": json.dumps({**data, "schedule": {**data["schedule"], "steps": [["x", 1]]}}),
        "no-input-specs": json.dumps({**data, "plan": {k: v for k, v in data["plan"].items() if k != "input_specs"}}),
        "plan-null": json.dumps({**data, "plan": None}),
        "unknown-key": json.dumps({**data, "plan": {**data["plan"], "peak": 1}}),
    }


@pytest.mark.parametrize("damage", list(_damaged(json.dumps({"format": 1, "plan": {}, "schedule": {}}))))
def test_damaged_plan_file_is_refused(saved_resnet_plan: tuple[Plan, Path], tmp_path: Path, damage: str) -> None:
    _, path = saved_resnet_plan
    damaged = tmp_path / "damaged.plan.json"
    damaged.write_text(_damaged(path.read_text())[damage])
    with pytest.raises(InvalidScheduleError):
        Plan.load(damaged)


def test_format_1_file_of_an_older_writer_is_migrated(transformer: Workload, tmp_path: Path) -> None:
    """Format-1 files written before keyword inputs, re-planning and operator variants lack
    ``call``, ``request``, ``workload`` and ``variants``; ``plan_file`` reads them as those
    versions meant (positional call, the byte budget and the preset, no workload, stock ops)."""
    original = planner.plan(transformer.graph, "80%", op_variants=False)
    path = tmp_path / "new.plan.json"
    original.save(path)
    data = json.loads(path.read_text())
    for key in ("call", "request", "workload", "variants"):
        del data["plan"][key]
    old = tmp_path / "old.plan.json"
    old.write_text(json.dumps(data))
    loaded = Plan.load(old)
    assert (loaded.call, loaded.workload, loaded.variants) == (None, None, ())
    assert loaded.request == planner.planning.PlanRequest(original.budget_bytes, cost_model="cpu")
    assert loaded.schedule == original.schedule and str(loaded) == str(original)


def test_plan_with_a_nonexistent_op_is_refused(resnet: Workload, saved_resnet_plan: tuple[Plan, Path],
                                               tmp_path: Path) -> None:
    """Valid JSON and the right fingerprint, but a step names an op the graph does not have."""
    _, path = saved_resnet_plan
    data = json.loads(path.read_text())
    data["schedule"]["steps"].insert(0, ["c", len(resnet.graph.ops) + 5])
    damaged = tmp_path / "damaged.plan.json"
    damaged.write_text(json.dumps(data))
    model = resnet.fresh_copy()
    with pytest.raises(InvalidScheduleError):
        pm = Plan.load(damaged).apply(model, loss_fn=F.cross_entropy)
        resnet.loss(pm(resnet.x)).backward()


def test_plan_with_another_fingerprint_is_refused(resnet: Workload, saved_resnet_plan: tuple[Plan, Path],
                                                  tmp_path: Path) -> None:
    _, path = saved_resnet_plan
    data = json.loads(path.read_text())
    data["schedule"]["fingerprint"] = "0" * 32
    damaged = tmp_path / "other.plan.json"
    damaged.write_text(json.dumps(data))
    with pytest.raises(PlanMismatchError):
        Plan.load(damaged).apply(resnet.fresh_copy(), loss_fn=F.cross_entropy)


# ---- infeasible and unreadable budgets -------------------------------------------------------------
@pytest.mark.parametrize("workload_name, budget", [("transformer", 1000), ("resnet18", "50%")])
def test_infeasible_budget_names_the_lowest_peak(request: pytest.FixtureRequest, workload_name: str, budget) -> None:
    workload: Workload = request.getfixturevalue({"transformer": "transformer", "resnet18": "resnet"}[workload_name])
    graph = workload.graph
    budget_bytes = planner.parse_budget(budget, workload.store_all_peak)
    with pytest.raises(InfeasibleBudgetError) as caught:
        planner.plan(graph, budget)
    error = caught.value
    assert error.budget_bytes == budget_bytes
    assert error.min_feasible_bytes > budget_bytes
    # at least as low as any single algorithm reaches (fast mode also reorders each schedule)
    assert error.min_feasible_bytes <= _lowest_baseline_peak(graph, budget_bytes)
    assert str(error.min_feasible_bytes) in str(error)

    again = planner.plan(graph, error.min_feasible_bytes)
    assert again.predicted_peak_bytes <= error.min_feasible_bytes
    with pytest.raises(InfeasibleBudgetError):
        planner.plan(graph, error.min_feasible_bytes - 1)


def test_infeasible_explicit_algorithm_says_fast_mode_fits(transformer: Workload) -> None:
    graph = transformer.graph
    budget = transformer.store_all_peak - 1
    with pytest.raises(InfeasibleBudgetError) as caught:
        planner.plan(graph, budget, algorithm="store_all", op_variants=False)
    error = caught.value
    assert error.min_feasible_bytes == transformer.store_all_peak  # store_all's own peak, above the budget
    assert "fast mode fits this budget" in str(error)
    assert planner.plan(graph, budget, op_variants=False).predicted_peak_bytes <= budget


def test_infeasible_explicit_algorithm_names_the_lowest_peak_of_any_baseline(transformer: Workload) -> None:
    graph = transformer.graph
    with pytest.raises(InfeasibleBudgetError) as caught:
        planner.plan(graph, 1, algorithm="store_all", op_variants=False)
    error = caught.value
    assert error.min_feasible_bytes <= _lowest_baseline_peak(graph, 1)
    assert error.min_feasible_bytes < transformer.store_all_peak
    assert planner.plan(graph, error.min_feasible_bytes, op_variants=False).predicted_peak_bytes <= error.min_feasible_bytes


@pytest.mark.parametrize("budget", ["abc", -5, 0, float("nan"), float("inf"), "", "-5MB", "0%", "12 parsecs",
                                    True, None], ids=repr)
def test_unreadable_budget_says_what_is_accepted(transformer: Workload, budget) -> None:
    with pytest.raises(ValueError) as caught:
        planner.plan(transformer.graph, budget)
    message = str(caught.value)
    assert "'6GiB'" in message and "'50%'" in message, message


@pytest.mark.parametrize("kwargs", [{"mode": "bogus"}, {"algorithm": "bogus"}],
                         ids=["mode-bogus", "algorithm-bogus"])
def test_unknown_mode_or_algorithm(transformer: Workload, kwargs: dict) -> None:
    with pytest.raises(ValueError) as caught:
        planner.plan(transformer.graph, "80%", **kwargs)
    assert repr(next(iter(kwargs.values()))) in str(caught.value)
    if "algorithm" in kwargs:
        assert all(name in str(caught.value) for name in ALGORITHMS)
