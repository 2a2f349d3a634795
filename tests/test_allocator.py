"""The CUDA caching allocator's view of a step (rounding) and budgets in reserved memory.

What the allocator really reserves is measured on a GPU by benchmarks/gpu_check.py; these check
the arithmetic, which needs none.
"""
from __future__ import annotations

import pytest

import planner
from planner.allocator import DEFAULT_RESERVE_MARGIN, allocated_peak, allocator_view, rounded_bytes, reserved_budget

from conftest import Case


def test_requests_round_up_to_512_byte_blocks() -> None:
    assert [rounded_bytes(n) for n in (0, 1, 511, 512, 513, 1 << 20)] == [0, 512, 512, 512, 1024, 1 << 20]


def test_allocated_peak_is_the_simulation_with_rounded_storages(tiny_cnn_case: Case) -> None:
    g = tiny_cnn_case.graph
    view = allocator_view(g)
    assert view.fingerprint == g.fingerprint and view.ops == g.ops
    assert all(v.nbytes == rounded_bytes(s.nbytes) >= s.nbytes for v, s in zip(view.storages, g.storages))
    schedule = planner.plan(g, "100%").schedule
    live = planner.simulate(g, schedule).peak_bytes
    rounded = allocated_peak(g, schedule)
    assert rounded == planner.simulate(view, schedule).peak_bytes
    # every storage of a tiny model is far below 512 bytes: rounding dominates its allocated peak
    assert live < rounded <= live + 512 * len(g.storages)


def test_reserved_budget_holds_back_the_margin() -> None:
    assert reserved_budget("16GiB", 0.1) == int(16 * 2**30 * 0.9)
    assert reserved_budget(10**9) == int(10**9 * (1 - DEFAULT_RESERVE_MARGIN))
    assert reserved_budget("1GiB", 0.0) == 2**30
    for margin in (-0.1, 1.0, 2):
        with pytest.raises(planner.InvalidBudgetError, match="margin"):
            reserved_budget("1GiB", margin)
    with pytest.raises(planner.InvalidBudgetError, match="percentage"):
        reserved_budget("50%")
    with pytest.raises(planner.InvalidBudgetError):
        reserved_budget("lots")
