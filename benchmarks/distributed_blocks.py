"""Per-block planning (``planner.plan_blocks``) alone and under FSDP2: predicted and measured peaks.

A Llama-style causal LM (transformers' ``LlamaForCausalLM``, random weights, no downloads) is
planned layer by layer at whole-step budgets (``BUDGETS``), then trained for one step:

- one process: the planned model and plain eager PyTorch;
- FSDP2 over two processes on gloo (CPU): ``plan_blocks(..., fsdp=True)``, then ``fully_shard``
  on every layer and on the model; unplanned FSDP2 alongside. Each rank has its own batch.

Peaks are ``planner.measure_step``'s (the meter follows FSDP2's storage resizes and DTensor's local
tensors); predictions are ``BlockPlan.rank_peak_bytes``. Losses and gradients (``full_tensor()``
under FSDP2) are compared with the unplanned model's, bit for bit.

Run from the repository root::

    python benchmarks/distributed_blocks.py
    python benchmarks/distributed_blocks.py --markdown docs/distributed.md

``--markdown PATH`` replaces the "## Measured peaks" section of PATH only.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import planner  # noqa: E402
from planner.units import format_bytes  # noqa: E402
from report import command_line, environment_line, publish  # noqa: E402

SECTION_HEADING = "## Measured peaks"
WORLD = 2


@dataclass(frozen=True)
class Config:
    name: str
    layers: int
    hidden: int
    vocab: int
    batch: int
    sequence: int

    def model(self) -> torch.nn.Module:
        import transformers

        torch.manual_seed(0)
        config = transformers.LlamaConfig(
            hidden_size=self.hidden, intermediate_size=4 * self.hidden, num_hidden_layers=self.layers,
            num_attention_heads=4, num_key_value_heads=2, vocab_size=self.vocab, max_position_embeddings=self.sequence,
            use_cache=False, bos_token_id=0, eos_token_id=0, pad_token_id=0)
        return transformers.LlamaForCausalLM(config).train()

    def batch_for(self, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        shape = (self.batch, self.sequence)
        return (torch.randint(0, self.vocab, shape, generator=generator),
                torch.randint(0, self.vocab, shape, generator=generator))


CONFIGS = (
    Config("tests' Llama (4 layers, hidden 64, vocab 32, batch 4 x 128)", 4, 64, 32, 4, 128),
    Config("Llama, 8 layers, hidden 128, vocab 1024, batch 4 x 256", 8, 128, 1024, 4, 256),
)
BUDGETS = ("75%", "45%")


def causal_lm_loss(output, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(output.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())


def _step(model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    loss = causal_lm_loss(model(ids), labels)
    loss.backward()
    return loss.detach()


def _measure(model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> int:
    return planner.measure_step(model, lambda: _step(model, ids, labels), [ids, labels]).peak_bytes


def _same_step(planned: torch.nn.Module, eager: torch.nn.Module, ids, labels, gather) -> bool:
    """One more step of each from zero gradients: losses and gradients bit for bit."""
    losses = []
    for model in (planned, eager):
        model.zero_grad(set_to_none=True)
        losses.append(_step(model, ids, labels))
    grads = [[gather(p.grad) for p in m.parameters()] for m in (planned, eager)]
    return bool(torch.equal(*losses)) and all(torch.equal(a, b) for a, b in zip(*grads))


def single_process(config: Config, budget: str) -> dict:
    model = config.model()
    eager = copy.deepcopy(model)
    ids, labels = config.batch_for(1)
    began = time.perf_counter()
    chosen = planner.plan_blocks(model, budget, ids, loss_fn=causal_lm_loss, targets=labels)
    seconds = time.perf_counter() - began
    return dict(algorithm=chosen.plans[0].algorithm, predicted=chosen.predicted_peak_bytes, measured=_measure(model, ids, labels),
                eager=_measure(eager, ids, labels), store_all=chosen.store_all_peak_bytes,
                recomputations=chosen.recomputations, overhead=chosen.overhead, seconds=seconds,
                same=_same_step(model, eager, ids, labels, lambda g: g))


def _shard(model: torch.nn.Module) -> None:
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)


def _fsdp_worker(rank: int, port: int, config: Config, budget: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model = config.model()
        eager = copy.deepcopy(model)
        ids, labels = config.batch_for(100 + rank)
        began = time.perf_counter()
        chosen = planner.plan_blocks(model, budget, ids, loss_fn=causal_lm_loss, targets=labels, fsdp=True)
        seconds = time.perf_counter() - began
        _shard(model)
        _shard(eager)
        result = dict(algorithm=chosen.plans[0].algorithm, predicted=chosen.rank_peak_bytes[rank], measured=_measure(model, ids, labels),
                      eager=_measure(eager, ids, labels), store_all=chosen.store_all_peak_bytes,
                      recomputations=chosen.recomputations, overhead=chosen.overhead, seconds=seconds,
                      same=_same_step(model, eager, ids, labels, lambda g: g.full_tensor()))
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def fsdp(config: Config, budget: str) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_fsdp_worker, args=(port, config, budget, out), nprocs=WORLD, join=True)
        return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(WORLD)]


def _row(budget: str, setting: str, result: dict) -> str:
    error = result["measured"] / result["predicted"] - 1
    return (f"| {budget} | {setting} | {format_bytes(result['eager'])} | {format_bytes(result['store_all'])} | "
            f"{format_bytes(result['predicted'])} | {format_bytes(result['measured'])} | {error:+.3%} | "
            f"{result['measured'] / result['eager']:.1%} | {result['algorithm']} | {result['recomputations']} | "
            f"{result['overhead']:+.1%} | {'yes' if result['same'] else 'NO'} | {result['seconds']:.1f} |")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", type=Path, help="write the section into this file (docs/distributed.md)")
    parser.add_argument("--configs", type=int, default=len(CONFIGS), help="how many of CONFIGS to run")
    args = parser.parse_args(argv[1:])
    lines = [environment_line() + " Two gloo processes share the CPU cores for FSDP2.", "",
             f"Command: `{command_line(argv)}`", ""]
    for config in CONFIGS[: args.configs]:
        lines += [f"**{config.name}**; budgets are of the predicted step with every layer unplanned:", "",
                  "| budget | setting | unplanned, measured | unplanned, predicted (store-all) | planned, predicted | "
                  "planned, measured | measured vs predicted | planned / unplanned | layers' plan | ops recomputed | "
                  "predicted overhead | loss, grads bitwise | planning s |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for budget in BUDGETS:
            lines.append(_row(budget, "one process", single_process(config, budget)))
            lines += [_row(budget, f"FSDP2, rank {rank} of {WORLD}", result)
                      for rank, result in enumerate(fsdp(config, budget))]
        lines.append("")
    publish(SECTION_HEADING, "\n".join(lines), args.markdown)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv)
