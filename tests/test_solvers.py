"""Exact mode's optional solvers (CP-SAT, SCIP) on the same formulation as HiGHS: their optimum is
brute force's, their bounds are never above it, their schedules pass the simulator; the MIP start,
time limit, stop and the typed error for a missing extra. ortools and pyscipopt are in the test
extra, so these run in CI (a missing package fails them, it does not skip them)."""
from __future__ import annotations

import dataclasses
import sys
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import planner
from planner import SolverUnavailableError
from planner.algorithms import solvers
from planner.algorithms.milp import exact_problem, exact_search, formulate, lowest_peak_search, solve_highs

from _random_dags import DagSpec, dag_specs
from _workloads import Workload, build_workload
from test_milp import CPU, _budget, brute_forced_case

BACKENDS = {"cpsat": solvers.solve_cpsat, "scip": solvers.solve_scip}


@pytest.fixture(scope="module")
def transformer() -> Workload:
    return build_workload("transformer")


@pytest.mark.parametrize("name", sorted(BACKENDS))
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=dag_specs(min_ops=3, max_ops=6), fraction=st.floats(0.0, 1.0))
# SCIP stops at its gap limit from a MIP start ("gaplimit"): exact mode used to take that for
# unproven and solve the same model again, round after round, until the time limit
@example(spec=DagSpec(d=4, batch=2, ops=(("linear", 0, 0), ("tanh", 1, 1), ("tanh", 2, 2), ("add", 3, 2)),
                      extra_output=1), fraction=0.0)
def test_optimum_equals_brute_force(name: str, spec, fraction: float) -> None:
    """Every recomputation pattern is checked by brute force (``test_milp._brute_force``: the rows
    count the simulator's peak to the byte); the solver's proven optimum must be the fastest one
    that fits, its bound never above it, its schedule valid under the simulator, and exact mode
    and the least-peak search on this solver must agree with brute force too."""
    graph, budget, problem, form, (best, peaks) = brute_forced_case(spec, fraction)
    lowest = lowest_peak_search(graph, CPU, time_limit=20.0, solver=name)
    assert lowest.optimal and lowest.peak_bytes == min(peaks)
    assert lowest.lower_bound_bytes <= lowest.peak_bytes
    outcome = BACKENDS[name](form, 30.0, gap=0.0)
    if best is None:
        assert outcome.x is None and not outcome.optimal
        return
    assert outcome.optimal, outcome.message
    assert form.violation(outcome.x) <= 1e-9
    assert form.objective(outcome.x) == pytest.approx(best, rel=1e-9, abs=1e-15)
    for bound in (outcome.root_bound, outcome.bound):
        assert form.problem.base_time + form.time_unit * bound <= best * (1 + 1e-9)
    result = planner.simulate(graph, problem.schedule(form.recompute_of(outcome.x)), CPU)
    assert result.peak_bytes <= budget and result.time == pytest.approx(best, rel=1e-9)
    found = exact_search(graph, CPU, budget, time_limit=20.0, solver=name)
    assert found.optimal and name in found.message
    assert found.time == pytest.approx(best, rel=2e-4)
    assert max(found.lower_bound, found.root_bound) <= best * (1 + 1e-12)
    assert planner.simulate(graph, found.schedule, CPU).peak_bytes <= budget


@pytest.mark.parametrize("name", sorted(BACKENDS))
@pytest.mark.parametrize("fraction", [0.6, 0.5])
def test_agrees_with_highs_on_the_transformer(name: str, fraction: float, transformer: Workload) -> None:
    """A formulation with memory units of many bytes and fractional objective coefficients (CP-SAT
    scales and rounds them down): the same optimum as HiGHS, a bound below it, from HiGHS's
    answer as the MIP start."""
    form = formulate(exact_problem(transformer.graph, CPU), _budget(transformer.graph, fraction))
    reference = solve_highs(form, 30.0, gap=0.0)
    assert reference.optimal
    ours = BACKENDS[name](form, 30.0, start=reference.x, gap=0.0)
    assert ours.optimal, ours.message
    assert form.violation(ours.x) <= 1e-9
    assert form.objective(ours.x) == pytest.approx(form.objective(reference.x), rel=1e-9)
    assert ours.bound <= form.cost @ reference.x * (1 + 1e-9)


def test_cpsat_keeps_every_pattern_the_rows_accept(transformer: Workload) -> None:
    """The integer domains CP-SAT gets for the continuous columns (``solvers._upper``) hold every
    least point: fast mode's plan, store-all and checkpoint-all patterns."""
    graph = transformer.graph
    problem = exact_problem(graph, CPU)
    form = formulate(problem, _budget(graph, 0.5))
    upper = solvers._upper(form)
    fast = planner.plan(graph, _budget(graph, 0.5), cost_model=CPU, op_variants=False)
    patterns = [problem.recomputations(fast.schedule) & (form.recompute_index >= 0),
                np.zeros(form.recompute_index.shape, bool), form.recompute_index >= 0]
    for recompute in patterns:
        x = form.vector(problem.minimal_keep(recompute), recompute)
        assert np.all(x <= upper + 1e-9) and np.array_equal(x, np.round(x))


def test_cpsat_refuses_fractional_rows(transformer: Workload) -> None:
    form = formulate(exact_problem(transformer.graph, CPU), _budget(transformer.graph, 0.5))
    halved = dataclasses.replace(form, matrix=form.matrix * 0.5)
    with pytest.raises(ValueError, match="integer"):
        solvers.to_cpsat(halved)


@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_time_limit_and_stop(name: str) -> None:
    """ResNet-50 at 33% (a cell no solver closes in seconds): the time limit holds within 2 s,
    building included, and ``progress`` returning True stops the solver with its incumbent. (10 s:
    on 2 busy cores building this MILP takes up to 5 s, and the limit now covers it.)"""
    import torch
    import torchvision

    graph = planner.capture(torchvision.models.resnet50().train(), torch.randn(8, 3, 64, 64))
    budget = _budget(graph, 0.33)
    began = time.perf_counter()
    found = exact_search(graph, CPU, budget, time_limit=10.0, solver=name)
    assert time.perf_counter() - began <= 10.0 + 2.0
    assert found.schedule is not None and found.lower_bound <= found.time * (1 + 1e-12)
    seen = []
    stopped = exact_search(graph, CPU, budget, time_limit=30.0, solver=name,
                           progress=lambda incumbent, bound, elapsed: seen.append(incumbent) or True)
    assert seen and stopped.schedule is not None and not stopped.optimal


def test_plan_takes_the_solver_and_keeps_it(transformer: Workload, tmp_path) -> None:
    chosen = planner.plan(transformer.graph, _budget(transformer.graph, 0.6), mode="exact", time_limit=20,
                          cost_model=CPU, solver="cpsat")
    assert "cpsat: OPTIMAL" in chosen.message  # CP-SAT solved the MILP to its optimum
    # ... which is the answer, unless fast mode's plan (outside staged schedules) is faster still
    assert chosen.status == "optimal" or (chosen.status == "fallback" and "fast mode's plan is faster" in chosen.message)
    chosen.save(tmp_path / "plan.json")
    assert planner.Plan.load(tmp_path / "plan.json").request.solver == "cpsat"


def test_unknown_or_missing_solver_is_a_typed_error(transformer: Workload, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SolverUnavailableError, match="choose one of"):
        planner.plan(transformer.graph, "50%", mode="exact", solver="gurobi")
    with pytest.raises(ValueError, match='mode="exact"'):
        planner.plan(transformer.graph, "50%", solver="cpsat")
    monkeypatch.setitem(sys.modules, "ortools", None)  # import ortools now raises ImportError
    for call in (lambda: planner.plan(transformer.graph, "50%", mode="exact", solver="cpsat"),
                 lambda: exact_search(transformer.graph, CPU, _budget(transformer.graph, 0.5), 5.0, solver="cpsat")):
        with pytest.raises(SolverUnavailableError, match=r"pip install remat-planner\[cpsat\]"):
            call()
