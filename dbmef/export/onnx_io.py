"""Saving and comparing ONNX graphs: torch-free, shared by the torch export and the ONNX-folder path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

TWO_GB = 2**31


def save_onnx(model: Any, out: Path) -> Path:
    import onnx

    out.parent.mkdir(parents=True, exist_ok=True)
    data = out.with_name(out.name + ".data")
    for p in (out, data):
        if p.exists():
            p.unlink()
    # ByteSize() itself fails past 2 GB, so weigh the tensors: they are nearly all of a model.
    weights = sum(len(t.raw_data) or 4 * len(t.float_data) for t in model.graph.initializer)
    if weights >= TWO_GB - (256 << 20):
        onnx.save_model(model, str(out), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
    else:
        onnx.save_model(model, str(out))
    for p in (out, data):
        if p.exists():
            p.chmod(0o644)  # onnx writes external data 0600; a bundle is meant to be shared
    # Shape inference and the checker by path: both handle external data and > 2 GB graphs.
    onnx.shape_inference.infer_shapes_path(str(out), str(out))
    onnx.checker.check_model(str(out))
    return out


def compare(name: str, got: np.ndarray, ref: np.ndarray, atol: float, rtol: float) -> dict[str, Any]:
    """Max abs/rel error and whether ``|got - ref| <= atol + rtol |ref|`` everywhere; reports
    where the largest difference is."""
    got = np.asarray(got, np.float64)
    ref = np.asarray(ref, np.float64)
    if got.shape != ref.shape:
        return {"output": name, "ok": False, "reason": f"shape {got.shape} != {ref.shape}"}
    diff = np.abs(got - ref)
    rel = diff / np.maximum(np.abs(ref), 1e-12)
    ok = bool(np.all(diff <= atol + rtol * np.abs(ref)))
    worst = np.unravel_index(int(diff.argmax()), diff.shape) if diff.size else ()
    return {"output": name, "ok": ok, "max_abs": float(diff.max(initial=0)), "max_rel": float(rel.max(initial=0)),
            "worst_index": [int(i) for i in worst], "atol": atol, "rtol": rtol}


def release_memory() -> None:
    """Collect garbage and hand freed heap back to the system. protobuf, graphsurgeon and ONNX Runtime
    free multi-GB buffers through malloc, whose arenas keep them (resident) unless trimmed: after
    SD v1.5's scorer export the process held 3.7 GiB more than before it."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        pass
