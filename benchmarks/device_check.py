#!/usr/bin/env python3
"""One command that checks dbmef's GPU code on the GPU machine the project can borrow: one H200 with
torch (CUDA), cuda-bindings, CuPy, onnx and CPU onnxruntime, but no TensorRT, no onnxruntime-gpu and
no diffusers; 10 minutes a command.

    python benchmarks/device_check.py                 # on the GPU machine (writes $OUT/device_check.json)
    python benchmarks/device_check.py --dry           # anywhere: the same logic, CUDA steps skipped, tiny sizes

Steps (the JSON is rewritten after each, so a run cut short keeps what it measured):

a. ``cuda``: ``dbmef.runtime.backends.cuda`` on the real ``cuda.bindings``: pinned and device
   copies round trip; a failing call raises ``EngineError`` naming the CUDA error and leaves no
   sticky error; a CUDA graph captured on the non-blocking stream replays what it captured, reading
   the buffers at launch; a capture that does something CUDA forbids (a stream sync) raises
   ``CaptureFailed`` and the stream works afterwards; the row path's device-side gathers
   (``row_gather.plan_chunk``) equal numpy's gather, with zero allocations per batch after the first.
b. ``digits``: the committed digits bundle's decisions with every component interpreted by torch on
   the GPU (``dbmef/reference/torch_onnx.py``: the bundle's own ONNX graphs and weights; a CUDA row kernel
   that the machine has), through the row scheduler, against ONNX Runtime on the CPU: the same labels,
   rethink flags and UNet evaluation counts (a different label counts only beyond a near tie), one host
   sync per engine call.
c. ``sd15_unet``: SD v1.5's UNet (its real architecture, random weights: diffusers from a carried
   wheel, see README) in fp16 at a 64 x 64 latent, batch 32 and 64, replayed as a CUDA graph: UNet
   evaluations per second, the figure a TensorRT engine must beat.
d. ``tensorrt``: only where ``import tensorrt`` works: ``gpu_check``'s TensorRT-vs-ONNX-Runtime
   comparison on the digits bundle.

``--dry`` runs b on the CPU with torch (40 digits) and c with a tiny UNet at batch 2, so
``make test`` exercises every step's logic; a and d report why they were skipped.
Exit code 0 when no step failed (skipped steps do not fail).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WHEELS = ROOT / ".device" / "wheels"  # small pure-python wheels carried to the GPU machine (ignored by git)


class Skip(Exception):
    """A step that cannot run on this machine (the reason says what is missing)."""


def use_carried_wheels(folder: Path = WHEELS) -> list[str]:
    """Unpack carried wheels into a temporary folder and put it at the end of ``sys.path``: the GPU
    machine has no package registry. Unpacked rather than imported from the zip so that binary
    wheels (safetensors' abi3 extension, regex for several Pythons side by side) load too; last on
    the path so that what the machine already has wins."""
    import tempfile
    import zipfile

    wheels = sorted(folder.glob("*.whl")) if folder.is_dir() else []
    site = Path(tempfile.gettempdir()) / "dbmef-device-site"  # not in the checkout: it is carried as it is
    for w in wheels:
        with zipfile.ZipFile(w) as z:
            z.extractall(site)
    if wheels and str(site) not in sys.path:
        sys.path.append(str(site))
    return [w.name for w in wheels]


# -- a. cuda.py on the real bindings --------------------------------------------------------------------
def step_cuda(dry: bool) -> dict[str, Any]:
    from dbmef.errors import BackendUnavailableError
    from dbmef.runtime.backends.cuda_check import check_cuda

    if dry:
        raise Skip("dry run")
    try:
        return check_cuda()
    except BackendUnavailableError as exc:
        raise Skip(str(exc)) from None


# -- b. the digits bundle's decisions on the GPU ---------------------------------------------------------
def step_digits(dry: bool) -> dict[str, Any]:
    import torch

    from dbmef.apps.digits import demo_bundle_dir, demo_test_split, render
    from dbmef.export.checks import clear_decision
    from dbmef.reference.torch_onnx import BACKEND, register_torch_backend
    from dbmef.runtime import DBMEFRuntime
    from dbmef.runtime.row_scheduler import SchedulerStats

    device = "cuda" if torch.cuda.is_available() and not dry else "cpu"
    if device == "cpu" and not dry:
        raise Skip("torch sees no CUDA device")
    torch.backends.cudnn.allow_tf32 = False  # float32 as ONNX Runtime computes it: no TF32 convolutions
    torch.backends.cuda.matmul.allow_tf32 = False
    register_torch_backend(device)
    split = demo_test_split()
    n = 40 if dry else len(split.images)
    images = [np.asarray(render(a)) for a in split.images[:n]]
    with DBMEFRuntime(demo_bundle_dir()) as ref_rt:
        t0 = time.perf_counter()
        ref = ref_rt.classify(images)
        ref_s = time.perf_counter() - t0
    with DBMEFRuntime(demo_bundle_dir(), backend=BACKEND) as rt:
        rt.classify(images[:4])  # warm-up (CUDA context, cuDNN autotuning)
        scorer = rt.pipeline.engines.scorer
        calls0, syncs0 = scorer.calls, scorer.syncs
        stats = SchedulerStats()
        t0 = time.perf_counter()
        got = sorted(rt.stream(images, stats=stats), key=lambda r: r.index)
        got_s = time.perf_counter() - t0
        calls, syncs = scorer.calls - calls0, scorer.syncs - syncs0
        sched = stats.to_dict()
    diffs = [float(np.nanmax(np.abs(np.asarray(g.noise_errors, float) - np.asarray(r.noise_errors, float))))
             for g, r in zip(got, ref) if r.rethought and g.rethought]
    max_abs = max(diffs, default=0.0)
    differing = [j for j, (g, r) in enumerate(zip(got, ref)) if g.label != r.label]
    # the exporter's rule (vote() and its tie-break both clear of twice the measured difference)
    near_tie = [j for j in differing
                if ref[j].rethought and not clear_decision(np.asarray(ref[j].noise_errors, float), max_abs)]
    out = {
        "device": device, "torch": torch.__version__, "images": n, "rethought": sum(r.rethought for r in ref),
        "labels_differing": len(differing), "labels_differing_beyond_near_ties": len(differing) - len(near_tie),
        "rethink_flags_differing": sum(g.rethought != r.rethought for g, r in zip(got, ref)),
        "unet_evals_differing": sum(g.unet_evals != r.unet_evals for g, r in zip(got, ref)),
        "max_abs_noise_error_diff": max_abs, "scorer_engine_calls": calls,
        "host_syncs_per_scorer_call": syncs / max(calls, 1), "scheduler": sched,
        "wall_s": {"torch_" + device: got_s, "onnxruntime_cpu": ref_s},
    }
    out["passed"] = (out["labels_differing_beyond_near_ties"] == 0 and out["rethink_flags_differing"] == 0
                     and (out["unet_evals_differing"] == 0 or bool(near_tie))
                     and out["host_syncs_per_scorer_call"] == 1)
    return out


# -- c. SD v1.5's UNet: evaluations per second ------------------------------------------------------------
def step_sd15_unet(dry: bool, batches: tuple[int, ...] = (32, 64), repeats: int = 10) -> dict[str, Any]:
    import torch

    try:
        from diffusers import UNet2DConditionModel
    except ImportError as exc:
        raise Skip(f"diffusers is not importable ({exc}); carry its wheel: see README, GPU machine") from exc
    from dbmef.export.sources import SD15_UNET

    cuda = torch.cuda.is_available() and not dry
    if not cuda and not dry:
        raise Skip("torch sees no CUDA device")
    device, dtype = ("cuda", torch.float16) if cuda else ("cpu", torch.float32)
    if dry:  # the logic only: a tiny UNet of the same class
        config: dict[str, Any] = {"sample_size": 8, "block_out_channels": (32, 64), "layers_per_block": 1,
                                  "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
                                  "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"), "cross_attention_dim": 64}
        batches, repeats, side, width = (2,), 2, 8, 64
    else:
        config, side, width = dict(SD15_UNET), 64, 768
    torch.manual_seed(0)
    unet: Any = UNet2DConditionModel(**config).to(device, dtype).eval()
    out: dict[str, Any] = {"device": device, "dtype": str(dtype), "latent": [4, side, side], "batches": {}}
    for b in batches:
        x = torch.randn(b, 4, side, side, device=device, dtype=dtype)
        t = torch.randint(0, 1000, (b,), device=device)
        ctx = torch.randn(b, 77, width, device=device, dtype=dtype)
        with torch.inference_mode():
            step = lambda x=x, t=t, ctx=ctx: unet(x, t, encoder_hidden_states=ctx).sample  # noqa: E731
            graphed, capture_error = cuda, None
            try:
                run = _graphed(step, cuda)
            except Exception as exc:  # a capture the model does not allow: time it eagerly, say why
                run, graphed, capture_error = step, False, f"{type(exc).__name__}: {exc}"
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                run()
                if cuda:
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        out["batches"][str(b)] = {"median_s": med, "unet_evals_per_s": b / med, "cuda_graph": graphed,
                                  **({"capture_error": capture_error} if capture_error else {})}
    out["passed"] = all(v["unet_evals_per_s"] > 0 for v in out["batches"].values())
    return out


def _graphed(fn: Callable[[], Any], cuda: bool) -> Callable[[], Any]:
    """``fn`` replayed as a CUDA graph (after warm-up runs on a side stream, as torch requires), or
    ``fn`` itself on the CPU."""
    if not cuda:
        fn()
        return fn
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


# -- d. TensorRT, where it is installed ----------------------------------------------------------------------
def step_tensorrt(dry: bool) -> dict[str, Any]:
    try:
        import tensorrt  # noqa: F401
    except ImportError as exc:
        raise Skip(f"tensorrt is not installed ({exc})") from exc
    if dry:
        raise Skip("dry run")
    from benchmarks.gpu_check import check_bundle
    from dbmef.apps.digits import demo_bundle_dir

    return check_bundle(Path(demo_bundle_dir()), 8, {"votes": 1}, 3)


STEPS: dict[str, Callable[[bool], dict[str, Any]]] = {
    "cuda": step_cuda, "digits": step_digits, "sd15_unet": step_sd15_unet, "tensorrt": step_tensorrt}


def run(out: Path, dry: bool, only: list[str] | None = None) -> dict[str, Any]:
    """Every step (or ``only`` those), the report rewritten to ``out`` after each."""
    report: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "dry": dry,
                              "python": platform.python_version(), "machine": platform.platform(),
                              "carried_wheels": use_carried_wheels(), "steps": {}}
    out.parent.mkdir(parents=True, exist_ok=True)
    for name, step in STEPS.items():
        if only and name not in only:
            continue
        t0 = time.perf_counter()
        try:
            res = {"status": "passed", **step(dry)}
            if not res.pop("passed", True):
                res["status"] = "failed"
        except Skip as exc:
            res = {"status": "skipped", "reason": str(exc)}
        except Exception as exc:  # a failed step is reported and the next one still runs
            res = {"status": "failed", "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        res["seconds"] = time.perf_counter() - t0
        report["steps"][name] = res
        out.write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"{name}: {res['status']} ({res['seconds']:.1f} s) {res.get('reason', res.get('error', ''))}",
              file=sys.stderr)
    report["passed"] = all(s["status"] != "failed" for s in report["steps"].values())
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry", action="store_true", help="no GPU: the logic of every step at tiny sizes")
    ap.add_argument("--out", type=Path, default=None, help="default: $OUT/device_check.json, else benchmarks/results/")
    ap.add_argument("--only", nargs="+", choices=list(STEPS), help="run only these steps")
    a = ap.parse_args(argv)
    out = a.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else HERE / "results") / "device_check.json"
    report = run(out, a.dry, a.only)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))  # `python benchmarks/device_check.py` from a checkout
    raise SystemExit(main())
