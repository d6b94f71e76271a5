"""``dbmef serve`` as its operators meet it, on a local Ray instance (loopback, 2 CPUs) with the
committed digits bundle: stock ``tritonclient.http`` against the Open Inference Protocol,
``/metrics`` after known traffic, bad input, slow clients and bombs, and (in a child process)
SIGTERM draining in-flight requests and leaving no Ray process behind."""

from __future__ import annotations

import concurrent.futures as cf
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")
httpclient = pytest.importorskip("tritonclient.http")

from dbmef.apps.digits import DIGIT_NAMES, demo_bundle_dir, demo_test_split, render  # noqa: E402
from dbmef.cluster import RuntimeSpec  # noqa: E402
from tests.cluster.conftest import free_port, request, wait_ready  # noqa: E402

SPEC = RuntimeSpec(str(demo_bundle_dir()), batch_size=8)


def png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    render(a).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def digits() -> tuple[list[bytes], list[bool]]:
    """24 test digits as PNG bodies, a third of them rethought by the bundle's protector."""
    split = demo_test_split()
    with SPEC.build() as rt:
        probs, _ = rt.backbone_scores([render(a) for a in split.images])
        rethink = rt.protector.rethink(probs.max(axis=1))
    chosen = list(np.flatnonzero(rethink)[:8]) + list(np.flatnonzero(~rethink)[:16])
    return [png(split.images[j]) for j in chosen], [bool(rethink[j]) for j in chosen]


@pytest.fixture(scope="module")
def service(local_ray):
    from ray import serve

    from dbmef.cluster.serve import ServeConfig, start
    from dbmef.runtime.worker import WorkerConfig

    port, grpc_port = free_port(), free_port()
    start(SPEC, ServeConfig(WorkerConfig(batch_size=8, batch_wait_s=0.05, deadline_s=60.0), max_body_bytes=50_000,
                            body_timeout_s=4.0, max_header_bytes=4096, max_images_per_request=32,
                            grpc_port=grpc_port), port=port)
    base = f"http://127.0.0.1:{port}"
    wait_ready(base)
    yield port, base, grpc_port
    serve.shutdown()


def metric(text: str, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


def test_tritonclient_against_the_service_and_metrics_after_known_traffic(service, digits):
    port, base, _ = service
    bodies, rethink = digits
    client = httpclient.InferenceServerClient(f"127.0.0.1:{port}")
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("dbmef")
    assert not client.is_model_ready("other")
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    meta = client.get_model_metadata("dbmef")
    assert meta["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1, 1]}]
    before = request(base + "/metrics", method="GET")[2].decode()

    with SPEC.build() as rt:
        want = rt.classify(bodies)
    x = httpclient.InferInput("image", [len(bodies), 1], "BYTES")
    x.set_data_from_numpy(np.array(bodies, dtype=object).reshape(-1, 1))  # binary data: the client's default
    res = client.infer("dbmef", [x], request_id="batch-1")
    assert res.get_response()["id"] == "batch-1"
    assert list(res.as_numpy("label")) == [r.label for r in want]
    assert list(res.as_numpy("rethought")) == [r.rethought for r in want] == rethink
    assert list(res.as_numpy("unet_evals")) == [r.unet_evals for r in want]
    np.testing.assert_allclose(res.as_numpy("max_prob"), [r.max_prob for r in want], rtol=1e-6)
    assert res.as_numpy("topk").tolist() == [[c for c, _ in r.topk] for r in want]

    def one(body: bytes) -> int:  # concurrent single-image requests, each its own client
        c = httpclient.InferenceServerClient(f"127.0.0.1:{port}")
        y = httpclient.InferInput("image", [1, 1], "BYTES")
        y.set_data_from_numpy(np.array([body], dtype=object).reshape(1, 1))
        return int(c.infer("dbmef", [y], outputs=[httpclient.InferRequestedOutput("label")]).as_numpy("label")[0])

    with cf.ThreadPoolExecutor(8) as ex:
        assert list(ex.map(one, bodies[:8])) == [r.label for r in want[:8]]

    bad = httpclient.InferInput("pixels", [1, 1], "BYTES")
    bad.set_data_from_numpy(np.array([bodies[0]], dtype=object).reshape(1, 1))
    with pytest.raises(httpclient.InferenceServerException) as e:
        client.infer("dbmef", [bad])
    assert e.value.status() == "400" and "unexpected inference input 'pixels'" in e.value.message()
    big = httpclient.InferInput("image", [1, 1], "BYTES")  # JSON data: the image inside a 5 kB header
    big.set_data_from_numpy(np.array([b"A" * 5000], dtype=object).reshape(1, 1), binary_data=False)
    with pytest.raises(httpclient.InferenceServerException) as e:
        client.infer("dbmef", [big])
    assert e.value.status() == "413" and "4096-byte limit" in e.value.message()
    with pytest.raises(httpclient.InferenceServerException) as e:
        client.infer("resnet", [x])
    assert e.value.status() == "404"

    after = request(base + "/metrics", method="GET")[2].decode()

    def grew(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert grew("dbmef_requests_total", endpoint="infer", outcome="success") == 1 + 8
    assert grew("dbmef_requests_total", endpoint="infer", outcome="bad_request") == 2  # wrong input, unknown model
    assert grew("dbmef_requests_total", endpoint="infer", outcome="too_large") == 1
    n_re = sum(rethink) + sum(rethink[:8])
    assert grew("dbmef_rethought_total") == n_re
    assert grew("dbmef_images_total", path="fast") == (len(bodies) - sum(rethink)) + (8 - sum(rethink[:8]))
    assert grew("dbmef_unet_evaluations_total") == sum(r.unet_evals for r in want) + sum(r.unet_evals for r in want[:8])
    assert metric(after, "dbmef_engine_rows_total", kind="sent") >= metric(after, "dbmef_engine_rows_total",
                                                                          kind="needed") > 0
    assert metric(after, "dbmef_queue_wait_seconds_count", path="slow") >= n_re


def test_stock_grpc_client_gets_the_http_answers_and_is_counted(service, digits):
    """One running service, both transports: tritonclient.grpc gets classify's labels (issue 35)."""
    grpcclient = pytest.importorskip("tritonclient.grpc")
    _, base, grpc_port = service
    bodies, rethink = digits
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("dbmef")
    before = request(base + "/metrics", method="GET")[2].decode()
    with SPEC.build() as rt:
        want = rt.classify(bodies)
    x = grpcclient.InferInput("image", [len(bodies), 1], "BYTES")
    x.set_data_from_numpy(np.array(bodies, dtype=object).reshape(-1, 1))
    res = client.infer("dbmef", [x], request_id="g-1", client_timeout=120)
    assert res.get_response().id == "g-1"
    assert list(res.as_numpy("label")) == [r.label for r in want]
    assert list(res.as_numpy("rethought")) == [r.rethought for r in want] == rethink
    with pytest.raises(grpcclient.InferenceServerException) as e:
        client.infer("resnet", [x])
    assert e.value.status() == "StatusCode.NOT_FOUND"
    after = request(base + "/metrics", method="GET")[2].decode()
    assert metric(after, "dbmef_requests_total", endpoint="grpc_infer", outcome="success") - metric(
        before, "dbmef_requests_total", endpoint="grpc_infer", outcome="success") == 1
    assert metric(after, "dbmef_requests_total", endpoint="grpc_infer", outcome="bad_request") >= 1


def test_malformed_oip_json_is_a_counted_400(service):
    """Issue 35's probe: these were bare 500s that /metrics did not count."""
    _, base, _ = service
    before = request(base + "/metrics", method="GET")[2].decode()
    head = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1, 1], "data": ["eA=="]}]}
    for bad in ({**head, "outputs": [{"name": ["label"]}]}, {**head, "outputs": [{"name": "label", "parameters": []}]},
                {"inputs": [{**head["inputs"][0], "parameters": "x"}]}):
        status, err, _ = request(base + "/v2/models/dbmef/infer", json.dumps(bad).encode())
        assert status == 400 and ("parameters" in err["error"] or "name" in err["error"]), err
    after = request(base + "/metrics", method="GET")[2].decode()
    assert metric(after, "dbmef_requests_total", endpoint="infer", outcome="bad_request") - metric(
        before, "dbmef_requests_total", endpoint="infer", outcome="bad_request") == 3
    assert metric(after, "dbmef_ready") == 1


def test_rayservice_probes_point_at_real_routes(service):
    """deploy/rayservice.yaml is valid YAML; its serve config is deploy/serve.yaml's application with
    the bundle at /bundle; every probe's path answers 200 on a running service; the pods' grace
    period exceeds the drain."""
    import yaml

    _, base, _ = service
    root = Path(__file__).resolve().parents[2] / "deploy"
    svc = yaml.safe_load((root / "rayservice.yaml").read_text())
    local = yaml.safe_load((root / "serve.yaml").read_text())
    served = yaml.safe_load(svc["spec"]["serveConfigV2"])
    app, app_local = served["applications"][0], local["applications"][0]
    assert app["import_path"] == app_local["import_path"] == "dbmef.cluster.serve:app"
    assert app["args"]["bundle"] == "/bundle" and app["args"]["grpc_port"] == app_local["args"]["grpc_port"]
    cluster = svc["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"]
                                                             for g in cluster["workerGroupSpecs"]]
    probes = [c[k] for pod in pods for c in pod["containers"] for k in c if k.endswith("Probe")]
    assert len(probes) >= 3
    for probe in probes:
        assert probe["httpGet"]["port"] == served["http_options"]["port"]
        assert request(base + probe["httpGet"]["path"], method="GET")[0] == 200, probe
    assert all(pod["terminationGracePeriodSeconds"] > app["args"]["graceful_shutdown_s"] for pod in pods)


def test_classify_route_bad_input_and_exact_routes(service, digits):
    port, base, _ = service
    bodies = digits[0]
    with SPEC.build() as rt:
        want = rt.classify(bodies[:4])
    with cf.ThreadPoolExecutor(4) as ex:
        answers = list(ex.map(lambda b: request(base + "/classify", b), bodies[:4]))
    for (status, got, _), w in zip(answers, want):
        assert status == 200 and got["label"] == w.label and got["rethought"] == w.rethought
        if w.rethought:
            np.testing.assert_allclose(got["noise_errors"], w.noise_errors, rtol=1e-6)
    status, err, _ = request(base + "/classify", b"this is not an image")
    assert status == 400 and "not a readable image" in err["error"]
    assert request(base + "/classify", b"\0" * 60_000)[0] == 413
    assert request(base + "/classify", b"")[0] == 400
    assert request(base + "/classify", method="GET")[0] == 405
    for path in ("/nope", "/anything/classify", "/x/../classify", "/classify/extra", "/v2/models/dbmef/x"):
        assert request(base + path, bodies[0])[0] == 404, path
    status, health, _ = request(base + "/healthz", method="GET")
    assert status == 200 and health["classes"] == 10 and health["max_body_bytes"] == 50_000
    slow_clients_and_bombs(port, bodies[0])


def slow_clients_and_bombs(port: int, good: bytes) -> None:
    """200 clients that send headers and 10 bytes of a 40 kB body (under this service's 50 kB
    limit, so only the body deadline can end them) do not stall the service: health and a good
    request are answered while they hang (before their 4 s body deadline cuts them off), a
    decompression bomb fails only its own request (400), and the slow clients get 408."""
    from tests.conftest import png_declaring

    base = f"http://127.0.0.1:{port}"
    slow = []
    for _ in range(200):
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        s.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Length: 40000\r\n\r\n" + b"0123456789")
        slow.append(s)
    try:
        time.sleep(0.5)
        assert request(base + "/v2/health/ready", method="GET")[0] == 200
        with cf.ThreadPoolExecutor(2) as ex:
            bomb = ex.submit(request, base + "/classify", png_declaring(30000, 30000))
            status, ok, _ = request(base + "/classify", good)
        assert status == 200 and ok["class_name"] in DIGIT_NAMES
        first = slow[0].recv(200, socket.MSG_DONTWAIT) if _readable(slow[0]) else b""
        assert b" 408 " not in first  # answered while the slow uploads still hang: they were not waited for
        status, err, _ = bomb.result()
        assert status == 400 and "decompression-bomb guard" in err["error"]
        cut = 0
        for s in slow:  # each gets 408 once its 4 s body deadline passes
            try:
                cut += b" 408 " in s.recv(200)
            except OSError:
                pass
        assert cut >= 190, cut
    finally:
        for s in slow:
            s.close()


def _readable(s: socket.socket) -> bool:
    import select

    return bool(select.select([s], [], [], 0)[0])


def ray_processes(tmp: Path) -> list[str]:
    """Processes whose command line names this Ray session's temporary folder."""
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout.splitlines()
    return [line for line in out if str(tmp) in line and "ps -eo" not in line]


def test_serve_run_starts_the_deploy_config(digits, tmp_path):
    """`serve run deploy/serve.yaml` (Ray Serve's own CLI, from the repository root) starts the
    service, which answers over HTTP and gRPC; Ctrl-C stops it. Only the ports are changed."""
    import yaml

    grpcclient = pytest.importorskip("tritonclient.grpc")
    root = Path(__file__).resolve().parents[2]
    cfg = yaml.safe_load((root / "deploy" / "serve.yaml").read_text())
    port, grpc_port = free_port(), free_port()
    cfg["http_options"].update(host="127.0.0.1", port=port)
    cfg["applications"][0]["args"].update(grpc_port=grpc_port, grpc_host="127.0.0.1")
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([str(Path(sys.executable).parent / "serve"), "run", str(tmp_path / "serve.yaml")],
                            cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, timeout=240, proc=proc)
        bodies = digits[0][:3]
        with SPEC.build() as rt:
            want = [r.label for r in rt.classify(bodies)]
        assert [request(base + "/classify", b)[1]["label"] for b in bodies] == want
        x = grpcclient.InferInput("image", [len(bodies), 1], "BYTES")
        x.set_data_from_numpy(np.array(bodies, dtype=object).reshape(-1, 1))
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        assert list(client.infer("dbmef", [x]).as_numpy("label")) == want
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert "Traceback" not in out, out[-3000:]


def test_sigterm_drains_in_flight_requests_and_leaves_no_ray_process(digits):
    import shutil
    import tempfile

    bodies, rethink = digits
    port = free_port()
    tmp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: Ray's unix sockets live under it
    env = {**os.environ, "RAY_TMPDIR": str(tmp), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "dbmef.apps.cli", "serve", "--bundle", str(demo_bundle_dir()),
                             "--port", str(port), "--k", "5", "--votes", "5", "--graceful-shutdown-s", "60"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, timeout=240, proc=proc)
        slow = [b for b, r in zip(bodies, rethink) if r][:4]  # rethinks at k = 5, V = 5: seconds each
        with cf.ThreadPoolExecutor(len(slow)) as ex:
            inflight = [ex.submit(request, base + "/classify", b) for b in slow]
            time.sleep(1.0)  # the requests are in the service
            proc.send_signal(signal.SIGTERM)
            answers = [f.result() for f in inflight]
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert [a[0] for a in answers] == [200] * len(slow), answers
    assert all(a[1]["rethought"] for a in answers)
    assert proc.returncode == 0, out[-3000:]
    assert "SIGTERM: draining" in out and "Traceback" not in out
    # a clean stop prints no failure and a start no notice of Ray's secure default (issue 40)
    assert "graceful_shutdown failed" not in out and "Token authentication is enabled" not in out, out[-3000:]
    time.sleep(2)
    assert ray_processes(tmp) == []
    shutil.rmtree(tmp, ignore_errors=True)
