"""``plan(..., op_variants=...)``: the planner chooses low-memory operator variants, plans run and
re-apply with them, and ``op_variants=False`` keeps plans to stock PyTorch ops.

What can fail here: a plan using variants that does not fit or runs with gradients other than
eager PyTorch's; a saved plan that loses its variants; a meter that misses a variant's
temporaries (measured peak below the simulator's); variants that make fast mode worse.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import planner
from planner import InfeasibleBudgetError, Plan, PlanMismatchError
from planner.algorithms import ALGORITHMS, BASELINES
import planner.variants
from planner.graph import VariantCapability
from planner.variants import ALL_VARIANTS, BITWISE_VARIANTS, apply_variants, variant_kinds, variant_sites
from _workloads import Workload, assert_same_step, build_workload, planned_step


CPU = planner.RooflineCostModel("cpu")  # what plan() uses for a CPU graph


@pytest.fixture(scope="module")
def transformer() -> Workload:
    return build_workload("transformer")


@pytest.fixture(scope="module")
def resnet() -> Workload:
    """Batch 16: at the suite's usual batch of 2, parameters are 97% of the lowest peak."""
    return build_workload("resnet18", batch=16)


def _lowest_peak(graph, **options) -> int:
    with pytest.raises(InfeasibleBudgetError) as caught:
        planner.plan(graph, 1, **options)
    return caught.value.min_feasible_bytes


def test_default_plans_use_bitwise_variants_and_stock_is_untouched(transformer: Workload) -> None:
    chosen = planner.plan(transformer.graph, "68%")
    assert chosen.variants and chosen.graph.variants == chosen.variants
    assert {name.split("@")[0] for name in chosen.variants} <= BITWISE_VARIANTS
    assert chosen.store_all_peak_bytes == transformer.store_all_peak  # percentages of plain PyTorch
    stock = planner.plan(transformer.graph, "68%", op_variants=False)
    assert stock.variants == () and stock.graph is transformer.graph
    assert "operator variants" in str(chosen) and "none (stock PyTorch ops)" in str(stock)


@pytest.fixture(scope="module")
def stem_heavy() -> Workload:
    return build_workload("stem_heavy")


def test_variants_lower_the_reachable_peak(stem_heavy: Workload) -> None:
    """Where the lowest peak is a ReLU and max-pool's backward, the packed variants lower it."""
    assert _lowest_peak(stem_heavy.graph) < _lowest_peak(stem_heavy.graph, op_variants=False)


@pytest.mark.parametrize("name", ["transformer", "resnet"])
def test_variants_never_cost_more(name: str, request) -> None:
    graph = request.getfixturevalue(name).graph
    store_all = planner.simulate(graph, planner.Schedule.store_all(graph), CPU).peak_bytes
    for fraction in (1.0, 0.95, 0.9, 0.85, 0.75):  # the variants' plan is no slower than any stock plan that fits
        budget = int(fraction * store_all)
        try:
            stock_times = [planner.plan(graph, budget, op_variants=False).predicted_time]
        except InfeasibleBudgetError:
            stock_times = []
        for baseline in BASELINES:
            result = planner.simulate(graph, ALGORITHMS[baseline](graph, CPU, budget), CPU)
            stock_times += [result.time] if result.peak_bytes <= budget else []
        if stock_times:
            chosen = planner.plan(graph, budget)
            fastest = min(stock_times)
            assert chosen.predicted_time <= fastest * (1 + 1e-9), fraction


def test_planned_step_with_variants_is_bitwise_eager_and_peak_is_predicted(transformer: Workload) -> None:
    model = transformer.fresh_copy()
    # below the stock minimum under the roofline, 65.9% (measured times move the stock plans' peaks)
    chosen = planner.plan(model, "64%", transformer.x, loss_fn=transformer.loss_fn, targets=transformer.y,
                          cost_model="cpu")
    assert chosen.variants
    planned = chosen.apply(model)
    assert_same_step(planned_step(model, planned, transformer.x, transformer.loss, seed=3),
                     transformer.reference(seed=3))
    measured = planner.measure_step(model, lambda: transformer.loss(planned(transformer.x)).backward(),
                                    transformer.held)
    assert abs(measured.peak_bytes - chosen.predicted_peak_bytes) <= 0.01 * chosen.predicted_peak_bytes


def test_exact_mode_plans_on_the_variants_and_runs_bitwise(transformer: Workload) -> None:
    fast = planner.plan(transformer.graph, "64%")
    exact = planner.plan(transformer.graph, "64%", mode="exact", time_limit=5)
    assert exact.variants and exact.predicted_time <= fast.predicted_time * (1 + 1e-9)
    assert exact.predicted_peak_bytes <= exact.budget_bytes
    model = transformer.fresh_copy()
    planned = exact.apply(model, transformer.loss_fn)
    assert_same_step(planned_step(model, planned, transformer.x, transformer.loss, seed=2),
                     transformer.reference(seed=2))


def test_saved_plan_reapplies_its_variants(stem_heavy: Workload, tmp_path: Path) -> None:
    model = stem_heavy.fresh_copy()
    below_stock = _lowest_peak(stem_heavy.graph, op_variants=False) - 1  # only the variants fit
    chosen = planner.plan(model, below_stock, stem_heavy.x, loss_fn=F.cross_entropy, targets=stem_heavy.y)
    assert chosen.variants
    path = tmp_path / "plan.json"
    chosen.save(path)
    loaded = Plan.load(path)
    assert loaded.variants == chosen.variants and loaded.graph is None
    fresh = stem_heavy.fresh_copy()
    planned = loaded.apply(fresh, loss_fn=F.cross_entropy)  # re-captured, variants re-applied by name
    assert planned.runner.graph.fingerprint == chosen.graph.fingerprint
    assert_same_step(planned_step(fresh, planned, stem_heavy.x, stem_heavy.loss, seed=1),
                     stem_heavy.reference(seed=1))


def test_plan_file_naming_a_variant_the_model_lacks_is_refused(resnet: Workload, tmp_path: Path) -> None:
    model = resnet.fresh_copy()
    path = tmp_path / "plan.json"
    planner.plan(model, "85%", resnet.x, loss_fn=F.cross_entropy, targets=resnet.y).save(path)
    data = json.loads(path.read_text())
    data["plan"]["variants"] = ["relu_packed@no_such_op"]
    path.write_text(json.dumps(data))
    with pytest.raises(PlanMismatchError, match="no_such_op"):
        Plan.load(path).apply(resnet.fresh_copy(), loss_fn=F.cross_entropy)


def test_plan_file_without_variants_loads_as_stock(transformer: Workload, tmp_path: Path) -> None:
    path = tmp_path / "plan.json"
    planner.plan(transformer.graph, "70%", op_variants=False).save(path)
    data = json.loads(path.read_text())
    del data["plan"]["variants"]  # files written before variants existed
    path.write_text(json.dumps(data))
    assert Plan.load(path).variants == ()


def test_op_variants_option_is_checked() -> None:
    assert variant_kinds(True) == BITWISE_VARIANTS
    assert variant_kinds(False) == frozenset()
    assert variant_kinds("all") == ALL_VARIANTS
    assert variant_kinds(["relu_packed"]) == {"relu_packed"}
    with pytest.raises(ValueError, match="relu_packed"):
        variant_kinds(["relu_compressed"])


def test_chosen_kinds_only(transformer: Workload) -> None:
    """Only the allowed kind is weighed (whether it wins depends on the stock plans' times)."""
    chosen = planner.plan(transformer.graph, "68%", op_variants=["dropout_packed"])
    weighed = {name for candidate in chosen.candidates for name in candidate.graph.variants}
    assert weighed and all(name.startswith("dropout_packed@") for name in weighed)
    assert all(name.startswith("dropout_packed@") for name in chosen.variants)


def test_meter_counts_the_temporaries_of_variant_ops() -> None:
    """The CPU twin of relu_packed's backward unpacks the mask into one byte per element: the
    meter sees it, as the simulator's workspace does."""
    grad, x = torch.randn(1000, 100), torch.randn(1000, 100)
    _, mask = torch.ops.remat_planner.relu_packed(x)
    with planner.MemoryMeter(include=[grad, mask]) as meter:
        out = torch.ops.remat_planner.relu_packed_backward(grad, mask)
    held = grad.nbytes + mask.nbytes
    assert meter.peak_bytes - held >= out.nbytes + x.numel()  # output plus the unpacked byte per element
    assert meter.current_bytes - held == out.nbytes


def test_plan_for_the_cupy_kernels_is_refused_where_the_twins_run(transformer: Workload, tmp_path: Path,
                                                                   monkeypatch) -> None:
    """The variants' workspace depends on what runs them, so the capability is in the graph, its
    fingerprint and the plan file: a plan made where the CuPy kernels run is accepted where they
    run and refused, saying so, where the PyTorch twins run (it was refused as "edited or
    damaged": its predicted peak was not the re-applied graph's)."""
    kernels = VariantCapability(cupy_kernels=True)
    sites = variant_sites(transformer.graph)
    assert (apply_variants(transformer.graph, sites, kernels).fingerprint
            != apply_variants(transformer.graph, sites).fingerprint)
    path = tmp_path / "plan.json"
    with monkeypatch.context() as patch:  # this process as one where the CuPy kernels run
        patch.setattr(planner.variants, "device_capability", lambda device: kernels)
        chosen = planner.plan(transformer.fresh_copy(), "64%", transformer.x, loss_fn=transformer.loss_fn,
                              targets=transformer.y, cost_model="cpu")
        assert chosen.variants and chosen.graph.variant_capability == kernels
        chosen.save(path)
        again = Plan.load(path).apply(transformer.fresh_copy(), loss_fn=transformer.loss_fn)
        assert again.runner.graph.fingerprint == chosen.graph.fingerprint
    assert json.loads(path.read_text())["plan"]["variant_capability"] == {"cupy_kernels": True}
    with pytest.raises(PlanMismatchError, match="CuPy kernels.*PyTorch twins"):
        Plan.load(path).apply(transformer.fresh_copy(), loss_fn=transformer.loss_fn)
