"""Schedules: construction from an op order, JSON persistence, ties to one graph (fingerprint)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision

import planner
from planner import Compute, Free, InvalidScheduleError, PlanMismatchError, Schedule

from conftest import Case, TinyCNN


def _capture_cnn(batch: int = 2, dtype: torch.dtype = torch.float32, train: bool = True):
    torch.manual_seed(0)
    model = TinyCNN().to(dtype).train(train)
    return planner.capture(model, torch.randn(batch, 3, 8, 8, dtype=dtype))


# ---- fingerprint ---------------------------------------------------------------------------------

def test_fingerprint_stable_across_captures() -> None:
    assert _capture_cnn().fingerprint == _capture_cnn().fingerprint


def test_fingerprint_stable_resnet18(resnet18_case: Case) -> None:
    again = planner.capture(torchvision.models.resnet18().train(), torch.randn(4, 3, 64, 64))
    assert again.fingerprint == resnet18_case.graph.fingerprint
    assert again is not resnet18_case.graph


def test_fingerprint_ignores_values() -> None:
    """Weights and input values do not change the graph: only structure, shapes and dtypes do."""
    torch.manual_seed(1)
    a = planner.capture(TinyCNN().train(), torch.randn(2, 3, 8, 8))
    torch.manual_seed(2)
    b = planner.capture(TinyCNN().train(), torch.randn(2, 3, 8, 8))
    assert a.fingerprint == b.fingerprint


def test_fingerprint_differs_for_batch_size() -> None:
    assert _capture_cnn(batch=2).fingerprint != _capture_cnn(batch=3).fingerprint


def test_fingerprint_differs_for_dtype() -> None:
    assert _capture_cnn(dtype=torch.float32).fingerprint != _capture_cnn(dtype=torch.float64).fingerprint


def test_fingerprint_differs_for_mode() -> None:
    assert _capture_cnn(train=True).fingerprint != _capture_cnn(train=False).fingerprint


def test_fingerprint_differs_for_constants() -> None:
    """Same ops and shapes, different constant arguments: a different computation, a different graph."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)

    def clipped(bound: float):
        return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Hardtanh(-bound, bound))

    assert planner.capture(clipped(1.0), x).fingerprint == planner.capture(clipped(1.0), x).fingerprint
    assert planner.capture(clipped(1.0), x).fingerprint != planner.capture(clipped(2.0), x).fingerprint


# ---- construction ----------------------------------------------------------------------------------

def test_store_all_computes_every_op_once_and_frees_everything(tiny_cnn_case: Case) -> None:
    g = tiny_cnn_case.graph
    schedule = Schedule.store_all(g)
    assert schedule.fingerprint == g.fingerprint
    assert [c.op for c in schedule.computes] == list(range(len(g.ops)))
    assert schedule.recomputed_ops() == {}
    freed = [s.tensor for s in schedule.steps if isinstance(s, Free)]
    assert len(freed) == len(set(freed))
    transient = {t.id for t in g.tensors if not g.is_resident(t.id)}
    assert set(freed) == transient
    # each tensor is freed after its producer and after its last consumer
    position = {id(step): i for i, step in enumerate(schedule.steps)}
    compute_at = {c.op: position[id(c)] for c in schedule.computes}
    for i, step in enumerate(schedule.steps):
        if isinstance(step, Free):
            t = g.tensors[step.tensor]
            assert compute_at[t.producer] < i
            assert all(compute_at[c] < i for c in t.consumers)


def test_from_order_rejects_op_before_its_producer(tiny_cnn_case: Case) -> None:
    g = tiny_cnn_case.graph
    with pytest.raises(InvalidScheduleError, match="no earlier step produced"):
        Schedule.from_order(g, reversed(range(len(g.ops))))


def test_from_order_rejects_consumer_first(tiny_cnn_case: Case) -> None:
    g = tiny_cnn_case.graph
    producer = next(op for op in g.ops if op.outputs and g.tensors[op.outputs[0]].consumers)
    consumer = g.tensors[producer.outputs[0]].consumers[0]
    order = [consumer] + [i for i in range(len(g.ops)) if i != consumer]
    with pytest.raises(InvalidScheduleError):
        Schedule.from_order(g, order)


def test_from_order_accepts_compute_steps(tiny_cnn_case: Case) -> None:
    g = tiny_cnn_case.graph
    assert Schedule.from_order(g, [Compute(i) for i in range(len(g.ops))]) == Schedule.store_all(g)


def test_recomputed_ops_counts_extra_computes(tiny_cnn_case: Case) -> None:
    g = tiny_cnn_case.graph
    schedule = Schedule((Compute(0), Compute(1), Compute(0), Compute(0)), g.fingerprint)
    assert schedule.recomputed_ops() == {0: 2}


# ---- JSON ------------------------------------------------------------------------------------------

def test_json_round_trip(tiny_cnn_case: Case, tmp_path: Path) -> None:
    g = tiny_cnn_case.graph
    schedule = Schedule.store_all(g)
    path = tmp_path / "store_all.plan.json"
    schedule.save(path)
    loaded = Schedule.load(path)
    assert loaded == schedule
    assert Schedule.load(path, graph=g) == schedule
    assert Schedule.from_json(json.loads(path.read_text())) == schedule
    assert planner.simulate(g, loaded).peak_bytes == planner.simulate(g, schedule).peak_bytes


def test_json_steps_have_two_elements(tiny_cnn_case: Case) -> None:
    """Steps are written ["c", op] and ["f", tensor]; a step with a third element (which
    implementation to run, before variants moved into the graph) is refused: format 1 never had it."""
    data = Schedule.store_all(tiny_cnn_case.graph).to_json()
    assert all(len(row) == 2 for row in data["steps"])
    assert Schedule.from_json(data) == Schedule.store_all(tiny_cnn_case.graph)
    for extra in ("default", "lowmem_cupy"):
        steps = [row + [extra] if row[0] == "c" else row for row in data["steps"]]
        with pytest.raises(InvalidScheduleError, match="corrupted"):
            Schedule.from_json({**data, "steps": steps})


def test_load_with_another_graph_raises_mismatch(tiny_cnn_case: Case, tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    Schedule.store_all(tiny_cnn_case.graph).save(path)
    other = _capture_cnn(batch=3)
    with pytest.raises(PlanMismatchError, match="plan again"):
        Schedule.load(path, graph=other)


def test_simulate_with_another_graph_raises_mismatch(tiny_cnn_case: Case) -> None:
    other = _capture_cnn(batch=3)
    with pytest.raises(PlanMismatchError):
        planner.simulate(other, Schedule.store_all(tiny_cnn_case.graph))


def test_truncated_json_raises(tiny_cnn_case: Case, tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    Schedule.store_all(tiny_cnn_case.graph).save(path)
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    with pytest.raises(InvalidScheduleError, match="truncated"):
        Schedule.load(path)


def test_empty_file_raises(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    path.write_text("")
    with pytest.raises(InvalidScheduleError):
        Schedule.load(path)


def test_wrong_format_raises(tiny_cnn_case: Case, tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    data = Schedule.store_all(tiny_cnn_case.graph).to_json()
    assert data["format"] == 1
    data["format"] = 2
    path.write_text(json.dumps(data))
    with pytest.raises(InvalidScheduleError, match="format 2"):
        Schedule.load(path)


@pytest.mark.parametrize("data", [
    [],
    {"format": 1, "fingerprint": "abc"},
    {"format": 1, "fingerprint": "abc", "steps": [["x", 1]]},
    {"format": 1, "fingerprint": "abc", "steps": [["c", "one"]]},
    {"format": 1, "fingerprint": "abc", "steps": [["f"]]},
    {"format": 1, "fingerprint": "abc", "steps": [[]]},
    {"format": 1, "fingerprint": "abc", "steps": 7},
])
def test_corrupted_json_raises(data: object, tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    path.write_text(json.dumps(data))
    with pytest.raises(InvalidScheduleError):
        Schedule.load(path)
