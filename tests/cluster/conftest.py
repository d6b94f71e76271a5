"""Shared by the Ray tests: the runtime they all use and a labelled folder of test digits."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from dbmef.apps.digits import DIGIT_NAMES, demo_bundle_dir, demo_test_split, render
from dbmef.runtime import RuntimeSpec

N_IMAGES = 36
SPEC = RuntimeSpec(str(demo_bundle_dir()), batch_size=8)


# Ray cannot be shut down and started again safely in one process: threads of the first session
# can touch its freed core worker later, up to a crash at interpreter exit after every test passed
# (ray-project/ray#31145); and a Serve application started on a session Ray Data has used can
# fail to get its proxy up on a loaded 2-core machine. So the service tests and the multi-node
# tests (a cluster of their own) each run in a pytest process of their own (`make unit` runs
# them apart), and the rest share one local Ray session.
OWN_PROCESS = ("test_serve.py", "test_multinode.py")


# A process that ran a Ray cluster of its own (test_multinode) ends without Ray's driver shutdown: in
# CI, ray.shutdown() after both multi-node tests had passed let one of Ray's own threads touch the core
# worker it had just freed ("The core worker has already been shutdown ... The process will exit"), and
# the process ended with status 1 before pytest printed its summary. So its fixture leaves the driver
# up and names the cluster's processes here; once pytest has printed its summary they are killed and
# the process exits with pytest's own status, Ray's atexit shutdown never running.
KILL_AT_EXIT = pytest.StashKey[list[int]]()
RAY_FOLDER = pytest.StashKey[str]()  # that cluster's own Ray folder (RAY_TMPDIR), removed with it
EXIT_STATUS = pytest.StashKey[int]()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    session.config.stash[EXIT_STATUS] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    pids = config.stash.get(KILL_AT_EXIT, None)
    if pids is None:
        return
    for pid in with_descendants(pids):  # the raylets' agents and workers too: they outlive a killed raylet
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    # the cluster's own Ray folder, and with it what Cluster.shutdown would forget last: the cluster's
    # address (ray_current_cluster), which the next ray.init() there would take for a running cluster
    shutil.rmtree(config.stash[RAY_FOLDER], ignore_errors=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(config.stash.get(EXIT_STATUS, 1))


def with_descendants(pids: list[int]) -> list[int]:
    """``pids`` and every process below them (read from /proc), parents first."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, ...
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], list(pids)
    while todo:
        pid = todo.pop(0)
        out.append(pid)
        todo += [c for c in children.get(pid, []) if c not in out]
    return out


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    files = {i.path for i in items}
    for item in items:
        if item.path.name in OWN_PROCESS and item.path.parent.name == "cluster" and len(files) > 1:
            item.add_marker(pytest.mark.skip(reason=f"starts Ray of its own: run `pytest tests/cluster/"
                                                    f"{item.path.name}` in a separate process (`make unit` does)"))


@pytest.fixture(scope="session")
def local_ray():
    """One local Ray instance (loopback, 2 CPUs) for every local Ray test of the session."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def digits_folder(tmp_path_factory) -> Path:
    """An ImageFolder of test digits (class-name folders), chosen so about a third are rethought,
    plus one corrupt file."""
    root = tmp_path_factory.mktemp("digits")
    split = demo_test_split()
    with SPEC.build() as rt:
        probs, _ = rt.backbone_scores([render(a) for a in split.images])
        rethink = rt.protector.rethink(probs.max(axis=1))
    chosen = list(np.flatnonzero(rethink)[:12]) + list(np.flatnonzero(~rethink)[: N_IMAGES - 12])
    for j in chosen:
        d = root / DIGIT_NAMES[split.labels[j]]
        d.mkdir(exist_ok=True)
        render(split.images[j]).save(d / f"digit{split.indices[j]}.png")
    (root / "three" / "corrupt.png").write_bytes(b"\x89PNG not really")
    return root


def same_record(a: dict, b: dict) -> None:
    """Two results-file records of one image agree (answers exactly, floats to 1e-6)."""
    for f in ("label", "rethought", "backbone_label", "candidates", "votes", "label_true", "correct"):
        assert a[f] == b[f], (a["image"], f, a[f], b[f])
    assert (a["error"] is None) == (b["error"] is None)
    if a["noise_errors"]:
        np.testing.assert_allclose(a["noise_errors"], b["noise_errors"], rtol=1e-6)
    np.testing.assert_allclose([p for _, p in a["topk"]], [p for _, p in b["topk"]], rtol=1e-6)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(url: str, body: bytes | None = None, method: str = "POST") -> tuple[int, dict, bytes]:
    req = urllib.request.Request(url, data=body, method=method)
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            raw = r.read()
            status = r.status
    except urllib.error.HTTPError as e:
        raw, status = e.read(), e.code
    try:
        return status, json.loads(raw), raw
    except ValueError:
        return status, {}, raw


def wait_ready(base: str, timeout: float = 180, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if request(base + "/v2/health/ready", method="GET")[0] == 200:
                return
        except (urllib.error.URLError, ConnectionError):
            pass
        time.sleep(0.5)
    said = ""
    if proc is not None:  # what the service printed, to say why
        proc.kill()
        said = (proc.communicate(timeout=30)[0] or "")[-3000:]
    raise AssertionError(f"service did not become ready in {timeout:.0f} s {said}")
