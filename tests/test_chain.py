"""The chain DP against brute force over its own search space, and the hierarchy's pieces.

The brute force walks every decision tree the DP can express (an option per block, checkpoint
runs, soft passes) and charges memory as the plan executes, with explicit held items; the DP
charges it through budgets passed down its recursion. Both must agree on the optimum.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from planner.algorithms.chain import ChainProblem, solve

INF = math.inf


def random_problem(seed: int, n_blocks: int, n_options: int, quanta: int) -> ChainProblem:
    rng = np.random.default_rng(seed)

    def sizes(*shape, high=4):
        return rng.integers(0, high, size=shape).astype(np.int64)

    checkpoint = sizes(n_blocks, high=3)
    # spanning storages: made by block a, read up to block h > a + 1, held after each e in a..h-1
    # by a run of blocks recomputed from before a
    crossing = np.triu(np.repeat(checkpoint[None, :], n_blocks, axis=0))
    for _ in range(int(rng.integers(0, 3))):
        a = int(rng.integers(0, n_blocks))
        h, size = a + 2 + int(rng.integers(0, 2)), int(rng.integers(1, 3))
        crossing[: a + 1, a: min(h, n_blocks)] += size
    kept = checkpoint[:, None] + sizes(n_blocks, n_options, high=3)  # what a forward leaves holds its output
    forward_peak = kept + sizes(n_blocks, n_options, high=3)
    backward_peak = kept + sizes(n_blocks, n_options, high=4)
    time = rng.uniform(1.0, 2.0, size=(n_blocks, n_options))
    time += (5 - kept) * rng.uniform(0.1, 0.5, size=(n_blocks, n_options))  # keeping less costs more
    missing = rng.random((n_blocks, n_options)) < 0.2
    missing[:, 0] = False
    time[missing] = INF
    output_time = rng.uniform(0.0, 0.3, size=(n_blocks, n_options))
    output_time[rng.random((n_blocks, n_options)) < 0.3] = INF
    first_forward_peak = forward_peak + sizes(n_blocks, n_options, high=2)
    backward_time = time * rng.uniform(0.4, 0.8, size=time.shape)
    first_forward_time = rng.uniform(0.5, 1.5, n_blocks)
    # a leaf pass skips the output: it needs at most the forward's peak and time
    leaf_forward_peak = np.maximum(forward_peak - sizes(n_blocks, n_options, high=3), 0)
    leaf_time = time.copy()
    forward_part = time[~missing] - backward_time[~missing]
    leaf_time[~missing] -= forward_part * rng.uniform(0.0, 0.5, size=forward_part.shape)
    return ChainProblem(
        forward_peak, kept, backward_peak, time, output_time, first_forward_peak, backward_time,
        leaf_forward_peak=leaf_forward_peak, leaf_time=leaf_time,
        first_forward_time=first_forward_time, first_checkpoint_peak=sizes(n_blocks, high=4) + 1, checkpoint=checkpoint,
        crossing=crossing,
        checkpoint_forward_peak=sizes(n_blocks, high=4) + 1, checkpoint_forward_time=rng.uniform(0.5, 1.5, n_blocks),
        long_lived_forward=np.sort(sizes(n_blocks + 1, high=2)), long_lived_backward=sizes(n_blocks + 1, high=2),
        frontier=sizes(n_blocks + 1, high=2), through=sizes(n_blocks + 1, high=2),
        loss_forward_peak=int(rng.integers(0, 3)), loss_backward_peak=int(rng.integers(0, 3)),
        loss_time=float(rng.uniform(0.1, 1.0)), quanta=quanta)


def brute_force(p: ChainProblem) -> float:
    """Least time over every decision tree, memory charged as the plan runs (``held`` items)."""
    n, n_options = p.kept.shape
    q = p.quanta

    def ck_need(s: int, e: int, peak=p.checkpoint_forward_peak) -> int:
        return max(peak[j] + (p.crossing[s, j - 1] if j > s else 0) for j in range(s, e + 1))

    def ck_time(s: int, e: int, seconds=p.checkpoint_forward_time) -> float:
        return float(sum(seconds[s: e + 1]))

    def options(s: int):
        return [o for o in range(n_options) if p.time[s, o] < INF]

    def backward_fits(s: int, o: int, held: int) -> bool:
        return held + p.backward_peak[s, o] + p.through[s] + p.long_lived_backward[s] <= q

    def run_pass(s: int, t: int, held: int, soft_owner=None) -> float:
        """Backward of s..t; the input of s is held (inside ``held``); a soft pass may drop it
        (the output of block s - 1, kept by option ``soft_owner``) while blocks after s run."""
        best = INF
        grad_extra = p.frontier[t] + p.long_lived_backward[t]
        x_in = p.checkpoint[s - 1] if soft_owner is not None else 0  # the owner pays for the recompute
        for o in options(s):
            if s == t:  # a leaf pass: the blocks after s are done, so its output is not computed
                if soft_owner is None and held + p.leaf_forward_peak[s, o] + grad_extra <= q \
                        and backward_fits(s, o, held):
                    best = min(best, p.leaf_time[s, o])
                continue
            if held + p.forward_peak[s, o] + grad_extra > q or not backward_fits(s, o, held):
                continue
            inner = held + p.kept[s, o]  # at the end of block s's forward its input is still there
            if inner > q:
                continue
            if soft_owner is not None:
                if held - x_in + p.checkpoint_forward_peak[s - 1] + p.kept[s, o] + p.frontier[s] \
                        + p.long_lived_backward[s] > q:
                    continue
                best = min(best, p.time[s, o] + run_pass(s + 1, t, inner - x_in))
                continue
            best = min(best, p.time[s, o] + run_pass(s + 1, t, inner))
            if p.output_time[s, o] < INF:
                best = min(best, p.time[s, o] + run_pass(s + 1, t, inner, soft_owner=o) + p.output_time[s, o])
        for s2 in range(s + 1, t + 1):
            if held + ck_need(s, s2 - 1) + grad_extra > q or held + p.crossing[s, s2 - 1] > q:
                continue
            if soft_owner is not None and held - x_in + p.checkpoint_forward_peak[s - 1] + p.frontier[s2 - 1] \
                    + p.long_lived_backward[s2 - 1] > q:
                continue
            later = run_pass(s2, t, held + p.crossing[s, s2 - 1] - x_in)
            best = min(best, ck_time(s, s2 - 1) + later + run_pass(s, s2 - 1, held))
        return best

    def first(s: int, held: int, soft_owner=None) -> float:
        """The first forward from block s on (the loss at ``n``), then the backward down to s."""
        if s == n:
            fits = held + p.loss_forward_peak + p.long_lived_forward[n] <= q and \
                held + p.loss_backward_peak + p.through[n] + p.long_lived_backward[n] <= q
            return p.loss_time if fits and soft_owner is None else INF
        best = INF
        x_in = p.checkpoint[s - 1] if soft_owner is not None else 0
        for o in options(s):  # the first forward runs every op of the block
            if held + p.first_forward_peak[s, o] + p.long_lived_forward[s] > q or not backward_fits(s, o, held):
                continue
            inner = held + p.kept[s, o]
            if inner > q:
                continue
            block_time = p.first_forward_time[s] + p.backward_time[s, o]
            if soft_owner is not None:
                if held - x_in + p.checkpoint_forward_peak[s - 1] + p.kept[s, o] + p.frontier[s] \
                        + p.long_lived_backward[s] > q:
                    continue
                best = min(best, block_time + first(s + 1, inner - x_in))
                continue
            best = min(best, block_time + first(s + 1, inner))
            if p.output_time[s, o] < INF:
                best = min(best, block_time + first(s + 1, inner, soft_owner=o) + p.output_time[s, o])
        for s2 in range(s + 1, n + 1):
            need = ck_need(s, s2 - 1, p.first_checkpoint_peak)
            if held + need + p.long_lived_forward[s2 - 1] > q or held + p.crossing[s, s2 - 1] > q:
                continue
            if soft_owner is not None and held - x_in + p.checkpoint_forward_peak[s - 1] + p.frontier[s2 - 1] \
                    + p.long_lived_backward[s2 - 1] > q:
                continue
            later = first(s2, held + p.crossing[s, s2 - 1] - x_in)
            best = min(best, ck_time(s, s2 - 1, p.first_forward_time) + later + run_pass(s, s2 - 1, held))
        return best

    return first(0, 0)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), n_blocks=st.integers(1, 4), n_options=st.integers(1, 3),
       quanta=st.integers(4, 14))
def test_chain_dp_equals_brute_force(seed: int, n_blocks: int, n_options: int, quanta: int) -> None:
    problem = random_problem(seed, n_blocks, n_options, quanta)
    expected = brute_force(problem)
    solution = solve(problem)
    if expected == INF:
        assert solution is None
    else:
        assert solution is not None
        assert solution.time == pytest.approx(expected, rel=1e-12)


def test_brute_force_is_not_vacuous() -> None:
    """The random problems cover feasible and infeasible cases, and soft passes that win."""
    outcomes = [brute_force(random_problem(seed, 3, 2, quanta)) for seed in range(20) for quanta in (6, 10, 14)]
    assert any(o == INF for o in outcomes) and any(o < INF for o in outcomes)
    wins = 0
    for seed in range(200):
        problem = random_problem(seed, 3, 2, 12)
        solution = solve(problem)
        wins += solution is not None and any(a[0] == "output" for a in solution.actions)
    assert wins > 0
