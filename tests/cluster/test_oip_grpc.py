"""The Open Inference Protocol's gRPC service against stock ``tritonclient.grpc``, in-process (no
Ray): a real grpcio server over a real ``ClassifierWorker`` on the committed digits bundle. The
service wiring inside a Serve replica is tested in test_serve.py."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest

grpcclient = pytest.importorskip("tritonclient.grpc")

from dbmef.apps.digits import demo_bundle_dir, demo_test_split, render  # noqa: E402
from dbmef.cluster.oip import ModelInfo  # noqa: E402
from dbmef.cluster.oip_grpc import start_server  # noqa: E402
from dbmef.runtime import RuntimeSpec  # noqa: E402
from dbmef.runtime.worker import ClassifierWorker, WorkerConfig  # noqa: E402
from tests.conftest import needs_ort  # noqa: E402

pytestmark = needs_ort


class WorkerBackend:
    """``oip_grpc.Backend`` over a ClassifierWorker, counting what the service reports."""

    def __init__(self, rt, config: WorkerConfig, ready: bool = True):
        self.worker = ClassifierWorker(rt.pipeline, config)
        self.model = ModelInfo("dbmef", "1", rt.config.k, len(rt.class_names), max_batch=16)
        self.ready, self.counted = ready, []

    def is_ready(self) -> bool:
        return self.ready

    def infer_images(self, images, deadline_s):
        futures = [self.worker.submit(im, f"request image {j}", deadline_s) for j, im in enumerate(images)]
        return [f.result() for f in futures]

    def count(self, endpoint, outcome, seconds):
        self.counted.append((endpoint, outcome))


def png(a) -> bytes:
    buf = io.BytesIO()
    render(a).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def system():
    """The digits bundle at k 5, V 5 (a rethink takes about a second here) and 12 test digits, a
    third rethought, with classify's answers."""
    split = demo_test_split()
    rt = RuntimeSpec(str(demo_bundle_dir()), scoring={"k": 5, "votes": 5}, batch_size=8).build()
    probs, _ = rt.backbone_scores([render(a) for a in split.images[:120]])
    rethink = rt.protector.rethink(probs.max(axis=1))
    chosen = list(np.flatnonzero(rethink)[:4]) + list(np.flatnonzero(~rethink)[:8])
    bodies = [png(split.images[j]) for j in chosen]
    yield rt, bodies, rt.classify(bodies)
    rt.close()


def serve(backend):
    server = start_server(backend, "test", 0, "127.0.0.1")
    return server, grpcclient.InferenceServerClient(f"127.0.0.1:{server.port}")


def image_input(bodies: list[bytes]):
    x = grpcclient.InferInput("image", [len(bodies), 1], "BYTES")
    x.set_data_from_numpy(np.array(bodies, dtype=object).reshape(-1, 1))
    return x


def test_stock_client_gets_classifys_answers_and_metadata(system):
    rt, bodies, want = system
    backend = WorkerBackend(rt, WorkerConfig(batch_size=8))
    server, client = serve(backend)
    try:
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("dbmef")
        assert not client.is_model_ready("other") and not client.is_model_ready("dbmef", "7")
        assert "binary_tensor_data" in client.get_server_metadata().extensions
        meta = client.get_model_metadata("dbmef", as_json=True)
        assert meta["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": ["-1", "1"]}]
        res = client.infer("dbmef", [image_input(bodies)], request_id="g-1")
        assert res.get_response().id == "g-1"
        assert list(res.as_numpy("label")) == [r.label for r in want]
        assert list(res.as_numpy("rethought")) == [r.rethought for r in want] and any(r.rethought for r in want)
        assert list(res.as_numpy("unet_evals")) == [r.unet_evals for r in want]
        assert res.as_numpy("topk").tolist() == [[c for c, _ in r.topk] for r in want]
        assert [x.decode() for x in res.as_numpy("class_name")] == [r.class_name for r in want]
        only = client.infer("dbmef", [image_input(bodies[:2])], outputs=[grpcclient.InferRequestedOutput("label")])
        assert only.get_response().outputs[0].name == "label" and len(only.get_response().outputs) == 1

        # typed contents (bytes_contents) instead of raw_input_contents: the same answer
        from tritonclient.grpc import service_pb2, service_pb2_grpc

        req = service_pb2.ModelInferRequest(model_name="dbmef")
        t = req.inputs.add(name="image", datatype="BYTES", shape=[2, 1])
        t.contents.bytes_contents.extend(bodies[:2])
        stub = service_pb2_grpc.GRPCInferenceServiceStub(client._channel)
        typed = stub.ModelInfer(req)
        labels = np.frombuffer(typed.raw_output_contents[0], "<i8")
        assert typed.outputs[0].name == "label" and labels.tolist() == [r.label for r in want[:2]]
    finally:
        server.stop(None)
        backend.worker.close()
    assert backend.counted.count(("grpc_infer", "success")) == 3


def test_errors_are_status_codes(system):
    rt, bodies, _ = system
    backend = WorkerBackend(rt, WorkerConfig(batch_size=8))
    server, client = serve(backend)
    try:
        def code(call):
            with pytest.raises(grpcclient.InferenceServerException) as e:
                call()
            return e.value.status(), e.value.message()

        wrong = grpcclient.InferInput("pixels", [1, 1], "BYTES")
        wrong.set_data_from_numpy(np.array([bodies[0]], dtype=object).reshape(1, 1))
        status, msg = code(lambda: client.infer("dbmef", [wrong]))
        assert status == "StatusCode.INVALID_ARGUMENT" and "unexpected inference input 'pixels'" in msg
        assert code(lambda: client.infer("resnet", [image_input(bodies[:1])]))[0] == "StatusCode.NOT_FOUND"
        assert code(lambda: client.infer("dbmef", [image_input([b"not an image"])]))[0] == \
            "StatusCode.INVALID_ARGUMENT"
        status, msg = code(lambda: client.infer("dbmef", [image_input(bodies[:1] * 17)]))
        assert status == "StatusCode.RESOURCE_EXHAUSTED" and "16-image limit" in msg
        bad_out = [grpcclient.InferRequestedOutput("logits")]
        assert "unknown output 'logits'" in code(lambda: client.infer("dbmef", [image_input(bodies[:1])],
                                                                      outputs=bad_out))[1]
        backend.ready = False
        assert not client.is_server_ready()
        assert code(lambda: client.infer("dbmef", [image_input(bodies[:1])]))[0] == "StatusCode.UNAVAILABLE"
    finally:
        server.stop(None)
        backend.worker.close()
    outcomes = [o for e, o in backend.counted if e == "grpc_infer"]
    assert outcomes == ["bad_request", "bad_request", "bad_request", "too_large", "bad_request", "unavailable"]


def test_the_client_deadline_is_the_requests_deadline(system):
    """A deadline shorter than a rethink gets the fast answer with rethink_skipped before the client
    gives up; under on_overload="reject" it is RESOURCE_EXHAUSTED instead."""
    rt, bodies, want = system
    re_j = next(j for j, r in enumerate(want) if r.rethought)
    for mode in ("fast_answer", "reject"):
        backend = WorkerBackend(rt, WorkerConfig(batch_size=8, on_overload=mode))
        server, client = serve(backend)
        try:
            client.infer("dbmef", [image_input([bodies[re_j]])])  # one full rethink: the worker knows its speed
            t0 = time.perf_counter()
            if mode == "reject":
                with pytest.raises(grpcclient.InferenceServerException) as e:
                    client.infer("dbmef", [image_input([bodies[re_j]])], client_timeout=0.5)
                assert e.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
            else:
                res = client.infer("dbmef", [image_input([bodies[re_j]])], client_timeout=0.5)
                assert res.as_numpy("rethink_skipped")[0] == b"deadline"
                assert res.as_numpy("label")[0] == want[re_j].backbone_label
            assert time.perf_counter() - t0 < 0.5
        finally:
            server.stop(None)
            backend.worker.close()
