"""Fidelity across a zoo of architectures that no other test names.

Every case is planned twice (store-all, and a budget below it that forces recomputation), with
PyTorch's stock operators and with the low-memory operator variants (``op_variants=False`` and the
default ``True``), and run for one steady-state training step whose ``.grad`` already hold an
earlier micro-batch's values. Each must give eager PyTorch's loss, every gradient, every buffer
and the RNG state after the step, bitwise; and the peak the ``MemoryMeter`` measures (as
``planner.measure_step`` accounts it) must be the simulator's prediction within 0.1%. Losses
carry real signal: cross-entropy on random labels. A token-routing mixture of experts, which has
data-dependent shapes, must be refused with a typed error naming the fix.

The zoo: timm families (ConvNeXt with stochastic depth, Swin, EfficientNet, ViT with dropout,
RegNet, MobileViT, NFNet, BYOBNet, MambaOut, a ResNet in ``channels_last``), and small models
written for what they exercise: custom ``autograd.Function``s, weight-norm parametrizations,
``channels_last`` with pooling, in-place ops on views and an in-place buffer update, grouped
convolutions, LSTM and GRU, an embedding tied to the output layer, and a UNet
(``planner.zoo.UNet``). Every model is tiny; the module runs on one intra-op thread.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import planner
from planner import TrainingGraph
from planner.zoo import UNet, Workload

from _workloads import StepResult, assert_same_step, snapshot
from _workloads import one_intra_op_thread  # noqa: F401  (autouse fixture)
from conftest import SharedShift

PEAK_TOLERANCE = 1e-3  # measured peak vs predicted, relative
#: sha256 of every case's saved plan file, recorded at commit 4b87075 (before the structure
#: refactors of issue 14). A change that alters a plan on purpose records them again with
#: ``PLANNER_RECORD_PLAN_DIGESTS=1 pytest tests/test_zoo_fidelity.py`` and says which plans changed.
PLAN_DIGESTS = Path(__file__).parent / "data" / "zoo_plan_digests.json"
RECORD_DIGESTS = os.environ.get("PLANNER_RECORD_PLAN_DIGESTS") == "1"
CLASSES = 10


# ---- models written for what they exercise ----------------------------------------------------------
class _ScaledTanh(torch.autograd.Function):
    """``a * tanh(x)``, whose backward reads the saved output and reduces into the scalar ``a``."""

    @staticmethod
    def forward(ctx, x, a):
        y = torch.tanh(x)
        ctx.save_for_backward(y, a)
        return a * y

    @staticmethod
    def backward(ctx, grad):
        y, a = ctx.saved_tensors
        return grad * a * (1 - y * y), (grad * y).sum().reshape(a.shape)


class _ClippedGradient(torch.autograd.Function):
    """The identity, whose backward clips the gradient (a non-tensor on ``ctx``)."""

    @staticmethod
    def forward(ctx, x, bound: float):
        ctx.bound = bound
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad.clamp(-ctx.bound, ctx.bound), None


class CustomFunctionNet(nn.Module):
    """Blocks of the two Functions above and ``conftest.SharedShift`` between linear layers."""

    def __init__(self, width: int = 128, blocks: int = 4):
        super().__init__()
        self.fc_in, self.fc_out = nn.Linear(16, width), nn.Linear(width, CLASSES)
        self.mix = nn.ModuleList(nn.Linear(width, width) for _ in range(2 * blocks))
        self.scales = nn.Parameter(torch.full((blocks,), 1.5))
        self.shifts_a = nn.ParameterList(nn.Parameter(torch.zeros(width)) for _ in range(blocks))
        self.shifts_b = nn.ParameterList(nn.Parameter(torch.zeros(width)) for _ in range(blocks))

    def forward(self, x):
        h = self.fc_in(x)
        for i in range(len(self.scales)):
            h = _ScaledTanh.apply(self.mix[2 * i](h), self.scales[i])
            h = _ClippedGradient.apply(self.mix[2 * i + 1](h), 1e-3)
            h = F.silu(SharedShift.apply(h, self.shifts_a[i], self.shifts_b[i]))
        return self.fc_out(h)


class WeightNormNet(nn.Module):
    """``parametrizations.weight_norm`` on residual convolutions (over both dims) and the classifier."""

    def __init__(self, width: int = 16, layers: int = 4):
        super().__init__()
        weight_norm = nn.utils.parametrizations.weight_norm
        self.stem = weight_norm(nn.Conv2d(3, width, 3, padding=1))
        self.convs = nn.ModuleList(weight_norm(nn.Conv2d(width, width, 3, padding=1), dim=i % 2) for i in range(layers))
        self.fc = weight_norm(nn.Linear(width, CLASSES))

    def forward(self, x):
        h = F.relu(self.stem(x))
        for conv in self.convs:
            h = F.relu(conv(h)) + h
        return self.fc(h.mean((2, 3)))


class PoolingCNN(nn.Module):
    """Convolutions, BatchNorm, ReLU and max-pooling: in ``channels_last`` every variant applies."""

    def __init__(self):
        super().__init__()
        def unit(c_in: int, c_out: int, stride: int = 1) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]

        self.features = nn.Sequential(*unit(3, 16), *unit(16, 16), nn.MaxPool2d(2), *unit(16, 32), *unit(32, 32),
                                      nn.MaxPool2d(2), *unit(32, 64), *unit(64, 64))
        self.fc = nn.Linear(64, CLASSES)

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


class _InplaceViewBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(32, 96), nn.Linear(32, 32)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):  # (batch, 8, 32) -> (batch, 8, 32)
        q, k, v = self.fc1(x).chunk(3, dim=-1)
        a, b = v.split([16, 16], dim=-1)
        attention = torch.softmax(q @ k.transpose(1, 2) / 4, dim=-1)
        out = attention @ torch.cat([b, a], dim=-1)
        out.add_(x)
        out = self.act(out)
        w = self.fc2(out).transpose(1, 2).contiguous().view(out.shape[0], -1)  # (batch, 256)
        w.narrow(1, 0, 64).mul_(0.5)
        return w.view(-1, 32, 8).transpose(1, 2).sigmoid_()


class InplaceViewNet(nn.Module):
    """In-place ops on fresh tensors and on views, chains of views, chunk/split, and a buffer
    updated in place (a running mean of the input, like BatchNorm's but hand-written)."""

    def __init__(self, blocks: int = 4):
        super().__init__()
        self.blocks = nn.Sequential(*(_InplaceViewBlock() for _ in range(blocks)))
        self.fc = nn.Linear(32, CLASSES)
        self.register_buffer("input_mean", torch.zeros(32))

    def forward(self, x):  # x: (batch, 8, 32)
        self.input_mean.mul_(0.9).add_(0.1 * x.detach().mean((0, 1)))
        return self.fc(self.blocks(x - self.input_mean).mean(1))


class GroupedConvNet(nn.Module):
    """ResNeXt-style blocks: grouped 3x3 convolutions (4, 8 groups, and depthwise) and grouped 1x1."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.blocks = nn.ModuleList(nn.Sequential(
            nn.Conv2d(32, 32, 1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1, groups=groups), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 32, 1, groups=2), nn.BatchNorm2d(32)) for groups in (4, 8, 32))
        self.fc = nn.Linear(32, CLASSES)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = F.relu(x + block(x))
        return self.fc(x.mean((2, 3)))


class RecurrentClassifier(nn.Module):
    """A stacked LSTM or GRU classifying a sequence from its last step."""

    def __init__(self, cell: type[nn.RNNBase], layers: int):
        super().__init__()
        self.rnn = cell(16, 32, num_layers=layers, batch_first=True)
        self.fc = nn.Linear(32, CLASSES)

    def forward(self, x):
        return self.fc(self.rnn(x)[0][:, -1])


class TiedLM(nn.Module):
    """Token embedding tied to the output projection (one parameter, two uses)."""

    def __init__(self, vocab: int = 256, width: int = 32, layers: int = 4):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.mix = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        h = self.embed(ids)
        for mix in self.mix:
            h = h + F.gelu(mix(h))
        return self.head(self.norm(h))


# ---- the cases ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ZooCase:
    """How to build one workload, and the budget (a fraction of store-all) that forces recomputation:
    the midpoint, measured when the case was added, between the lowest peak fast mode reaches
    (``InfeasibleBudgetError.min_feasible_bytes``, with and without variants) and the lowest peak
    without recomputation (store-all reordered, with and without variants)."""

    build: Callable[[], Workload]
    budget: float


def _classify(model: nn.Module, x: torch.Tensor) -> Workload:
    return Workload(model, (x,), (torch.randint(0, CLASSES, (x.shape[0],)),), F.cross_entropy)


def _images(batch: int, size: int, channels_last: bool = False) -> torch.Tensor:
    x = torch.randn(batch, 3, size, size)
    return x.to(memory_format=torch.channels_last) if channels_last else x


def _timm(name: str, batch: int, size: int, channels_last: bool = False, **kwargs) -> Callable[[], Workload]:
    def build() -> Workload:
        timm = pytest.importorskip("timm")  # the test extra installs it
        model = timm.create_model(name, pretrained=False, num_classes=CLASSES, **kwargs)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        return _classify(model, _images(batch, size, channels_last))
    return build


def _language_model() -> Workload:
    ids, labels = torch.randint(0, 256, (4, 32)), torch.randint(0, 256, (4, 32))
    return Workload(TiedLM(), (ids,), (labels,), lambda out, y: F.cross_entropy(out.flatten(0, 1), y.flatten()))


def _segmentation() -> Workload:
    x, labels = torch.randn(4, 3, 32, 32), torch.randint(0, 4, (4, 32, 32))
    return Workload(UNet(3, 4, width=8, depth=3), (x,), (labels,), F.cross_entropy)


CASES: dict[str, ZooCase] = {
    "convnext": ZooCase(_timm("test_convnext", 8, 64, drop_path_rate=0.1), 0.81),
    "swin": ZooCase(_timm("swin_tiny_patch4_window7_224", 4, 32, img_size=32, patch_size=2, window_size=4,
                          embed_dim=16, depths=(1, 1), num_heads=(1, 2)), 0.74),
    "efficientnet": ZooCase(_timm("test_efficientnet", 4, 64), 0.77),
    "vit": ZooCase(_timm("test_vit", 32, 32, drop_rate=0.1, proj_drop_rate=0.1, attn_drop_rate=0.1), 0.75),
    "regnet": ZooCase(_timm("regnetx_002", 16, 64), 0.83),
    # 48 px: the 3x3 map of stage 3 is interpolated to the 2x2 patch grid (bilinear, both ways)
    "mobilevit": ZooCase(_timm("mobilevit_xxs", 4, 48), 0.79),
    "nfnet": ZooCase(_timm("test_nfnet", 4, 64), 0.82),
    "byobnet": ZooCase(_timm("test_byobnet", 8, 64), 0.87),
    "mambaout": ZooCase(_timm("test_mambaout", 4, 64), 0.82),
    "resnet_channels_last": ZooCase(_timm("test_resnet", 8, 64, channels_last=True), 0.76),
    "custom_function": ZooCase(lambda: _classify(CustomFunctionNet(), torch.randn(512, 16)), 0.75),
    "weight_norm": ZooCase(lambda: _classify(WeightNormNet(), _images(8, 32)), 0.66),
    "cnn_channels_last": ZooCase(
        lambda: _classify(PoolingCNN().to(memory_format=torch.channels_last), _images(4, 64, channels_last=True)), 0.64),
    "inplace_views": ZooCase(lambda: _classify(InplaceViewNet(), torch.randn(16, 8, 32)), 0.76),
    "grouped_conv": ZooCase(lambda: _classify(GroupedConvNet(), _images(4, 32)), 0.67),
    "lstm": ZooCase(lambda: _classify(RecurrentClassifier(nn.LSTM, 4), torch.randn(32, 16, 16)), 0.88),
    "gru": ZooCase(lambda: _classify(RecurrentClassifier(nn.GRU, 2), torch.randn(32, 6, 16)), 0.8),
    "tied_embedding_lm": ZooCase(_language_model, 0.87),
    "unet": ZooCase(_segmentation, 0.75),
}


# ---- running ----------------------------------------------------------------------------------------
@dataclass
class Captured:
    """A case's workload (pristine: each run deep-copies the model), its graph, and eager's step."""

    workload: Workload
    graph: TrainingGraph
    eager: StepResult


def _step(model: nn.Module, runner: nn.Module, workload: Workload, seed: int = 1) -> tuple[StepResult, int]:
    """One steady-state step, measured; returns what it leaves and its peak. Every ``.grad``
    holds the same random values first (an accumulated micro-batch), so the step must also add
    its gradients into them as eager does."""
    generator = torch.Generator().manual_seed(seed)
    for parameter in model.parameters():
        parameter.grad = torch.empty_like(parameter).copy_(1e-3 * torch.randn(parameter.shape, generator=generator))
    losses = []

    def step() -> None:
        torch.manual_seed(seed)
        loss = workload.loss_fn(runner(*workload.inputs), *workload.targets)
        loss.backward()
        losses.append(loss)

    measured = planner.measure_step(model, step, [*workload.inputs, *workload.targets])
    return snapshot(model, losses[0]), measured.peak_bytes


@pytest.fixture(scope="module")
def zoo() -> Callable[[str], Captured]:
    """Builds, captures and runs eagerly each case once, on first use."""
    cache: dict[str, Captured] = {}

    def get(name: str) -> Captured:
        if name not in cache:
            torch.manual_seed(0)
            workload = CASES[name].build()
            workload.model.train()
            graph = planner.capture(workload.model, workload.inputs, workload.loss_fn, targets=workload.targets)
            reference = copy.deepcopy(workload.model)
            cache[name] = Captured(workload, graph, _step(reference, reference, workload)[0])
        return cache[name]

    return get


@pytest.fixture(scope="module")
def plan_digests() -> dict[str, str]:
    """The recorded digests; in record mode, the ones this run computes, written at the end."""
    recorded = json.loads(PLAN_DIGESTS.read_text()) if PLAN_DIGESTS.exists() else {}
    yield recorded
    if RECORD_DIGESTS:
        PLAN_DIGESTS.parent.mkdir(exist_ok=True)
        PLAN_DIGESTS.write_text(json.dumps(dict(sorted(recorded.items())), indent=1) + "\n")


def _assert_plan_file_unchanged(chosen: planner.Plan, key: str, digests: dict[str, str], folder: Path) -> None:
    """The saved plan, byte for byte, is the recorded one: refactors must not change a plan."""
    path = folder / "plan.json"
    chosen.save(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if RECORD_DIGESTS:
        digests[key] = digest
        return
    assert key in digests, f"no recorded digest for {key}: record them (see PLAN_DIGESTS)"
    assert digest == digests[key], f"the plan file of {key} changed: {path.read_text()[:400]}"


@pytest.mark.parametrize("budget", ["store_all", "recompute"])
@pytest.mark.parametrize("op_variants", [False, True], ids=["stock", "variants"])
@pytest.mark.parametrize("name", list(CASES))
def test_planned_step_is_eagers_and_its_peak_the_predicted(zoo, plan_digests, tmp_path, name: str, op_variants: bool,
                                                           budget: str) -> None:
    case = zoo(name)
    if budget == "store_all":
        chosen = planner.plan(case.graph, "100%", op_variants=op_variants, algorithm="store_all")
    else:
        chosen = planner.plan(case.graph, f"{CASES[name].budget:.0%}", op_variants=op_variants)
        assert chosen.recomputations > 0, f"{chosen.algorithm} recomputes nothing at {CASES[name].budget:.0%}"
        assert chosen.predicted_peak_bytes < chosen.store_all_peak_bytes
    _assert_plan_file_unchanged(chosen, f"{name}-{'variants' if op_variants else 'stock'}-{budget}", plan_digests,
                                tmp_path)
    model = copy.deepcopy(case.workload.model)
    planned = planner.PlannedModule(model, chosen.graph, chosen.schedule)
    got, peak = _step(model, planned, case.workload)
    assert_same_step(got, case.eager)
    error = (peak - chosen.predicted_peak_bytes) / chosen.predicted_peak_bytes
    # one row of docs/reliability.md's zoo table (pytest -s prints it)
    fraction = chosen.budget_bytes / chosen.store_all_peak_bytes
    print(f"\nzoo | {name} | {'variants' if op_variants else 'stock'} | {fraction:.0%} | {chosen.algorithm} "
          f"| {chosen.recomputations} | {len(chosen.variants)} | {chosen.predicted_peak_bytes} | {peak} "
          f"| {error:+.4%} |")
    assert abs(error) <= PEAK_TOLERANCE, (
        f"{name} ({chosen.algorithm}, variants {chosen.variants_summary}): measured peak {peak} B vs "
        f"predicted {chosen.predicted_peak_bytes} B ({error:+.3%})")


# ---- what cannot be planned -------------------------------------------------------------------------
class TokenRoutingMoE(nn.Module):
    """A mixture of experts that sends each token to its top-1 expert by gathering the token rows
    (``nonzero``): how many rows each expert gets depends on the router's values."""

    def __init__(self, width: int = 16, experts: int = 4):
        super().__init__()
        self.router = nn.Linear(width, experts)
        self.experts = nn.ModuleList(nn.Linear(width, width) for _ in range(experts))
        self.head = nn.Linear(width, CLASSES)

    def forward(self, x):
        choice = self.router(x).argmax(-1)
        out = torch.zeros_like(x)
        for index, expert in enumerate(self.experts):
            rows = (choice == index).nonzero(as_tuple=True)[0]
            out = out.index_add(0, rows, expert(x[rows]))
        return self.head(out)


def test_token_routing_mixture_of_experts_is_refused_naming_the_fix() -> None:
    """Data-dependent shapes cannot be planned ahead: a typed error that says what to write instead."""
    torch.manual_seed(0)
    x, y = torch.randn(32, 16), torch.randint(0, CLASSES, (32,))
    with pytest.raises(planner.CaptureError, match="dynamic shapes.*fixed capacity"):
        planner.capture(TokenRoutingMoE().train(), x, F.cross_entropy, targets=y)
