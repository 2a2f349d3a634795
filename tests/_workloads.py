"""Model factories and eager-vs-planned comparison helpers for the executor, baseline and plan tests.

Every workload is tiny (batch 1-2, small images) so that a whole step runs in well under a second
on a 2-core CPU. Models are built under a fixed seed; tests deep-copy them so that the planned copy
and the eager reference start from identical parameters and buffers.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Optional

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import planner
from planner import zoo
from planner import Schedule, SimResult, TrainingGraph
from planner.algorithms import ALGORITHMS

tv = torchvision.models

ALL_ALGORITHMS = tuple(ALGORITHMS)
#: vgg16 has 138M parameters: only a few algorithms are run on it to keep memory and time down
VGG_ALGORITHMS = ("store_all", "checkpoint_all", "chen_greedy")
NUM_CLASSES = 1000  # torchvision's default head


@pytest.fixture(scope="module", autouse=True)
def one_intra_op_thread():
    """Run each module's steps on one intra-op thread, restored afterwards.

    With two OpenMP threads on a 2-core machine that other processes share, every small kernel
    waits at a barrier for a descheduled thread and a 0.1 s step takes seconds. Results are
    compared between runs made under the same setting, so this changes nothing they check.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def projection_loss(output: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A fixed random projection of the output: a loss with real signal (the gradient reaching the
    output is ``weights``) whose backward allocates exactly what the graph's does. A squared error
    would do too, but eager's ``pow`` backward holds temporaries inside its autograd node that the
    traced ops free earlier, and on this small encoder the peak falls in the loss's backward."""
    return (output * weights).sum()


def make_transformer(dropout: float = 0.1) -> nn.TransformerEncoder:
    """d_model 32, 4 heads, feed-forward 64, 2 layers, batch-first, nested tensors off."""
    layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=dropout, batch_first=True)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)


@dataclass(frozen=True)
class Spec:
    """How to build one workload: a model factory, its input shape, and its loss: cross-entropy on
    random labels for a classifier, else a fixed random projection of the output
    (``projection_loss``; not the output's sum: a post-norm encoder's output sums to ~0 whatever
    the weights, so its gradients would be float noise)."""

    factory: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    classifier: bool = True
    algorithms: tuple[str, ...] = ALL_ALGORITHMS


class StemHeavy(nn.Module):
    """A wide ReLU and max-pool at full resolution before a small head: the lowest peak of any
    plan is the stem's backward, where the variants' packed mask and positions stand in for the
    ReLU output that the stock backward must hold."""

    def __init__(self, classes: int = NUM_CLASSES):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.pool = nn.MaxPool2d(4)
        self.head = nn.Sequential(nn.Conv2d(32, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                  nn.Flatten(), nn.Linear(8, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(torch.relu(self.stem(x))))


SPECS: dict[str, Spec] = {
    "resnet18": Spec(lambda: tv.resnet18(), (2, 3, 64, 64)),
    "mobilenet_v2": Spec(lambda: tv.mobilenet_v2(), (2, 3, 64, 64)),
    "densenet121": Spec(lambda: tv.densenet121(), (2, 3, 64, 64)),
    "googlenet": Spec(lambda: tv.googlenet(aux_logits=False, init_weights=False), (2, 3, 64, 64)),
    # 75x75 is the smallest input inception_v3's stem and reduction blocks accept
    "inception_v3": Spec(lambda: tv.inception_v3(aux_logits=False, init_weights=False), (2, 3, 75, 75)),
    "vgg16": Spec(lambda: tv.vgg16(), (1, 3, 32, 32), algorithms=VGG_ALGORITHMS),
    "transformer": Spec(make_transformer, (2, 16, 32), classifier=False),
    # 3 classes: the output keeps the input's shape, as the projection loss needs
    "unet": Spec(lambda: zoo.UNet(3, 3, width=8, depth=2), (2, 3, 32, 32), classifier=False),
    "stem_heavy": Spec(StemHeavy, (4, 3, 64, 64)),
}


@dataclass
class Workload:
    """A model in train mode, one example batch, its captured graph, and lazily computed
    schedules, simulations and eager reference results (cached: each is computed once)."""

    name: str
    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor  # class labels (cross-entropy) or the projection's weights
    graph: TrainingGraph
    cost_model: planner.CostModel
    algorithms: tuple[str, ...]
    _schedules: dict = field(default_factory=dict, repr=False)
    _sims: dict = field(default_factory=dict, repr=False)
    _measured: dict = field(default_factory=dict, repr=False)
    _references: dict = field(default_factory=dict, repr=False)

    # -- loss ------------------------------------------------------------------------------------
    @property
    def loss_fn(self):
        """What ``capture``/``plan`` get: cross-entropy for classifiers, else the projection."""
        return projection_loss if self.y.is_floating_point() else F.cross_entropy

    @property
    def targets(self) -> tuple:
        return (self.y,)

    @property
    def held(self) -> list[torch.Tensor]:
        return [self.x, *self.targets]

    def loss(self, output: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(output, self.y)

    # -- planning ----------------------------------------------------------------------------------
    @property
    def store_all_peak(self) -> int:
        return self.sim("store_all").peak_bytes

    def schedule(self, algorithm: str) -> Schedule:
        if algorithm not in self._schedules:
            budget = int(0.9 * self.simulate(Schedule.store_all(self.graph)).peak_bytes)
            self._schedules[algorithm] = ALGORITHMS[algorithm](self.graph, self.cost_model, budget)
        return self._schedules[algorithm]

    def simulate(self, schedule: Schedule) -> SimResult:
        return planner.simulate(self.graph, schedule, self.cost_model)

    def sim(self, algorithm: str) -> SimResult:
        if algorithm not in self._sims:
            self._sims[algorithm] = self.simulate(self.schedule(algorithm))
        return self._sims[algorithm]

    # -- running -----------------------------------------------------------------------------------
    def fresh_copy(self) -> nn.Module:
        return copy.deepcopy(self.model)

    def planned(self, algorithm: str) -> tuple[nn.Module, planner.PlannedModule]:
        """A fresh copy of the model and the ``PlannedModule`` running ``algorithm``'s schedule on it."""
        model = self.fresh_copy()
        return model, planner.PlannedModule(model, self.graph, self.schedule(algorithm))

    def reference(self, seed: int = 1) -> "StepResult":
        """One eager step of a fresh copy (``loss(model(x)).backward()``), RNG seeded with ``seed``."""
        if seed not in self._references:
            self._references[seed] = eager_step(self.fresh_copy(), self.x, self.loss, seed)
        return self._references[seed]

    def measure(self, algorithm: str) -> planner.MeasuredStep:
        """Measured peak of one planned step, ``loss(planned(x)).backward()``, in steady state."""
        if algorithm not in self._measured:
            model, pm = self.planned(algorithm)
            self._measured[algorithm] = planner.measure_step(
                model, lambda: self.loss(pm(self.x)).backward(), self.held)
        return self._measured[algorithm]


def build_workload(name: str, cost_model: planner.CostModel | None = None, batch: int | None = None) -> Workload:
    """Build ``name`` from ``SPECS`` under seed 0, in train mode (optionally at another batch
    size), and capture its step."""
    spec = SPECS[name]
    shape = spec.input_shape if batch is None else (batch,) + spec.input_shape[1:]
    torch.manual_seed(0)
    model = spec.factory().train()
    x = torch.randn(shape)
    y = torch.randint(0, NUM_CLASSES, (shape[0],)) if spec.classifier else torch.randn(shape)  # encoders keep the shape
    graph = planner.capture(model, x, F.cross_entropy if spec.classifier else projection_loss, targets=y)
    return Workload(name, model, x, y, graph, cost_model or planner.RooflineCostModel("cpu"), spec.algorithms)


# ---- comparing a planned step with eager PyTorch ---------------------------------------------------
@dataclass
class StepResult:
    """What one training step leaves behind: the loss, every .grad, every buffer, the RNG state."""

    loss: torch.Tensor
    grads: dict[str, Optional[torch.Tensor]]
    buffers: dict[str, torch.Tensor]
    rng_state: torch.Tensor
    model: nn.Module


def snapshot(model: nn.Module, loss: torch.Tensor) -> StepResult:
    return StepResult(
        loss=loss.detach().clone(),
        grads={n: None if p.grad is None else p.grad.detach().clone() for n, p in model.named_parameters()},
        buffers={n: b.detach().clone() for n, b in model.named_buffers()},
        rng_state=torch.get_rng_state(),
        model=model,
    )


def eager_step(model: nn.Module, x: torch.Tensor, loss: Callable, seed: int) -> StepResult:
    torch.manual_seed(seed)
    value = loss(model(x))
    value.backward()
    return snapshot(model, value)


def planned_step(model: nn.Module, pm: planner.PlannedModule, x: torch.Tensor, loss: Callable,
                 seed: int) -> StepResult:
    torch.manual_seed(seed)
    value = loss(pm(x))
    value.backward()
    return snapshot(model, value)


def assert_same_step(got: StepResult, want: StepResult, *, check_rng: bool = True) -> None:
    """Bitwise: loss, every parameter's .grad, every buffer (BatchNorm statistics and counters)."""
    assert torch.equal(got.loss, want.loss), f"loss {got.loss.item()!r} != eager {want.loss.item()!r}"
    assert got.grads.keys() == want.grads.keys()
    for name, want_grad in want.grads.items():
        got_grad = got.grads[name]
        assert (got_grad is None) == (want_grad is None), f"{name}: .grad presence differs from eager"
        if want_grad is not None:
            assert torch.equal(got_grad, want_grad), (
                f"{name}.grad differs from eager (max abs diff {(got_grad - want_grad).abs().max().item():.3e})")
    assert_same_buffers(got.buffers, want.buffers)
    if check_rng:
        assert torch.equal(got.rng_state, want.rng_state), "the RNG ends the step in another state than eager's"


def assert_same_buffers(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name, value in want.items():
        assert torch.equal(got[name], value), f"buffer {name} differs from eager"


def assert_same_parameters(got: nn.Module, want: nn.Module) -> None:
    for (name, a), (_, b) in zip(got.named_parameters(), want.named_parameters(), strict=True):
        assert torch.equal(a, b), f"parameter {name} differs (max abs diff {(a - b).abs().max().item():.3e})"
    assert_same_buffers(dict(got.named_buffers()), dict(want.named_buffers()))
