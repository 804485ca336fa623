"""bench/chaos.py, small: 40 jobs through a real gateway, Redis and two workers, while one worker is
SIGKILLed and Redis is SIGKILLed and started again from its files. No accepted job is lost or finishes
twice, and no answer hides the jobs it had accepted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from service.paths import REPO_ROOT, bundled_model

pytestmark = pytest.mark.slow


def test_a_short_chaos_run_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    if not (bundled_model() / "model.safetensors").exists():
        pytest.skip("the demo model is not in models/shapes")
    figures_path = tmp_path / "figures.json"
    command = [sys.executable, "-m", "bench.chaos", "--jobs", "40", "--workers", "2", "--rate", "3"]
    command += ["--faults", "redis-kill,worker-kill", "--fault-every", "3", "--poison", "0", "--settle", "60"]
    command += ["--folder", str(tmp_path / "run"), "--json", str(figures_path)]
    run = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=170)
    print(run.stdout[-4000:], run.stderr[-4000:])  # shown when the test fails
    figures = json.loads(figures_path.read_text())
    assert [f["kind"] for f in figures["faults"]] == ["redis-kill", "worker-kill"], figures["fault_errors"]
    assert figures["lost"] == 0, figures["lost_jobs"]
    assert figures["duplicated"] == 0, figures["duplicated_jobs"]
    assert figures["accepted"] == 40 and figures["succeeded"] == 40, figures["failed_reasons"]
    assert figures["hidden"] == [] and figures["gave_up"] == []
    assert run.returncode == 0
