"""Exact mode: the staged problem, the MILP against brute force, the decoded schedules against the
simulator and eager PyTorch, and the fallbacks (solver failure, no time, no highspy, stopped)."""
from __future__ import annotations

import copy
import itertools
import re
import sys
import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

import planner
from planner import InfeasibleBudgetError
from planner.algorithms import milp
from planner.algorithms.milp import encode, exact_problem, exact_search, formulate, lowest_peak_search, lp_bound, solve_highs, solve_scipy
from planner.algorithms.neighbourhood import window_search
from planner.algorithms.staging import build_problem

from _random_dags import DagSpec, build_dag, dag_specs
from _workloads import Workload, assert_same_step, build_workload, planned_step
from _workloads import one_intra_op_thread  # noqa: F401  (autouse fixture)

CPU = planner.RooflineCostModel("cpu")
PEAK_TOLERANCE = 0.01
BRUTE_FORCE_COLUMNS = 12  # 4096 recomputation patterns


def _budget(graph, fraction: float) -> int:
    store_all = planner.simulate(graph, planner.Schedule.store_all(graph), CPU).peak_bytes
    return graph.resident_bytes + int(fraction * (store_all - graph.resident_bytes))


def _budget_above_floor(graph, fraction: float) -> int:
    """``fraction`` of the way from what every staged schedule holds at its fullest step (on small
    random graphs most budgets below that) to store-all's peak."""
    floor = formulate(exact_problem(graph, CPU), None)
    floor_bytes = graph.resident_bytes + floor.unit * int(floor.memory_fixed.max())
    store_all = planner.simulate(graph, planner.Schedule.store_all(graph), CPU).peak_bytes
    return floor_bytes + int(fraction * (store_all - floor_bytes))


@pytest.fixture(scope="module")
def resnet18() -> Workload:
    """Batch 8 at 64x64: activations are about half the peak, so budgets force recomputation."""
    return build_workload("resnet18", CPU, batch=8)


@pytest.fixture(scope="module")
def transformer() -> Workload:
    return build_workload("transformer")


# ---- the staged problem --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["resnet18", "transformer"])
def test_staged_store_all_is_store_all(name: str, request: pytest.FixtureRequest) -> None:
    """With nothing recomputed the staged order peaks exactly where plain PyTorch does: the fixed
    backward profile and the lazily emitted views lose nothing."""
    graph = request.getfixturevalue(name).graph
    problem = build_problem(graph, CPU)
    assert sorted(op for node in problem.nodes for op in node.ops) == list(graph.forward_ops)
    staged = planner.simulate(graph, problem.schedule(np.zeros((problem.n_stages, len(problem.nodes)), bool)), CPU)
    reference = planner.simulate(graph, planner.Schedule.store_all(graph), CPU)
    assert staged.peak_bytes == reference.peak_bytes
    assert staged.time == pytest.approx(reference.time, rel=1e-12)


# ---- the MILP equals brute force, and its memory rows count what the simulator does ---------------------
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=dag_specs(min_ops=3, max_ops=6), fraction=st.floats(0.0, 1.0), block_order=st.booleans())
def test_milp_optimum_equals_brute_force(spec, fraction: float, block_order: bool) -> None:
    """Every recomputation pattern, each with the least holding it needs (memory only grows with
    what is held), is checked against the rows: the peak the memory rows count is the simulator's
    peak of the decoded schedule, to the byte (the unit is one byte on these graphs), so the rows
    accept a pattern exactly when its schedule fits. The best feasible one must be what HiGHS
    proves optimal, and no bound it reports (root, final, the LP relaxation, exact mode's) may be
    above it; exact mode's least-peak search must find the least peak of all patterns. In the
    hierarchy's backward order (what exact mode solves) and in graph order."""
    graph = build_dag(spec).graph
    budget = _budget_above_floor(graph, fraction)
    problem = exact_problem(graph, CPU) if block_order else build_problem(graph, CPU)
    form = formulate(problem, budget)
    searched = _brute_force(graph, problem, form, budget)
    assume(searched is not None)
    best, peaks = searched
    if block_order:  # exact mode's lowest feasible budget is the least peak of any pattern
        lowest = lowest_peak_search(graph, CPU, time_limit=20.0)
        assert lowest.optimal and lowest.peak_bytes == min(peaks)
        assert lowest.lower_bound_bytes <= lowest.peak_bytes
    if form.constant_violation:
        assert best is None
        return
    outcome = solve_highs(form, 30.0, gap=0.0)
    if best is None:
        assert outcome.x is None
        return
    assert outcome.optimal
    assert form.objective(outcome.x) == pytest.approx(best, rel=1e-9, abs=1e-15)
    for bound in (outcome.root_bound, outcome.bound, lp_bound(form, 30.0)):
        assert milp._seconds(form, bound) <= best * (1 + 1e-9)
    if block_order:
        for whole in (0, milp.WHOLE_NONZEROS):  # by rounds of phase rows, and whole (these models are small)
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(milp, "WHOLE_NONZEROS", whole)
                found = exact_search(graph, CPU, budget, time_limit=20.0)
            assert found.optimal
            assert found.time == pytest.approx(best, rel=2e-4)
            assert max(found.lower_bound, found.root_bound) <= best * (1 + 1e-12)


# a graph whose recomputation phases bind at its floor budget: the optimum without phase rows
# breaks one, and no staged schedule fits (found by searching random DAGs)
PHASES_BIND = DagSpec(d=4, batch=6, ops=(("linear", 0, 0), ("relu", 1, 1), ("relu", 2, 2), ("linear", 3, 3),
                                         ("relu", 4, 4), ("linear", 5, 5), ("relu", 5, 5)), extra_output=None)


@pytest.mark.parametrize("whole", [False, True])
def test_row_generation_never_answers_a_schedule_that_breaks_a_phase(whole: bool,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The first round's answer breaks a phase row: exact mode must add it and solve again, and
    report no schedule, since brute force finds none that fits: by rounds of the broken phases,
    and, with ``milp.WHOLE_NONZEROS`` at its size, by one round with every phase row."""
    graph = build_dag(PHASES_BIND).graph
    budget = _budget_above_floor(graph, 0.0)
    problem = exact_problem(graph, CPU)
    full, relaxed = formulate(problem, budget), formulate(problem, budget, phases=set())
    first = solve_highs(relaxed, 30.0, gap=0.0)
    assert first.optimal
    assert full.phases_over_budget(milp.staged_point(problem, full, relaxed.recompute_of(first.x))), \
        "the premise: without phase rows the optimum breaks one"
    assert _brute_force(graph, problem, full, budget)[0] is None, "the premise: no staged schedule fits"
    monkeypatch.setattr(milp, "WHOLE_NONZEROS", full.matrix.nnz if whole else full.matrix.nnz - 1)
    found = exact_search(graph, CPU, budget, time_limit=20.0)
    assert found.schedule is None and "no schedule found" in found.message
    rounds, stages = re.search(r"(\d+) rounds, phase rows of (\d+) of", found.message).groups()
    if whole:  # one round, every phase row in it
        assert (int(rounds), int(stages)) == (1, problem.n_stages), found.message
    else:
        assert int(rounds) >= 2 and int(stages) < problem.n_stages, found.message


def _brute_force(graph, problem, form, budget: int) -> tuple[float | None, list[int]] | None:
    """Every recomputation pattern at its least holding, each checked against the simulator: the
    fastest fitting one's time and every pattern's peak (None: too many patterns)."""
    assert form.unit == 1
    patterns = _patterns(form)
    if patterns is None:
        return None
    best, peaks = None, []
    for recompute in patterns:
        keep = problem.minimal_keep(recompute)
        assert not (keep & (form.keep_index < 0)).any(), "a needed group has no variable at that stage"
        x = form.vector(keep, recompute)
        result = planner.simulate(graph, problem.schedule(recompute), CPU)
        peaks.append(result.peak_bytes)
        assert form.peak_bytes(x) == result.peak_bytes, "the memory rows count another peak than the simulator"
        fits = result.peak_bytes <= budget
        assert (form.violation(x) <= 1e-9) == fits, "the rows reject a schedule that fits" if fits else \
            "the rows accept a schedule over the budget"
        if not fits:
            continue
        assert result.time == pytest.approx(form.objective(x), rel=1e-9)
        best = form.objective(x) if best is None else min(best, form.objective(x))
    return best, peaks


def staged_case(spec: DagSpec, fraction: float):
    """A random DAG at ``fraction`` above its floor, in exact mode's staged problem; the example is
    skipped where its patterns are too many to brute-force or nothing fits."""
    graph = build_dag(spec).graph
    budget = _budget_above_floor(graph, fraction)
    problem = exact_problem(graph, CPU)
    form = formulate(problem, budget)
    assume(_patterns(form) is not None and not form.constant_violation)
    return graph, budget, problem, form


def brute_forced_case(spec: DagSpec, fraction: float):
    """``staged_case`` with its brute force (``_brute_force``)."""
    graph, budget, problem, form = staged_case(spec, fraction)
    return graph, budget, problem, form, _brute_force(graph, problem, form, budget)


def _patterns(form) -> list[np.ndarray] | None:
    """Every recomputation pattern the columns allow (None: more than ``BRUTE_FORCE_COLUMNS``)."""
    free = [(k, f) for k, f in zip(*np.nonzero(form.recompute_index >= 0))
            if form.col_upper[form.recompute_index[k, f]] > 0]
    if len(free) > BRUTE_FORCE_COLUMNS:
        return None
    patterns = []
    for chosen in itertools.product((False, True), repeat=len(free)):
        recompute = np.zeros(form.recompute_index.shape, dtype=bool)
        for (k, f), on in zip(free, chosen):
            recompute[k, f] = on
        patterns.append(recompute)
    return patterns


REPAIRS_PER_CASE = 4


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(spec=dag_specs(min_ops=3, max_ops=6), fraction=st.floats(0.0, 0.3))
@example(spec=PHASES_BIND, fraction=0.0)
def test_a_start_that_breaks_a_phase_is_repaired_into_one_that_fits(spec, fraction: float) -> None:
    """Every pattern whose point breaks a recomputation phase, repaired (``milp._repaired``): the
    answer satisfies every row and its decoded schedule fits the budget in the simulator; where
    the repair's window spans every stage it is the whole MILP, so it finds the brute-force
    optimum whenever some staged schedule fits, and nothing where none does."""
    graph, budget, problem, form = staged_case(spec, fraction)
    broken = [x for x in (milp.staged_point(problem, form, r) for r in _patterns(form)) if form.phases_over_budget(x)]
    assume(broken)  # before the brute force: most examples break no phase
    best, _ = _brute_force(graph, problem, form, budget)
    for x in broken[:: -(-len(broken) // REPAIRS_PER_CASE)]:  # each repair is a MILP solve: a spread of them
        repaired = milp._repaired(problem, form, x, time.perf_counter() + 30.0)
        window = {k for p in form.phases_over_budget(x)
                  for k in range(p - milp.REPAIR_WINDOW, p + milp.REPAIR_WINDOW + 1)}
        if best is None:
            assert repaired is None
        elif window >= set(range(problem.n_stages)):
            assert repaired is not None and form.objective(repaired) == pytest.approx(best, rel=1e-3)
        if repaired is not None:
            assert form.violation(repaired) <= 1e-9
            assert planner.simulate(graph, problem.schedule(form.recompute_of(repaired)), CPU).peak_bytes <= budget


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(spec=dag_specs(min_ops=3, max_ops=6), fraction=st.floats(0.0, 1.0), width=st.integers(1, 4))
def test_the_window_search_improves_a_start_into_schedules_that_fit(spec, fraction: float, width: int) -> None:
    """The window search (``neighbourhood.window_search``) from the slowest pattern that fits:
    its answer satisfies every row, decodes to a schedule that fits the budget in the simulator
    at the objective's time, is never slower than the start nor faster than the brute-force
    optimum; with one window spanning every node it is the whole MILP, so it is that optimum."""
    graph, budget, problem, form = staged_case(spec, fraction)
    fitting = [x for x in (milp.staged_point(problem, form, r) for r in _patterns(form)) if form.violation(x) <= 1e-9]
    assume(len(fitting) > 1)
    best, _ = _brute_force(graph, problem, form, budget)
    start = max(fitting, key=form.objective)
    found, report = window_search(problem, form, start, time.perf_counter() + 30.0, width=width)
    assert form.violation(found) <= 1e-9 and report.windows >= 1
    result = planner.simulate(graph, problem.schedule(form.recompute_of(found)), CPU)
    assert result.peak_bytes <= budget
    assert result.time == pytest.approx(form.objective(found), rel=1e-9)
    assert best * (1 - 1e-9) <= form.objective(found) <= form.objective(start)
    if width >= len(problem.nodes):
        assert form.objective(found) == pytest.approx(best, rel=1e-3)


def test_where_the_rounds_stall_the_window_search_improves_the_incumbent(
        resnet18: Workload, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rounds whose solver returns its start unimproved at the time limit (what HiGHS does on
    ResNet-50 b64 at 33% of store-all): exact mode's answer is still faster than that start, from
    the window search, keeps the rounds' bound, fits and executes like eager."""
    def stalled(form, time_limit, start=None, *args, **kwargs):
        return milp.SolveOutcome(start, -np.inf, -np.inf, False, "highs", "Time limit reached")

    monkeypatch.setattr(milp, "solve", stalled)
    budget = _budget(resnet18.graph, 0.65)
    fast = planner.plan(resnet18.graph, budget, cost_model=CPU, op_variants=False)
    found = exact_search(resnet18.graph, CPU, budget, time_limit=20.0, starts=[fast.schedule])
    assert "window search" in found.message and not found.optimal
    assert found.schedule is not None and found.time < found.start_time * (1 - 1e-6), found.message
    result = planner.simulate(resnet18.graph, found.schedule, CPU)
    assert result.peak_bytes <= budget and result.time == pytest.approx(found.time, rel=1e-12)
    assert found.lower_bound == -np.inf
    model = resnet18.fresh_copy()
    pm = planner.PlannedModule(model, resnet18.graph, found.schedule)
    assert_same_step(planned_step(model, pm, resnet18.x, resnet18.loss, seed=1), resnet18.reference(seed=1))


def test_the_window_search_gets_time_only_where_the_start_is_far_from_the_universal_bound(
        resnet18: Workload, monkeypatch: pytest.MonkeyPatch) -> None:
    """The rounds' time limit: all the solver's time where the start is within ``WINDOW_GAP`` of
    the universal bound, all but ``WINDOW_SHARE`` of it where the start is further above."""
    limits = []

    def stalled(form, time_limit, start=None, *args, **kwargs):
        limits.append(time_limit)
        return milp.SolveOutcome(start, -np.inf, -np.inf, False, "highs", "Time limit reached")

    monkeypatch.setattr(milp, "solve", stalled)
    budget = _budget(resnet18.graph, 0.65)
    fast = planner.plan(resnet18.graph, budget, cost_model=CPU, op_variants=False)
    near = fast.predicted_time * (1 - milp.WINDOW_GAP / 2)
    far = fast.predicted_time * (1 - 2 * milp.WINDOW_GAP)
    for universal in (near, far):
        exact_search(resnet18.graph, CPU, budget, time_limit=10.0, starts=[fast.schedule], universal=universal)
    near_limit, far_limit = limits
    assert near_limit > 5.0, f"a start near the bound: the round got {near_limit:.1f} s of 10"
    assert far_limit < (1 - milp.WINDOW_SHARE) * near_limit + 0.5, \
        f"a far start: the round got {far_limit:.1f} s, against {near_limit:.1f} s near the bound"


@pytest.mark.parametrize("name,fraction", [("resnet18", 0.5), ("transformer", 0.5), ("transformer", 0.33)])
def test_fast_mode_plan_enters_the_solver(name: str, fraction: float, request: pytest.FixtureRequest) -> None:
    """The warm start: fast mode's plan, as the staged schedule it maps to, satisfies every row
    whenever that schedule fits (its rows count the simulator's peak, up to rounding each group
    to the memory unit), and exact mode starts from it, so its answer is never slower."""
    graph = request.getfixturevalue(name).graph
    budget = _budget(graph, fraction)
    fast = planner.plan(graph, budget, cost_model=CPU, op_variants=False)
    problem = exact_problem(graph, CPU)
    form = formulate(problem, budget)
    x = encode(problem, form, fast.schedule)
    assert x is not None
    image = planner.simulate(graph, problem.schedule(form.recompute_of(x)), CPU)
    assert image.peak_bytes <= form.peak_bytes(x) <= image.peak_bytes + form.unit * (len(problem.groups) + 1)
    assert image.time == pytest.approx(form.objective(x), rel=1e-9)
    assert form.peak_bytes(x) <= budget, "the premise: fast mode's staged image fits this budget"
    assert form.violation(x) <= 1e-9, "the MILP's own rows reject a schedule that fits"
    found = exact_search(graph, CPU, budget, time_limit=3.0, starts=[fast.schedule])
    assert found.start_time is not None and found.start_time <= image.time * (1 + 1e-9)
    assert found.schedule is not None and found.time <= found.start_time * (1 + 1e-9)


@settings(max_examples=5, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(spec=dag_specs(min_ops=5, max_ops=8), fraction=st.floats(0.0, 0.8))
def test_exact_plans_of_random_models_execute_like_eager(spec, fraction: float) -> None:
    """Decoded MILP schedules pass the simulator and run with eager's loss and gradients, bitwise."""
    case = build_dag(spec)
    budget = _budget_above_floor(case.graph, fraction)
    found = exact_search(case.graph, CPU, budget, time_limit=10.0)
    assume(found.schedule is not None)
    result = planner.simulate(case.graph, found.schedule, CPU)  # raises on an invalid schedule
    assert result.peak_bytes <= budget and result.time == pytest.approx(found.time, rel=1e-12)

    def step(module) -> dict:
        torch.manual_seed(1)
        outputs = module(case.x)
        loss = sum(o.sum() * o.sum() for o in (outputs if isinstance(outputs, tuple) else (outputs,)))
        loss.backward()
        return {"loss": loss.detach()} | {n: p.grad for n, p in model_of(module).named_parameters()}

    eager = copy.deepcopy(case.model)
    model_of = lambda module: module if module is eager else planned  # noqa: E731
    planned = copy.deepcopy(case.model)
    want = step(eager)
    got = step(planner.PlannedModule(planned, case.graph, found.schedule))
    assert want.keys() == got.keys()
    for key, value in want.items():
        assert (value is None) == (got[key] is None), key
        assert value is None or torch.equal(value, got[key]), key


def test_scipy_backend_agrees_with_highspy(transformer: Workload) -> None:
    form = formulate(build_problem(transformer.graph, CPU), _budget(transformer.graph, 0.6))
    ours, theirs = solve_highs(form, 30.0), solve_scipy(form, 30.0)
    assert ours.optimal and theirs.optimal
    assert form.objective(ours.x) == pytest.approx(form.objective(theirs.x), rel=1e-3)
    assert form.violation(ours.x) <= 1e-6 and form.violation(theirs.x) <= 1e-6


# ---- exact plans run like eager PyTorch -----------------------------------------------------------------
@pytest.fixture(scope="module")
def unet() -> Workload:
    return build_workload("unet")


@pytest.mark.parametrize("name,fraction", [("resnet18", 0.65), ("transformer", 0.5), ("unet", 0.5)])
def test_exact_schedule_executes_like_eager(name: str, fraction: float, request: pytest.FixtureRequest) -> None:
    work: Workload = request.getfixturevalue(name)
    budget = _budget(work.graph, fraction)
    found = exact_search(work.graph, CPU, budget, time_limit=15.0)
    assert found.schedule is not None, found.message
    result = planner.simulate(work.graph, found.schedule, CPU)
    assert result.peak_bytes <= budget and result.recomputations > 0

    model = work.fresh_copy()
    pm = planner.PlannedModule(model, work.graph, found.schedule)
    assert_same_step(planned_step(model, pm, work.x, work.loss, seed=1), work.reference(seed=1))
    measured = planner.measure_step(model, lambda: work.loss(pm(work.x)).backward(), work.held)
    error = abs(measured.peak_bytes - result.peak_bytes) / result.peak_bytes
    assert error <= PEAK_TOLERANCE, f"measured {measured.peak_bytes} vs predicted {result.peak_bytes}"


@pytest.mark.parametrize("name,fraction", [("transformer", 0.6), ("resnet18", 0.8)])
def test_milp_optimum_has_no_better_neighbour(name: str, fraction: float, request: pytest.FixtureRequest) -> None:
    """The MILP alone on real models, against its own search space around its answer (brute force
    is out of reach there): every staged schedule one recomputation away from HiGHS's optimum that
    the rows accept fits the budget in the simulator, is no faster than the optimum, and no faster
    than the proven bound. (Exact mode is never slower than fast mode by construction, since fast
    mode's plan is one of its candidates: that comparison could not fail.)"""
    graph = request.getfixturevalue(name).graph
    budget = _budget(graph, fraction)
    problem = build_problem(graph, CPU)
    form = formulate(problem, budget)
    outcome = solve_highs(form, 30.0, gap=0.0)
    assert outcome.x is not None and outcome.optimal, outcome.message
    recompute = form.recompute_of(outcome.x)
    optimum = planner.simulate(graph, problem.schedule(recompute), CPU)
    assert optimum.peak_bytes <= budget and optimum.recomputations > 0
    assert optimum.time == pytest.approx(form.objective(form.rounded(outcome.x)), rel=1e-9)
    bound = milp._seconds(form, outcome.bound)
    assert bound <= optimum.time * (1 + 1e-9)
    flips = np.argwhere(form.recompute_index >= 0)
    flips = flips[np.random.default_rng(0).permutation(len(flips))[:400]]
    accepted = 0
    for k, f in flips:
        neighbour = recompute.copy()
        neighbour[k, f] = not neighbour[k, f]
        x = form.vector(problem.minimal_keep(neighbour), neighbour)
        if form.violation(x) > 1e-9:
            continue
        accepted += 1
        result = planner.simulate(graph, problem.schedule(neighbour), CPU)
        assert result.peak_bytes <= budget, f"the rows accept a schedule peaking at {result.peak_bytes} > {budget}"
        assert result.time >= optimum.time * (1 - 1e-9), f"recomputing node {f} before stage {k} is faster"
        assert result.time >= bound * (1 - 1e-9)
    assert accepted >= 10, f"only {accepted} of {len(flips)} neighbours fit: the check checked little"


def test_exact_mode_finds_better_plans_than_fast_mode(resnet18: Workload) -> None:
    """Not a guarantee in general, but on resnet18 at 65% of the activations the DP's
    segmentations leave time on the table that the MILP's throw-away checkpoints recover."""
    budget = _budget(resnet18.graph, 0.65)
    fast = planner.plan(resnet18.graph, budget, cost_model=CPU)
    exact = planner.plan(resnet18.graph, budget, mode="exact", time_limit=15, cost_model=CPU)
    assert exact.algorithm == "milp" and exact.status in ("optimal", "feasible")
    assert exact.predicted_time < fast.predicted_time
    # the message says what was proven, and over which schedules
    assert "incumbent" in exact.message and "root bound" in exact.message and "final bound" in exact.message
    assert milp.SCHEDULE_CLASS in exact.message
    assert exact.lower_bound <= exact.predicted_time


def test_time_limit_is_respected() -> None:
    import torchvision

    model = torchvision.models.resnet50().train()
    graph = planner.capture(model, torch.randn(8, 3, 64, 64))
    began = time.perf_counter()
    chosen = planner.plan(graph, _budget(graph, 0.33), mode="exact", time_limit=3, cost_model=CPU)
    assert time.perf_counter() - began <= 3 + 2.0
    assert chosen.status in ("feasible", "fallback", "optimal")
    if chosen.status == "feasible":
        assert chosen.gap is not None and 0 <= chosen.gap < 1


def test_time_limit_covers_the_work_after_the_last_solve(resnet18: Workload, monkeypatch: pytest.MonkeyPatch) -> None:
    """A solver that spends its whole time limit (HiGHS does at tight budgets) and a slow simulator
    (a large graph's decoding): the search keeps back what follows the solve, measured on the
    start, so it ends within its limit. Without that it ends one simulation (``SLOW``) late."""
    slow, limit = 1.5, 4.0
    real_simulate, real_solve = milp.simulate, milp.solve

    def slow_simulate(*args, **kwargs):
        time.sleep(slow)
        return real_simulate(*args, **kwargs)

    def whole_limit(form, time_limit, *args, **kwargs):
        began = time.perf_counter()
        outcome = real_solve(form, time_limit, *args, **kwargs)
        time.sleep(max(0.0, time_limit - (time.perf_counter() - began)))
        return outcome

    monkeypatch.setattr(milp, "simulate", slow_simulate)
    monkeypatch.setattr(milp, "solve", whole_limit)
    budget = _budget(resnet18.graph, 0.65)
    began = time.perf_counter()
    found = exact_search(resnet18.graph, CPU, budget, time_limit=limit)
    elapsed = time.perf_counter() - began
    assert found.schedule is not None, found.message
    assert elapsed <= limit + slow / 2, f"{elapsed:.2f} s against a {limit} s limit"


# ---- faults ---------------------------------------------------------------------------------------------
def test_solver_failure_falls_back_to_fast_mode(resnet18: Workload, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("HiGHS exploded")

    monkeypatch.setattr(milp, "solve_highs", broken)
    budget = _budget(resnet18.graph, 0.65)
    exact = planner.plan(resnet18.graph, budget, mode="exact", time_limit=10, cost_model=CPU)
    fast = planner.plan(resnet18.graph, budget, cost_model=CPU)
    assert exact.status == "fallback" and exact.schedule == fast.schedule
    assert "HiGHS exploded" in exact.message


def test_time_limit_zero_returns_fast_mode_at_once(resnet18: Workload) -> None:
    budget = _budget(resnet18.graph, 0.65)
    began = time.perf_counter()
    exact = planner.plan(resnet18.graph, budget, mode="exact", time_limit=0, cost_model=CPU)
    assert time.perf_counter() - began < 5
    assert exact.status == "fallback" and "time limit" in exact.message
    assert exact.schedule == planner.plan(resnet18.graph, budget, cost_model=CPU).schedule


def test_without_highspy_scipy_solves(transformer: Workload, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "highspy", None)  # import highspy now raises ImportError
    exact = planner.plan(transformer.graph, _budget(transformer.graph, 0.6), mode="exact", time_limit=20,
                         cost_model=CPU)
    assert "scipy: Optimization terminated successfully" in exact.message  # scipy solved the MILP to its optimum
    # ... which is the answer, unless fast mode's plan (outside staged schedules) is faster still
    assert exact.status == "optimal" or (exact.status == "fallback" and "fast mode's plan is faster" in exact.message)


def test_stopping_the_solver_keeps_its_incumbent(resnet18: Workload) -> None:
    """``progress`` returning True interrupts HiGHS (what Ctrl-C in the CLI does): the answer is
    the incumbent so far, or fast mode's plan, never an error."""
    seen = []

    def stop_at_first(incumbent: float, bound: float, elapsed: float) -> bool:
        seen.append((incumbent, bound))
        return True

    budget = _budget(resnet18.graph, 0.5)
    chosen = planner.plan(resnet18.graph, budget, mode="exact", time_limit=20, cost_model=CPU,
                          progress=stop_at_first)
    assert len(seen) >= 1
    assert chosen.predicted_peak_bytes <= budget
    assert chosen.status in ("feasible", "fallback", "optimal")


def test_exact_mode_below_the_minimum_names_it(resnet18: Workload) -> None:
    with pytest.raises(InfeasibleBudgetError) as error:
        planner.plan(resnet18.graph, resnet18.graph.resident_bytes, mode="exact", time_limit=5,
                     cost_model=CPU)
    assert error.value.min_feasible_bytes > resnet18.graph.resident_bytes


def test_below_fast_modes_least_peak_the_start_comes_from_the_least_peak_milp(unet: Workload) -> None:
    """A budget no heuristic's plan fits but a staged schedule does (the UNet's staged least peak
    is below fast mode's): exact mode's start is the least-peak MILP's first fitting point, so it
    has a schedule within the budget from the start, which executes like eager."""
    graph = unet.graph
    with pytest.raises(InfeasibleBudgetError) as fast:
        planner.plan(graph, 1, cost_model=CPU, op_variants=False)
    staged = lowest_peak_search(graph, CPU, 20.0)
    assert staged.peak_bytes < fast.value.min_feasible_bytes, "the premise: a staged schedule below fast mode's"
    budget = (staged.peak_bytes + fast.value.min_feasible_bytes) // 2
    problem = exact_problem(graph, CPU)
    form = formulate(problem, budget)
    start = milp._best_start(graph, CPU, budget, problem, form, (), time.perf_counter() + 20.0)
    assert start is not None and form.violation(start) <= 1e-9
    assert planner.simulate(graph, problem.schedule(form.recompute_of(start)), CPU).peak_bytes <= budget
    found = exact_search(graph, CPU, budget, time_limit=10.0)
    assert found.start_time is not None and found.schedule is not None
    model = unet.fresh_copy()
    pm = planner.PlannedModule(model, graph, found.schedule)
    assert_same_step(planned_step(model, pm, unet.x, unet.loss, seed=1), unet.reference(seed=1))


def test_a_least_peak_meeting_the_memory_bound_is_optimal_despite_rounding() -> None:
    """VGG11 at batch 16: the MILP's rows round sizes to a unit of many bytes, so its own bound
    cannot prove the least staged peak; that peak equals ``memory_lower_bound`` (every schedule
    runs the largest op), which proves it least over every schedule."""
    import torchvision

    from planner.algorithms.bounds import memory_lower_bound

    torch.manual_seed(0)
    graph = planner.capture(torchvision.models.vgg11().train(), torch.randn(16, 3, 224, 224),
                            torch.nn.functional.cross_entropy, targets=torch.randint(0, 1000, (16,)))
    assert formulate(exact_problem(graph, CPU), None).unit > 1, "the premise: rows in rounded units"
    lowest = lowest_peak_search(graph, CPU, 20.0)
    assert lowest.peak_bytes == lowest.lower_bound_bytes == memory_lower_bound(graph, CPU)
    assert lowest.optimal and "memory_lower_bound" in lowest.message
    assert planner.simulate(graph, lowest.schedule, CPU).peak_bytes == lowest.peak_bytes
