"""The storage meter, and the simulator's store-all peak against a real eager step."""
from __future__ import annotations

import gc

import pytest
import torch
import torchvision
from torch import nn

import planner
from planner import MemoryMeter

from conftest import make_transformer


# ---- MemoryMeter ---------------------------------------------------------------------------------

def test_meter_counts_and_releases_an_allocation() -> None:
    with MemoryMeter() as meter:
        assert meter.current_bytes == 0
        t = torch.empty(1000)
        assert meter.current_bytes == 4000 == t.untyped_storage().nbytes()
        assert meter.peak_bytes == 4000
        del t
        gc.collect()
        assert meter.current_bytes == 0
    assert meter.peak_bytes == 4000
    assert meter.peak_bytes >= meter.current_bytes


def test_meter_counts_views_once() -> None:
    with MemoryMeter() as meter:
        a = torch.ones(10, dtype=torch.float64)
        b = a.view(2, 5)
        c = b.t()
        assert meter.current_bytes == 80
        del a, b
        assert meter.current_bytes == 80  # c still holds the storage
        del c
        assert meter.current_bytes == 0
    assert meter.peak_bytes == 80


def test_meter_peak_tracks_the_maximum() -> None:
    with MemoryMeter() as meter:
        a = torch.empty(100)
        b = torch.empty(200)
        del a
        c = torch.empty(50)
        assert meter.current_bytes == 1000
        del b, c
    assert meter.peak_bytes == 1200
    assert meter.current_bytes == 0


def test_meter_includes_given_tensors_and_ignores_other_preexisting_ones() -> None:
    held = torch.empty(250)
    other = torch.empty(1000)
    with MemoryMeter(include=[held, held.view(5, 50)]) as meter:
        assert meter.baseline_bytes == 1000
        y = other + 1  # new 4000-byte result; `other` itself is not counted
        assert meter.current_bytes == 5000
        del y
    assert meter.peak_bytes == 5000
    assert meter.current_bytes == 1000


def test_measure_step_counts_resident_memory() -> None:
    torch.manual_seed(0)
    model = nn.Linear(100, 10)
    x = torch.randn(8, 100)
    measured = planner.measure_step(model, lambda: model(x).sum().backward(), [x])
    params = sum(p.numel() * 4 for p in model.parameters())
    assert model.weight.grad is not None
    assert measured.resident_bytes == 2 * params + x.numel() * 4
    assert measured.peak_bytes > measured.resident_bytes
    assert measured.seconds >= 0


# ---- simulator vs eager -----------------------------------------------------------------------------

def _compare(model: nn.Module, x: torch.Tensor) -> tuple[int, planner.MeasuredStep, planner.TrainingGraph]:
    model.train()
    graph = planner.capture(model, x)
    simulated = planner.simulate(graph, planner.Schedule.store_all(graph)).peak_bytes
    measured = planner.measure_training_step(model, x)
    return simulated, measured, graph


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_store_all_peak_matches_eager_cnn(name: str) -> None:
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)()
    simulated, measured, graph = _compare(model, torch.randn(4, 3, 64, 64))
    assert simulated == pytest.approx(measured.peak_bytes, rel=0.01)
    # same steady state on both sides, except the loss tangent eager allocates during the step
    assert graph.resident_bytes - measured.resident_bytes == graph.storages[graph.tensors[graph.tangent].storage].nbytes


def test_store_all_peak_matches_eager_transformer() -> None:
    torch.manual_seed(0)
    model = make_transformer(d_model=64, nhead=4, ff=128, layers=2, dropout=0.0)
    simulated, measured, _ = _compare(model, torch.randn(4, 32, 64))
    assert simulated == pytest.approx(measured.peak_bytes, rel=0.01)


def test_store_all_peak_matches_eager_with_loss_and_targets() -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18().train()
    x, y = torch.randn(4, 3, 64, 64), torch.randint(0, 1000, (4,))
    graph = planner.capture(model, x, nn.functional.cross_entropy, targets=y)
    simulated = planner.simulate(graph, planner.Schedule.store_all(graph)).peak_bytes
    measured = planner.measure_training_step(model, x, nn.functional.cross_entropy, y)
    assert simulated == pytest.approx(measured.peak_bytes, rel=0.01)


def test_store_all_peak_matches_eager_wide_linear() -> None:
    """A wide output layer: the backward's transpose of d(loss)/d(output) is a view in eager and
    must not be counted as a fresh output-sized allocation."""
    torch.manual_seed(0)
    simulated, measured, _ = _compare(nn.Linear(64, 20000), torch.randn(64, 64))
    assert simulated == pytest.approx(measured.peak_bytes, rel=0.01)


def test_store_all_peak_matches_eager_cpu_lstm() -> None:
    """oneDNN's LSTM layer keeps a training workspace for its backward (here larger than the
    layer's output) that its meta kernel reports as empty: capture measures it on the real kernel."""
    if not torch.backends.mkldnn.is_available():
        pytest.skip("this PyTorch build has no oneDNN: its CPU LSTM is not mkldnn_rnn_layer")
    torch.manual_seed(0)
    simulated, measured, graph = _compare(nn.LSTM(8, 16, num_layers=2), torch.randn(12, 4, 8))
    workspaces = [graph.tensors[op.outputs[3]] for op in graph.ops if op.target == "aten.mkldnn_rnn_layer.default"]
    assert len(workspaces) == 2 and all(w.dtype == torch.uint8 and w.nbytes > 0 for w in workspaces)
    assert simulated == pytest.approx(measured.peak_bytes, rel=1e-3)


def test_dropout_graph_is_leaner_than_cpu_eager() -> None:
    """With dropout, the graph keeps a bool mask (native_dropout) where CPU eager keeps a float
    noise tensor: the simulated store-all peak is at most the measured eager peak."""
    torch.manual_seed(0)
    model = make_transformer(d_model=64, nhead=4, ff=128, layers=2, dropout=0.1)
    simulated, measured, graph = _compare(model, torch.randn(4, 32, 64))
    assert any(op.is_random for op in graph.ops)
    assert simulated <= measured.peak_bytes


def test_meter_follows_storages_resized_in_place() -> None:
    """FSDP2 allocates and frees its unsharded parameters with ``untyped_storage().resize_``; no op
    output shows it. Growth counts as an allocation, shrinking releases what was counted."""
    outside = torch.empty(1000)  # 4000 bytes from before the meter: not counted
    original = torch.UntypedStorage.resize_
    with MemoryMeter() as meter:
        storage = outside.untyped_storage()
        storage.resize_(0)
        assert meter.current_bytes == 0
        storage.resize_(4000)
        assert meter.current_bytes == 4000
        other = torch.empty(10)
        storage.resize_(0)
        assert meter.current_bytes == 40 and meter.peak_bytes == 4040
        del other
    assert torch.UntypedStorage.resize_ is original and meter.current_bytes == 0
    storage.resize_(4000)  # outside the meter: not followed
    assert meter.current_bytes == 0
