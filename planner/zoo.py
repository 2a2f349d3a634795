"""Model specs for the CLI, benchmarks and tests: ``torchvision:resnet50``, ``preset:transformer``,
``preset:unet``, ``package.module:factory``.

A spec builds a model (random weights, no downloads), an example batch and a loss. ``UNet`` lives
here because no library the project depends on has one, and its skip connections (every encoder
level's output is held until the decoder level that mirrors it) are the memory shape a chain
of blocks does not have.
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


class _DoubleConv(torch.nn.Sequential):
    """Two 3x3 convolutions, each followed by BatchNorm and ReLU: one UNet level."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(
            torch.nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), torch.nn.BatchNorm2d(out_channels),
            torch.nn.ReLU(inplace=True),
            torch.nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), torch.nn.BatchNorm2d(out_channels),
            torch.nn.ReLU(inplace=True),
        )


class UNet(torch.nn.Module):
    """The segmentation UNet of Ronneberger et al. (2015), with padded convolutions and BatchNorm.

    ``depth`` encoder levels of ``_DoubleConv`` (channels ``width * 2**level``) joined by 2x2
    max-pooling, a bottleneck, then ``depth`` decoder levels: a 2x2 transposed convolution up, the
    encoder level's output concatenated (the skip connection), a ``_DoubleConv``. A 1x1
    convolution gives ``classes`` logits per pixel. Image sides must be divisible by ``2**depth``.
    """

    def __init__(self, in_channels: int = 3, classes: int = 2, width: int = 32, depth: int = 4):
        super().__init__()
        channels = [width * 2**level for level in range(depth + 1)]
        self.down = torch.nn.ModuleList(
            _DoubleConv(c_in, c_out) for c_in, c_out in zip([in_channels] + channels[:-2], channels[:-1]))
        self.pool = torch.nn.MaxPool2d(2)
        self.bottleneck = _DoubleConv(channels[-2], channels[-1])
        self.up = torch.nn.ModuleList(torch.nn.ConvTranspose2d(c, c // 2, 2, stride=2) for c in reversed(channels[1:]))
        self.decode = torch.nn.ModuleList(_DoubleConv(c, c // 2) for c in reversed(channels[1:]))
        self.head = torch.nn.Conv2d(width, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for level in self.down:
            x = level(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottleneck(x)
        for up, decode, skip in zip(self.up, self.decode, reversed(skips)):
            x = decode(torch.cat([skip, up(x)], dim=1))
        return self.head(x)


def _unet(width: int, depth: int, image_size: int, batch_size: int, classes: int = 4) -> Workload:
    """A UNet with per-pixel cross-entropy on random labels."""
    inputs = (torch.randn(batch_size, 3, image_size, image_size),)
    targets = (torch.randint(0, classes, (batch_size, image_size, image_size)),)
    return Workload(UNet(3, classes, width, depth).train(), inputs, targets, F.cross_entropy)


def _transformer(layers: int, width: int, heads: int, sequence: int, batch_size: int) -> Workload:
    layer = torch.nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.1, batch_first=True)
    model = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
    return Workload(model.train(), (torch.randn(batch_size, sequence, width),), (), None)


MODEL_PRESETS: dict[str, Callable[[int], Workload]] = {
    "transformer": lambda batch: _transformer(6, 512, 8, 128, batch),
    "transformer-tiny": lambda batch: _transformer(2, 64, 4, 32, batch),
    "unet": lambda batch: _unet(32, 4, 128, batch),
    "unet-tiny": lambda batch: _unet(8, 3, 32, batch),
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
    build a ``TransformerEncoder`` with dropout and a sum loss; ``preset:unet`` (width 32, 4 levels,
    128x128) and ``preset:unet-tiny`` (width 8, 3 levels, 32x32) build a ``UNet`` with per-pixel
    cross-entropy on random labels (4 classes); ``module:factory`` calls ``factory(batch_size=..., [image_size=...])``, which returns a
    ``Workload`` or a ``(model, inputs)`` pair (loss: sum of the output).
    """
    source, _, name = spec.partition(":")
    if not name:
        raise ValueError(f"model spec {spec!r} needs a source: 'torchvision:resnet50' or 'package.module:factory'")
    if source == "torchvision":
        return _torchvision(name, batch_size, image_size)
    if source == "preset":
        if name not in MODEL_PRESETS:
            raise ValueError(f"unknown preset {name!r}: choose one of {sorted(MODEL_PRESETS)}")
        return MODEL_PRESETS[name](batch_size)
    return _user_factory(spec, batch_size, image_size)
