"""A real multi-node Ray cluster on one machine (``ray.cluster_utils.Cluster``: a head and worker
nodes, each its own raylet with its own resources): ``eval --ray`` places its actors on both
workers and answers as the single process does; a worker node removed mid-evaluation still
yields a complete, identical results file; ``serve`` with two replicas on two nodes answers the
same."""

from __future__ import annotations

import os
import tempfile
import threading
import time

import numpy as np
import pytest

ray = pytest.importorskip("ray")
httpclient = pytest.importorskip("tritonclient.http")

from dbmef.runtime.data import load_labelled  # noqa: E402
from dbmef.runtime.evaluate import evaluate, read_results  # noqa: E402
from tests.cluster.conftest import KILL_AT_EXIT, N_IMAGES, RAY_FOLDER, SPEC, same_record  # noqa: E402

WORKER = {"num_cpus": 2, "include_dashboard": False}


@pytest.fixture(scope="module")
def cluster(request):
    from ray import serve
    from ray.cluster_utils import Cluster

    # A Ray folder of its own: a Cluster writes its address to <Ray folder>/ray_current_cluster, where
    # any ray.init() on the machine would find and join it (`make test` runs the service tests beside
    # this file). Short: Ray's unix sockets live under it.
    os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="raymn", dir="/tmp")
    request.config.stash[RAY_FOLDER] = os.environ["RAY_TMPDIR"]
    # The head keeps 1 CPU (read tasks); each actor asks for 2, so actors only fit on the workers.
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    workers = [c.add_node(**WORKER), c.add_node(**WORKER)]
    ray.init(address=c.address, log_to_driver=False)
    c.wait_for_nodes()
    yield c, workers
    serve.shutdown()
    # no ray.shutdown(): the process ends after pytest's summary, the cluster's processes killed then
    # (tests/cluster/conftest.py, KILL_AT_EXIT: why)
    request.config.stash[KILL_AT_EXIT] = [info.process.pid for node in c.list_all_nodes()
                                          for infos in node.all_processes.values() for info in infos]


def single_process(digits_folder, tmp_path):
    with SPEC.build() as rt:
        items = load_labelled(digits_folder, rt.class_names)
        evaluate(rt, items, tmp_path / "single.jsonl")
    return items, read_results(tmp_path / "single.jsonl")


def test_eval_on_two_worker_nodes_survives_losing_one(cluster, digits_folder, tmp_path):
    from dbmef.cluster.ray_eval import ray_evaluate

    c, workers = cluster
    items, want = single_process(digits_folder, tmp_path)
    kw = {"batch_size": 4, "fast_actors": 1, "rethink_actors": 1, "cpus_per_actor": 2.0}
    summary = ray_evaluate(SPEC, items, tmp_path / "two.jsonl", **kw)
    got = read_results(tmp_path / "two.jsonl")
    assert set(got) == set(want)
    for key in want:
        same_record(want[key], got[key])
    placed = summary["ray_nodes"]  # each stage's actor takes a whole worker node: one on each
    assert {*placed["fast"], *placed["rethink"]} == {w.node_id for w in workers}
    assert len(placed["fast"]) == len(placed["rethink"]) == 1 and placed["fast"] != placed["rethink"]

    # Lose a worker node once a few records are in; a new node joins, as an autoscaler's would.
    path = tmp_path / "lost.jsonl"
    errors: list[BaseException] = []

    def run() -> None:
        try:
            ray_evaluate(SPEC, items, path, **kw)
        except BaseException as exc:  # Ray gave up on the lost node's work: the resume rule finishes it
            errors.append(exc)

    t = threading.Thread(target=run)
    t.start()
    deadline = time.time() + 300
    while time.time() < deadline and (not path.exists() or len(path.read_text().splitlines()) < 6):
        time.sleep(0.2)
    c.remove_node(workers[1])
    workers[1] = c.add_node(**WORKER)
    t.join(600)
    assert not t.is_alive()
    if errors:
        ray_evaluate(SPEC, items, path, **kw)  # resumes: only what the lost node had not answered
    got = read_results(path)
    assert set(got) == set(want) and len(got) == N_IMAGES + 1
    for key in want:
        same_record(want[key], got[key])
    assert len(path.read_text().splitlines()) == 1 + N_IMAGES + 1  # header + each image exactly once


def test_serve_with_two_replicas_on_two_nodes(cluster, digits_folder):
    from ray import serve

    from dbmef.cluster.serve import ServeConfig, start
    from tests.cluster.conftest import free_port, request, wait_ready

    workers = cluster[1]
    port = free_port()
    start(SPEC, ServeConfig(replicas=2, max_replicas_per_node=1, cpus_per_replica=2.0, proxy_location="HeadOnly"),
          port=port)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_ready(base, timeout=300)
        seen: set[str] = set()
        deadline = time.time() + 120  # readiness answers once one replica is ready: ask until both answer
        while len(seen) < 2 and time.time() < deadline:
            status, health, _ = request(base + "/healthz", method="GET")
            if status == 200:
                seen.add(health["node"])
        assert seen == {w.node_id for w in workers}
        bodies = [p.read_bytes() for p in sorted(digits_folder.rglob("digit*.png"))[:12]]
        with SPEC.build() as rt:
            want = rt.classify(bodies)
        client = httpclient.InferenceServerClient(f"127.0.0.1:{port}", concurrency=4)
        labels, rethought = [], []
        for b in bodies:  # one request each, spread over the replicas by Serve's router
            x = httpclient.InferInput("image", [1, 1], "BYTES")
            x.set_data_from_numpy(np.array([b], dtype=object).reshape(1, 1))
            res = client.infer("dbmef", [x])
            labels.append(int(res.as_numpy("label")[0]))
            rethought.append(bool(res.as_numpy("rethought")[0]))
        assert labels == [r.label for r in want] and rethought == [r.rethought for r in want]
    finally:
        serve.shutdown()
