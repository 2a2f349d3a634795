"""The DP checkpoint search ("fast mode"): the DP against brute force on random DAG models (its own
objective, and fast mode against every segmentation judged by the simulator), the memory lower
bound, executed fast plans against eager PyTorch, the DP against the baselines on resnet18, and
determinism.
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import event, example, given, settings
from hypothesis import strategies as st

import planner
from planner import InfeasibleBudgetError
from planner.algorithms import ALGORITHMS
from planner.algorithms.bounds import memory_lower_bound
from planner.algorithms.dp import (
    best_cuts, dp, dp_memory, evaluate_cuts, kept_ops_for_cuts, segment_tables,
)
from planner.algorithms.keepset import model_forward_ops, schedule_keeping

from _random_dags import MAX_FORWARD_OPS, DagSpec, build_dag, dag_specs
from _workloads import Workload, assert_same_step, build_workload, planned_step
from _workloads import one_intra_op_thread  # noqa: F401  (autouse fixture)

CPU = planner.RooflineCostModel("cpu")  # what plan() uses for a CPU graph when given no cost model
PROPERTY = settings(max_examples=25, deadline=None, derandomize=True, database=None)
PEAK_TOLERANCE = 0.01  # measured peak within 1% of the predicted one
DP_ALGORITHMS = [name for name in ALGORITHMS if name.startswith("dp")]  # dp, dp_memory and variants
TIME_RTOL = 1e-9  # equal op multisets summed in another order (reordered schedules) differ by ulps

#: hand-written specs run by every property test besides the drawn ones: 14 and 13 forward ops,
#: where the DP's answer has two or three segments at some limits
CHAIN_WITH_SKIPS = DagSpec(8, 4, (("linear", 0, 0), ("tanh", 1, 1), ("linear", 2, 2), ("relu", 3, 3),
                                  ("add", 4, 2), ("linear", 5, 5), ("sigmoid", 6, 6), ("mul", 7, 5)), None)
BRANCHES = DagSpec(12, 6, (("linear", 0, 0), ("relu", 1, 1), ("tanh", 1, 1), ("mul", 2, 3), ("add", 4, 0),
                           ("linear", 5, 5), ("sigmoid", 6, 6), ("add", 7, 4)), 3)


def _activation_peak(graph) -> int:
    """Store-all's simulated peak beyond resident memory."""
    return planner.simulate(graph, planner.Schedule.store_all(graph), CPU).peak_bytes - graph.resident_bytes


def _segmentations(n: int):
    """Every segmentation of positions 1..n: sorted cut positions ending with n."""
    for r in range(n):
        for inner in itertools.combinations(range(1, n), r):
            yield list(inner) + [n]


# ---- 1. the DP is exact for its own objective ---------------------------------------------------------
@PROPERTY
@given(dag_specs(), st.floats(0.6, 0.95))
@example(CHAIN_WITH_SKIPS, 0.9)
@example(BRANCHES, 0.9)
def test_best_cuts_matches_brute_force(spec: DagSpec, fraction: float) -> None:
    """Limits: fractions of store-all's simulated activation peak, and of the DP's own model of
    it (most segmentations fit or fail between 60% and 100% of that on these small graphs)."""
    graph = build_dag(spec).graph
    tables = segment_tables(graph, CPU)
    n = len(model_forward_ops(graph))
    assert len(tables.ops) == n + 1
    assert n <= MAX_FORWARD_OPS
    event(f"forward ops: {n}")
    activations = _activation_peak(graph)
    store_all_model = float(tables.last_local_bytes[0])  # the DP's modelled store-all peak
    limits = sorted({f * activations for f in (1.0, 0.7, 0.5, 0.3)}
                    | {f * store_all_model for f in (fraction, 0.8)}, reverse=True)
    segmentations = list(_segmentations(n))
    assert len(segmentations) == 2 ** (n - 1)
    for limit in limits:
        best = None
        for cuts in segmentations:
            time, fits = evaluate_cuts(tables, cuts, limit)
            if fits and (best is None or time < best[0]):
                best = (time, cuts)
        found = best_cuts(tables, limit)
        if best is None:
            assert found is None, f"limit {limit}: brute force finds no segmentation, the DP returns {found}"
            continue
        assert found is not None, f"limit {limit}: the DP finds nothing, brute force finds {best[1]}"
        cuts = [int(c) for c in found]
        event(f"DP answers with {len(cuts)} segments")
        assert cuts[-1] == n and all(a < b for a, b in zip([0] + cuts, cuts)), cuts  # increasing, in 1..n
        time, fits = evaluate_cuts(tables, cuts, limit)
        assert fits, f"limit {limit}: the DP's cuts {cuts} do not fit their own memory model"
        assert math.isclose(time, best[0], rel_tol=1e-9, abs_tol=1e-15), (
            f"limit {limit}: the DP's cuts {cuts} take {time}, brute force's {best[1]} take {best[0]}")


# ---- 2. dp's schedules and fast-mode plans on random models -------------------------------------------
def _budgets(graph) -> list[int]:
    activations = _activation_peak(graph)
    lower = memory_lower_bound(graph, CPU)
    return sorted({graph.resident_bytes + int(f * activations) for f in (1.0, 0.8, 0.6, 0.4, 0.2)}
                  | {lower - 1, lower}, reverse=True)


def _every_segmentation(graph) -> list[tuple[int, float]]:
    """(simulated peak, time) of the schedule of every checkpoint segmentation of the model's
    forward ops: the DP's whole search space, judged by the simulator instead of the DP's own
    memory model. O(2^(n-1)) schedules, n <= MAX_FORWARD_OPS."""
    tables = segment_tables(graph, CPU)
    results = []
    for cuts in _segmentations(len(tables.ops) - 1):
        schedule = schedule_keeping(graph, kept_ops_for_cuts(tables, np.array(cuts, dtype=np.int64)))
        result = planner.simulate(graph, schedule, CPU)
        results.append((result.peak_bytes, result.time))
    return results


@PROPERTY
@given(dag_specs())
@example(CHAIN_WITH_SKIPS)
@example(BRANCHES)
def test_dp_schedules_and_fast_plans_on_random_models(spec: DagSpec) -> None:
    """Fast mode against brute force over the DP's search space: whenever some segmentation's
    schedule fits the budget in the simulator, fast mode finds a plan no slower than the fastest
    of them (the DP alone misses it on a few graphs, its memory model being an estimate; then
    another of fast mode's candidates must make up for it)."""
    graph = build_dag(spec).graph
    store_all = planner.simulate(graph, planner.Schedule.store_all(graph), CPU)
    lower = memory_lower_bound(graph, CPU)
    segmentations = _every_segmentation(graph)
    for budget in _budgets(graph):
        for name in DP_ALGORITHMS:
            planner.simulate(graph, ALGORITHMS[name](graph, CPU, budget), CPU)  # raises if invalid
        fitting = [time for peak, time in segmentations if peak <= budget]
        try:
            chosen = planner.plan(graph, budget, mode="fast", cost_model=CPU, op_variants=False)
        except InfeasibleBudgetError as error:
            assert error.min_feasible_bytes >= lower
            assert error.min_feasible_bytes > budget
            assert store_all.peak_bytes > budget, "store-all fits this budget, yet fast mode found nothing"
            assert not fitting, f"fast mode found nothing within {budget} bytes, yet {len(fitting)} segmentations fit"
            least = planner.plan(graph, error.min_feasible_bytes, mode="fast", cost_model=CPU, op_variants=False)
            assert least.predicted_peak_bytes <= error.min_feasible_bytes, "the least peak it named does not plan"
            continue
        assert budget >= lower, f"a plan within {budget} bytes, below the lower bound {lower}"
        assert chosen.predicted_peak_bytes <= budget
        result = planner.simulate(graph, chosen.schedule, CPU)
        assert result.peak_bytes == chosen.predicted_peak_bytes
        if fitting:
            best = min(fitting)
            assert chosen.predicted_time <= best * (1 + TIME_RTOL), (
                f"budget {budget}: fast mode ({chosen.algorithm}) takes {chosen.predicted_time:.6g} s, "
                f"the best segmentation {best:.6g} s")


# ---- 3. the memory lower bound ------------------------------------------------------------------------
def _check_lower_bound(graph, budgets) -> None:
    lower = memory_lower_bound(graph, CPU)
    assert graph.resident_bytes < lower
    for budget in budgets:
        for name, algorithm in ALGORITHMS.items():
            peak = planner.simulate(graph, algorithm(graph, CPU, budget), CPU).peak_bytes
            assert lower <= peak, f"{name} at budget {budget}: peak {peak} below the lower bound {lower}"


@PROPERTY
@given(dag_specs())
@example(CHAIN_WITH_SKIPS)
@example(BRANCHES)
def test_memory_lower_bound_on_random_models(spec: DagSpec) -> None:
    graph = build_dag(spec).graph
    activations = _activation_peak(graph)
    _check_lower_bound(graph, [graph.resident_bytes + int(f * activations) for f in (1.0, 0.6, 0.3, 0.0)])


def test_memory_lower_bound_on_resnet18() -> None:
    resnet = build_workload("resnet18")  # batch 2 at 64x64, cross-entropy
    graph = resnet.graph
    activations = _activation_peak(graph)
    _check_lower_bound(graph, [graph.resident_bytes + int(f * activations) for f in (1.0, 0.9, 0.5, 0.0)])


# ---- 4. executed fast plans ---------------------------------------------------------------------------
#: name -> (loose, tight) budgets as fractions of store-all's activation peak beyond resident
#: memory: both force recomputation and fit; at the loose one the DP's schedule is the fastest
EXECUTED = {
    "resnet18": (0.8, 0.65),  # batch 4; its lowest peak found is ~62% (weight gradients dominate)
    "mobilenet_v2": (0.6, 0.4),
    "transformer": (0.6, 0.4),
}


@pytest.fixture(scope="module")
def resnet18_b4() -> Workload:
    """resnet18, batch 4 at 64x64, cross-entropy."""
    return build_workload("resnet18", CPU, batch=4)


@pytest.fixture(scope="module", params=list(EXECUTED))
def executed(request: pytest.FixtureRequest, resnet18_b4: Workload) -> Workload:
    return resnet18_b4 if request.param == "resnet18" else build_workload(request.param, CPU)


@pytest.mark.parametrize("which", ["loose", "tight"])
def test_executed_fast_plan_matches_eager(executed: Workload, which: str) -> None:
    """At the loose budget the DP's own plan (``dp_reorder``) runs, whatever fast mode would pick
    there; at the tight one, fast mode's choice."""
    graph = executed.graph
    fraction = EXECUTED[executed.name][0 if which == "loose" else 1]
    budget = graph.resident_bytes + int(fraction * _activation_peak(graph))
    model = executed.fresh_copy()
    how = {"algorithm": "dp_reorder"} if which == "loose" else {"mode": "fast"}
    chosen = planner.plan(model, budget, executed.x, loss_fn=executed.loss_fn,
                          targets=executed.y, cost_model=CPU, **how)
    assert chosen.predicted_peak_bytes <= budget < chosen.store_all_peak_bytes
    assert chosen.recomputations > 0

    pm = chosen.apply(model)
    got = planned_step(model, pm, executed.x, executed.loss, seed=1)
    assert_same_step(got, executed.reference(seed=1))

    measured = planner.measure_step(model, lambda: executed.loss(pm(executed.x)).backward(), executed.held)
    error = abs(measured.peak_bytes - chosen.predicted_peak_bytes) / chosen.predicted_peak_bytes
    assert error <= PEAK_TOLERANCE, (
        f"{executed.name} at {fraction:.0%} of activations ({chosen.algorithm}): measured peak "
        f"{measured.peak_bytes} vs predicted {chosen.predicted_peak_bytes} ({error:.3%} off)")


# ---- 5. the DP against the baselines on resnet18 ------------------------------------------------------
@pytest.mark.parametrize("fraction", [0.8, 0.7, 0.5])
def test_dp_beats_baselines_on_resnet18(resnet18_b4: Workload, fraction: float) -> None:
    graph = resnet18_b4.graph
    budget = graph.resident_bytes + int(fraction * _activation_peak(graph))
    ours = planner.simulate(graph, dp(graph, CPU, budget), CPU)
    for name in ("chen_greedy", "checkpoint_all"):
        theirs = planner.simulate(graph, ALGORITHMS[name](graph, CPU, budget), CPU)
        if theirs.peak_bytes <= budget:  # then dp must fit too, and be no slower
            fits = ours.peak_bytes <= budget
            assert fits, (f"{name} fits {fraction:.0%} of activations (peak {theirs.peak_bytes}), "
                          f"dp does not (peak {ours.peak_bytes}, budget {budget})")
            faster = ours.time <= theirs.time * (1 + TIME_RTOL)
            assert faster, f"dp takes {ours.time}, {name} {theirs.time}"
    memory_only, peak = planner.simulate(graph, dp_memory(graph, CPU, budget), CPU).peak_bytes, ours.peak_bytes
    assert memory_only <= peak, f"dp_memory peaks at {memory_only}, above dp's {peak}"


# ---- 6. determinism -----------------------------------------------------------------------------------
def _check_deterministic(graph) -> None:
    budget = graph.resident_bytes + int(0.8 * _activation_peak(graph))
    first, second = dp(graph, CPU, budget), dp(graph, CPU, budget)
    assert first.recomputed_ops(), "the budget should force recomputation"
    assert first == second
    assert first.to_json() == second.to_json()
    tables = segment_tables(graph, CPU)
    limit = 0.9 * float(tables.last_local_bytes[0])
    assert np.array_equal(best_cuts(tables, limit), best_cuts(segment_tables(graph, CPU), limit))


def test_dp_is_deterministic_on_resnet18(resnet18_b4: Workload) -> None:
    _check_deterministic(resnet18_b4.graph)


def test_dp_is_deterministic_on_a_random_model() -> None:
    case = build_dag(BRANCHES)
    _check_deterministic(case.graph)
    recaptured = planner.capture(case.model, case.x)  # same model, same step: same fingerprint
    budget = case.graph.resident_bytes + int(0.8 * _activation_peak(case.graph))
    assert dp(recaptured, CPU, budget).to_json() == dp(case.graph, CPU, budget).to_json()
