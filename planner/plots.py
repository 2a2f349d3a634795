"""Pictures: a plan's memory over the step, and overhead against budget (matplotlib, PNG)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from planner.cost import CostModel
from planner.graph import TrainingGraph
from planner.schedule import Schedule
from planner.simulator import simulate
from planner.units import format_bytes

_GIB = 2.0**30


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


def _step_curve(graph: TrainingGraph, schedule: Schedule, cost_model: CostModel):
    """Per step: cumulative simulated time (ms), memory (GiB), and which steps recompute."""
    result = simulate(graph, schedule, cost_model)
    is_compute, index = schedule.arrays
    times = np.where(is_compute, np.asarray(cost_model.op_times(graph))[np.where(is_compute, index, 0)], 0.0)
    seen, recompute = set(), np.zeros(len(index), dtype=bool)
    for k in np.flatnonzero(is_compute):
        recompute[k] = index[k] in seen
        seen.add(int(index[k]))
    loss_steps = [k for k in np.flatnonzero(is_compute) if graph.ops[int(index[k])].in_loss]
    return np.cumsum(times) * 1e3, result.timeline / _GIB, recompute, loss_steps, result


def timeline_png(graph: TrainingGraph, schedule: Schedule, cost_model: CostModel, path: str | Path,
                 budget_bytes: int | None = None, title: str = "") -> None:
    """Memory over the step for ``schedule`` against store-all, forward and backward marked,
    recomputations in orange, the budget dashed."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 5.4), dpi=120)
    t0, m0, _, _, base = _step_curve(graph, Schedule.store_all(graph), cost_model)
    t1, m1, recompute, loss_steps, result = _step_curve(graph, schedule, cost_model)
    ax.plot(t0, m0, color="0.6", lw=1.2, label=f"store-all (peak {format_bytes(base.peak_bytes)})")
    ax.plot(t1, m1, color="tab:blue", lw=1.4, label=f"plan (peak {format_bytes(result.peak_bytes)})")
    ax.scatter(t1[recompute], m1[recompute], s=6, color="tab:orange", zorder=3, label="recomputation")
    if loss_steps:
        ax.axvspan(0, t1[loss_steps[0]], color="tab:green", alpha=0.06, label="forward")
        ax.axvspan(t1[loss_steps[-1]], t1[-1], color="tab:purple", alpha=0.06, label="backward")
    ax.axhline(graph.resident_bytes / _GIB, color="0.3", ls=":", lw=1, label="resident (params, .grad, batch)")
    if budget_bytes:
        ax.axhline(budget_bytes / _GIB, color="tab:red", ls="--", lw=1, label="budget")
    ax.set_xlabel(f"simulated time (ms, {cost_model.name})")
    ax.set_ylabel("memory (GiB)")
    ax.set_title(title or "memory over one training step")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), fontsize=8, ncol=4, frameon=False)
    ax.set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def sweep_png(rows: Sequence[dict], path: str | Path, title: str = "") -> None:
    """Overhead against budget, one line per algorithm; ``rows`` as produced by ``planner sweep``
    (algorithm, budget_fraction, overhead or None when the budget does not fit)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    for algorithm in dict.fromkeys(r["algorithm"] for r in rows):
        points = sorted((r["budget_fraction"], r["overhead"]) for r in rows
                        if r["algorithm"] == algorithm and r["overhead"] is not None)
        if points:
            x, y = zip(*points)
            ax.plot([100 * v for v in x], [100 * v for v in y], marker="o", ms=4, label=algorithm,
                    lw=2.2 if algorithm == "fast" else 1.2)
    ax.set_xlabel("budget (% of the store-all peak)")
    ax.set_ylabel("compute overhead (%)")
    ax.invert_xaxis()
    ax.set_title(title or "overhead against memory budget")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
