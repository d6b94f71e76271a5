"""`import dbmef.runtime` stays lean: no torch, diffusers, timm, transformers, onnx."""

import subprocess
import sys

HEAVY = ["torch", "diffusers", "timm", "transformers", "onnx", "onnxruntime", "tensorrt", "ray"]


def test_runtime_import_pulls_no_heavy_package():
    code = (
        "import sys, dbmef, dbmef.runtime\n"
        f"bad = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"dbmef.runtime imported {out.stdout.strip()}"
