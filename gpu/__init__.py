"""Low-memory operator implementations ("variants"): ops that save less for their backward.

Each op is a ``torch.library`` custom op in the ``remat_planner`` namespace (usable directly in
eager code, with autograd and fake-tensor support) with a CuPy kernel for CUDA tensors and an
exact pure-PyTorch twin used everywhere else (CPU tensors, or CuPy missing or without a device):

- ``relu_packed`` / ``relu_packed_backward``: a 1-bit mask instead of the output (bitwise stock);
- ``dropout_packed`` / ``dropout_packed_backward``: the keep-mask as bits instead of bools (stock
  forward and RNG use, bitwise stock gradients);
- ``max_pool2d_packed`` / ``max_pool2d_packed_backward``: window-relative argmax positions (4 or
  8 bits) instead of int64 indices and the input (bitwise stock);
- ``batch_norm_inverted`` / ``batch_norm_inverted_backward``: the backward reads the output
  instead of the input, with an exact fallback for channels whose weight cannot be inverted
  (within a stated tolerance of stock).

Each op module also declares its ``Variant`` (``_registry.py``): the ATen op it replaces, where it
applies in a captured graph, the rewrite and its workspace on a device that runs the kernels or
the twins, registered once in ``VARIANTS``, which ``planner.variants`` reads to rewrite a graph.
"""
from planner.gpu._cuda import kernels_available
from planner.gpu.batchnorm import batch_norm_inverted, batch_norm_inverted_backward
from planner.gpu.dropout import dropout_packed, dropout_packed_backward
from planner.gpu.maxpool import max_pool2d_packed, max_pool2d_packed_backward
from planner.gpu.relu import relu_packed, relu_packed_backward

__all__ = [
    "kernels_available", "relu_packed", "relu_packed_backward", "dropout_packed", "dropout_packed_backward",
    "max_pool2d_packed", "max_pool2d_packed_backward", "batch_norm_inverted", "batch_norm_inverted_backward",
]
