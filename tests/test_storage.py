"""Storage accounting: views share storages, storages have exact sizes, resident memory adds up."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import planner
from planner import Phase, TensorKind, TrainingGraph

from conftest import Case, TinyCNN, TinyMLP, ViewModel

_ITEMSIZE = {torch.float32: 4, torch.float64: 8, torch.int64: 8, torch.float16: 2, torch.bool: 1}


def _op(graph: TrainingGraph, target: str, phase: Phase, reads: int | None = None):
    """The ops with this ATen target and phase (reading tensor ``reads``, if given)."""
    return [op for op in graph.ops
            if op.target == target and op.phase is phase and (reads is None or reads in op.inputs)]


def _aliasing(op) -> bool:
    """Does the ATen schema say every output of ``op`` aliases an input (a pure view op)?"""
    schema = op._schema
    return bool(schema.returns) and not schema.is_mutable and all(
        r.alias_info is not None and not r.alias_info.is_write for r in schema.returns)


def test_views_share_storage() -> None:
    torch.manual_seed(0)
    g = planner.capture(ViewModel(), torch.randn(2, 4))
    (mm,) = _op(g, "aten.mm.default", Phase.FORWARD)
    (h,) = mm.outputs
    storage = g.tensors[h].storage
    assert g.storages[storage].nbytes == 2 * 4 * 4
    views = _op(g, "aten.view.default", Phase.FORWARD, reads=h) + _op(g, "aten.t.default", Phase.FORWARD, reads=h)
    assert {op.target for op in views} == {"aten.view.default", "aten.t.default"}
    for op in views:
        assert op.is_view
        assert op.flops == 0 and op.bytes_read == 0 and op.bytes_written == 0
        (out,) = op.outputs
        assert g.tensors[out].storage == storage
        assert g.tensors[out].nbytes == 32  # the view's own numel * itemsize
    view_shapes = {g.tensors[op.outputs[0]].shape for op in views}
    assert view_shapes == {(8,), (4, 2)}
    # Views are free in the simulator: the store-all peak counts h's storage once.
    result = planner.simulate(g, planner.Schedule.store_all(g))
    assert result.peak_bytes >= g.resident_bytes + 32


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fresh_storage_bytes_are_numel_times_itemsize(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    model = TinyMLP().to(dtype).train()
    g = planner.capture(model, torch.randn(8, 16, dtype=dtype))
    first_tensor: dict[int, int] = {}
    for t in g.tensors:
        first_tensor.setdefault(t.storage, t.id)
    assert len(first_tensor) == len(g.storages)
    for storage, tensor_id in first_tensor.items():
        t = g.tensors[tensor_id]
        expected = math.prod(t.shape) * _ITEMSIZE[t.dtype]
        assert t.nbytes == expected, t.name
        assert g.storages[storage].nbytes == expected, t.name
    for t in g.tensors:
        if t.kind is TensorKind.PARAMETER:
            assert t.dtype == dtype


def test_fresh_storage_bytes_resnet18(resnet18_case: Case) -> None:
    g = resnet18_case.graph
    for op in g.ops:
        if op.is_view:
            continue
        for t in map(g.tensors.__getitem__, op.outputs):
            if all(g.tensors[i].storage != t.storage for i in op.inputs):
                assert g.storages[t.storage].nbytes == math.prod(t.shape) * _ITEMSIZE[t.dtype], t.name


def test_resident_bytes_add_up() -> None:
    """params + buffers + inputs + targets + tangent storages + one .grad per trainable param."""
    torch.manual_seed(0)
    model = TinyCNN().train()
    model.conv1.bias.requires_grad_(False)  # frozen: no .grad accumulator
    x, y = torch.randn(2, 3, 8, 8), torch.randint(0, 10, (2,))
    g = planner.capture(model, x, nn.functional.cross_entropy, targets=y)

    def nbytes(ts) -> int:
        return sum(t.numel() * t.element_size() for t in ts)

    params = nbytes(model.parameters())
    buffers = nbytes(model.buffers())
    inputs = nbytes([x, y])
    tangent = 4  # d(loss)/d(loss): a float32 scalar
    grads = nbytes(p for p in model.parameters() if p.requires_grad)
    assert g.grad_accumulator_bytes == grads
    assert g.resident_bytes == params + buffers + inputs + tangent + grads
    assert g.summary() == {"parameter": params, "buffer": buffers, "input": inputs, "tangent": tangent,
                           "gradient accumulators": grads}
    assert len(g.gradients) == len(list(model.parameters())) - 1
    result = planner.simulate(g, planner.Schedule.store_all(g))
    assert result.resident_bytes == g.resident_bytes
    assert result.timeline[-1] == g.resident_bytes


def test_tied_parameter_counted_once() -> None:
    """A parameter used in two places (weight tying) is one storage and one ``.grad`` accumulator,
    as in eager PyTorch, whatever names the graph lists it under."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    model[2].weight = model[0].weight
    g = planner.capture(model, torch.randn(4, 8))
    assert g.tensors[g.parameters["0.weight"]].storage == g.tensors[g.parameters.get("2.weight", g.parameters["0.weight"])].storage
    params = sum(p.numel() * 4 for p in model.parameters())  # 8*8 + 8 + 8 floats: tied weight once
    assert g.summary()["parameter"] == params
    assert g.grad_accumulator_bytes == params  # one .grad per distinct parameter
    assert g.resident_bytes == params + 4 * 8 * 4 + 4 + params


# ---- views of the model's output and of its gradient -------------------------------------------
# The capture marks the model's outputs (and their gradients) with a boundary op that it then
# removes from the graph. A view taken of a marked tensor must still share its storage.

def test_loss_view_of_model_output_shares_storage() -> None:
    torch.manual_seed(0)
    g = planner.capture(nn.Linear(4, 3), torch.randn(2, 4), loss_fn=lambda out: out.view(-1).sum())
    (out,) = g.model_outputs
    (view,) = _op(g, "aten.view.default", Phase.FORWARD, reads=out)
    assert view.in_loss
    assert g.tensors[view.outputs[0]].storage == g.tensors[out].storage
    assert view.is_view


def test_backward_view_of_output_grad_shares_storage() -> None:
    """Linear's backward transposes d(loss)/d(output): a view, which must not cost memory."""
    torch.manual_seed(0)
    g = planner.capture(nn.Linear(4, 3), torch.randn(2, 4))
    (grad,) = g.output_grads
    (transpose,) = _op(g, "aten.t.default", Phase.BACKWARD, reads=grad)
    assert g.tensors[transpose.outputs[0]].storage == g.tensors[grad].storage
    assert transpose.is_view


def test_schema_views_are_views_resnet18(resnet18_case: Case) -> None:
    """Every op whose ATen schema says it returns an alias of an input is a free view in the IR."""
    g = resnet18_case.graph
    not_views = [(op.name, op.target) for op, call in zip(g.ops, g.calls)
                 if _aliasing(call.target) and not op.is_view]
    assert not_views == []
