#!/usr/bin/env python3
"""Static verification of dbmef's TensorRT and cuda-python calls, without a GPU.

TensorRT: for each supported version (the newest 10.x and 11.x), download the ~1.3 MB bindings
wheel from PyPI, load its pybind11 module against link-time stand-ins for libnvinfer (TensorRT's
C++ API is reached through vtables, so ten C entry points are all the loader needs; none is ever
called), generate exact stubs with pybind11-stubgen, and type-check dbmef's TensorRT modules
against each version's stubs with mypy. A misspelt method, a wrong argument count or a removed
API (TensorRT 11 dropped BuilderFlag.FP16, EXPLICIT_BATCH, device_memory_size, ...) fails.

cuda-python: every ``cuda*`` call in dbmef/runtime/backends/cuda.py is bound against the real signature
of ``cuda.bindings.runtime`` (Cython functions carry their signatures) and every enum it names
must exist.

Usage: check_trt.py [--cache DIR] [--self-test | --stubs-only]
"""

from __future__ import annotations

import argparse
import ast
import inspect
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
TRT_VERSIONS = {"10": "10.16.1.11", "11": "11.4.0.106"}
CUDA_BINDINGS = "cuda-bindings>=12.6"
TRT_FILES = ["dbmef/export/trt_build.py", "dbmef/runtime/backends/trt_engines.py", "dbmef/runtime/backends/tensorrt.py"]
CUDA_FILES = ["dbmef/runtime/backends/cuda.py"]
# The C entry points the bindings link against; fake_trt.c defines them.
FAKE_LIBS = ["libnvinfer.so.{major}", "libnvonnxparser.so.{major}", "libnvinfer_plugin.so.{major}"]


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:  # type: ignore[type-arg]
    return subprocess.run(cmd, text=True, capture_output=True, **kw)


def pip(args: list[str]) -> None:
    r = run([sys.executable, "-m", "pip", *args, "-q", "--disable-pip-version-check"])
    if r.returncode != 0:
        sys.exit(f"check-trt: pip {' '.join(args)} failed:\n{r.stderr[-2000:]}")


def stubs_for(major: str, version: str, cache: Path) -> Path:
    """Generate (once) a stub package `tensorrt` for one TensorRT version; return its folder."""
    out = cache / f"stubs-{version}"
    if (out / "tensorrt" / "__init__.pyi").is_file():
        return out
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    pip(["download", "--no-deps", "--only-binary=:all:", "--python-version", "3.11", "--platform",
         "manylinux_2_28_x86_64", "-d", str(wheels), f"tensorrt-cu12-bindings=={version}"])
    whl = next(wheels.glob(f"tensorrt_cu12_bindings-{version}-*.whl"))
    tree = cache / f"tree-{version}"
    shutil.rmtree(tree, ignore_errors=True)
    with zipfile.ZipFile(whl) as z:
        z.extractall(tree)
    fake = cache / f"fake-{major}"
    fake.mkdir(parents=True, exist_ok=True)
    for lib in FAKE_LIBS:
        r = run(["gcc", "-shared", "-fPIC", "-o", str(fake / lib.format(major=major)), str(HERE / "fake_trt.c")])
        if r.returncode != 0:
            sys.exit(f"check-trt: gcc failed: {r.stderr}")
    env = {**os.environ, "PYTHONPATH": str(tree), "LD_LIBRARY_PATH": str(fake)}
    gen = cache / f"gen-{version}"
    shutil.rmtree(gen, ignore_errors=True)
    r = run([sys.executable, "-m", "pybind11_stubgen", "tensorrt_bindings.tensorrt", "-o", str(gen),
             "--ignore-all-errors"], env=env)
    src = gen / "tensorrt_bindings" / "tensorrt.pyi"
    if not src.is_file():
        sys.exit(f"check-trt: pybind11-stubgen produced no stubs for TensorRT {version}:\n{r.stderr[-3000:]}")
    pkg = out / "tensorrt"
    pkg.mkdir(parents=True, exist_ok=True)
    text = fix_stubs(src.read_text().replace("tensorrt_bindings.tensorrt.", ""))
    # __version__ is set by the wheel's Python __init__, not by the compiled module.
    (pkg / "__init__.pyi").write_text(text + "\n__version__: str\n")
    return out


def _fix_def(line: str) -> str:
    """pybind11 allows what Python syntax does not: a parameter named `in`, and parameters without
    defaults after ones with defaults (C++ overload order). Rename the first, default the second."""
    line = re.sub(r"([(,] ?)in:", r"\1in_:", line)
    head, sep, rest = line.partition("(")
    if not sep:
        return line
    depth, params, cur = 1, [], ""
    for j, ch in enumerate(rest):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
            if depth == 0:
                params.append(cur)
                tail = rest[j:]
                break
        if ch == "," and depth == 1:
            params.append(cur)
            cur = ""
        else:
            cur += ch
    else:
        return line
    seen_default = False
    fixed = []
    for prm in params:
        stripped = prm.strip()
        if "=" in stripped:
            seen_default = True
        elif seen_default and stripped and not stripped.startswith("*"):
            prm = prm + " = ..."
        fixed.append(prm)
    return head + "(" + ",".join(fixed) + tail


def fix_stubs(text: str) -> str:
    return "\n".join(_fix_def(ln) if ln.lstrip().startswith("def ") else ln for ln in text.split("\n"))


def mypy_against(stubs: Path, files: list[Path]) -> tuple[bool, str]:
    env = {**os.environ, "MYPYPATH": str(stubs)}
    # one incremental cache per version's stubs: the self-test's runs re-check only the broken copy
    cache = stubs.parent / f"mypy-{stubs.name}"
    r = run([sys.executable, "-m", "mypy", "--cache-dir", str(cache), "--follow-imports=silent", "--python-version",
             "3.11", "--ignore-missing-imports", "--check-untyped-defs", "--no-error-summary",
             *map(str, files)], env=env, cwd=ROOT)
    # A version's stubs are what is checked: an unresolved `tensorrt` would make every call Any.
    bad_setup = "Cannot find implementation or library stub for module named \"tensorrt\"" in r.stdout
    # Generated stubs carry their own complaints (TensorRT names a type `bool`, overlapping
    # overloads): only errors in dbmef's files count.
    ours = [ln for ln in r.stdout.splitlines() if ": error:" in ln and not ln.startswith(str(stubs))
            and ".cache" not in ln.split(":")[0]]
    if r.returncode not in (0, 1) or "Traceback" in r.stderr:
        return False, r.stderr
    return not ours and not bad_setup, "\n".join(ours)


# -- cuda-python ------------------------------------------------------------------------------------
def cuda_runtime(cache: Path):  # type: ignore[no-untyped-def]
    target = cache / "cuda-bindings"
    if not (target / "cuda").is_dir():
        pip(["install", "--target", str(target), "--no-deps", CUDA_BINDINGS, "cuda-pathfinder"])
    sys.path.insert(0, str(target))
    from cuda.bindings import runtime

    return runtime


def check_cuda_calls(files: list[Path], rt) -> list[str]:  # type: ignore[no-untyped-def]
    """Bind every `<x>.cudaFoo(...)` call to cudaFoo's real signature; check `<x>.cudaEnum.member`."""
    problems = []
    for f in files:
        tree = ast.parse(f.read_text(), str(f))
        for node in ast.walk(tree):
            is_call = isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            if is_call and node.func.attr.startswith("cuda"):  # type: ignore[attr-defined]
                name = node.func.attr
                fn = getattr(rt, name, None)
                where = f"{f.relative_to(ROOT)}:{node.lineno}"
                if fn is None:
                    problems.append(f"{where}: cuda.bindings.runtime has no function {name}")
                    continue
                try:
                    sig = inspect.signature(fn)
                    sig.bind(*[None] * len(node.args), **{k.arg: None for k in node.keywords if k.arg})
                except TypeError as exc:
                    problems.append(f"{where}: {name}{sig} called with {len(node.args)} arguments: {exc}")
                except ValueError:
                    pass  # no signature metadata: existence checked above
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
                    and node.value.attr.startswith("cuda") and not node.attr.startswith("_")):
                enum = getattr(rt, node.value.attr, None)
                if enum is not None and inspect.isclass(enum) and not hasattr(enum, node.attr):
                    problems.append(f"{f.relative_to(ROOT)}:{node.lineno}: {node.value.attr} has no member {node.attr}")
    return problems


def check(files_trt: list[Path], files_cuda: list[Path], cache: Path, quiet: bool = False) -> bool:
    ok = True
    for major, version in TRT_VERSIONS.items():
        stubs = stubs_for(major, version, cache)
        good, out = mypy_against(stubs, files_trt)
        print(f"TensorRT {version}: {'ok' if good else 'FAILED'} ({len(files_trt)} files)")
        if not good:
            ok = False
            if not quiet:
                print(out)
    rt = cuda_runtime(cache)
    problems = check_cuda_calls(files_cuda, rt)
    print(f"cuda-python {getattr(rt, '__version__', '')}: {'ok' if not problems else 'FAILED'} "
          f"({len(files_cuda)} files)")
    for p in problems:
        print("  " + p)
    return ok and not problems


def self_test(cache: Path) -> bool:
    """Break the code on purpose and require the check to fail: a misspelt TensorRT method, a
    wrong TensorRT argument count, an API TensorRT 11 removed, a wrong cuda-python arity."""
    import tempfile

    cases = {
        "misspelt TensorRT method": ("dbmef/runtime/backends/tensorrt.py", "execute_async_v3(self.stream.ptr)",
                                     "execute_async_v4(self.stream.ptr)"),
        "wrong TensorRT argument count": ("dbmef/runtime/backends/tensorrt.py",
                                          "self.context.set_input_shape(n, shape)", "self.context.set_input_shape(n)"),
        "TensorRT 11 removed API": (
            "dbmef/export/trt_build.py", "config.builder_optimization_level = ",
            "config.set_flag(trt.BuilderFlag.FP16)\n        config.builder_optimization_level = "),
        "wrong cuda-python argument count": ("dbmef/runtime/backends/cuda.py", "cudaStreamSynchronize(self.handle)",
                                             "cudaStreamSynchronize(self.handle, 0)"),
    }
    all_caught = True
    for label, (rel, old, new) in cases.items():
        src = (ROOT / rel).read_text()
        assert old in src, f"self-test anchor {old!r} not in {rel}"
        with tempfile.TemporaryDirectory(dir=ROOT) as tmp:
            # keep the package path so imports resolve; shadow one module with the broken copy
            # (renamed: a copy of backends/tensorrt.py named tensorrt.py would shadow TensorRT itself)
            broken = Path(tmp) / f"broken_{Path(rel).name}"
            broken.write_text(src.replace(old, new, 1))
            trt_files = [ROOT / f for f in TRT_FILES if f != rel] + ([broken] if rel in TRT_FILES else [])
            cuda_files = [broken] if rel in CUDA_FILES else [ROOT / f for f in CUDA_FILES]
            caught = not check(trt_files, cuda_files, cache, quiet=True)
        print(f"self-test: {label}: {'caught' if caught else 'NOT CAUGHT'}")
        all_caught &= caught
    return all_caught


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default=str(ROOT / ".cache" / "check-trt"))
    ap.add_argument("--self-test", action="store_true", help="also prove that broken calls are caught")
    ap.add_argument("--stubs-only", action="store_true", help="only generate each version's stubs in the cache "
                    "(make test does this first: tests/runtime/test_trt.py type-checks against them)")
    args = ap.parse_args()
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    if args.stubs_only:
        for major, version in TRT_VERSIONS.items():
            print(f"check-trt: stubs of TensorRT {version} in {stubs_for(major, version, cache)}")
        return 0
    ok = check([ROOT / f for f in TRT_FILES], [ROOT / f for f in CUDA_FILES], cache)
    if args.self_test:
        ok = self_test(cache) and ok
    print("check-trt:", "passed" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
