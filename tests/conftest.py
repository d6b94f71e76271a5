"""Shared fixtures: one tiny seeded system per test session, built through save_pretrained."""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"


def has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


needs_torch = pytest.mark.skipif(not (has("torch") and has("diffusers") and has("timm")),
                                 reason="needs the [export] extra (torch, diffusers, timm)")
needs_ort = pytest.mark.skipif(not has("onnxruntime"), reason="needs onnxruntime ([cpu] or [gpu] extra)")


def pytest_configure(config: pytest.Config) -> None:
    """Results files a test writes by default (``dbmef eval`` / ``calibrate`` without --results)
    go to a scratch folder of this session, never to the user's ~/.cache/dbmef; subprocesses
    inherit it."""
    os.environ["DBMEF_HOME"] = tempfile.mkdtemp(prefix="dbmef-home-")
    if os.environ.get("PYTEST_XDIST_WORKER"):
        one_thread_per_worker()


def one_thread_per_worker() -> None:
    """``make unit`` runs the suite in pytest-xdist workers, one per core. Each worker computes on
    one thread: with every library's pool sized to the machine (ONNX Runtime, torch and BLAS all
    default to every core), two workers on two cores spent 30 % more CPU switching threads and
    finished no sooner than one process. Thread counts a test sets itself are kept."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = "1"  # this worker's torch and numpy, and the processes it starts
    if has("torch"):
        import torch

        torch.set_num_threads(1)
    if has("onnxruntime"):
        import onnxruntime as ort

        class OneThread(ort.SessionOptions):  # type: ignore[misc]
            def __setattr__(self, name: str, value: object) -> None:
                if name in ("intra_op_num_threads", "inter_op_num_threads") and value == 0:
                    value = 1  # 0 is "ONNX Runtime decides": every core
                super().__setattr__(name, value)

        ort.SessionOptions = OneThread


# Seconds each test file took (setup, call and teardown of its tests, summed) in one run on this
# project's 2-core machine: `make test-seconds` writes it. It orders the files for pytest-xdist.
FILE_SECONDS = TESTS / "file_seconds.json"
_seconds_run: dict[str, float] = {}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--store-file-seconds", action="store_true",
                     help=f"write each test file's seconds in this run to {FILE_SECONDS.relative_to(ROOT)}")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Slowest files first, Ray's last; a stable sort, so a file's tests keep their order.

    pytest-xdist hands a worker the next file whenever it is nearly out of work (`--dist loadfile
    --no-loadscope-reorder` keeps this order): with the long files first, the short ones fill in at
    the end and both workers finish about together (dealt by test count, one ran 70 s longer than the
    other). A file the table lacks counts as its median. The Ray tests still go last: the local Ray
    session they share stays up until the worker ends (it cannot be restarted safely in one process:
    tests/cluster/conftest.py), and its daemons and idle actors take CPU from every test after them."""
    seconds = json.loads(FILE_SECONDS.read_text()) if FILE_SECONDS.exists() else {}
    unknown = statistics.median(seconds.values()) if seconds else 0.0

    def key(item: pytest.Item) -> tuple[bool, float]:
        return TESTS / "cluster" in item.path.parents, -seconds.get(item.path.relative_to(ROOT).as_posix(), unknown)

    items.sort(key=key)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if not os.environ.get("PYTEST_XDIST_WORKER"):  # the controller sees every worker's reports too
        file = report.nodeid.split("::")[0]
        _seconds_run[file] = _seconds_run.get(file, 0.0) + report.duration


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if session.config.getoption("store_file_seconds") and not os.environ.get("PYTEST_XDIST_WORKER"):
        table = {f: round(s, 1) for f, s in sorted(_seconds_run.items(), key=lambda fs: -fs[1])}
        FILE_SECONDS.write_text(json.dumps(table, indent=1) + "\n")


@pytest.fixture(scope="session", autouse=True)
def no_worker_threads_left():
    """A ClassifierWorker left open keeps threads inside ONNX Runtime while the interpreter shuts
    down, which can crash the process after every test has passed: fail the session instead."""
    yield
    import threading

    left = [t.name for t in threading.enumerate() if t.name.startswith("dbmef-") and t.is_alive()]
    assert not left, f"threads still running when the tests ended: {left} (close every ClassifierWorker)"


@pytest.fixture(scope="session")
def tiny_system(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not (has("torch") and has("diffusers") and has("timm")):
        pytest.skip("needs the [export] extra")
    from dbmef.reference.tiny import build_tiny_system

    return built_once(tmp_path_factory, "tiny-system", lambda d: build_tiny_system(d / "tiny"))


@pytest.fixture(scope="session")
def sample_images() -> list:
    """A few seeded RGB arrays of different sizes and aspect ratios."""
    import numpy as np

    rng = np.random.default_rng(1234)
    sizes = [(80, 100), (64, 64), (120, 90), (70, 140), (96, 96), (100, 75)]
    out = []
    for j, (h, w) in enumerate(sizes):
        base = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        # smooth gradients so images differ in more than noise
        yy, xx = np.mgrid[0:h, 0:w]
        base[..., j % 3] = ((xx * (j + 1) + yy * 3) % 256).astype(np.uint8)
        out.append(base)
    return out


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny system exported to an ONNX bundle (same seed as ``tiny_system``: same weights), with
    the features component of ``TINY_FEATURES`` (``dbmef-export --features``)."""
    if not (has("torch") and has("diffusers") and has("timm") and has("onnxruntime")):
        pytest.skip("needs the [export] and [cpu] extras")
    from dbmef.export.exporter import ExportConfig, export_bundle
    from dbmef.runtime.features import FeatureSpec

    return built_once(tmp_path_factory, "tiny-bundle", lambda d: export_bundle(ExportConfig(
        backbone="tiny", sd="tiny", out=str(d / "tiny"), scorer="both", features=FeatureSpec(**TINY_FEATURES))))


def built_once(factory: pytest.TempPathFactory, name: str, build: Callable[[Path], Path]) -> Path:
    """``build(folder)`` once per test run: pytest-xdist's workers share the first worker's result
    (their temporary roots have one parent), the others waiting on a file lock while it builds.
    Read-only for tests, as a session fixture always was: a test that changes it copies it first."""
    import fcntl

    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return build(factory.mktemp(name))
    root = factory.getbasetemp().parent
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = root / f"{name}.path"
        if done.is_file():
            return Path(done.read_text())
        out = build(Path(tempfile.mkdtemp(prefix=f"{name}-", dir=root)))
        done.write_text(str(out))
        return out


@pytest.fixture(scope="session")
def digits_calibration_pass(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The committed digits bundle's rethink-all pass over its 200-digit calibration split, exactly
    as ``dbmef demo`` makes it (``apps/demo.py: operating_point``), fresh, once per test run: a folder
    holding the split as an ImageFolder (``calibration/``) and the pass's results
    (``calibration.jsonl``). The most UNet work of any fixture (about 45 s on one core), and the demo
    and ``dbmef calibrate`` tests each ran it again: they now resume from a copy (``seed_results``),
    which is the product's own resume path, and still check every number of the pass; the operating
    point test reads its records as they are."""
    if not has("onnxruntime"):
        pytest.skip("needs onnxruntime ([cpu] extra)")

    def build(root: Path) -> Path:
        from dbmef.apps.calibrate import calibrate_operating_point
        from dbmef.apps.digits import DIGIT_NAMES, demo_bundle_dir, demo_calibration_split, write_image_folder
        from dbmef.runtime import RuntimeSpec
        from dbmef.runtime.data import load_labelled

        items = load_labelled(write_image_folder(demo_calibration_split(), root / "calibration"), DIGIT_NAMES)
        calibrate_operating_point(RuntimeSpec(str(demo_bundle_dir())), items, "prot", 0.95,
                                  data="digits calibration split", results=root / "calibration.jsonl", write=False)
        return root

    return built_once(tmp_path_factory, "digits-calibration", build)


def seed_results(calibration_pass: Path, folder: Path, results: Path) -> Path:
    """``results``: the shared pass's results file (``digits_calibration_pass``) with each record's
    image path moved from the pass's ImageFolder to ``folder``, a copy of the same split (the
    records are keyed by path): a run over ``folder`` that resumes from it finds every image done."""
    src = calibration_pass / "calibration"
    lines = (calibration_pass / "calibration.jsonl").read_text().splitlines()
    out = [lines[0]]  # the header: the runtime's identity
    for line in lines[1:]:
        rec = json.loads(line)
        rec["image"] = str(folder / Path(os.path.realpath(rec["image"])).relative_to(os.path.realpath(src)))
        out.append(json.dumps(rec))
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text("\n".join(out) + "\n")
    return results


TINY_FEATURES = {"block": "up.1", "timestep": 90, "pool": 2}


def write_images(folder: Path, images: list, prefix: str = "img") -> list[Path]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for j, a in enumerate(images):
        p = folder / f"{prefix}{j:03d}.png"
        Image.fromarray(a).save(p)
        paths.append(p)
    return paths


@pytest.fixture(scope="session")
def many_images() -> list:
    """40 seeded images with varied content, enough for parity on >= 32 images."""
    import numpy as np

    rng = np.random.default_rng(99)
    out = []
    for j in range(40):
        h, w = int(rng.integers(64, 130)), int(rng.integers(64, 130))
        yy, xx = np.mgrid[0:h, 0:w]
        a = np.stack([(xx * (1 + j % 5) + yy * (j % 3)) % 256, (yy * (1 + j % 7)) % 256,
                      ((xx + yy) * (j % 4 + 1)) % 256], -1).astype(np.uint8)
        a = np.clip(a.astype(int) + rng.integers(-40, 40, a.shape), 0, 255).astype(np.uint8)
        out.append(a)
    return out


@pytest.fixture(scope="session")
def onnx_folder(tiny_system: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny system's SD written as ONNX in optimum's layout (``dbmef.reference.optimum_layout``)."""
    from dbmef.reference.optimum_layout import write_onnx_sd_folder

    return write_onnx_sd_folder(tiny_system / "sd", tmp_path_factory.mktemp("optimum") / "sd", image_size=64)


def png_declaring(width: int, height: int) -> bytes:
    """A 100-byte PNG whose header declares width x height (its data is one compressed row)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * (width + 1)))
            + chunk(b"IEND", b""))


# The child reports its own peak RSS from /proc/self/status (VmHWM, kB: this address space only).
# getrusage will not do: RUSAGE_CHILDREN in the parent is the largest child the test process ever had,
# and Linux keeps RUSAGE_SELF's ru_maxrss across execve, so a child of a large pytest process
# reports the parent's size.
_RUN_CLI = ("import re, sys; from dbmef.apps.cli import main; rc = main(sys.argv[1:]); "
            "hwm = re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1); "
            "print('PEAK_RSS', hwm, file=sys.stderr); sys.exit(rc)")


def cli(*args: str, timeout: int = 300) -> tuple[int, str, str, int]:
    """Run the dbmef CLI in a child; returns (rc, stdout, stderr, peak RSS of that child in bytes)."""
    out = subprocess.run([sys.executable, "-c", _RUN_CLI, *args], capture_output=True, text=True, cwd=ROOT,
                         timeout=timeout)
    peak = [int(line.split()[1]) for line in out.stderr.splitlines() if line.startswith("PEAK_RSS")]
    return out.returncode, out.stdout, out.stderr, (peak[-1] if peak else 0) * 1024
