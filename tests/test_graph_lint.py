"""The IR's builder and checker: ``TrainingGraph.lint`` catches each broken invariant, naming it
and the op or tensor at fault, and ``GraphBuilder.build`` derives what an edit changes.

(The suite's conftest also lints every graph any test builds: captures and variant rewrites.)
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import pytest
import torch

import planner
from planner.errors import GraphLintError, PlannerError
from planner.graph import OpCall, Phase, StorageInfo, TensorKind, TensorRef, TrainingGraph
from planner.graph_builder import GraphBuilder
from planner.variants import apply_variants, variant_sites

from conftest import TinyCNN


@pytest.fixture(scope="module")
def graph() -> TrainingGraph:
    torch.manual_seed(0)
    return planner.capture(TinyCNN().train(), torch.randn(2, 3, 8, 8))


def _first(graph: TrainingGraph, test: Callable) -> int:
    return next(op.id for op in graph.ops if test(op))


def _replace_op(graph: TrainingGraph, op: int, **fields) -> TrainingGraph:
    ops = list(graph.ops)
    ops[op] = dataclasses.replace(ops[op], **fields)
    return dataclasses.replace(graph, ops=tuple(ops))


def _replace_tensor(graph: TrainingGraph, tensor: int, **fields) -> TrainingGraph:
    tensors = list(graph.tensors)
    tensors[tensor] = dataclasses.replace(tensors[tensor], **fields)
    return dataclasses.replace(graph, tensors=tuple(tensors))


def _view(graph: TrainingGraph) -> int:
    return _first(graph, lambda op: op.is_view and op.outputs)


def _conv(graph: TrainingGraph) -> int:
    return _first(graph, lambda op: op.target == "aten.convolution.default")


def _activation(graph: TrainingGraph) -> int:
    return graph.ops[_conv(graph)].outputs[0]


#: (invariant, corruption, expected op, expected tensor): each corruption breaks one invariant
CORRUPTIONS: list[tuple[str, Callable[[TrainingGraph], TrainingGraph], Callable, Callable]] = [
    ("dense ids in order", lambda g: dataclasses.replace(g, ops=(g.ops[1], g.ops[0], *g.ops[2:])),
     lambda g: 0, lambda g: None),
    ("inputs and outputs are the call's", lambda g: _replace_op(g, _conv(g), inputs=g.ops[_conv(g)].inputs[:1]),
     _conv, lambda g: None),
    ("consumers are the ops reading it",
     lambda g: _replace_tensor(g, _activation(g), consumers=g.tensors[_activation(g)].consumers[:-1]),
     lambda g: None, _activation),
    ("bytes are shape times element size",
     lambda g: _replace_tensor(g, _activation(g), nbytes=g.tensors[_activation(g)].nbytes + 4),
     lambda g: None, _activation),
    ("views share storage with their base", lambda g: _replace_op(g, _conv(g), is_view=True), _conv, lambda g: None),
    ("bytes moved are its tensors'", lambda g: _replace_op(g, _conv(g), bytes_read=g.ops[_conv(g)].bytes_read - 1),
     _conv, lambda g: None),
    ("bytes moved are its tensors'", lambda g: _replace_op(g, _view(g), flops=1.0), _view, lambda g: None),
    ("forward ops before backward ops", lambda g: _replace_op(g, len(g.ops) - 1, phase=Phase.FORWARD),
     lambda g: len(g.ops) - 1, lambda g: None),
    ("resident tensors have no producer, others one",
     lambda g: _replace_tensor(g, g.tangent, kind=TensorKind.ACTIVATION), lambda g: None, lambda g: g.tangent),
    ("a tensor fits its storage",
     lambda g: dataclasses.replace(g, storages=tuple(
         dataclasses.replace(s, nbytes=0) if s.id == g.tensors[_activation(g)].storage else s for s in g.storages)),
     lambda g: None, _activation),
    ("every storage holds a tensor",
     lambda g: dataclasses.replace(g, storages=g.storages + (StorageInfo(len(g.storages), 8),)),
     lambda g: None, lambda g: None),
    ("gradients are gradient tensors",
     lambda g: dataclasses.replace(g, gradients={_activation(g): next(iter(g.parameters.values()))}),
     lambda g: None, _activation),
    ("input specs describe the inputs",
     lambda g: dataclasses.replace(g, input_specs=(dataclasses.replace(g.input_specs[0], dtype=torch.float64),)),
     lambda g: None, lambda g: g.inputs[0]),
]


@pytest.mark.parametrize("invariant, corrupt, op, tensor", CORRUPTIONS,
                         ids=[f"{i}-{c[0]}" for i, c in enumerate(CORRUPTIONS)])
def test_lint_names_the_broken_invariant(graph: TrainingGraph, invariant: str, corrupt, op, tensor) -> None:
    graph.lint()  # the captured graph keeps every invariant
    with pytest.raises(GraphLintError) as caught:
        corrupt(graph).lint()
    assert caught.value.invariant == invariant
    assert (caught.value.op, caught.value.tensor) == (op(graph), tensor(graph))
    assert isinstance(caught.value, PlannerError) and invariant in str(caught.value)


def test_lint_catches_a_topological_order_broken_through_the_builder(graph: TrainingGraph) -> None:
    """The builder keeps producers and consumers consistent whatever an edit does; the order of
    ops is the caller's, and lint refuses an op reading what a later op produces."""
    conv = _conv(graph)
    later = graph.ops[-1].outputs[0]
    builder = GraphBuilder.from_graph(graph)
    call = graph.calls[conv]
    builder.set_call(conv, dataclasses.replace(call, args=(TensorRef(later),) + tuple(call.args[1:])))
    with pytest.raises(GraphLintError) as caught:
        builder.build().lint()
    assert (caught.value.invariant, caught.value.op, caught.value.tensor) == ("topological order", conv, later)


def test_build_derives_every_field_an_edit_changes(graph: TrainingGraph) -> None:
    """An op whose output is moved into its input's storage becomes a view: is_view, its zero
    FLOPs and bytes, and its readers follow (the old rewrite kept the stock op's flags)."""
    relu = _first(graph, lambda op: op.target == "aten.relu.default" and op.phase is Phase.FORWARD)
    (x,), (y,) = graph.ops[relu].inputs, graph.ops[relu].outputs
    assert not graph.ops[relu].is_view and graph.ops[relu].flops > 0
    builder = GraphBuilder.from_graph(graph)
    builder.set_tensor(y, storage=graph.tensors[x].storage)
    edited = builder.build()
    edited.lint()
    op = edited.ops[relu]
    assert op.is_view and (op.flops, op.bytes_read, op.bytes_written) == (0.0, 0, 0)
    # a new output added to a call gets the op as producer and its own storage, sized to fit
    builder = GraphBuilder.from_graph(graph)
    extra = builder.add_tensor("relu.extra", (3, 5), torch.float16, TensorKind.ACTIVATION)
    call = graph.calls[relu]
    builder.set_call(relu, OpCall(call.target, call.args, call.kwargs, (y, extra), True))
    edited = builder.build()
    edited.lint()
    assert edited.tensors[extra].producer == relu and edited.tensors[extra].nbytes == 30
    assert edited.storages[edited.tensors[extra].storage].nbytes == 30
    assert edited.ops[relu].bytes_written == graph.ops[relu].bytes_written + 30


def test_graph_is_frozen(graph: TrainingGraph) -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        graph.output_form = None  # type: ignore[misc]
    assert graph.call_form is not None and graph.output_form is not None and graph.assumptions is not None


def test_dtypes_are_torch_dtypes_and_plan_files_keep_their_names(graph: TrainingGraph, tmp_path) -> None:
    assert all(isinstance(t.dtype, torch.dtype) for t in graph.tensors)
    assert graph.input_specs[0].dtype is torch.float32
    torch.manual_seed(0)
    model, x = TinyCNN().train(), torch.randn(2, 3, 8, 8)
    made = planner.plan(model, "100%", x)
    made.save(tmp_path / "plan.json")
    assert '"torch.float32"' in (tmp_path / "plan.json").read_text()
    assert planner.Plan.load(tmp_path / "plan.json").input_specs == made.input_specs


def test_variant_rewrite_keeps_every_invariant(graph: TrainingGraph) -> None:
    sites = variant_sites(graph)
    assert {s.variant for s in sites} >= {"relu_packed", "batch_norm_inverted"}
    rewritten = apply_variants(graph, sites)
    rewritten.lint()
    for site in sites:
        assert rewritten.ops[site.forward_op].target.startswith("remat_planner.")
        for output in rewritten.ops[site.forward_op].outputs:
            assert rewritten.tensors[output].producer == site.forward_op
