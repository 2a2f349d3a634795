"""planner.backend as a torch.compile backend: planned graphs, eager-identical training."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

import planner

from _workloads import projection_loss


class SmallCNN(nn.Module):
    def __init__(self, graph_break: bool = False):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Linear(8 * 8 * 8, 10)
        self.graph_break = graph_break

    def forward(self, x):
        x = self.features(x)
        if self.graph_break:
            torch._dynamo.graph_break()
        return self.head(x.flatten(1))


def _train_both(model: nn.Module, x, y, budget: str, steps: int = 2, loss_fn=F.cross_entropy):
    torch._dynamo.reset()
    reference = copy.deepcopy(model)
    compiled = torch.compile(model, backend=planner.backend(budget=budget))
    for step in range(steps):
        torch.manual_seed(step)
        loss = loss_fn(compiled(x), y) if y is not None else loss_fn(compiled(x))
        loss.backward()
        torch.manual_seed(step)
        expected = loss_fn(reference(x), y) if y is not None else loss_fn(reference(x))
        expected.backward()
        assert torch.equal(loss, expected)
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(a.grad, b.grad), name
    for a, b in zip(model.buffers(), reference.buffers()):
        assert torch.equal(a, b)


def test_backend_trains_like_eager_with_batchnorm() -> None:
    torch.manual_seed(0)
    _train_both(SmallCNN().train(), torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,)), "95%")


def test_backend_plans_each_graph_across_a_graph_break() -> None:
    """The second graph's input is the first graph's output: its gradient must flow back.
    (The head graph alone, one Linear, cannot go below its own store-all peak: budget 100%.)"""
    torch.manual_seed(0)
    _train_both(SmallCNN(graph_break=True).train(), torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,)), "100%")


def test_backend_replays_dropout_like_eager() -> None:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.1, batch_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).train()
    # a random projection of the output: the sum of a post-norm output is ~0, its gradients float noise
    _train_both(model, torch.randn(2, 8, 16), torch.randn(2, 8, 16), "90%", loss_fn=projection_loss)


def test_backend_reports_an_infeasible_budget() -> None:
    torch._dynamo.reset()
    compiled = torch.compile(SmallCNN().train(), backend=planner.backend(budget=1000))
    try:
        compiled(torch.randn(4, 3, 8, 8))
    except Exception as error:  # dynamo wraps backend failures; the planner's error must be the cause
        cause = error
        while cause is not None and not isinstance(cause, planner.InfeasibleBudgetError):
            cause = cause.__cause__ or cause.__context__
        assert isinstance(cause, planner.InfeasibleBudgetError), repr(error)
        assert cause.min_feasible_bytes > 1000
    else:
        raise AssertionError("a 1000-byte budget was accepted")
