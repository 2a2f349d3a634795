"""Capture a real model's training step as a ``TrainingGraph``, without running it.

The model and inputs stay real; AOT autograd converts them to fake tensors and traces the forward,
the loss and the backward into one ATen graph, so capture costs no activation memory. A marker op
around the model's outputs (and around their gradients in the backward) tells the model apart from
the loss: ``Plan.apply`` runs the model's part and leaves the loss to the user's own code.
"""
from __future__ import annotations

import inspect
import operator
from typing import Any, Callable, Sequence

import torch
import torch.fx
from torch.utils.flop_counter import flop_registry

from planner import _aot
from planner._torch import OpOverload, schema_is_mutable, schema_returns, tree_flatten, tree_map, tree_unflatten
from planner.calls import PytreeForm, Slot, as_tuple, call_arguments, split, split_call
from planner.errors import CaptureError, PlannerError, UnsupportedOperatorError
from planner.guards import step_key
from planner.graph import InputSpec, OpCall, Phase, TensorKind, TensorRef, TrainingGraph
from planner.graph_builder import GraphBuilder
from planner.runtime import GRAD_MODE_OPS, real_outputs

LossFn = Callable[..., torch.Tensor]
_MODEL_PREFIX = "model."


@torch.library.custom_op("remat_planner::boundary", mutates_args=())
def _boundary(x: torch.Tensor, index: int) -> torch.Tensor:
    """Marks model output ``index`` (forward) or its gradient (backward); removed from the captured
    graph. The index pairs each gradient with its output: the backward need not meet them in order."""
    return x.clone()


@_boundary.register_fake
def _(x: torch.Tensor, index: int) -> torch.Tensor:
    return torch.empty_like(x)


def _boundary_setup(ctx, inputs: tuple, output: torch.Tensor) -> None:
    ctx.index = inputs[1]


_boundary.register_autograd(lambda ctx, grad: (_boundary(grad, ctx.index), None), setup_context=_boundary_setup)
_BOUNDARY = torch.ops.remat_planner.boundary.default
# kept by dead-code elimination when the loss ignores the output it marks (transformers' logits
# beside its loss, a cache): the planned module still returns that output
torch.fx.node.has_side_effect(_BOUNDARY)


def default_loss(output: Any) -> torch.Tensor:
    leaves = [leaf for leaf in tree_flatten(output)[0] if isinstance(leaf, torch.Tensor) and leaf.is_floating_point()]
    if not leaves:
        raise CaptureError("the model returns no floating-point tensor for the default loss (the sum of "
                           "the outputs) to add up: pass loss_fn")
    return sum(leaf.sum() for leaf in leaves)


class _TrainingStep(torch.nn.Module):
    """``loss_fn(model(*args, **kwargs), *targets)`` as one module of tensors, the shape AOT
    autograd traces; ``call_form`` rebuilds the model's arguments from the tensors."""

    def __init__(self, model: torch.nn.Module, loss_fn: LossFn | None, call_form: PytreeForm):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn or default_loss
        self.call_form = call_form
        self.n_inputs = call_form.n_tensors
        self.output_form: PytreeForm | None = None

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor]:
        args, kwargs = self.call_form.fill(tensors[: self.n_inputs])
        output = self.model(*args, **kwargs)
        leaves, spec = tree_flatten(output)
        form, outputs = split(output, "the model's output", keep_objects=True)
        if not any(t.requires_grad for t in outputs):
            raise CaptureError("the model's output does not depend on any trainable parameter: "
                               "nothing to differentiate (is requires_grad off everywhere?)")
        self.output_form = form
        marked = [_boundary(t, i) for i, t in enumerate(outputs)]  # every tensor the model returns
        leaves = [marked[slot.index] if isinstance(slot, Slot) else leaf for slot, leaf in zip(form.leaves, leaves)]
        loss = self.loss_fn(tree_unflatten(leaves, spec), *tensors[self.n_inputs:])
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise CaptureError(f"loss_fn must return a scalar tensor, got {shape}: "
                               "reduce it with .mean() or .sum()")
        return (loss,)


def _check_arguments(model: torch.nn.Module, inputs: tuple, targets: tuple, input_grads: bool) -> torch.device:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not inputs:
        raise TypeError("inputs are required: pass an example batch, e.g. torch.randn(32, 3, 224, 224)")
    _refuse_distributed_wrappers(model)
    devices = {p.device for p in model.parameters()} | {b.device for b in model.buffers()}
    if len(devices) > 1:
        raise CaptureError(f"the model's parameters are spread over {sorted(map(str, devices))}; "
                           "move the model to one device first")
    device = devices.pop() if devices else inputs[0].device
    for what, values in (("inputs", inputs), ("targets", targets)):
        for i, value in enumerate(values):
            if value.device != device:
                raise CaptureError(f"{what}[{i}] is on {value.device} but the model is on {device}: "
                                   f"move it with .to('{device}')")
            if value.requires_grad and not (input_grads and what == "inputs"):
                raise CaptureError(f"{what}[{i}] requires grad; the planner plans parameter gradients "
                                   "only: pass it .detach()ed")
    return device


def _refuse_distributed_wrappers(model: torch.nn.Module) -> None:
    """DDP's forward and FSDP's sharded parameters cannot be traced; say what works instead."""
    if not torch.distributed.is_available():
        return
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        raise CaptureError("the model is wrapped in DistributedDataParallel: plan the module inside "
                           "(ddp.module), then wrap the planned module: DistributedDataParallel(plan.apply(model))")
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch build without them: nothing can be sharded
        return

    sharded = [name or "the model" for name, module in model.named_modules()
               if isinstance(module, (FSDPModule, FullyShardedDataParallel))]
    sharded += [name for name, parameter in model.named_parameters() if isinstance(parameter, DTensor)]
    if sharded:
        raise CaptureError(f"{sharded[0]} is sharded (FSDP or DTensor parameters), which plan() cannot trace: "
                           "plan the unsharded model's blocks, planner.plan_blocks(model, budget, inputs, fsdp=True), "
                           "then fully_shard each block and the model (docs/distributed.md), or train the planned "
                           "model with DistributedDataParallel")



def _makes_own_positions(model: torch.nn.Module, args: tuple, kwargs: dict) -> bool:
    """Whether the call leaves a ``position_ids`` parameter of the model's forward unset (the
    model then numbers positions itself: ``_aot._one_sequence_per_row``)."""
    try:
        signature = inspect.signature(model.forward)
        bound = signature.bind_partial(*args, **kwargs).arguments
    except (TypeError, ValueError):
        return False
    return "position_ids" in signature.parameters and bound.get("position_ids") is None


def capture(
    model: torch.nn.Module,
    inputs: Any,
    loss_fn: LossFn | None = None,
    *,
    targets: torch.Tensor | Sequence[torch.Tensor] | None = None,
    input_grads: bool = False,
) -> TrainingGraph:
    """Trace one training step of ``model`` into a ``TrainingGraph``.

    Parameters
    ----------
    model: the module to train, in the mode it will train in (``model.train()`` normally).
    inputs: an example batch: a tensor (``model(x)``), a tuple of them (``model(*inputs)``) or a
        dict (``model(**inputs)``, a transformers batch); tuples, lists and dicts may nest and hold
        constants (None, bool, int, float, str), which the graph assumes (``planner.calls``).
    loss_fn: ``loss_fn(output, *targets) -> scalar``; defaults to the sum of the output.
    targets: extra tensors for ``loss_fn`` (labels).
    input_grads: allow inputs that require grad and plan their gradients too (the
        ``torch.compile`` backend needs it: after a graph break, a graph's inputs are activations).

    Raises
    ------
    TypeError: inputs that are not tensors or constants. CaptureError: tracing failed
    (data-dependent control flow, a non-scalar loss, inputs on another device, ...);
    UnsupportedOperatorError names an operator the planner cannot handle.

    Notes
    -----
    No activation memory is allocated: the step is traced with fake tensors. The one exception is
    oneDNN's CPU LSTM layer, whose meta kernel misstates its workspace: it runs once on zeros (one
    layer's worth; ``planner.runtime.GRAD_MODE_OPS``). Time is roughly
    linear in the number of operators (ResNet-50: about 2 s on 2 CPU cores).
    """
    args, kwargs = call_arguments(inputs)
    call_form, tensors = split_call(args, kwargs)
    if not tensors:
        raise TypeError("inputs hold no tensor: pass tensors (a tensor, a tuple of them, or a dict for "
                        "model(**inputs)), e.g. torch.randn(32, 3, 224, 224)")
    targets = as_tuple(targets, "targets")
    device = _check_arguments(model, tensors, targets, input_grads)
    assumptions, _ = step_key(model, call_form, tensors, device.type)
    step = _TrainingStep(model, loss_fn, call_form)
    try:
        with _aot.quiet_torch_logs():  # a failure becomes one CaptureError, not pages of torch logs
            joint = _aot.trace_joint(step, _distinct_storages(tensors + targets), _makes_own_positions(model, args, kwargs))
    except PlannerError:
        raise
    except Exception as error:  # tracing surfaces many exception types; name the cause
        raise CaptureError(_explain_trace_failure(error)) from error
    _drop_assertions(joint.graph)
    _sum_tied_gradients(joint)
    _one_node_per_output(joint)
    specs = tuple(InputSpec(tuple(v.shape), v.dtype, str(v.device)) for v in tensors + targets)
    reader = _JointReader(joint, n_inputs=len(tensors), device=str(device))
    fields = reader.read()
    return reader.ir.build(**fields, input_specs=specs, call_form=call_form, output_form=step.output_form,
                           assumptions=assumptions)


def _drop_assertions(graph: torch.fx.Graph) -> None:
    """Remove the ops that only check values (``aten._assert_async`` from ``F.one_hot``'s class
    range, and other ops returning nothing), with the ops that computed nothing but their argument.
    They allocate nothing and no plan can move them; the planned step does not run them (the loss
    code, which the user runs, still checks)."""
    def removable(node: torch.fx.Node) -> bool:
        target = node.target
        return (node.op == "call_function" and not node.users and target is not _BOUNDARY
                and isinstance(target, OpOverload) and not schema_is_mutable(target)
                and torch.Tag.nondeterministic_seeded not in target.tags)

    pending = [n for n in graph.nodes if n.op == "call_function" and isinstance(n.target, OpOverload)
               and not schema_returns(n.target) and removable(n)]
    while pending:
        node = pending.pop()
        if node.graph is None or not removable(node):
            continue
        feeders = node.all_input_nodes
        graph.erase_node(node)
        pending.extend(feeders)


def _distinct_storages(values: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """The batch with every tensor in a storage of its own (a tensor passed twice, such as token
    ids given as input and as labels, is traced as two): the graph, and so its fingerprint, does
    not depend on how the caller's example tensors alias, so a plan re-captured from fresh
    tensors (``Plan.apply``, ``Plan.load``) matches. Each is counted as resident on its own."""
    seen: set = set()
    distinct = []
    for value in values:
        key = _aot.storage_key(value)
        distinct.append(value.clone() if key in seen else value)
        seen.add(key)
    return tuple(distinct)


def _sum_tied_gradients(joint: torch.fx.GraphModule) -> None:
    """One gradient per parameter, summed as eager sums it, for a parameter used under several
    names (an embedding tied to the output layer).

    AOT lifts each name as an input of its own and returns a gradient for each; added into
    ``.grad`` one by one they give ``(g + a) + b``, where eager's autograd sums the contributions
    first (its input buffer holds the first until the last arrives) and adds ``g + (a + b)``: the
    bits differ as soon as ``.grad`` is not zero (gradient accumulation). The contributions are
    summed by ``aten.add`` ops right after the last one is produced (in the order the backward
    produces them) and the sum is the gradient of the parameter's first name; the others get none.
    Complexity: O(nodes).
    """
    output = next(node for node in joint.graph.nodes if node.op == "output")
    storage_of = {_aot.input_role(node, _MODEL_PREFIX).name: _aot.storage_key(node.meta["val"])
                  for node in joint.graph.nodes if node.op == "placeholder"
                  and _aot.input_role(node, _MODEL_PREFIX).kind == "parameter"}
    slots = list(output.args[0])
    tied: dict[Any, list[int]] = {}
    for position, (value, role) in enumerate(zip(slots, _aot.output_roles(output, _MODEL_PREFIX))):
        if isinstance(value, torch.fx.Node) and role is not None and role.kind == "gradient" \
                and role.target in storage_of:
            tied.setdefault(storage_of[role.target], []).append(position)
    order = {node: i for i, node in enumerate(joint.graph.nodes)}
    for positions in (p for p in tied.values() if len(p) > 1):
        contributions = sorted((slots[p] for p in positions), key=order.__getitem__)
        total = contributions[0]
        for contribution in contributions[1:]:  # the running total is computed before this one
            with joint.graph.inserting_after(contribution):
                added = joint.graph.call_function(torch.ops.aten.add.Tensor, (total, contribution))
            added.meta.update(val=torch.ops.aten.add.Tensor(total.meta["val"], contribution.meta["val"]),
                              partitioner_tag=contribution.meta.get("partitioner_tag"))
            total = added
        slots[positions[0]] = total
        for position in positions[1:]:
            slots[position] = None
    output.args = (type(output.args[0])(slots),) + tuple(output.args[1:])


def _one_node_per_output(joint: torch.fx.GraphModule) -> None:
    """Give every output slot of the joint graph a node of its own, the same in every trace.

    The IR maps each gradient tensor to one parameter, but AOT can list one node for two:
    - a backward that returns one tensor twice (a custom ``autograd.Function``'s ``return g, s, s``):
      the repeated slot gets an ``aten.alias`` of the node, placed right after it (a view: no
      memory, freed where eager frees it);
    - an op whose meta kernel returns one tensor for outputs its schema says are fresh (oneDNN's
      LSTM backward: the bias gradient, for both biases; the real kernel returns two). A trace
      cannot tell those outputs apart, and whether AOT names one of them twice depends on fake
      tensor caching (the first trace in a process does): the slots naming them get them in
      schema order, so every capture gives the same graph and fingerprint.
    """
    output = next(node for node in joint.graph.nodes if node.op == "output")
    slots = list(output.args[0])
    groups: dict[tuple[torch.fx.Node, Any], list[int]] = {}
    for position, value in enumerate(slots):
        if isinstance(value, torch.fx.Node) and value.target is operator.getitem:
            groups.setdefault((value.args[0], _aot.storage_key(value.meta["val"])), []).append(position)
    for (op, key), positions in groups.items():
        if not isinstance(op.target, OpOverload):
            continue
        returns = schema_returns(op.target)
        twins = [i for i, item in enumerate(op.meta["val"]) if isinstance(item, torch.Tensor)
                 and _aot.storage_key(item) == key and returns[min(i, len(returns) - 1)].alias_info is None]
        if len(twins) > 1:
            for position, index in zip(positions, twins):
                slots[position] = _getitem(joint, op, index)
    seen: set[torch.fx.Node] = set()
    for position, value in enumerate(slots):
        if value in seen:
            with joint.graph.inserting_after(value):
                alias = joint.graph.call_function(torch.ops.aten.alias.default, (value,))
            alias.meta.update(val=torch.ops.aten.alias.default(value.meta["val"]),
                              partitioner_tag=value.meta.get("partitioner_tag"))
            slots[position] = alias
        if isinstance(value, torch.fx.Node):
            seen.add(value)
    output.args = (type(output.args[0])(slots),) + tuple(output.args[1:])


def _getitem(joint: torch.fx.GraphModule, op: torch.fx.Node, index: int) -> torch.fx.Node:
    """The node reading output ``index`` of multi-output ``op``, added right after it if missing."""
    for user in op.users:
        if user.target is operator.getitem and user.args[1] == index:
            return user
    with joint.graph.inserting_after(op):
        node = joint.graph.call_function(operator.getitem, (op, index))
    node.meta.update(val=op.meta["val"][index], partitioner_tag=op.meta.get("partitioner_tag"))
    return node


def _explain_trace_failure(error: Exception) -> str:
    text = f"{type(error).__name__}: {error}".strip()
    first_line = text.splitlines()[0][:400]
    if "DataDependent" in text or "data-dependent" in text or "_local_scalar_dense" in text:
        return ("the model has data-dependent control flow or output shapes (it reads tensor values "
                f"in Python, e.g. `if x.sum() > 0` or `.item()`), which cannot be planned ahead: {first_line}")
    if "dynamic" in text.lower() and "shape" in text.lower():
        return ("the model has dynamic shapes (an op whose output size depends on tensor values: nonzero, "
                "boolean-mask indexing, unique), which cannot be planned ahead: keep every shape a function of "
                "the input shapes (select with masks or torch.where; route tokens to experts with a fixed "
                f"capacity): {first_line}")
    return f"could not trace the training step: {first_line}"


class _JointReader:
    """Turns AOT's joint fx graph into the IR (through ``GraphBuilder``): contracts getitem and
    marker nodes, assigns storages, tells the loss's ops apart."""

    def __init__(self, joint: torch.fx.GraphModule, n_inputs: int, device: str):
        self.joint = joint
        self.n_inputs = n_inputs
        self.device = device
        self.ir = GraphBuilder()
        self.tensor_of: dict[torch.fx.Node, int] = {}  # fx node (single-tensor value) -> tensor id
        self.slots_of: dict[torch.fx.Node, tuple[int | None, ...]] = {}  # multi-output op node -> tensor ids
        self.storage_ids: dict[Any, int] = {}  # fake storage -> storage id
        self.storage_keys: list[Any] = []  # tensor id -> its fake storage
        self.parameters: dict[str, int] = {}
        self.buffers: dict[str, int] = {}
        self.inputs: list[int] = []
        self.targets: list[int] = []
        self.tangent = -1
        self.model_outputs: dict[int, int] = {}  # output index -> tensor id
        self.output_grads: dict[int, int] = {}  # output index -> tensor id of its gradient
        self.loss_nodes: set[torch.fx.Node] = set()  # forward nodes downstream of the model-output markers
        self.input_gradients: dict[int, int] = {}
        self.constants: dict[int, torch.Tensor] = {}
        self.forward_op_of_sequence: dict[int, int] = {}  # autograd sequence number -> first forward op

    # -- tensors and storages -----------------------------------------------------------------
    def _storage(self, value: torch.Tensor, sources: Sequence[int]) -> int:
        """The storage of ``value``: a view of one of the op's inputs (``sources``) lives in that
        input's storage as the IR has it (not always the fake storage's first owner: see
        ``_separate_from_siblings``); any other tensor in the storage its fake storage names."""
        key = _aot.storage_key(value)
        for source in sources:
            if self.storage_keys[source] == key:
                return self.ir.tensors[source].storage
        if key not in self.storage_ids:
            self.storage_ids[key] = self.ir.add_storage(value.untyped_storage().nbytes())
        return self.storage_ids[key]

    def _new_tensor(self, name: str, value: torch.Tensor, kind: TensorKind, sources: Sequence[int] = ()) -> int:
        if value.layout is not torch.strided:
            raise CaptureError(f"{name} is a {value.layout} tensor, whose memory the planner cannot count: "
                               "keep the model's tensors dense (torch.strided)")
        tensor_id = self.ir.add_tensor(name, tuple(value.shape), value.dtype, kind, self._storage(value, sources),
                                       tuple(value.stride()))
        self.storage_keys.append(_aot.storage_key(value))
        return tensor_id

    def _separate_from_siblings(self, target: OpOverload, index: int, slots: list) -> None:
        """Output ``index`` (the last of ``slots``) in a storage of its own when it shares one with
        an earlier output of the op but the schema says it is a fresh tensor (no alias annotation).
        ATen requires that of its kernels; a meta kernel may not keep to it: oneDNN's LSTM backward
        returns one fake bias gradient for both biases, while the real kernel returns two tensors.
        Views of either find their storage through the op they are read by (``_storage``)."""
        returns = schema_returns(target)
        storage = self.ir.tensors[slots[-1]].storage
        siblings = {self.ir.tensors[t].storage for t in slots[:-1] if t is not None}
        if storage in siblings and returns[min(index, len(returns) - 1)].alias_info is None:
            self.ir.set_tensor(slots[-1], storage=self.ir.add_storage(self.ir.storage_sizes[storage]))

    # -- nodes ----------------------------------------------------------------------------------
    def _placeholder(self, node: torch.fx.Node) -> None:
        role = _aot.input_role(node, _MODEL_PREFIX)
        value = node.meta["val"]
        if role.kind == "parameter":
            self.tensor_of[node] = self.parameters[role.name] = self._new_tensor(role.name, value, TensorKind.PARAMETER)
        elif role.kind == "buffer":
            self.tensor_of[node] = self.buffers[role.name] = self._new_tensor(role.name, value, TensorKind.BUFFER)
        elif role.kind == "tangent":
            self.tensor_of[node] = self.tangent = self._new_tensor("loss_grad", value, TensorKind.TANGENT)
        else:
            is_target = role.index >= self.n_inputs
            name = f"target{role.index - self.n_inputs}" if is_target else f"input{role.index}"
            tensor_id = self._new_tensor(name, value, TensorKind.INPUT)
            (self.targets if is_target else self.inputs).append(tensor_id)
            self.tensor_of[node] = tensor_id

    def _ref(self, node: torch.fx.Node) -> TensorRef:
        if node not in self.tensor_of:
            raise CaptureError(f"node {node.name} ({node.target}) is used as a tensor but holds "
                               f"{type(node.meta.get('val')).__name__}: dynamic shapes are not supported")
        return TensorRef(self.tensor_of[node])

    def _call_function(self, node: torch.fx.Node) -> None:
        target = node.target
        if target is operator.getitem:
            parent, index = node.args
            if parent in self.loss_nodes:
                self.loss_nodes.add(node)
            tensor_id = self.slots_of[parent][index]
            if tensor_id is not None:
                self.tensor_of[node] = tensor_id
            return
        if target is _BOUNDARY:  # contract the marker: its output is its input
            source, index = node.args
            if node.meta.get("partitioner_tag") == _aot.FORWARD_TAG:
                self.loss_nodes.add(node)
            self.tensor_of[node] = self.tensor_of[source]
            # later views of the marker's output live in the source's storage
            self.storage_ids.setdefault(_aot.storage_key(node.meta["val"]), self.ir.tensors[self.tensor_of[source]].storage)
            is_forward = node.meta.get("partitioner_tag") == _aot.FORWARD_TAG
            (self.model_outputs if is_forward else self.output_grads)[index] = self.tensor_of[source]
            return
        if not isinstance(target, OpOverload):
            raise UnsupportedOperatorError(str(target), "only ATen operators can be planned "
                                           "(higher-order operators and Python callables are not supported)")
        if schema_is_mutable(target):
            raise UnsupportedOperatorError(str(target), "it writes into its inputs, which the planner "
                                           "cannot reorder or recompute safely")
        is_forward = node.meta.get("partitioner_tag") == _aot.FORWARD_TAG
        if is_forward and any(a in self.loss_nodes for a in node.all_input_nodes):
            self.loss_nodes.add(node)  # reads the marked model output (or loss values): part of the loss
        args = tree_map(lambda a: self._ref(a) if isinstance(a, torch.fx.Node) else a, node.args)
        kwargs = tree_map(lambda a: self._ref(a) if isinstance(a, torch.fx.Node) else a, node.kwargs)
        input_ids = OpCall(target, tuple(args), dict(kwargs), (), False).input_ids()
        value = node.meta["val"]
        output_slots = self._outputs(node, input_ids)
        vals = tree_map(lambda a: a.meta["val"] if isinstance(a, torch.fx.Node) else a, (node.args, node.kwargs))
        if target in GRAD_MODE_OPS and self.device != "meta":  # its meta kernel states the inference outputs
            self._resize(output_slots, real_outputs(target, *vals))
        op_id = len(self.ir.ops)
        sequence = node.meta.get("seq_nr")
        if is_forward and sequence is not None:
            self.forward_op_of_sequence.setdefault(sequence, op_id)
        differentiates = None if is_forward or node.meta.get("is_gradient_acc") else \
            self.forward_op_of_sequence.get(sequence)
        call = OpCall(target, tuple(args), dict(kwargs), output_slots, not isinstance(value, torch.Tensor))
        self.ir.add_op(node.name, Phase.FORWARD if is_forward else Phase.BACKWARD, call,
                       flops=_flops(target, vals[0], vals[1], value), in_loss=node in self.loss_nodes,
                       is_random=torch.Tag.nondeterministic_seeded in target.tags, differentiates=differentiates)

    def _outputs(self, node: torch.fx.Node, input_ids: tuple[int, ...]) -> tuple[int | None, ...]:
        """A tensor for each tensor ``node`` returns (``None`` where it returns None): the op's
        output slots, in storages of their own or, for views, of the input they view."""
        target, value = node.target, node.meta["val"]
        if isinstance(value, torch.Tensor):
            self.tensor_of[node] = self._new_tensor(node.name, value, TensorKind.ACTIVATION, input_ids)
            return (self.tensor_of[node],)
        if not isinstance(value, (tuple, list)):
            raise UnsupportedOperatorError(str(target), f"it returns {type(value).__name__}, not tensors")
        slots = []
        for i, item in enumerate(value):
            if isinstance(item, torch.Tensor):
                slots.append(self._new_tensor(f"{node.name}.{i}", item, TensorKind.ACTIVATION, input_ids))
                self._separate_from_siblings(target, i, slots)
            elif item is None:
                slots.append(None)
            else:
                raise UnsupportedOperatorError(str(target), f"it returns a {type(item).__name__} "
                                               "(symbolic sizes or scalars), which cannot be planned")
        self.slots_of[node] = tuple(slots)
        return self.slots_of[node]

    def _get_attr(self, node: torch.fx.Node) -> None:
        """A tensor the forward creates from constants (``torch.tensor([])`` in transformers'
        caches): resident, bound to the traced value. Anything else is a higher-order op's graph."""
        value = getattr(self.joint, node.target)
        if not isinstance(value, torch.Tensor):
            raise UnsupportedOperatorError(f"{node.target} (a higher-order operator's subgraph)",
                                           "control flow operators (torch.cond, while_loop, map) cannot be "
                                           "planned: compute both branches and select with torch.where")
        self.tensor_of[node] = tensor_id = self._new_tensor(node.target, value, TensorKind.CONSTANT)
        self.constants[tensor_id] = value

    def _resize(self, slots: tuple[int | None, ...], real: list) -> None:
        """Give the tensors in ``slots`` the shapes, layouts, dtypes and storage bytes the real kernel produces."""
        for tensor_id, found in zip(slots, real):
            if tensor_id is not None and found is not None:
                shape, strides, dtype, storage_bytes = found
                self.ir.set_tensor(tensor_id, shape=shape, strides=strides, dtype=dtype)
                self.ir.resize_storage(self.ir.tensors[tensor_id].storage, storage_bytes)

    def _resident_named(self, name: str) -> int:
        if name in self.buffers:
            return self.buffers[name]
        return self.inputs[int(name.removeprefix("input"))]

    def _output(self, node: torch.fx.Node) -> tuple[int, dict[int, int], dict[int, int]]:
        loss = -1
        gradients: dict[int, int] = {}
        buffer_updates: dict[int, int] = {}
        for value, role in zip(node.args[0], _aot.output_roles(node, _MODEL_PREFIX)):
            if role is None or value is None:
                continue
            tensor_id = self.tensor_of[value]
            if role.kind == "loss":
                loss = tensor_id
            elif role.kind == "mutation":
                buffer_updates[tensor_id] = self._resident_named(role.target)
            elif role.target in self.parameters:
                gradients[tensor_id] = self.parameters[role.target]
                self.ir.set_tensor(tensor_id, kind=TensorKind.GRADIENT)
            elif role.target.startswith("input"):
                self.input_gradients[tensor_id] = self.inputs[int(role.target.removeprefix("input"))]
        return loss, gradients, buffer_updates

    # -- assembly -------------------------------------------------------------------------------
    def read(self) -> dict[str, Any]:
        """Read every node into ``self.ir``; returns the graph-level fields for its ``build``."""
        loss, gradients, buffer_updates = -1, {}, {}
        for node in self.joint.graph.nodes:
            if node.op == "placeholder":
                self._placeholder(node)
            elif node.op == "call_function":
                self._call_function(node)
            elif node.op == "output":
                loss, gradients, buffer_updates = self._output(node)
            elif node.op == "get_attr":
                self._get_attr(node)
            else:
                raise UnsupportedOperatorError(node.op, f"unexpected fx node {node.name} in the joint graph")
        if not gradients:
            raise CaptureError("the traced step produces no parameter gradient: does the loss depend "
                               "on a parameter with requires_grad=True?")
        loss_backward = self._loss_backward()
        for op_id in loss_backward | self._loss_forward(loss_backward, buffer_updates):
            self.ir.set_in_loss(op_id)
        return dict(
            parameters=self.parameters, buffers=self.buffers, inputs=tuple(self.inputs), targets=tuple(self.targets),
            tangent=self.tangent, loss=loss,
            model_outputs=tuple(self.model_outputs[i] for i in sorted(self.model_outputs)),
            output_grads=tuple(self.output_grads.get(i) for i in sorted(self.model_outputs)),
            gradients=gradients, buffer_updates=buffer_updates, input_gradients=self.input_gradients,
            device=self.device, constants=self.constants,
        )

    def _loss_forward(self, loss_backward: set[int], buffer_updates: dict[int, int]) -> set[int]:
        """Forward ops the model does not need: upstream of no model output, no new buffer value
        and nothing the model's own backward reads. They are the loss's, even though they do not
        read the model's output (``labels[:, 1:]``, a one-hot of the targets, constants)."""
        ops, tensors = self.ir.ops, self.ir.tensors
        needed: set[int] = set()
        pending = [*self.model_outputs.values(), *buffer_updates, *(
            t for op_id, row in enumerate(ops) if row.phase is Phase.BACKWARD and op_id not in loss_backward
            for t in row.inputs)]
        while pending:
            op_id = tensors[pending.pop()].producer
            if op_id is None or op_id in needed or ops[op_id].phase is not Phase.FORWARD:
                continue
            needed.add(op_id)
            pending.extend(ops[op_id].inputs)
        return {op_id for op_id, row in enumerate(ops) if row.phase is Phase.FORWARD and op_id not in needed}

    def _loss_backward(self) -> set[int]:
        """Backward ops upstream of the gradients of the model outputs: the loss's backward."""
        ops, tensors = self.ir.ops, self.ir.tensors
        region: set[int] = set()
        pending = [tensors[t].producer for t in self.output_grads.values()]
        while pending:
            op_id = pending.pop()
            if op_id is None or op_id in region or ops[op_id].phase is not Phase.BACKWARD:
                continue
            region.add(op_id)
            pending.extend(tensors[t].producer for t in ops[op_id].inputs)
        return region


def _flops(target: OpOverload, args: Any, kwargs: Any, out: Any) -> float:
    """FLOPs from PyTorch's own counter where it knows the op; one per element otherwise."""
    counter = flop_registry.get(target.overloadpacket)
    if counter is not None:
        return float(counter(*args, **kwargs, out_val=out))
    tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
    return float(max((t.numel() for t in tensors), default=0))
