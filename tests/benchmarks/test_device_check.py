"""benchmarks/device_check.py in its dry mode (what `make test` can run without a GPU), and its
CUDA step's row-gather check on the simulated device, with a planted fault it must catch."""

from __future__ import annotations

import json

import numpy as np

from tests.conftest import needs_ort
from tests.simdevice import install

pytestmark = needs_ort


def test_dry_run_runs_every_step_it_can_and_writes_its_report(tmp_path):
    from benchmarks.device_check import main

    out = tmp_path / "device_check.json"
    assert main(["--dry", "--out", str(out)]) == 0
    steps = json.loads(out.read_text())["steps"]
    assert steps["cuda"]["status"] == "skipped" and steps["tensorrt"]["status"] == "skipped"
    d = steps["digits"]
    assert d["status"] == "passed", d
    assert d["images"] == 40 and d["rethought"] > 0 and d["labels_differing"] == 0
    assert d["unet_evals_differing"] == 0 and d["host_syncs_per_scorer_call"] == 1
    u = steps["sd15_unet"]
    assert u["status"] == "passed" and u["batches"]["2"]["unet_evals_per_s"] > 0


def test_the_cuda_step_on_the_simulated_device(monkeypatch):
    """Step a end to end on tests/simdevice.py: copies, the error path, graph replay, a capture that
    syncs refused (the simulated device rejects what CUDA rejects while capturing), gathers equal
    numpy's, no allocation per batch."""
    from benchmarks.device_check import step_cuda

    install(monkeypatch)
    out = step_cuda(dry=False)
    assert out["passed"], out
    assert out["row_gather"]["inputs_differing_from_numpy"] == 0


def test_an_allocation_per_batch_is_caught(monkeypatch):
    """Planted fault: a gather that allocates a device buffer per copy (what a per-batch
    DeviceBuffer would do) fails the zero-allocation check."""
    from benchmarks import device_check
    from dbmef.runtime.backends import cuda

    install(monkeypatch)
    real = cuda.memcpy_dtod_async
    held = []

    def allocating(dst, src, nbytes, stream):
        held.append(cuda.DeviceBuffer(nbytes))
        real(dst, src, nbytes, stream)

    monkeypatch.setattr(cuda, "memcpy_dtod_async", allocating)
    stream = cuda.Stream()
    res = device_check.row_gather_on_device(stream, np.random.default_rng(0), batches=3)
    assert res["inputs_differing_from_numpy"] == 0 and res["allocations_after_first_batch"] > 0
    assert not res["passed"]
