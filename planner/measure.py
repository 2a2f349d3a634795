"""Measure the real peak memory of code, by tracking live tensor storages.

``MemoryMeter`` is a ``TorchDispatchMode``: every op output's storage is counted once, when first
seen, and uncounted by a finalizer when the storage dies. That is exact for everything allocated
as a tensor, on any device, including the temporaries of ``planner.gpu``'s variant ops (their
Python bodies run inside the meter); scratch memory an ATen kernel allocates internally (CPU
convolution workspace) is invisible to it, as documented in docs/architecture.md.

Two ways of holding memory bypass op outputs, and the meter follows both: a tensor subclass that
wraps others (DTensor, FSDP2's sharded parameters and gradients) is counted by its inner tensors,
and a storage resized in place (FSDP2 allocates and frees its unsharded parameters with
``untyped_storage().resize_``) counts its new size, through ``torch.UntypedStorage.resize_``,
which the meter wraps while it is active.

The accounting of a training step is defined once here and used everywhere (tests, benchmarks,
the CLI): parameters, buffers, inputs, targets and ``.grad`` accumulators are allocated before the
step starts (steady state), and the peak includes them.
"""
from __future__ import annotations

import time
import weakref
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch

from planner._aot import storage_key, storage_ref
from planner._torch import FakeTensor, TorchDispatchMode, is_traceable_wrapper_subclass, schema_name, tree_flatten
from planner.calls import as_tuple
from planner.capturing import default_loss
from planner.gpu._registry import BODIES


class MemoryMeter(TorchDispatchMode):
    """Context manager measuring live tensor bytes: ``current_bytes`` and ``peak_bytes``.

    Storages that exist before entering are not counted unless passed to ``include``.

    ``torch.compile`` runs compiled code under the meter (``ignore_compile_internals``: dynamo
    compiles with the meter off and runs the compiled code with it on), so a model compiled with
    ``planner.backend`` is measured as it runs; code another backend compiles into fused kernels
    allocates outside ATen's dispatcher, where the meter cannot see it.
    """

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        return True

    def __init__(self, include: Iterable[torch.Tensor] = ()):
        super().__init__()
        self._counted: dict = {}
        self.current_bytes = 0
        self.peak_bytes = 0
        for tensor in include:
            self._count(tensor, finalize=False)
        self.baseline_bytes = self.current_bytes

    def _count(self, tensor: torch.Tensor, finalize: bool = True) -> None:
        if is_traceable_wrapper_subclass(tensor):  # DTensor: its local tensor holds the memory
            for name in tensor.__tensor_flatten__()[0]:
                inner = getattr(tensor, name)
                if isinstance(inner, torch.Tensor):
                    self._count(inner, finalize)
            return
        storage = tensor.untyped_storage()
        key = storage_key(tensor)
        if key in self._counted:
            return
        nbytes = storage.nbytes()
        self._counted[key] = nbytes
        self.current_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.current_bytes)
        if finalize:
            weakref.finalize(storage, self._release, key)

    def _release(self, key) -> None:
        self.current_bytes -= self._counted.pop(key, 0)

    def _resized(self, storage: torch.UntypedStorage, old_bytes: int) -> None:
        """A storage changed size in place: growth is an allocation, shrinking a release (of what
        was counted: a storage that existed before the meter releases only what it grew by)."""
        key = storage_ref(storage)
        counted = self._counted.get(key)
        if counted is None:
            if storage.nbytes() <= old_bytes:
                return
            counted = 0
            weakref.finalize(storage, self._release, key)
        now = max(0, counted + storage.nbytes() - old_bytes)
        self._counted[key] = now
        self.current_bytes += now - counted
        self.peak_bytes = max(self.peak_bytes, self.current_bytes)

    def __enter__(self):
        resize = self._resize_before = torch.UntypedStorage.resize_
        meter = self

        def resize_and_count(storage: torch.UntypedStorage, size: int):
            old_bytes = storage.nbytes()
            result = resize(storage, size)
            meter._resized(storage, old_bytes)
            return result

        torch.UntypedStorage.resize_ = resize_and_count
        return super().__enter__()

    def __exit__(self, *exc):
        torch.UntypedStorage.resize_ = self._resize_before
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        body = BODIES.get(schema_name(func))
        if body is not None:  # a variant op: run its body in view, so its temporaries count too
            with self:
                return body(*args, **(kwargs or {}))
        result = func(*args, **(kwargs or {}))
        for value in tree_flatten(result)[0]:  # a step planned again inside the meter traces fake tensors
            if isinstance(value, torch.Tensor) and value.device.type != "meta" and not isinstance(value, FakeTensor):
                self._count(value)
        return result


@dataclass(frozen=True)
class MeasuredStep:
    peak_bytes: int  # everything live at the peak, resident memory included
    resident_bytes: int  # parameters, buffers, inputs, targets, .grad before the step
    seconds: float


def steady_state_tensors(model: torch.nn.Module, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Allocate every trainable parameter's ``.grad`` (zeros where missing) and list what a step
    holds throughout: parameters, buffers, their grads and the given tensors."""
    for p in model.parameters():
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return [*model.parameters(), *model.buffers(), *grads, *tensors]


def measure_step(model: torch.nn.Module, step: Callable[[], object], held: Sequence[torch.Tensor] = ()) -> MeasuredStep:
    """Run ``step()`` once in steady state and measure its peak (resident memory included)."""
    resident = steady_state_tensors(model, held)
    with MemoryMeter(include=resident) as meter:
        start = time.perf_counter()
        step()
        seconds = time.perf_counter() - start
    return MeasuredStep(meter.peak_bytes, meter.baseline_bytes, seconds)


def measure_training_step(model: torch.nn.Module, inputs, loss_fn=None, targets=()) -> MeasuredStep:
    """Measure one plain eager step, ``loss_fn(model(*inputs), *targets).backward()``."""

    inputs, targets = as_tuple(inputs, "inputs"), as_tuple(targets, "targets")
    loss_fn = loss_fn or default_loss
    return measure_step(model, lambda: loss_fn(model(*inputs), *targets).backward(), [*inputs, *targets])
