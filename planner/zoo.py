"""Model specs for the CLI and benchmarks: ``torchvision:resnet50``, ``preset:transformer``,
``package.module:factory``.

A spec builds a model (random weights, no downloads), an example batch and a loss.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


@dataclass
class Workload:
    model: torch.nn.Module
    inputs: tuple[torch.Tensor, ...]
    targets: tuple[torch.Tensor, ...]
    loss_fn: Callable[..., torch.Tensor] | None


def _torchvision(name: str, batch_size: int, image_size: int | None) -> Workload:
    import torchvision

    if name not in torchvision.models.list_models(module=torchvision.models):
        raise ValueError(f"torchvision has no classification model {name!r}; e.g. resnet50, vgg16, mobilenet_v2")
    kwargs = {"aux_logits": False, "init_weights": False} if name in ("googlenet", "inception_v3") else {}
    model = torchvision.models.get_model(name, weights=None, **kwargs)
    size = image_size or (299 if name == "inception_v3" else 224)
    inputs = (torch.randn(batch_size, 3, size, size),)
    targets = (torch.randint(0, 1000, (batch_size,)),)
    return Workload(model.train(), inputs, targets, F.cross_entropy)


def _transformer(layers: int, width: int, heads: int, sequence: int, batch_size: int) -> Workload:
    layer = torch.nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.1, batch_first=True)
    model = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
    return Workload(model.train(), (torch.randn(batch_size, sequence, width),), (), None)


PRESETS: dict[str, Callable[[int], Workload]] = {
    "transformer": lambda batch: _transformer(6, 512, 8, 128, batch),
    "transformer-tiny": lambda batch: _transformer(2, 64, 4, 32, batch),
}


def _user_factory(spec: str, batch_size: int, image_size: int | None) -> Workload:
    module_name, _, attribute = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"cannot load model factory {spec!r} ({error}): give 'package.module:function'") from error
    try:
        built = factory(batch_size=batch_size, image_size=image_size) if image_size else factory(batch_size=batch_size)
    except Exception as error:  # the user's code: report it in one line, whatever it raised
        raise ValueError(f"model factory {spec!r} failed: {type(error).__name__}: {error}") from error
    if isinstance(built, Workload):
        return built
    model, inputs = built[0], built[1]
    return Workload(model, inputs if isinstance(inputs, tuple) else (inputs,), (), None)


def load_workload(spec: str, batch_size: int, image_size: int | None = None) -> Workload:
    """Build the model, batch and loss named by ``spec``.

    ``torchvision:NAME`` builds a torchvision classifier with cross-entropy on random labels;
    ``preset:transformer`` (6 layers, width 512, sequence 128) and ``preset:transformer-tiny``
    build a ``TransformerEncoder`` with dropout and a sum loss; ``module:factory`` calls ``factory(batch_size=..., [image_size=...])``, which returns a
    ``Workload`` or a ``(model, inputs)`` pair (loss: sum of the output).
    """
    source, _, name = spec.partition(":")
    if not name:
        raise ValueError(f"model spec {spec!r} needs a source: 'torchvision:resnet50' or 'package.module:factory'")
    if source == "torchvision":
        return _torchvision(name, batch_size, image_size)
    if source == "preset":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}: choose one of {sorted(PRESETS)}")
        return PRESETS[name](batch_size)
    return _user_factory(spec, batch_size, image_size)
