"""The CUDA self-check (dbmef/runtime/backends/cuda_check.py, the device check's first step) on the
simulated device, and a planted fault it must catch."""

from __future__ import annotations

import numpy as np

from tests.simdevice import install


def test_the_cuda_check_on_the_simulated_device(monkeypatch):
    """End to end on tests/simdevice.py: copies, the error path, graph replay, a capture that syncs
    refused (the simulated device rejects what CUDA rejects while capturing), gathers equal numpy's,
    no allocation per batch."""
    from dbmef.runtime.backends.cuda_check import check_cuda

    install(monkeypatch)
    out = check_cuda()
    assert out["passed"], out
    assert out["row_gather"]["inputs_differing_from_numpy"] == 0


def test_an_allocation_per_batch_is_caught(monkeypatch):
    """Planted fault: a gather that allocates a device buffer per copy (what a per-batch
    DeviceBuffer would do) fails the zero-allocation check."""
    from dbmef.runtime.backends import cuda
    from dbmef.runtime.backends.cuda_check import row_gather_on_device

    install(monkeypatch)
    real = cuda.memcpy_dtod_async
    held = []

    def allocating(dst, src, nbytes, stream):
        held.append(cuda.DeviceBuffer(nbytes))
        real(dst, src, nbytes, stream)

    monkeypatch.setattr(cuda, "memcpy_dtod_async", allocating)
    stream = cuda.Stream()
    res = row_gather_on_device(stream, np.random.default_rng(0), batches=3)
    assert res["inputs_differing_from_numpy"] == 0 and res["allocations_after_first_batch"] > 0
    assert not res["passed"]
