"""The GPU acceptance benchmarks' code paths on CPU (`--quick`: tiny model, gloo, local Ray):
profile in a child process, deploy, policy swap, `baton bench` in a child process, reports.
Slow (2-3 minutes each): `pytest -m slow tests/test_benchmark_smoke.py`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(module: str, tmp_path: Path) -> tuple[str, dict]:
    output = tmp_path / "out.json"
    done = subprocess.run(
        [sys.executable, "-m", module, "--quick", "--output", str(output)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout, json.loads(output.read_text())


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_placement_quick(tmp_path):
    stdout, results = run("benchmarks.placement", tmp_path)
    assert "max rate ratio goodput / round_robin" in stdout
    assert "attainment at" in stdout
    for policy in ("round_robin", "goodput"):
        assert results["search"][policy]["max_rate"] > 0
        [fixed] = results["fixed"][policy]["runs"]
        assert fixed["completed"] == fixed["num_requests"] and fixed["failed"] == 0
        assert len(results["fixed"][policy]["prefill_hit_rates"]) == 2


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_planner_check_quick(tmp_path):
    stdout, results = run("benchmarks.planner_check", tmp_path)
    assert "diff pts" in stdout
    assert len(results["measured"]) == len(results["predicted"]) == 2
    assert all(0.0 <= m <= 1.0 for m in results["measured"])
    # Per rate, the prefill worker's steps against the profile (benchmarks/step_report.py).
    steps = results["summaries"][0]["prefill_steps"]["bench-prefill-0"]
    assert steps["num_steps"] > 0 and steps["measured_over_predicted"] > 0
