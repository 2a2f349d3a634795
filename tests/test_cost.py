"""Cost models: roofline presets and the profiled model with its on-disk cache."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import planner
from planner import DEVICE_PRESETS, DeviceSpec, ProfiledCostModel, RooflineCostModel, profiled_cost
from planner.profiled_cost import choose_cost_model

from conftest import Case, TinyCNN


@pytest.mark.parametrize("preset", ["cpu", "v100", "a100", "h100"])
def test_roofline_times(preset: str, resnet18_case: Case) -> None:
    g = resnet18_case.graph
    model = RooflineCostModel(preset)
    assert model.name == f"roofline:{preset}"
    times = model.op_times(g)
    assert times.shape == (len(g.ops),)
    for op in g.ops:
        if op.is_view:
            assert times[op.id] == 0, op.name
        else:
            assert times[op.id] > 0, op.name
            assert times[op.id] >= DEVICE_PRESETS[preset].launch_overhead
    workspace = model.workspace_bytes(g)
    assert workspace.shape == (len(g.ops),) and not workspace.any()


def test_roofline_formula(resnet18_case: Case) -> None:
    g = resnet18_case.graph
    spec = DeviceSpec("toy", fp32_flops=1e9, half_flops=2e9, bandwidth=1e8, launch_overhead=1e-3)
    times = RooflineCostModel(spec).op_times(g)
    conv = next(op for op in g.ops if op.target == "aten.convolution.default")
    assert conv.flops > 0
    expected = max(conv.flops / 1e9, (conv.bytes_read + conv.bytes_written) / 1e8) + 1e-3
    assert times[conv.id] == pytest.approx(expected)


def test_faster_presets_are_faster(resnet18_case: Case) -> None:
    g = resnet18_case.graph
    totals = [RooflineCostModel(p).op_times(g).sum() for p in ("cpu", "v100", "a100", "h100")]
    assert totals == sorted(totals, reverse=True)
    assert len(set(totals)) == 4
    sims = [planner.simulate(g, planner.Schedule.store_all(g), RooflineCostModel(p)).time for p in ("cpu", "h100")]
    assert sims[0] > sims[1]
    assert sims[0] == pytest.approx(totals[0])


def test_default_cost_model_is_cpu_roofline(resnet18_case: Case) -> None:
    g = resnet18_case.graph
    assert planner.simulate(g, planner.Schedule.store_all(g)).time == pytest.approx(RooflineCostModel("cpu").op_times(g).sum())


def test_unknown_preset_raises() -> None:
    with pytest.raises(ValueError, match="unknown device preset"):
        RooflineCostModel("tpu-v9")


def test_roofline_half_precision_uses_half_rate() -> None:
    torch.manual_seed(0)
    x = torch.randn(64, 256)
    g32 = planner.capture(torch.nn.Linear(256, 256), x)
    spec = DeviceSpec("toy", fp32_flops=1e9, half_flops=1e12, bandwidth=1e15, launch_overhead=0.0)
    g16 = planner.capture(torch.nn.Linear(256, 256).to(torch.bfloat16), x.to(torch.bfloat16))
    t32 = RooflineCostModel(spec).op_times(g32).sum()
    t16 = RooflineCostModel(spec).op_times(g16).sum()
    assert t16 < t32 / 100


# ---- profiled ---------------------------------------------------------------------------------------

@pytest.fixture
def tiny() -> Case:
    torch.manual_seed(0)
    model = TinyCNN().train()
    x = torch.randn(2, 3, 8, 8)
    return Case(model, x, planner.capture(model, x))


def test_profiled_times_and_cache(tiny: Case, tmp_path: Path) -> None:
    g = tiny.graph
    cache = tmp_path / "profile.json"
    state = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    cost = ProfiledCostModel.profile(g, tiny.model, tiny.inputs, cache_path=cache)
    # profiling runs the ops under no_grad on the real model, but changes none of its state
    for k, v in tiny.model.state_dict().items():
        assert torch.equal(v, state[k]), k
    times, workspace = cost.op_times(g), cost.workspace_bytes(g)
    assert times.shape == workspace.shape == (len(g.ops),)
    for op in g.ops:
        if op.is_view:
            assert times[op.id] == 0
        else:
            assert times[op.id] > 0, op.name
    assert (workspace >= 0).all()
    assert cache.exists()
    entries = json.loads(cache.read_text())
    assert entries and all(len(v) == 2 and v[0] > 0 for v in entries.values())
    assert len(entries) <= sum(not op.is_view for op in g.ops)
    result = planner.simulate(g, planner.Schedule.store_all(g), cost)
    assert result.time == pytest.approx(times.sum())
    assert result.peak_bytes >= planner.simulate(g, planner.Schedule.store_all(g)).peak_bytes


def test_profiled_cache_is_reused(tiny: Case, tmp_path: Path) -> None:
    g = tiny.graph
    cache = tmp_path / "profile.json"
    ProfiledCostModel.profile(g, tiny.model, tiny.inputs, cache_path=cache)
    # overwrite every cached timing: a second profile must read them rather than time again
    entries = {key: [1.25, 7] for key in json.loads(cache.read_text())}
    cache.write_text(json.dumps(entries))
    cost = ProfiledCostModel.profile(g, tiny.model, tiny.inputs, cache_path=cache)
    non_view = np.array([not op.is_view for op in g.ops])
    assert np.all(cost.op_times(g)[non_view] == 1.25)
    # on CPU the workspace is what ops declare (the meter's view); measured scratch is CUDA's
    assert not cost.workspace_bytes(g).any()
    assert np.all(cost.op_times(g)[~non_view] == 0)
    assert json.loads(cache.read_text()) == entries  # nothing new to add


def test_profiled_cache_shared_across_graphs(tiny: Case, tmp_path: Path) -> None:
    """A second graph adds its new signatures to the same cache file, keeping the old ones."""
    cache = tmp_path / "profile.json"
    ProfiledCostModel.profile(tiny.graph, tiny.model, tiny.inputs, cache_path=cache)
    first = json.loads(cache.read_text())
    x = torch.randn(3, 3, 8, 8)
    other = planner.capture(tiny.model, x)
    ProfiledCostModel.profile(other, tiny.model, x, cache_path=cache)
    second = json.loads(cache.read_text())
    assert set(first) < set(second)
    assert all(second[k] == v for k, v in first.items())


def test_profiled_model_refuses_unprofiled_graph(tiny: Case, tmp_path: Path) -> None:
    cost = ProfiledCostModel.profile(tiny.graph, tiny.model, tiny.inputs, cache_path=tmp_path / "p.json")
    other = planner.capture(TinyCNN().train(), torch.randn(3, 3, 8, 8))
    with pytest.raises(KeyError, match="not profiled"):
        cost.op_times(other)


# ---- the default: measured on the machine that plans ------------------------------------------------

def test_plan_of_a_model_measures_op_times_by_default(tiny: Case) -> None:
    chosen = planner.plan(tiny.model, "100%", tiny.inputs)
    assert chosen.cost_model.startswith("profiled:cpu")
    assert "measured in a running step" in str(chosen)
    from_graph = planner.plan(tiny.graph, "100%")  # a graph alone: the roofline of its device
    assert from_graph.cost_model == "roofline:cpu" and "not measured" in str(from_graph)
    named = planner.plan(tiny.model, "100%", tiny.inputs, cost_model="h100")
    assert named.cost_model == "roofline:h100"


def test_meta_tensors_get_the_roofline_and_profiled_needs_a_model(tiny: Case) -> None:
    meta = TinyCNN().to("meta").train()
    x = torch.randn(2, 3, 8, 8, device="meta")
    graph = planner.capture(meta, x)
    assert choose_cost_model(graph, None, meta, x).name == "roofline:a100"  # not a CPU: the default GPU preset
    assert choose_cost_model(tiny.graph, None, tiny.model, tiny.inputs).name.startswith("profiled:cpu")
    with pytest.raises(ValueError, match="real tensors"):
        planner.plan(tiny.graph, "100%", cost_model="profiled")


def test_profiling_leaves_the_model_and_the_rng_as_they_were(tiny: Case) -> None:
    torch.manual_seed(5)
    rng = torch.get_rng_state()
    state = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    ProfiledCostModel.for_model(tiny.model, tiny.inputs).op_times(tiny.graph)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, state[k]) for k, v in tiny.model.state_dict().items())
    assert all(p.grad is None for p in tiny.model.parameters())


@pytest.fixture
def no_profiles(monkeypatch) -> None:
    """Nothing measured yet in this process."""
    monkeypatch.setattr(profiled_cost, "_PROCESS_CACHE", {})
    monkeypatch.setattr(profiled_cost, "_GRAPH_CACHE", {})


def test_known_signatures_are_not_timed_again(tiny: Case, monkeypatch, no_profiles) -> None:
    """A graph profiled before is not run again; a new graph whose signatures are all known is run
    once (to find them), untimed; the times are the same."""
    first = ProfiledCostModel.for_model(tiny.model, tiny.inputs).op_times(tiny.graph)
    timed, runs = [], []
    monkeypatch.setattr(profiled_cost._OpClock, "stop", lambda self, key, started: timed.append(key))
    initial_env = profiled_cost.initial_env
    monkeypatch.setattr(profiled_cost, "initial_env", lambda *a: (runs.append(1), initial_env(*a))[1])
    again = ProfiledCostModel.for_model(tiny.model, tiny.inputs).op_times(tiny.graph)
    assert not timed and not runs and np.array_equal(first, again)
    monkeypatch.setattr(profiled_cost, "_GRAPH_CACHE", {})
    once_more = ProfiledCostModel.for_model(tiny.model, tiny.inputs).op_times(tiny.graph)
    assert not timed and len(runs) == 1 and np.array_equal(first, once_more)


def test_every_op_instance_is_timed_in_place(tiny: Case, monkeypatch, no_profiles) -> None:
    """Each timed run times every non-view op where it runs in the step (new signatures only)."""
    timed = []
    stop = profiled_cost._OpClock.stop
    monkeypatch.setattr(profiled_cost._OpClock, "stop", lambda self, key, started: (timed.append(key), stop(self, key, started)))
    ProfiledCostModel.for_model(tiny.model, tiny.inputs, runs=2).op_times(tiny.graph)
    assert len(timed) == 2 * sum(not op.is_view for op in tiny.graph.ops)


def test_low_memory_profiling_when_store_all_does_not_fit(tiny: Case, monkeypatch, no_profiles) -> None:
    g = tiny.graph
    store_all = profiled_cost._profiling_schedule(g, 10**12)
    assert store_all == planner.Schedule.store_all(g)
    tight = profiled_cost._profiling_schedule(g, 0)
    assert tight != store_all and tight.recomputed_ops()
    assert planner.simulate(g, tight).peak_bytes < planner.simulate(g, store_all).peak_bytes
    monkeypatch.setattr(profiled_cost, "_available_bytes", lambda device: 0)  # profile with the recomputing schedule
    times = ProfiledCostModel.for_model(tiny.model, tiny.inputs).op_times(g)
    assert all(times[op.id] > 0 for op in g.ops if not op.is_view)


def test_a_graph_with_variants_is_profiled_on_first_use(tiny: Case) -> None:
    from planner.variants import apply_variants, variant_sites

    cost_model = ProfiledCostModel.for_model(tiny.model, tiny.inputs)
    rewritten = apply_variants(tiny.graph, variant_sites(tiny.graph))
    assert rewritten.variants and any(op.workspace_bytes for op in rewritten.ops)
    times, workspace = cost_model.op_times(rewritten), cost_model.workspace_bytes(rewritten)
    assert all(times[op.id] > 0 for op in rewritten.ops if not op.is_view)
    assert np.array_equal(workspace, [op.workspace_bytes for op in rewritten.ops])  # CPU: what ops declare
