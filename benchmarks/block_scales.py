"""What the second block size costs in planning time: ``planner.plan`` with
``hierarchical.BLOCK_SCALES`` at ``(1,)`` (small blocks only) and at its default, interleaved
(A B A B ...) in one warm process, medians and the median of per-round ratios.

Run from the repository root::

    python benchmarks/block_scales.py --models resnet50 densenet121 lstm llama-7b --rounds 5
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import planner
import planner.algorithms.hierarchical as hierarchical

import fast_mode


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet50", "densenet121", "lstm", "llama-7b"])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv[1:])
    settings = {"small blocks only": (1,), "default": hierarchical.BLOCK_SCALES}
    graphs = {name: fast_mode.load_graph(name) for name in args.models}
    cases = {name: (graph, fast_mode.timing_budget(name, graph)[0]) for name, graph in graphs.items()}
    seconds = {(name, label): [] for name in cases for label in settings}
    for round_ in range(args.rounds + 1):  # the first round warms numba and the caches up
        for name, (graph, budget) in cases.items():
            for label, scales in settings.items():
                hierarchical.BLOCK_SCALES = scales
                start = time.perf_counter()
                planner.plan(graph, budget)
                if round_:
                    seconds[name, label].append(time.perf_counter() - start)
    print(f"| graph | small blocks only | default {settings['default']} | ratio (median per round) |")
    print("|---|---:|---:|---:|")
    for name in cases:
        small, default = seconds[name, "small blocks only"], seconds[name, "default"]
        ratio = statistics.median(d / s for s, d in zip(small, default))
        print(f"| {name} | {statistics.median(small):.2f} s | {statistics.median(default):.2f} s | {ratio:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
