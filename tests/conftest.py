"""Shared small models and captured graphs for the test suite.

Everything here is small enough to capture in well under a second, except ``resnet18_case``,
which is captured once per session and shared by the schedule, simulator and cost-model tests.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

import planner
from planner import TrainingGraph
from planner.graph_builder import GraphBuilder


@pytest.fixture(scope="session", autouse=True)
def lint_every_graph():
    """Every graph the suite builds (each capture, each variant rewrite: all go through
    ``GraphBuilder.build``) is checked by ``TrainingGraph.lint`` before anyone reads it."""
    build = GraphBuilder.build

    def linted(self, **fields):
        graph = build(self, **fields)
        graph.lint()
        return graph

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(GraphBuilder, "build", linted)
        yield


class TinyMLP(nn.Module):
    """Three linear layers with ReLUs: a handful of ops, no buffers."""

    def __init__(self, d_in: int = 16, hidden: int = 32, d_out: int = 4):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class TinyCNN(nn.Module):
    """Conv, BatchNorm, ReLU, conv, pooling, linear: exercises buffers and buffer updates."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv1(x)))
        h = torch.relu(self.conv2(h))
        return self.fc(torch.flatten(self.pool(h), 1))


class ViewModel(nn.Module):
    """``h = x @ w`` followed by two views of ``h`` (``view`` and ``t``)."""

    def __init__(self, d: int = 4):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x @ self.w
        flat = h.view(-1)
        transposed = h.t()
        return flat.sum() * transposed.mean()


class SharedShift(torch.autograd.Function):
    """``x + a + b`` whose backward returns one tensor as the gradient of both ``a`` and ``b``
    (AOT then lists one node for two parameters' gradients)."""

    @staticmethod
    def forward(ctx, x, a, b):
        return x + a + b

    @staticmethod
    def backward(ctx, grad):
        shared = grad.sum(0)
        return grad, shared, shared


class ResidualNet(nn.Module):
    """Residual MLP blocks with LayerNorm, in a ``ModuleList`` (the repeated blocks ``plan_blocks``
    finds): enough activations to recompute; ``deep``: three hidden layers per block, enough to
    recompute inside one block."""

    def __init__(self, d: int = 32, classes: int = 5, blocks: int = 4, deep: bool = False, d_in: int = 16):
        super().__init__()
        self.inp = nn.Linear(d_in, d)

        def hidden() -> list[nn.Module]:
            return [module for _ in range(2 if deep else 0) for module in (nn.Linear(4 * d, 4 * d), nn.GELU())]

        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.GELU(), *hidden(), nn.Linear(4 * d, d))
            for _ in range(blocks))
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h)
        return self.head(h)


def make_transformer(d_model: int = 64, nhead: int = 4, ff: int = 128, layers: int = 2,
                     dropout: float = 0.1) -> nn.TransformerEncoder:
    """A batch-first ``nn.TransformerEncoder`` in train mode (nested tensors off)."""
    layer = nn.TransformerEncoderLayer(d_model, nhead, ff, dropout=dropout, batch_first=True)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False).train()


@dataclass
class Case:
    """A model, its example inputs and the graph captured from them."""

    model: nn.Module
    inputs: torch.Tensor
    graph: TrainingGraph


@pytest.fixture
def tiny_mlp_case() -> Case:
    torch.manual_seed(0)
    model = TinyMLP().train()
    x = torch.randn(8, 16)
    return Case(model, x, planner.capture(model, x))


@pytest.fixture
def tiny_cnn_case() -> Case:
    torch.manual_seed(0)
    model = TinyCNN().train()
    x = torch.randn(2, 3, 8, 8)
    return Case(model, x, planner.capture(model, x))


@pytest.fixture(scope="session")
def resnet18_case() -> Case:
    """torchvision resnet18, batch 4 at 64x64, captured once per session."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18().train()
    x = torch.randn(4, 3, 64, 64)
    return Case(model, x, planner.capture(model, x))
