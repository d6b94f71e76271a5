"""benchmarks/device_check.py in its dry mode (what `make test` can run without a GPU), run as the
GPU machine runs it: a script, in a process of its own."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import needs_ort

pytestmark = needs_ort
ROOT = Path(__file__).resolve().parents[2]


def test_dry_run_runs_every_step_it_can_and_writes_its_report(tmp_path):
    out = tmp_path / "device_check.json"
    run = subprocess.run([sys.executable, "benchmarks/device_check.py", "--dry", "--out", str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    steps = json.loads(out.read_text())["steps"]
    assert steps["cuda"]["status"] == "skipped" and steps["tensorrt"]["status"] == "skipped"
    d = steps["digits"]
    assert d["status"] == "passed", d
    assert d["images"] == 40 and d["rethought"] > 0 and d["labels_differing"] == 0
    assert d["unet_evals_differing"] == 0 and d["host_syncs_per_scorer_call"] == 1
    u = steps["sd15_unet"]
    assert u["status"] == "passed" and u["batches"]["2"]["unet_evals_per_s"] > 0
