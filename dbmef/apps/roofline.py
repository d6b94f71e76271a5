"""What the machine can do and where the scorer's time goes: the float32 matmul rate through every
library at hand (the reference peak of a roofline), an ONNX Runtime profile by op type, and the
fraction of that peak a measured slow path reaches (``dbmef bench`` reports them)."""

from __future__ import annotations

import functools
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


def timed_runs(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> list[float]:
    """Wall seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def roofline(flops_per_evaluation: float | None, evaluations: int, walls: dict[str, float],
             rates: dict[str, float]) -> dict[str, Any]:
    """Achieved FLOP/s of each measured slow path (UNet work over its whole wall time) and its
    fraction of the machine's matmul peak."""
    roof: dict[str, Any] = {"flops_per_unet_evaluation": flops_per_evaluation, "matmul_flops_per_s": rates}
    if flops_per_evaluation:
        for name, wall in walls.items():
            achieved = flops_per_evaluation * evaluations / wall
            roof[name] = {"achieved_flops_per_s": achieved, "fraction_of_peak": achieved / rates["peak"]}
    return roof


def numpy_matmul_rate(n: int = 2048, repeats: int = 5) -> float:
    """float32 GEMM FLOP/s through numpy's BLAS (median of repeats)."""
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b = a.copy()
    walls = timed_runs(lambda: a @ b, repeats, warmup=2)
    return 2 * n**3 / statistics.median(walls)


def ort_profile_by_op(model_path: str | Path, feeds: dict[str, np.ndarray], threads: int = 0) -> dict[str, Any]:
    """Run one ONNX model once under ONNX Runtime's profiler; total kernel time by op type."""
    from dbmef.runtime.backends.onnxruntime import import_onnxruntime

    ort = import_onnxruntime()
    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(tmp) / "prof")
        so.intra_op_num_threads = threads
        sess = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
        sess.run(None, feeds)  # warm-up inside the profile is excluded below by taking the last run
        sess.run(None, feeds)
        prof = sess.end_profiling()
        events = json.loads(Path(prof).read_text())
    runs = [e for e in events if e.get("name") == "model_run"]
    last_start = runs[-1]["ts"] if runs else 0
    by_op: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time") and e["ts"] >= last_start:
            op = e.get("args", {}).get("op_name", "?")
            by_op[op] = by_op.get(op, 0.0) + e["dur"] / 1e6
    total = sum(by_op.values())
    return {"total_s": total, "by_op_s": dict(sorted(by_op.items(), key=lambda kv: -kv[1])),
            "share": {k: v / total for k, v in sorted(by_op.items(), key=lambda kv: -kv[1])} if total else {}}


def machine_matmul_rate() -> dict[str, float]:
    """float32 GEMM rate through every library at hand; the best is the machine's reference peak."""
    return dict(_machine_matmul_rate())


# The peak is the machine's, not the run's: measured once per process (about 4 s of 2048^3 GEMMs on
# one core), however many reports a process writes.
@functools.cache
def _machine_matmul_rate() -> dict[str, float]:
    rates = {"numpy": numpy_matmul_rate()}
    try:
        import torch

        a = torch.randn(2048, 2048)
        walls = timed_runs(lambda: a @ a, 5, warmup=2)
        rates["torch"] = 2 * 2048**3 / statistics.median(walls)
    except ImportError:
        pass
    try:
        import onnx
        from onnx import TensorProto, helper

        from dbmef.runtime.backends.onnxruntime import import_onnxruntime

        ort = import_onnxruntime()
        g = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "mm",
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, [2048, 2048]),
                               helper.make_tensor_value_info("b", TensorProto.FLOAT, [2048, 2048])],
                              [helper.make_tensor_value_info("c", TensorProto.FLOAT, [2048, 2048])])
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
        sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        x = np.random.default_rng(0).standard_normal((2048, 2048), dtype=np.float32)
        walls = timed_runs(lambda: sess.run(None, {"a": x, "b": x}), 5, warmup=2)
        rates["onnxruntime"] = 2 * 2048**3 / statistics.median(walls)
        del onnx
    except ImportError:
        pass
    rates["peak"] = max(rates.values())
    return rates


def profile_scorer(rt: Any, threads: int = 0) -> dict[str, Any]:
    m = rt.manifest
    comp = m.scorer_component
    b = rt.config.unet_batch
    c, h, w = m.vae.latent_shape
    L, D = m.positive_embeddings.shape[1:]
    rng = np.random.default_rng(0)
    if comp == "scorer":
        feeds = {"x0": rng.standard_normal((b, c, h, w), dtype=np.float32),
                 "eps": rng.standard_normal((b, c, h, w), dtype=np.float32),
                 "timestep": np.full((b,), 500, np.int64),
                 "emb_pos": rng.standard_normal((b, L, D), dtype=np.float32),
                 "emb_neg": rng.standard_normal((b, L, D), dtype=np.float32), "lam": np.array([1.1], np.float32)}
    else:
        feeds = {"sample": rng.standard_normal((2 * b, c, h, w), dtype=np.float32),
                 "timestep": np.full((2 * b,), 500, np.int64),
                 "encoder_hidden_states": rng.standard_normal((2 * b, L, D), dtype=np.float32)}
    return ort_profile_by_op(rt.bundle_dir / m.components[comp].file, feeds, threads)


def fitting_unet_batch(manifest: Any, total_memory: int, want: int = 32) -> int:
    """Scorer rows per call that ONNX Runtime's CUDA provider can hold (issue 14.12). Its attention is
    not fused: each UNet sample materialises heads x tokens^2 scores and probabilities at the
    highest resolution (SD v1.5 at 64x64: 8 x 4096^2 x 2 B x 2 = 0.5 GB), two samples per row; keep
    that under half the GPU's memory."""
    _, h, w = manifest.vae.latent_shape
    cfg = manifest.sources.get("sd", {}).get("unet_config", {})
    heads = cfg.get("attention_head_dim", 8)
    heads = max(heads) if isinstance(heads, list) else int(heads)
    itemsize = 2 if manifest.precision == "fp16" else 4
    per_row = 2 * heads * (h * w) ** 2 * itemsize * 2
    return int(max(1, min(want, (total_memory // 2) // max(per_row, 1))))
