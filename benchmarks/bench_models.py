"""The models the measured benchmarks run (``cost_fidelity.py``, ``versus.py``, ``gpu_check.py``),
each at three sizes: ``small`` (the test suite, seconds), ``cpu`` (what 2 CPU cores time in
minutes) and ``gpu`` (the sizes issue 17 names for one H100/H200).

A ``BenchModel`` holds the model, its batch and loss, and its repeated blocks (what
``torch.utils.checkpoint`` is wrapped around); ``hf`` is the Hugging Face model inside, whose
``gradient_checkpointing_enable()`` is the transformers users' own tool. Random weights, dropout
0, fixed seed: copies built twice are identical. No downloads (``HF_HUB_OFFLINE=1``).
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

SIZES = ("small", "cpu", "gpu", "deep")  # deep: more layers, a small vocabulary (activations dominate)


@dataclass
class BenchModel:
    name: str
    description: str
    model: torch.nn.Module
    inputs: tuple[torch.Tensor, ...]
    targets: tuple[torch.Tensor, ...]
    loss_fn: Callable[..., torch.Tensor]
    blocks: list[torch.nn.Module]  # the repeated blocks, in forward order
    hf: torch.nn.Module | None = None  # the transformers model (gradient_checkpointing_enable)

    def to(self, device: str) -> "BenchModel":
        self.model.to(device)
        self.inputs = tuple(t.to(device) for t in self.inputs)
        self.targets = tuple(t.to(device) for t in self.targets)
        return self

    def fresh(self) -> tuple[torch.nn.Module, list[torch.nn.Module], torch.nn.Module | None]:
        """A deep copy of the model (same parameters), with its blocks and Hugging Face model."""
        names = {id(module): name for name, module in self.model.named_modules()}
        model = copy.deepcopy(self.model)
        blocks = [model.get_submodule(names[id(block)]) for block in self.blocks]
        hf = model.get_submodule(names[id(self.hf)]) if self.hf is not None else None
        return model, blocks, hf

    def step(self, model: torch.nn.Module | None = None) -> torch.Tensor:
        """One training step of ``model`` (default: this one) on this batch: forward, loss, backward."""
        loss = self.loss_fn((model or self.model)(*self.inputs), *self.targets)
        loss.backward()
        return loss.detach()


def causal_lm_loss(output, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy on the logits."""
    return F.cross_entropy(output.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())


def gpt2(size: str) -> BenchModel:
    """GPT2LMHeadModel, 12 layers (GPT-2 small's depth; 2 at the test size); width and sequence by size."""
    import transformers

    layers, width, heads, sequence, batch, vocab = {"small": (2, 32, 2, 32, 2, 128), "cpu": (12, 256, 4, 256, 4, 2048),
                                                    "gpu": (12, 768, 12, 1024, 8, 50257),
                                                    "deep": (16, 128, 4, 1024, 2, 256)}[size]
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=layers, n_embd=width, n_head=heads, vocab_size=vocab, n_positions=sequence,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config).train()
    ids = torch.randint(0, vocab, (batch, sequence))
    return BenchModel("gpt2", f"GPT2LMHeadModel, {layers} layers, width {width}, {heads} heads, vocabulary {vocab}; "
                      f"batch {batch} x sequence {sequence}", model, (ids,), (ids.clone(),), causal_lm_loss,
                      list(model.transformer.h), hf=model)


def llama(size: str) -> BenchModel:
    """LlamaForCausalLM (RMSNorm, rotary, grouped-query SDPA, SwiGLU); 8 layers (2 at the test size)."""
    import transformers

    layers, width, ffn, heads, sequence, batch, vocab = {
        "small": (2, 32, 64, 4, 32, 2, 128), "cpu": (8, 256, 688, 4, 256, 4, 2048),
        "gpu": (8, 1024, 2816, 16, 1024, 8, 32000), "deep": (16, 128, 344, 4, 1024, 2, 256)}[size]
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=width, intermediate_size=ffn, num_hidden_layers=layers,
                                      num_attention_heads=heads, num_key_value_heads=heads // 2, vocab_size=vocab,
                                      max_position_embeddings=sequence, use_cache=False, bos_token_id=0,
                                      eos_token_id=0, pad_token_id=0)
    model = transformers.LlamaForCausalLM(config).train()
    ids = torch.randint(0, vocab, (batch, sequence))
    return BenchModel("llama", f"LlamaForCausalLM, {layers} layers, width {width}, {heads} heads ({heads // 2} KV), "
                      f"vocabulary {vocab}; batch {batch} x sequence {sequence}", model, (ids,), (ids.clone(),),
                      causal_lm_loss, list(model.model.layers), hf=model)


def resnet50(size: str) -> BenchModel:
    """torchvision ResNet-50, cross-entropy on random labels; blocks: the 16 bottlenecks."""
    import torchvision

    batch, image = {"small": (2, 32), "cpu": (16, 128), "gpu": (64, 224)}[size]
    torch.manual_seed(0)
    model = torchvision.models.resnet50().train()
    x, y = torch.randn(batch, 3, image, image), torch.randint(0, 1000, (batch,))
    blocks = [block for layer in (model.layer1, model.layer2, model.layer3, model.layer4) for block in layer]
    return BenchModel("resnet50", f"torchvision resnet50; batch {batch} x 3 x {image} x {image}", model, (x,), (y,),
                      F.cross_entropy, blocks)


def unet(size: str) -> BenchModel:
    """``planner.zoo``'s UNet (its ``preset:unet`` family), per-pixel cross-entropy; blocks: every
    level's double convolution."""
    from planner import zoo

    if not hasattr(zoo, "UNet"):
        raise LookupError("planner.zoo has no UNet yet (issue 17 item 5 adds it)")
    width, depth, image, batch = {"small": (4, 2, 16, 2), "cpu": (32, 4, 128, 4), "gpu": (64, 4, 256, 16)}[size]
    torch.manual_seed(0)
    model = zoo.UNet(3, 4, width, depth).train()
    x, y = torch.randn(batch, 3, image, image), torch.randint(0, 4, (batch, image, image))
    return BenchModel("unet", f"UNet (planner.zoo), width {width}, depth {depth}; batch {batch} x 3 x {image} x {image}",
                      model, (x,), (y,), F.cross_entropy, [*model.down, model.bottleneck, *model.decode])


BUILDERS: dict[str, Callable[[str], BenchModel]] = {"gpt2": gpt2, "llama": llama, "resnet50": resnet50, "unet": unet}


def build(name: str, size: str, device: str = "cpu") -> BenchModel:
    """Model ``name`` at ``size`` on ``device``, built under seed 0 (two builds are identical)."""
    if size not in SIZES:
        raise ValueError(f"size {size!r}: choose one of {SIZES}")
    return BUILDERS[name](size).to(device)
