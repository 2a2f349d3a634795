"""benchmarks/gpu_check.py runs on CPU at test sizes, through every stage it runs on a GPU.

The same script validates CUDA when a GPU is lent (docs/benchmarks.md, "GPU validation"); this
run checks that each stage's code works before one is: the install stage fails as it should
without wheels and the checks go on with the PyTorch twins; the plans it measures give eager's
gradients bitwise, with the meter's peak at the predicted one.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_runs_on_cpu_at_small_sizes(tmp_path: Path) -> None:
    wheels = tmp_path / "no-wheels"
    wheels.mkdir()
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), str(out), "--device", "cpu",
                           "--small", "--wheels", str(wheels), "--seconds", "300"],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    stages = {stage["name"]: stage for stage in report["stages"]}
    assert list(stages) == ["environment", "install", "gpu tests", "kernels", "fidelity", "allocator", "versus"]
    assert stages["install"]["status"] == "failed" and "twins run" in stages["install"]["summary"]
    others = {name: s["status"] for name, s in stages.items() if name != "install"}
    assert set(others.values()) == {"ok"}, others
    assert stages["gpu tests"]["data"]["counts"].get("skipped", 0) > 0  # no CUDA here: every gpu test skips
    assert {row["op"] for row in stages["kernels"]["data"]} >= {"relu forward", "batch_norm backward"}

    (model,) = stages["fidelity"]["data"]
    assert [row["budget"] for row in model["rows"]] == ["store-all", "min"]
    for row in model["rows"]:
        assert row["gradient_difference"] == 0.0
        assert row["timing"]["median"] > 0 and row["predicted_time"] > 0
        assert abs(row["peak"]["meter_bytes"] / row["predicted_peak"] - 1) < 0.01
    minimum = model["rows"][1]
    assert minimum["predicted_peak"] < model["rows"][0]["predicted_peak"]
    for row in stages["allocator"]["data"]["rows"]:
        assert row["rounded"] >= row["predicted"]

    (comparison,) = stages["versus"]["data"]
    configs = comparison["configs"]
    tools = [c["name"] for c in configs if c["name"] != "planner"]
    assert tools == ["eager PyTorch", "torch.utils.checkpoint", "gradient_checkpointing_enable()",
                     "selective checkpointing", "torch.compile"]
    assert all(c["failure"] is None and c["peak_bytes"] > 0 for c in configs), [c["failure"] for c in configs]
    eager = configs[0]
    checkpointing = next(c for c in configs if c["name"] == "torch.utils.checkpoint")
    assert checkpointing["peak_bytes"] < eager["peak_bytes"]  # checkpointing saves memory
    planned = [c for c in configs if c["name"] == "planner"]
    assert len(planned) == len(tools) and all(c["gradient_difference"] == 0.0 for c in planned)
    markdown = (out / "gpu_check.md").read_text()
    assert markdown.startswith("## GPU validation (issue 17)") and "### versus" in markdown
