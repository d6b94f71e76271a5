"""Ray Data evaluation and the Ray Serve service on a local Ray instance (loopback, 2 CPUs),
with the committed digits bundle: a calibrated system, so some images are rethought and some not."""

from __future__ import annotations

import concurrent.futures as cf
import io
import json
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from dbmef.apps.digits import DIGIT_NAMES, demo_bundle_dir, demo_test_split, render  # noqa: E402
from dbmef.cluster import RuntimeSpec  # noqa: E402
from dbmef.runtime.data import load_labelled  # noqa: E402
from dbmef.runtime.evaluate import evaluate, read_results  # noqa: E402

N_IMAGES = 36
SPEC = RuntimeSpec(str(demo_bundle_dir()), batch_size=8)


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
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


def _same(a: dict, b: dict) -> None:
    for f in ("label", "rethought", "backbone_label", "candidates", "votes", "label_true", "correct"):
        assert a[f] == b[f], (a["image"], f, a[f], b[f])
    assert (a["error"] is None) == (b["error"] is None)
    if a["noise_errors"]:
        np.testing.assert_allclose(a["noise_errors"], b["noise_errors"], rtol=1e-6)
    np.testing.assert_allclose([p for _, p in a["topk"]], [p for _, p in b["topk"]], rtol=1e-6)


def test_ray_data_eval_equals_single_process_image_by_image_and_resumes(local_ray, digits_folder, tmp_path):
    from dbmef.cluster.ray_eval import ray_evaluate

    with SPEC.build() as rt:
        items = load_labelled(digits_folder, rt.class_names)
        single = evaluate(rt, items, tmp_path / "single.jsonl")
    assert single["n_errors"] == 1 and 0 < single["rethink_rate"] < 1
    # Start from a results file that already holds a third of the images (as a crashed run
    # leaves it, torn last line included): the Ray run must finish exactly the rest.
    lines = (tmp_path / "single.jsonl").read_text().splitlines()
    part = tmp_path / "ray.jsonl"
    part.write_text("\n".join(lines[:12]) + "\n" + lines[12][:40])
    dist = ray_evaluate(SPEC, items, part, batch_size=5, fast_actors=1, rethink_actors=1)
    a, b = read_results(tmp_path / "single.jsonl"), read_results(part)
    assert set(a) == set(b) and len(a) == N_IMAGES + 1
    for key in a:
        _same(a[key], b[key])
    assert len(part.read_text().splitlines()) == 1 + N_IMAGES + 1  # the header, then each image once
    for k in ("n_images", "n_errors", "backbone_accuracy", "dbmef_accuracy", "rethink_rate",
              "flips_true_to_false", "flips_false_to_true"):
        assert dist[k] == single[k], k


def test_calibrate_on_ray_gives_the_single_process_curve(local_ray, digits_folder, tmp_path):
    """``dbmef calibrate --ray``: the rethink-all pass as a Ray Data pipeline; the same curve."""
    from dbmef.apps.calibrate import calibrate_operating_point

    with SPEC.build() as rt:
        items = load_labelled(digits_folder, rt.class_names)
    kw = {"rule": "max_rethink_rate", "value": 0.5, "data": "digits", "write": False}
    a = calibrate_operating_point(SPEC, items, results=tmp_path / "a.jsonl", **kw)
    b = calibrate_operating_point(SPEC, items, results=tmp_path / "b.jsonl", ray="local", **kw)
    assert a["n_images"] == b["n_images"] == N_IMAGES and a["n_unreadable"] == b["n_unreadable"] == 1
    assert a["unet_evaluations"] == b["unet_evaluations"] and b["device"].startswith("Ray")
    keys = ("threshold", "rethink_rate", "accuracy", "fixed", "broken", "unet_evals_per_image", "prot")
    assert [[p[k] for k in keys] for p in a["curve"]] == [[p[k] for k in keys] for p in b["curve"]]
    assert a["chosen"]["point"]["threshold"] == b["chosen"]["point"]["threshold"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(url: str, body: bytes | None = None, method: str = "POST") -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, method=method)
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_serve_batches_concurrent_requests_and_rejects_bad_input(local_ray, digits_folder):
    from ray import serve

    from dbmef.cluster.serve import ServeConfig, start

    port = _free_port()
    start(SPEC, ServeConfig(max_batch_size=8, batch_wait_ms=300, max_body_bytes=50_000, body_timeout_s=4.0),
          port=port)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                status, health = _request(base + "/healthz", method="GET")
                if status == 200:
                    break
            except (urllib.error.URLError, ConnectionError):
                pass
            assert time.time() < deadline, "service did not come up"
            time.sleep(1)
        assert health["classes"] == 10 and health["max_body_bytes"] == 50_000

        paths = sorted(p for p in digits_folder.rglob("digit*.png"))[:10]
        bodies = [p.read_bytes() for p in paths]
        with cf.ThreadPoolExecutor(len(bodies)) as ex:
            answers = list(ex.map(lambda b: _request(base + "/classify", b), bodies))
        with SPEC.build() as rt:
            expected = rt.classify(bodies)
        for (status, got), want in zip(answers, expected):
            assert status == 200, got
            assert got["label"] == want.label and got["rethought"] == want.rethought
            assert got["class_name"] == want.class_name
            if want.rethought:
                np.testing.assert_allclose(got["noise_errors"], want.noise_errors, rtol=1e-6)
        assert max(a["batch_size"] for _, a in answers) > 1  # concurrent requests shared a batch

        status, err = _request(base + "/classify", b"this is not an image")
        assert status == 400 and "not a readable image" in err["error"]
        status, err = _request(base + "/classify", b"\0" * 60_000)
        assert status == 413 and "limit" in err["error"]
        status, err = _request(base + "/classify", b"")
        assert status == 400 and "empty body" in err["error"]
        assert _request(base + "/classify", method="GET")[0] == 405
        assert _request(base + "/nope", b"x")[0] == 404
        buf = io.BytesIO()
        render(demo_test_split().images[0]).save(buf, "PNG")
        status, ok = _request(base + "/classify", buf.getvalue())  # still serving after the bad ones
        assert status == 200 and ok["class_name"] in DIGIT_NAMES
        slow_clients_and_bombs(port, buf.getvalue())
    finally:
        serve.shutdown()


def slow_clients_and_bombs(port: int, good: bytes) -> None:
    """Issue 15: 200 clients that send headers and 10 bytes of a 40 kB body (under this service's
    50 kB limit, so only the body deadline can end them) do not stall the service: health and a
    good request answer within 2 s, a decompression bomb fails only its own request (400), and the
    slow clients are cut off with 408 after the body deadline."""
    from tests.runtime.test_hostile_input import png_declaring

    base = f"http://127.0.0.1:{port}"
    slow = []
    for _ in range(200):
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        s.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Length: 40000\r\n\r\n" + b"0123456789")
        slow.append(s)
    try:
        time.sleep(0.5)
        t0 = time.time()
        assert _request(base + "/healthz", method="GET")[0] == 200
        with cf.ThreadPoolExecutor(2) as ex:
            bomb = ex.submit(_request, base + "/classify", png_declaring(30000, 30000))
            status, ok = _request(base + "/classify", good)
        assert status == 200 and ok["class_name"] in DIGIT_NAMES
        assert time.time() - t0 < 2.0
        status, err = bomb.result()
        assert status == 400 and "decompression-bomb guard" in err["error"]
        cut, got = 0, []
        for s in slow:  # each gets 408 once its 4 s body deadline passes
            try:
                got.append(s.recv(200))
                cut += b" 408 " in got[-1]
            except OSError:
                pass
        assert cut >= 190, (cut, got[:2])
    finally:
        for s in slow:
            s.close()
