"""Capture of real models: structure of the training graph and its parameters, gradients, buffers.

Each model is captured once (module-scoped, parametrized fixture) and checked by several tests.
"""
from __future__ import annotations

import re
import sys
from typing import Callable

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

import planner
from planner import Phase, TensorKind
from planner.graph import RESIDENT_KINDS

from conftest import Case, SharedShift, make_transformer

tv = torchvision.models


def _transformer() -> tuple[nn.Module, torch.Tensor]:
    return make_transformer(d_model=32, nhead=4, ff=64, layers=2, dropout=0.1), torch.randn(2, 16, 32)


MODELS: dict[str, Callable[[], tuple[nn.Module, torch.Tensor]]] = {
    "resnet18": lambda: (tv.resnet18(), torch.randn(2, 3, 32, 32)),
    "resnet50": lambda: (tv.resnet50(), torch.randn(2, 3, 32, 32)),
    "vgg16": lambda: (tv.vgg16(), torch.randn(1, 3, 32, 32)),
    "mobilenet_v2": lambda: (tv.mobilenet_v2(), torch.randn(2, 3, 32, 32)),
    "densenet121": lambda: (tv.densenet121(), torch.randn(2, 3, 32, 32)),
    "googlenet": lambda: (tv.googlenet(aux_logits=False, init_weights=False), torch.randn(2, 3, 32, 32)),
    "inception_v3": lambda: (tv.inception_v3(aux_logits=False, init_weights=False), torch.randn(2, 3, 75, 75)),
    "transformer": _transformer,
}


@pytest.fixture(scope="module", params=list(MODELS))
def case(request: pytest.FixtureRequest) -> Case:
    torch.manual_seed(0)
    model, x = MODELS[request.param]()
    model.train()
    return Case(model, x, planner.capture(model, x))


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_op_counts(case: Case) -> None:
    g = case.graph
    assert len(g.forward_ops) > 0
    assert len(g.backward_ops) > 0
    assert len(g.forward_ops) + len(g.backward_ops) == len(g.ops)
    assert [op.id for op in g.ops] == list(range(len(g.ops)))


def test_every_parameter_captured_with_its_shape(case: Case) -> None:
    g = case.graph
    params = dict(case.model.named_parameters())
    assert set(g.parameters) == set(params)
    for name, p in params.items():
        info = g.tensors[g.parameters[name]]
        assert info.kind is TensorKind.PARAMETER
        assert info.shape == tuple(p.shape), name
        assert info.dtype == p.dtype
        assert info.producer is None


def test_every_buffer_captured_with_its_shape(case: Case) -> None:
    g = case.graph
    buffers = dict(case.model.named_buffers())
    assert set(g.buffers) == set(buffers)
    for name, b in buffers.items():
        info = g.tensors[g.buffers[name]]
        assert info.kind is TensorKind.BUFFER
        assert info.shape == tuple(b.shape), name


def test_one_gradient_per_trainable_parameter(case: Case) -> None:
    g = case.graph
    trainable = {name for name, p in case.model.named_parameters() if p.requires_grad}
    name_of = {tid: name for name, tid in g.parameters.items()}
    graded = [name_of[param_id] for param_id in g.gradients.values()]
    assert sorted(graded) == sorted(trainable)  # exactly one gradient each, no extras
    backward = set(g.backward_ops)
    for grad_id, param_id in g.gradients.items():
        grad, param = g.tensors[grad_id], g.tensors[param_id]
        assert grad.shape == param.shape, name_of[param_id]
        assert grad.dtype == param.dtype
        assert grad.kind is TensorKind.GRADIENT
        assert grad.producer in backward


def test_buffer_updates(case: Case) -> None:
    g = case.graph
    if not _has_batchnorm(case.model):
        assert g.buffer_updates == {}
        return
    assert g.buffer_updates, "a BatchNorm model in train mode updates its running statistics"
    assert set(g.buffer_updates.values()) == set(g.buffers.values())  # every BN buffer is updated
    for new, old in g.buffer_updates.items():
        assert g.tensors[new].shape == g.tensors[old].shape
        assert g.tensors[new].producer is not None


def test_random_ops(case: Case) -> None:
    g = case.graph
    has_dropout = any(isinstance(m, nn.Dropout) and m.p > 0 for m in case.model.modules())
    if isinstance(case.model, nn.TransformerEncoder):
        assert any(op.is_random for op in g.ops)
    if not has_dropout and not isinstance(case.model, nn.TransformerEncoder):
        assert not any(op.is_random for op in g.ops)
    for op in g.ops:
        if op.is_random:
            assert op.phase is Phase.FORWARD


def test_inputs_loss_and_boundaries(case: Case) -> None:
    g = case.graph
    assert len(g.inputs) == 1
    assert g.tensors[g.inputs[0]].shape == tuple(case.inputs.shape)
    assert g.tensors[g.inputs[0]].kind is TensorKind.INPUT
    assert g.targets == ()
    assert g.tensors[g.loss].shape == ()
    assert g.tensors[g.tangent].kind is TensorKind.TANGENT
    assert len(g.model_outputs) >= 1
    assert [g.tensors[t].shape for t in g.output_grads] == [g.tensors[t].shape for t in g.model_outputs]
    assert len(g.input_specs) == 1 and g.input_specs[0].shape == tuple(case.inputs.shape)


def test_graph_is_topologically_ordered(case: Case) -> None:
    """Every op reads only resident tensors or outputs of earlier ops; consumer lists agree."""
    g = case.graph
    consumers: dict[int, list[int]] = {t.id: [] for t in g.tensors}
    for op in g.ops:
        for t in op.inputs:
            producer = g.tensors[t].producer
            if producer is None:
                assert g.tensors[t].kind in RESIDENT_KINDS
            else:
                assert producer < op.id
            consumers[t].append(op.id)
        for t in op.outputs:
            assert g.tensors[t].producer == op.id
    for t in g.tensors:
        assert list(t.consumers) == consumers[t.id]


def test_store_all_simulates(case: Case) -> None:
    g = case.graph
    schedule = planner.Schedule.store_all(g)
    result = planner.simulate(g, schedule)
    assert result.peak_bytes >= g.resident_bytes
    assert result.peak_bytes > g.resident_bytes  # a training step holds some activations
    assert result.resident_bytes == g.resident_bytes
    assert result.time > 0
    assert result.recomputations == 0
    assert np.all(result.compute_counts == 1)
    assert len(result.timeline) == len(schedule.steps)
    assert result.timeline.max() <= result.peak_bytes
    assert result.timeline[-1] == g.resident_bytes  # everything transient is freed at the end


def test_view_ops_cost_nothing(case: Case) -> None:
    g = case.graph
    for op in g.ops:
        if op.is_view:
            assert op.flops == 0 and op.bytes_read == 0 and op.bytes_written == 0
            input_storages = {g.tensors[t].storage for t in op.inputs}
            assert all(g.tensors[t].storage in input_storages for t in op.outputs)
        else:
            assert op.bytes_written > 0 or not op.outputs


def test_graph_repr_and_summary(case: Case) -> None:
    g = case.graph
    assert f"{len(g.forward_ops)} forward ops" in repr(g)
    summary = g.summary()
    assert summary["parameter"] == sum(p.numel() * p.element_size() for p in case.model.parameters())
    assert sum(summary.values()) == g.resident_bytes


def test_networkx_export(case: Case) -> None:
    dag = case.graph.to_networkx()
    assert dag.number_of_nodes() == len(case.graph.ops)
    import networkx as nx

    assert nx.is_directed_acyclic_graph(dag)


def test_networkx_is_optional(case: Case, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without networkx installed, only to_networkx fails, naming the extra that installs it."""
    monkeypatch.setitem(sys.modules, "networkx", None)  # what an absent package looks like to import
    with pytest.raises(ImportError, match=re.escape("pip install 'remat-planner[networkx]'")):
        case.graph.to_networkx()


def test_capture_with_loss_and_targets() -> None:
    """A loss function with labels: targets are resident inputs, the loss region is marked."""
    from conftest import TinyCNN

    torch.manual_seed(0)
    model = TinyCNN().train()
    x, y = torch.randn(2, 3, 8, 8), torch.randint(0, 10, (2,))
    g = planner.capture(model, x, nn.functional.cross_entropy, targets=y)
    assert len(g.targets) == 1
    target = g.tensors[g.targets[0]]
    assert target.kind is TensorKind.INPUT and target.shape == (2,) and target.dtype == torch.int64
    assert any(op.in_loss and op.phase is Phase.FORWARD for op in g.ops)
    assert any(op.in_loss and op.phase is Phase.BACKWARD for op in g.ops)
    assert not any(op.in_loss and "convolution" in op.target for op in g.ops)
    assert len(g.input_specs) == 2


def test_one_tensor_returned_as_two_parameters_gradients() -> None:
    """AOT lists the same node as both gradients; each parameter must still get its own (``a``
    got none, silently)."""
    import copy

    class TwoBiases(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.a, self.b = nn.Parameter(torch.randn(4)), nn.Parameter(torch.randn(4))

        def forward(self, x):
            return SharedShift.apply(self.fc(x), self.a, self.b)

    torch.manual_seed(0)
    model, x, y = TwoBiases().train(), torch.randn(3, 4), torch.randint(0, 4, (3,))
    g = planner.capture(model, x, nn.functional.cross_entropy, targets=y)
    name_of = {tid: name for name, tid in g.parameters.items()}
    assert sorted(name_of[p] for p in g.gradients.values()) == ["a", "b", "fc.bias", "fc.weight"]
    planned_model, reference = copy.deepcopy(model), copy.deepcopy(model)
    planned = planner.PlannedModule(planned_model, g, planner.Schedule.store_all(g))
    for _ in range(2):  # the first step creates .grad, the second adds into it
        nn.functional.cross_entropy(planned(x), y).backward()
        nn.functional.cross_entropy(reference(x), y).backward()
    for (name, got), want in zip(planned_model.named_parameters(), reference.parameters()):
        assert torch.equal(got.grad, want.grad), name
    assert planned_model.a.grad.data_ptr() != planned_model.b.grad.data_ptr()


def test_lstm_bias_gradients_are_two_tensors_in_every_capture() -> None:
    """oneDNN's LSTM backward (the CPU LSTM): its meta kernel returns one tensor as both bias
    gradients, where the real kernel returns two. Each bias gets a gradient in a storage of its
    own, and the first capture in a process (where AOT names one node for both, and one bias got
    no gradient) gives the graph later captures give."""
    if not torch.backends.mkldnn.is_available():
        pytest.skip("this PyTorch build has no oneDNN: its CPU LSTM is not mkldnn_rnn_layer")
    torch.manual_seed(0)
    model, x = nn.LSTM(5, 7, num_layers=2).train(), torch.randn(3, 2, 5)  # shapes no other test traces
    first, second = (planner.capture(model, x) for _ in range(2))
    assert first.fingerprint == second.fingerprint and first.gradients == second.gradients
    assert any(op.target == "aten.mkldnn_rnn_layer_backward.default" for op in first.ops)
    grad_of = {name: grad for grad, tid in first.gradients.items() for name, pid in first.parameters.items() if pid == tid}
    assert set(grad_of) == {name for name, _ in model.named_parameters()}
    for layer in (0, 1):
        ih, hh = (first.tensors[grad_of[f"bias_{kind}_l{layer}"]] for kind in ("ih", "hh"))
        assert ih.id != hh.id and ih.storage != hh.storage
    planner.simulate(first, planner.Schedule.store_all(first))  # was refused: "recomputed while a view of its output is live"


class _Upsampling(nn.Module):
    def __init__(self, mode: str):
        super().__init__()
        self.mode, self.conv1, self.conv2 = mode, nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        corners = {"align_corners": False} if self.mode in ("bilinear", "bicubic") else {}
        return self.conv2(nn.functional.interpolate(self.conv1(x), size=(13, 11), mode=self.mode, **corners)).mean((2, 3))


@pytest.mark.parametrize("mode", ["bilinear", "bicubic", "nearest"])
def test_interpolation_is_traced_as_eager_runs_it(mode: str) -> None:
    """Tracing swapped Python decompositions (index gathers, an index-put backward) in for the
    upsampling kernels: bilinear and bicubic gradients differed from eager's in the last bits."""
    import copy

    torch.manual_seed(0)
    model, x, y = _Upsampling(mode).train(), torch.randn(2, 3, 9, 7), torch.randint(0, 4, (2,))
    g = planner.capture(model, x, nn.functional.cross_entropy, targets=y)
    targets = {op.target for op in g.ops}
    assert f"aten.upsample_{mode}2d_backward.default" in targets and "aten._unsafe_index_put.default" not in targets
    planned_model, reference = copy.deepcopy(model), copy.deepcopy(model)
    planned = planner.PlannedModule(planned_model, g, planner.Schedule.store_all(g))
    nn.functional.cross_entropy(planned(x), y).backward()
    nn.functional.cross_entropy(reference(x), y).backward()
    for (name, got), want in zip(planned_model.named_parameters(), reference.parameters()):
        assert torch.equal(got.grad, want.grad), name
    # the decompositions are back after the capture: other tracers (torch.compile) still get them
    assert torch.ops.aten.upsample_bilinear2d.vec.py_kernels


class _RealTensorMeter(planner.MemoryMeter):
    """The storage meter, counting plain tensors only: tracing's fake and functional tensor
    subclasses hold no real memory."""

    def _count(self, tensor: torch.Tensor, finalize: bool = True) -> None:
        if type(tensor) in (torch.Tensor, nn.Parameter):
            super()._count(tensor, finalize)


def test_capture_allocates_no_activation_memory() -> None:
    """Capture traces with fake tensors: a large batch costs no real activation memory."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 4096), nn.ReLU(), nn.Linear(4096, 4096)).train()
    x = torch.randn(4096, 256)
    with _RealTensorMeter() as meter:
        g = planner.capture(model, x)
    activation = planner.simulate(g, planner.Schedule.store_all(g)).peak_activation_bytes
    assert activation > 100 * 2**20  # the step itself would need > 100 MiB of activations
    assert meter.peak_bytes < 8 * 2**20
