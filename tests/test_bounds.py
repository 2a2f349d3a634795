"""The universal recompute bound (``planner.algorithms.bounds.recompute_lower_bound``): on random
DAG models never above any schedule the simulator accepts (brute force over every checkpoint
segmentation and every staged recomputation pattern, and every algorithm's schedule), 0 where
store-all fits, positive where memory is short; and what exact mode reports from it."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings

import planner
from planner.algorithms import ALGORITHMS
from planner.algorithms.bounds import memory_lower_bound, recompute_lower_bound, step_time_lower_bound
from planner.algorithms.dp import kept_ops_for_cuts, segment_tables
from planner.algorithms.keepset import schedule_keeping
from planner.algorithms.milp import SCHEDULE_CLASS, exact_problem, formulate
from planner.schedule import Schedule

from _random_dags import DagSpec, build_dag, dag_specs
from _workloads import Workload, build_workload
from test_dp import BRANCHES, CHAIN_WITH_SKIPS, _segmentations
from test_milp import _patterns

CPU = planner.RooflineCostModel("cpu")
PROPERTY = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])
TIME_RTOL = 1e-9  # the same op times summed in another order differ by ulps
#: a Linear and five tanh, each saving its output for its backward: narrow, so activations outweigh the weights
TANH_CHAIN = DagSpec(4, 8, (("linear", 0, 0),) + tuple(("tanh", i, i) for i in range(1, 6)), None)


def _every_schedule(graph) -> list[Schedule]:
    """Every checkpoint segmentation's schedule, every staged recomputation pattern's (exact
    mode's staged problem, when it has at most ``test_milp.BRUTE_FORCE_COLUMNS`` free columns),
    and every algorithm's schedule at budgets from the resident bytes to store-all's peak."""
    tables = segment_tables(graph, CPU)
    schedules = [schedule_keeping(graph, kept_ops_for_cuts(tables, np.array(cuts, dtype=np.int64)))
                 for cuts in _segmentations(len(tables.ops) - 1)]
    problem = exact_problem(graph, CPU)
    schedules += [problem.schedule(recompute) for recompute in _patterns(formulate(problem, None)) or []]
    store_all = planner.simulate(graph, Schedule.store_all(graph), CPU).peak_bytes
    for fraction in (1.0, 0.8, 0.6, 0.4, 0.2, 0.0):
        budget = graph.resident_bytes + int(fraction * (store_all - graph.resident_bytes))
        schedules += [algorithm(graph, CPU, budget) for algorithm in ALGORITHMS.values()]
    return schedules


def _check_below_every_schedule(graph) -> int:
    """At each schedule's own peak (where the bound is highest for it), the bound is at most its
    extra time and its floor at most its peak. Returns how many peaks get a positive bound."""
    store_all = planner.simulate(graph, Schedule.store_all(graph), CPU)
    fastest: dict[int, float] = {}  # per peak, the least extra time of a schedule peaking there
    for schedule in _every_schedule(graph):
        result = planner.simulate(graph, schedule, CPU)
        extra = result.time - store_all.time
        fastest[result.peak_bytes] = min(extra, fastest.get(result.peak_bytes, np.inf))
    positive = 0
    for peak, extra in fastest.items():
        bound = recompute_lower_bound(graph, CPU, peak)
        assert bound.floor_bytes <= peak, f"a schedule peaks at {peak} bytes, below the floor {bound.floor_bytes}"
        assert bound.seconds <= extra + TIME_RTOL * store_all.time, (
            f"at {peak} bytes a schedule recomputes for {extra:.6g} s, the bound says at least {bound.seconds:.6g} s")
        positive += bound.seconds > 0
    assert recompute_lower_bound(graph, CPU, store_all.peak_bytes).seconds == 0
    return positive


@PROPERTY
@given(dag_specs(min_ops=3, max_ops=7, max_forward_ops=10))
@example(CHAIN_WITH_SKIPS)
@example(BRANCHES)
def test_recompute_bound_is_below_every_schedule_on_random_models(spec: DagSpec) -> None:
    _check_below_every_schedule(build_dag(spec).graph)


def test_recompute_bound_is_positive_on_a_small_chain() -> None:
    """The property test's bound is not vacuous: on a chain whose activations outweigh its
    weights, some schedules' peaks force recomputation the bound sees."""
    assert _check_below_every_schedule(build_dag(TANH_CHAIN).graph) > 0


@pytest.fixture(scope="module")
def resnet18() -> Workload:
    """Batch 8 at 64x64, as test_milp's: activations are about half the peak."""
    return build_workload("resnet18", CPU, batch=8)


def test_recompute_bound_where_memory_is_short(resnet18: Workload) -> None:
    """resnet18 at 90% of store-all's peak: the bound is a real fraction of the step, below what
    exact mode finds; at store-all's peak it is 0; its floor lies between the resident bytes and
    fast mode's least budget, at or above ``memory_lower_bound``'s."""
    graph = resnet18.graph
    store_all = planner.simulate(graph, Schedule.store_all(graph), CPU)
    budget = int(0.9 * store_all.peak_bytes)
    bound = recompute_lower_bound(graph, CPU, budget)
    exact = planner.plan(graph, budget, mode="exact", time_limit=10, cost_model=CPU)
    assert 0.05 * store_all.time < bound.seconds <= exact.predicted_time - store_all.time
    assert step_time_lower_bound(graph, CPU, budget) == pytest.approx(store_all.time + bound.seconds, rel=1e-12)
    assert recompute_lower_bound(graph, CPU, store_all.peak_bytes).seconds == 0
    with pytest.raises(planner.InfeasibleBudgetError) as error:
        planner.plan(graph, graph.resident_bytes, cost_model=CPU)
    assert memory_lower_bound(graph, CPU) <= bound.floor_bytes <= error.value.min_feasible_bytes
    assert recompute_lower_bound(graph, CPU, bound.floor_bytes - 1).seconds == np.inf


def test_exact_mode_reports_the_universal_bound(resnet18: Workload) -> None:
    """The message names both bounds and their classes; ``lower_bound`` is the stronger one that
    covers the plan, never above its time, and ``gap`` is measured against it."""
    graph = resnet18.graph
    budget = int(0.9 * planner.simulate(graph, Schedule.store_all(graph), CPU).peak_bytes)
    exact = planner.plan(graph, budget, mode="exact", time_limit=3, cost_model=CPU)
    universal = step_time_lower_bound(graph, CPU, budget)
    assert "universal bound" in exact.message and "covers every schedule" in exact.message
    assert SCHEDULE_CLASS in exact.message
    assert universal <= exact.lower_bound <= exact.predicted_time
    if exact.status != "optimal":
        assert exact.gap == pytest.approx((exact.predicted_time - exact.lower_bound) / exact.predicted_time)


def test_a_fallback_gets_the_universal_gap(resnet18: Workload) -> None:
    """With no time for the MILP, exact mode returns fast mode's plan, which the staged bound does
    not cover: its ``lower_bound`` and ``gap`` are the universal bound's, a gap over every schedule."""
    graph = resnet18.graph
    budget = int(0.9 * planner.simulate(graph, Schedule.store_all(graph), CPU).peak_bytes)
    chosen = planner.plan(graph, budget, mode="exact", time_limit=0, cost_model=CPU, op_variants=False)
    assert chosen.status == "fallback"
    assert chosen.lower_bound == step_time_lower_bound(graph, CPU, budget)
    assert chosen.gap == pytest.approx((chosen.predicted_time - chosen.lower_bound) / chosen.predicted_time)
    assert 0 < chosen.gap < 1 and "the gap and the bound are the universal ones" in chosen.message
