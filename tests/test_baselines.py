"""Every baseline algorithm, run for real by the executor on torchvision CNNs and a transformer.

For each (workload, algorithm): the planned step gives the loss, gradients and buffers of eager
PyTorch bit for bit, its measured peak matches the simulator's prediction, and the checkpointing
baselines really lower activation memory. Each workload is captured once (module-scoped fixture;
pytest groups the tests by workload).
"""
from __future__ import annotations

import pytest

import planner
from planner.algorithms import ALGORITHMS, BASELINES

from _workloads import (
    ALL_ALGORITHMS, VGG_ALGORITHMS, Workload, assert_same_step, build_workload, planned_step,
)
from _workloads import one_intra_op_thread  # noqa: F401  (autouse fixture)

#: vgg16 (138M parameters) has its own fixture and runs only VGG_ALGORITHMS
WORKLOADS = ("resnet18", "mobilenet_v2", "densenet121", "googlenet", "inception_v3", "transformer")
CHECKPOINTING = ("checkpoint_all", "chen_sqrt", "chen_greedy")
PEAK_TOLERANCE = 0.01  # measured peak within 1% of the simulated one
MIN_ACTIVATION_SAVING = 0.03  # checkpointing must save at least 3% of store-all's activation memory


@pytest.fixture(scope="module", params=WORKLOADS)
def workload(request: pytest.FixtureRequest) -> Workload:
    return build_workload(request.param)


@pytest.fixture(scope="module")
def vgg16() -> Workload:
    return build_workload("vgg16")


def _check_matches_eager(workload: Workload, algorithm: str) -> None:
    model, pm = workload.planned(algorithm)
    got = planned_step(model, pm, workload.x, workload.loss, seed=1)
    assert_same_step(got, workload.reference(seed=1))


def _check_peak_matches_simulation(workload: Workload, algorithm: str) -> None:
    predicted = workload.sim(algorithm)
    measured = workload.measure(algorithm)
    error = abs(measured.peak_bytes - predicted.peak_bytes) / predicted.peak_bytes
    assert error <= PEAK_TOLERANCE, (
        f"{workload.name}/{algorithm}: measured peak {measured.peak_bytes} vs simulated "
        f"{predicted.peak_bytes} ({error:.3%} off)")
    # the resident part (parameters, buffers, .grad, batch) is the same set of tensors on both
    # sides; the simulator also counts the 4-byte loss tangent
    assert abs(measured.resident_bytes - predicted.resident_bytes) <= 64


# ---- the matrix ------------------------------------------------------------------------------------
def test_all_baselines_are_registered() -> None:
    assert set(BASELINES) == {"store_all", "checkpoint_all", "chen_sqrt", "chen_sqrt_linear",
                              "chen_greedy", "chen_greedy_linear"}
    assert set(BASELINES) <= set(ALGORITHMS)
    assert set(VGG_ALGORITHMS) <= set(ALGORITHMS)


@pytest.mark.parametrize("algorithm", ALL_ALGORITHMS)
def test_schedule_is_valid_for_its_graph(workload: Workload, algorithm: str) -> None:
    schedule = workload.schedule(algorithm)
    assert schedule.fingerprint == workload.graph.fingerprint
    result = workload.sim(algorithm)  # simulate validates the schedule (raises if invalid)
    assert result.peak_bytes >= workload.graph.resident_bytes
    if algorithm == "store_all":
        assert schedule == planner.Schedule.store_all(workload.graph)
        assert result.recomputations == 0
    elif algorithm == "reorder":  # the store-all computations, in an order of lower (or equal) peak
        assert sorted(c.op for c in schedule.computes) == sorted(c.op for c in planner.Schedule.store_all(workload.graph).computes)
        assert result.recomputations == 0
        assert result.peak_bytes <= workload.sim("store_all").peak_bytes
    else:
        assert result.recomputations > 0, f"{algorithm} recomputes nothing on {workload.name}"
        assert result.time > workload.sim("store_all").time


@pytest.mark.parametrize("algorithm", ALL_ALGORITHMS)
def test_planned_step_matches_eager(workload: Workload, algorithm: str) -> None:
    _check_matches_eager(workload, algorithm)


@pytest.mark.parametrize("algorithm", ALL_ALGORITHMS)
def test_measured_peak_matches_simulation(workload: Workload, algorithm: str) -> None:
    _check_peak_matches_simulation(workload, algorithm)


@pytest.mark.parametrize("algorithm", CHECKPOINTING)
def test_checkpointing_lowers_activation_peak(workload: Workload, algorithm: str) -> None:
    """Required for resnet18 and the transformer; holds on every workload of this module."""
    store_all, result = workload.sim("store_all"), workload.sim(algorithm)
    assert result.peak_bytes < store_all.peak_bytes
    assert result.peak_activation_bytes <= (1 - MIN_ACTIVATION_SAVING) * store_all.peak_activation_bytes, (
        f"simulated activations {result.peak_activation_bytes} vs store-all {store_all.peak_activation_bytes}")

    eager_like, measured = workload.measure("store_all"), workload.measure(algorithm)
    assert measured.peak_bytes < eager_like.peak_bytes
    measured_activations = measured.peak_bytes - measured.resident_bytes
    store_all_activations = eager_like.peak_bytes - eager_like.resident_bytes
    assert measured_activations <= (1 - MIN_ACTIVATION_SAVING) * store_all_activations, (
        f"measured activations {measured_activations} vs store-all {store_all_activations}")


def test_store_all_schedule_needs_no_more_memory_than_eager(workload: Workload) -> None:
    """The store-all schedule is the reference for budgets ("what plain PyTorch uses"): running it
    must not cost more than an eager step. (It can cost less: on the transformer the captured ATen
    graph holds ~10% less than eager autograd does.)"""
    eager_model = workload.fresh_copy()
    eager = planner.measure_step(eager_model, lambda: workload.loss(eager_model(workload.x)).backward(),
                                 workload.held)
    planned = workload.measure("store_all")
    assert planned.resident_bytes == eager.resident_bytes
    assert planned.peak_bytes <= (1 + PEAK_TOLERANCE) * eager.peak_bytes


# ---- vgg16: three algorithms only ----------------------------------------------------------------
@pytest.mark.parametrize("algorithm", VGG_ALGORITHMS)
def test_vgg16_planned_step_matches_eager(vgg16: Workload, algorithm: str) -> None:
    _check_matches_eager(vgg16, algorithm)


@pytest.mark.parametrize("algorithm", VGG_ALGORITHMS)
def test_vgg16_measured_peak_matches_simulation(vgg16: Workload, algorithm: str) -> None:
    _check_peak_matches_simulation(vgg16, algorithm)


def test_recompute_cheap_judges_ops_by_the_cost_models_rates() -> None:
    """``recompute_cheap`` reads ``CostModel.rates``, which every cost model has: a model that is
    not a roofline is judged by its own rates (before, by the CPU's, whatever its device), and a
    CUDA profile by the GPU preset. Two devices far apart (a slow and a fast FLOP rate at the same
    bandwidth) keep different ops, so the test can tell which rates were read."""
    graph = build_workload("transformer").graph
    slow, fast = (planner.DeviceSpec(f"x{rate:g}", rate, rate, 8e9, 5e-6) for rate in (1e8, 1e14))
    cheap = ALGORITHMS["recompute_cheap"]
    by_rates = {spec.name: cheap(graph, planner.RooflineCostModel(spec), 10**12) for spec in (slow, fast)}
    assert by_rates[slow.name] != by_rates[fast.name]
    roofline = planner.RooflineCostModel("cpu")
    times, workspace = {graph.fingerprint: roofline.op_times(graph)}, {graph.fingerprint: roofline.workspace_bytes(graph)}
    profiled = planner.ProfiledCostModel(times, workspace, "cpu (1 thread)")
    for spec in (slow, fast):
        profiled.rates = spec  # a profile of a device with these rates
        assert cheap(graph, profiled, 10**12) == by_rates[spec.name]
    assert planner.ProfiledCostModel(times, workspace, "cuda (a GPU)").rates == planner.DEVICE_PRESETS["a100"]
    assert planner.ProfiledCostModel(times, workspace, "cpu (2 threads)").rates == planner.DEVICE_PRESETS["cpu"]
