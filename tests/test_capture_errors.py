"""Bad input to ``capture``: each failure is a typed error with an actionable message."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import planner
from planner import CaptureError, PlannerError

from conftest import TinyMLP


@pytest.fixture
def mlp() -> nn.Module:
    torch.manual_seed(0)
    return TinyMLP().train()


@pytest.mark.parametrize("bad", [
    [1, 2],
    (torch.randn(2, 16), object()),
    np.zeros((8, 16), dtype=np.float32),
    "x",
])
def test_non_tensor_inputs_raise_type_error(mlp: nn.Module, bad: object) -> None:
    with pytest.raises(TypeError, match="pass tensors"):
        planner.capture(mlp, bad)


def test_constant_the_model_does_not_take_is_a_capture_error(mlp: nn.Module) -> None:
    """Constants are passed to the model (``model(x, 3)``); one it does not accept fails its trace."""
    with pytest.raises(CaptureError, match="TypeError"):
        planner.capture(mlp, (torch.randn(2, 16), 3))


def test_non_tensor_targets_raise_type_error(mlp: nn.Module) -> None:
    with pytest.raises(TypeError, match="targets"):
        planner.capture(mlp, torch.randn(8, 16), nn.functional.mse_loss, targets=[0.5])


def test_missing_inputs_raise_type_error(mlp: nn.Module) -> None:
    with pytest.raises(TypeError, match="hold no tensor"):
        planner.capture(mlp, ())


def test_non_module_raises_type_error() -> None:
    with pytest.raises(TypeError, match="torch.nn.Module"):
        planner.capture(lambda x: x * 2, torch.randn(2))


def test_non_scalar_loss_raises(mlp: nn.Module) -> None:
    with pytest.raises(CaptureError, match="scalar"):
        planner.capture(mlp, torch.randn(8, 16), loss_fn=lambda out: out)


def test_non_tensor_loss_raises(mlp: nn.Module) -> None:
    with pytest.raises(CaptureError, match="scalar"):
        planner.capture(mlp, torch.randn(8, 16), loss_fn=lambda out: 1.0)


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.fc(x)
        return self.fc(-x)


class ItemCall(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * float(x.max().item())


@pytest.mark.parametrize("model_type", [DataDependent, ItemCall])
def test_data_dependent_control_flow_raises(model_type: type) -> None:
    torch.manual_seed(0)
    with pytest.raises(CaptureError, match="data-dependent"):
        planner.capture(model_type(), torch.randn(2, 4))


def test_input_requiring_grad_raises(mlp: nn.Module) -> None:
    with pytest.raises(CaptureError, match="requires grad"):
        planner.capture(mlp, torch.randn(8, 16, requires_grad=True))


def test_target_requiring_grad_raises(mlp: nn.Module) -> None:
    y = torch.randn(8, 4, requires_grad=True)
    with pytest.raises(CaptureError, match="requires grad"):
        planner.capture(mlp, torch.randn(8, 16), nn.functional.mse_loss, targets=y)


def test_frozen_model_raises(mlp: nn.Module) -> None:
    for p in mlp.parameters():
        p.requires_grad_(False)
    with pytest.raises(CaptureError, match="trainable"):
        planner.capture(mlp, torch.randn(8, 16))


def test_loss_independent_of_parameters_raises(mlp: nn.Module) -> None:
    """The output requires grad but the loss ignores it: no gradient to plan."""
    x = torch.randn(8, 16)
    with pytest.raises(CaptureError):
        planner.capture(mlp, x, loss_fn=lambda out, t: (t * 2).sum(), targets=torch.randn(3))


def test_input_on_another_device_raises(mlp: nn.Module) -> None:
    x = torch.randn(8, 16, device="meta")
    with pytest.raises(CaptureError, match="move it"):
        planner.capture(mlp, x)


def test_errors_are_planner_errors() -> None:
    assert issubclass(CaptureError, PlannerError)
    assert issubclass(planner.UnsupportedOperatorError, CaptureError)
    assert issubclass(planner.InvalidScheduleError, PlannerError)
    assert issubclass(planner.PlanMismatchError, PlannerError)
    error = planner.InfeasibleBudgetError(1000, 2048)
    assert error.min_feasible_bytes == 2048 and "2048 bytes" in str(error)


def test_partially_frozen_model_captures(mlp: nn.Module) -> None:
    """Frozen parameters are resident but receive no gradient."""
    mlp.fc1.requires_grad_(False)
    g = planner.capture(mlp, torch.randn(8, 16))
    name_of = {tid: name for name, tid in g.parameters.items()}
    assert sorted(name_of[p] for p in g.gradients.values()) == ["fc2.bias", "fc2.weight", "fc3.bias", "fc3.weight"]
    assert set(g.parameters) == {name for name, _ in mlp.named_parameters()}
