"""A small Llama-style causal language model for the block-planning tests: transformers'
``LlamaForCausalLM`` (RMSNorm, rotary embeddings, grouped-query SDPA attention, SwiGLU) with 4
layers and random weights (no downloads), and its next-token cross-entropy on random labels.

Batch 4, sequence 128, hidden 64: activations (about 3.5 MiB per layer) dominate the 1 MiB of
parameters, so planning each layer has something to save; a vocabulary of 32 keeps the logits
small, so the step's peak is inside a layer's backward, where FSDP2 holds the layer's gathered
parameters, the next layer's prefetch and the layer's gradients.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VOCAB, BATCH, SEQUENCE, LAYERS = 32, 4, 128, 4


def tiny_llama(seed: int = 0) -> nn.Module:
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=256, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=SEQUENCE, use_cache=False,
        bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.LlamaForCausalLM(config).train()


def token_batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random tokens and random labels (a loss with real signal: cross-entropy around log(VOCAB))."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.randint(0, VOCAB, (BATCH, SEQUENCE), generator=generator),
            torch.randint(0, VOCAB, (BATCH, SEQUENCE), generator=generator))


def causal_lm_loss(output, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(output.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
