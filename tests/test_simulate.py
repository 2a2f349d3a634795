"""The simulator: validation of schedules, recomputation, peak/time/timeline bookkeeping."""
from __future__ import annotations

import random

import numpy as np
import pytest

import planner
from planner import Compute, Free, InvalidScheduleError, Phase, Schedule, TrainingGraph
from planner.schedule import Step

from conftest import Case


def _steps(schedule: Schedule) -> list[Step]:
    return list(schedule.steps)


def _position(steps: list[Step], step: Step) -> int:
    return steps.index(step)


def _terminal_backward_op(g: TrainingGraph) -> int:
    """A backward op whose outputs nobody reads (it produces a parameter gradient)."""
    return next(op.id for op in g.ops if op.phase is Phase.BACKWARD and op.outputs
                and all(not g.tensors[t].consumers for t in op.outputs))


def _recompute_candidate(g: TrainingGraph) -> tuple[int, int]:
    """(forward op f, its first backward consumer b) such that recomputing f right before b
    extends no other tensor's lifetime: f's inputs are resident or alive until b anyway, and f's
    single output has a storage of its own (no views of it outlive it)."""
    sharing: dict[int, int] = {}
    for t in g.tensors:
        sharing[t.storage] = sharing.get(t.storage, 0) + 1
    for op in g.ops:
        if op.phase is not Phase.FORWARD or op.is_view or op.is_random or len(op.outputs) != 1:
            continue
        out = g.tensors[op.outputs[0]]
        if sharing[out.storage] != 1:
            continue
        forward = [c for c in out.consumers if g.ops[c].phase is Phase.FORWARD]
        backward = [c for c in out.consumers if g.ops[c].phase is Phase.BACKWARD]
        if not forward or not backward:
            continue
        first_backward = backward[0]
        if all(g.is_resident(i) or max(g.tensors[i].consumers) >= first_backward for i in op.inputs):
            return op.id, first_backward
    raise AssertionError("no recomputation candidate in this graph")


# ---- valid schedules --------------------------------------------------------------------------------

def test_store_all_result_fields(tiny_cnn_case: Case) -> None:
    g = tiny_cnn_case.graph
    schedule = Schedule.store_all(g)
    result = planner.simulate(g, schedule)
    assert len(result.timeline) == len(schedule.steps)
    assert result.timeline.dtype == np.int64
    assert result.timeline.max() <= result.peak_bytes
    assert result.timeline.min() >= g.resident_bytes
    assert result.timeline[-1] == g.resident_bytes
    assert 0 <= result.peak_step < len(schedule.steps)
    assert isinstance(schedule.steps[result.peak_step], Compute)
    assert result.peak_bytes == result.timeline[result.peak_step]  # no workspace by default
    assert result.peak_activation_bytes == result.peak_bytes - g.resident_bytes > 0
    assert result.recomputations == 0
    assert result.compute_counts.tolist() == [1] * len(g.ops)
    expected_time = planner.RooflineCostModel("cpu").op_times(g).sum()
    assert result.time == pytest.approx(expected_time)


def test_timeline_tracks_allocations_by_hand(tiny_cnn_case: Case) -> None:
    """Recompute the memory curve independently: a storage is held while any tensor in it lives."""
    g = tiny_cnn_case.graph
    schedule = Schedule.store_all(g)
    result = planner.simulate(g, schedule)
    live: set[int] = set()
    expected = []
    for step in schedule.steps:
        if isinstance(step, Compute):
            live.update(g.ops[step.op].outputs)
        else:
            live.discard(step.tensor)
        storages = {g.tensors[t].storage for t in live} - g.resident_storages
        expected.append(g.resident_bytes + sum(g.storages[s].nbytes for s in storages))
    assert result.timeline.tolist() == expected
    assert result.peak_bytes == max(expected)


def test_random_topological_orders_are_valid(tiny_cnn_case: Case) -> None:
    """Any topological order of the ops, freed by ``from_order``, is a valid schedule."""
    g = tiny_cnn_case.graph
    store_all = planner.simulate(g, Schedule.store_all(g))
    rng = random.Random(0)
    deps = {op.id: {g.tensors[t].producer for t in op.inputs if g.tensors[t].producer is not None}
            for op in g.ops}
    for _ in range(10):
        done: set[int] = set()
        order: list[int] = []
        while len(order) < len(g.ops):
            ready = [o for o in deps if o not in done and deps[o] <= done]
            choice = rng.choice(ready)
            order.append(choice)
            done.add(choice)
        result = planner.simulate(g, Schedule.from_order(g, order))
        assert result.peak_bytes >= g.resident_bytes
        assert result.timeline[-1] == g.resident_bytes
        assert result.time == pytest.approx(store_all.time)  # same ops, same total time


@pytest.mark.parametrize("which", ["tiny_cnn_case", "resnet18_case"])
def test_recomputation_from_order(which: str, request: pytest.FixtureRequest) -> None:
    g = request.getfixturevalue(which).graph
    f, b = _recompute_candidate(g)
    schedule = Schedule.from_order(g, _order_with(g, f, b))
    assert schedule.recomputed_ops() == {f: 1}
    base = planner.simulate(g, Schedule.store_all(g))
    result = planner.simulate(g, schedule)
    assert result.recomputations == 1
    assert result.compute_counts[f] == 2
    assert result.peak_bytes <= base.peak_bytes
    assert result.time > base.time
    assert result.time == pytest.approx(base.time + planner.RooflineCostModel("cpu").op_times(g)[f])
    assert len(result.timeline) == len(schedule.steps)
    assert result.timeline.max() <= result.peak_bytes
    assert result.timeline[-1] == g.resident_bytes


def test_recomputation_by_hand(tiny_cnn_case: Case) -> None:
    """Edit store-all: free f's output after its last forward use, recompute f before backward."""
    g = tiny_cnn_case.graph
    f, b = _recompute_candidate(g)
    (out,) = g.ops[f].outputs
    last_forward = max(c for c in g.tensors[out].consumers if g.ops[c].phase is Phase.FORWARD)
    steps = _steps(Schedule.store_all(g))
    steps.remove(Free(out))
    steps.insert(_position(steps, Compute(last_forward)) + 1, Free(out))
    steps.insert(_position(steps, Compute(b)), Compute(f))
    steps.insert(_position(steps, Compute(max(g.tensors[out].consumers))) + 1, Free(out))
    schedule = Schedule(tuple(steps), g.fingerprint)
    base = planner.simulate(g, Schedule.store_all(g))
    result = planner.simulate(g, schedule)
    assert result.recomputations == 1
    assert result.peak_bytes <= base.peak_bytes
    assert result.time > base.time
    # the recomputation allocates the output's storage again, and only that
    again = _position(steps, Compute(b)) - 1
    assert steps[again] == Compute(f)
    assert result.timeline[again] - result.timeline[again - 1] == g.storages[g.tensors[out].storage].nbytes
    # and matches what from_order makes of the same order
    reference = planner.simulate(g, Schedule.from_order(g, _order_with(g, f, b)))
    assert result.peak_bytes == reference.peak_bytes
    assert result.time == pytest.approx(reference.time)


def _order_with(g: TrainingGraph, f: int, b: int) -> list[int]:
    order = list(range(len(g.ops)))
    order.insert(order.index(b), f)
    return order


def test_workspace_and_custom_cost_model(tiny_cnn_case: Case) -> None:
    """The simulator takes any object with ``op_times`` and ``workspace_bytes``."""
    g = tiny_cnn_case.graph
    heavy = next(op.id for op in g.ops if op.phase is Phase.BACKWARD and not op.is_view)

    class Fixed:
        name = "fixed"

        def op_times(self, graph: TrainingGraph) -> np.ndarray:
            return np.full(len(graph.ops), 0.5)

        def workspace_bytes(self, graph: TrainingGraph) -> np.ndarray:
            workspace = np.zeros(len(graph.ops), dtype=np.int64)
            workspace[heavy] = 10**9
            return workspace

    schedule = Schedule.store_all(g)
    result = planner.simulate(g, schedule, Fixed())
    assert result.time == pytest.approx(0.5 * len(g.ops))
    assert schedule.steps[result.peak_step] == Compute(heavy)
    assert result.peak_bytes == result.timeline[result.peak_step] + 10**9
    assert result.timeline.max() < result.peak_bytes  # the timeline excludes workspace


# ---- invalid schedules -----------------------------------------------------------------------------

def test_reading_a_freed_tensor_raises(tiny_cnn_case: Case) -> None:
    g = tiny_cnn_case.graph
    tensor = next(t for t in g.tensors if t.producer is not None and t.consumers
                  and not g.ops[t.producer].is_view)
    steps = _steps(Schedule.store_all(g))
    steps.remove(Free(tensor.id))
    steps.insert(_position(steps, Compute(tensor.producer)) + 1, Free(tensor.id))
    with pytest.raises(InvalidScheduleError, match="reads .* which is not live"):
        planner.simulate(g, Schedule(tuple(steps), g.fingerprint))


def test_double_free_raises(tiny_cnn_case: Case) -> None:
    g = tiny_cnn_case.graph
    steps = _steps(Schedule.store_all(g))
    index = next(i for i, s in enumerate(steps) if isinstance(s, Free))
    steps.insert(index + 1, steps[index])
    with pytest.raises(InvalidScheduleError, match="frees tensor .* not live"):
        planner.simulate(g, Schedule(tuple(steps), g.fingerprint))


def test_freeing_a_resident_tensor_raises(tiny_cnn_case: Case) -> None:
    g = tiny_cnn_case.graph
    steps = _steps(Schedule.store_all(g)) + [Free(g.inputs[0])]
    with pytest.raises(InvalidScheduleError, match="resident"):
        planner.simulate(g, Schedule(tuple(steps), g.fingerprint))


def test_freeing_an_unknown_tensor_raises(tiny_cnn_case: Case) -> None:
    g = tiny_cnn_case.graph
    for bad in (-1, len(g.tensors)):
        steps = _steps(Schedule.store_all(g)) + [Free(bad)]
        with pytest.raises(InvalidScheduleError):
            planner.simulate(g, Schedule(tuple(steps), g.fingerprint))


def test_unknown_op_raises(tiny_cnn_case: Case) -> None:
    g = tiny_cnn_case.graph
    for bad in (-1, len(g.ops)):
        steps = [Compute(bad)] + _steps(Schedule.store_all(g))
        with pytest.raises(InvalidScheduleError, match="does not exist"):
            planner.simulate(g, Schedule(tuple(steps), g.fingerprint))


def test_skipping_a_backward_op_raises(tiny_cnn_case: Case) -> None:
    g = tiny_cnn_case.graph
    skipped = _terminal_backward_op(g)
    schedule = Schedule.from_order(g, [i for i in range(len(g.ops)) if i != skipped])
    with pytest.raises(InvalidScheduleError, match=f"backward op {g.ops[skipped].name} is computed 0 times"):
        planner.simulate(g, schedule)


def test_skipping_a_backward_op_others_need_raises(tiny_cnn_case: Case) -> None:
    g = tiny_cnn_case.graph
    skipped = next(op.id for op in g.ops if op.phase is Phase.BACKWARD and op.outputs
                   and any(g.tensors[t].consumers for t in op.outputs))
    steps = [s for s in _steps(Schedule.store_all(g))
             if s != Compute(skipped) and not (isinstance(s, Free) and s.tensor in g.ops[skipped].outputs)]
    with pytest.raises(InvalidScheduleError):
        planner.simulate(g, Schedule(tuple(steps), g.fingerprint))


def test_computing_a_backward_op_twice_raises(tiny_cnn_case: Case) -> None:
    g = tiny_cnn_case.graph
    twice = _terminal_backward_op(g)
    order = list(range(len(g.ops)))
    order.insert(order.index(twice), twice)
    with pytest.raises(InvalidScheduleError, match="computed 2 times"):
        planner.simulate(g, Schedule.from_order(g, order))


def test_computing_an_op_while_its_output_is_live_raises(tiny_cnn_case: Case) -> None:
    g = tiny_cnn_case.graph
    op = next(op.id for op in g.ops if op.phase is Phase.BACKWARD and not op.is_view and op.outputs)
    steps = _steps(Schedule.store_all(g))
    steps.insert(_position(steps, Compute(op)) + 1, Compute(op))
    with pytest.raises(InvalidScheduleError, match="while its output .* is live"):
        planner.simulate(g, Schedule(tuple(steps), g.fingerprint))


def test_recomputing_while_a_view_is_live_raises() -> None:
    import torch

    from conftest import ViewModel

    torch.manual_seed(0)
    g = planner.capture(ViewModel(), torch.randn(2, 4))
    mm = next(op for op in g.ops if op.target == "aten.mm.default" and op.phase is Phase.FORWARD)
    (h,) = mm.outputs
    view = next(op for op in g.ops if op.is_view and h in op.inputs)
    steps = [Compute(mm.id), Compute(view.id), Free(h), Compute(mm.id)]
    with pytest.raises(InvalidScheduleError, match="view of its output"):
        planner.simulate(g, Schedule(tuple(steps), g.fingerprint))


def test_never_computing_a_forward_op_raises(tiny_cnn_case: Case) -> None:
    g = tiny_cnn_case.graph
    loss_op = g.tensors[g.loss].producer
    schedule = Schedule.from_order(g, [i for i in range(len(g.ops)) if i != loss_op])
    with pytest.raises(InvalidScheduleError, match="never computed"):
        planner.simulate(g, schedule)


def test_never_freeing_a_tensor_raises(tiny_cnn_case: Case) -> None:
    g = tiny_cnn_case.graph
    steps = _steps(Schedule.store_all(g))
    last_free = max(i for i, s in enumerate(steps) if isinstance(s, Free))
    del steps[last_free]
    with pytest.raises(InvalidScheduleError, match="never freed"):
        planner.simulate(g, Schedule(tuple(steps), g.fingerprint))


def test_never_freeing_a_gradient_raises(tiny_cnn_case: Case) -> None:
    g = tiny_cnn_case.graph
    grad = next(iter(g.gradients))
    steps = [s for s in _steps(Schedule.store_all(g)) if s != Free(grad)]
    with pytest.raises(InvalidScheduleError, match="never freed"):
        planner.simulate(g, Schedule(tuple(steps), g.fingerprint))


def test_empty_schedule_raises(tiny_cnn_case: Case) -> None:
    g = tiny_cnn_case.graph
    with pytest.raises(InvalidScheduleError):
        planner.simulate(g, Schedule((), g.fingerprint))


def test_part_timeline_counts_only_the_masked_storages(tiny_cnn_case: Case) -> None:
    """``part_timeline`` is the memory of the masked storages alone: every non-resident storage
    gives the timeline less the resident bytes, none gives zeros, and two disjoint halves add up
    to the whole (what staging reads the backward's own memory off)."""
    g = tiny_cnn_case.graph
    schedule = Schedule.store_all(g)
    full = planner.simulate(g, schedule)
    assert full.part_timeline is None
    everything = np.ones(len(g.storages), dtype=bool)
    everything[list(g.resident_storages)] = False
    whole = planner.simulate(g, schedule, part=everything).part_timeline
    assert np.array_equal(whole, full.timeline - g.resident_bytes)
    assert not planner.simulate(g, schedule, part=np.zeros(len(g.storages), dtype=bool)).part_timeline.any()
    half = everything & (np.arange(len(g.storages)) % 2 == 0)
    halves = [planner.simulate(g, schedule, part=mask).part_timeline for mask in (half, everything & ~half)]
    assert np.array_equal(halves[0] + halves[1], whole) and halves[0].any() and halves[1].any()
