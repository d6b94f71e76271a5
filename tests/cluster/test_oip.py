"""The Open Inference Protocol codec (no server): requests as stock ``tritonclient.http`` builds
them decode to the images sent, and responses parse back through tritonclient's own reader."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from dbmef.cluster.oip import ModelInfo, ProtocolError, decode_infer, encode_infer, model_metadata
from dbmef.runtime.results import ImageResult

httpclient = pytest.importorskip("tritonclient.http")
MODEL = ModelInfo("dbmef", "1", k=3, classes=10, max_batch=8)


def client_request(images: list[bytes], binary: bool = True, request_id: str = "", timeout: int | None = None,
                   outputs: list[str] | None = None) -> tuple[bytes, str | None]:
    """The body and Inference-Header-Content-Length tritonclient.http sends for these images."""
    from tritonclient.http._utils import _get_inference_request

    x = httpclient.InferInput("image", [len(images), 1], "BYTES")
    x.set_data_from_numpy(np.array(images, dtype=object).reshape(-1, 1), binary_data=binary)
    outs = [httpclient.InferRequestedOutput(o) for o in outputs] if outputs else None
    body, size = _get_inference_request([x], request_id, outs, 0, False, False, 0, timeout, None)
    return body, None if size is None else str(size)


def test_binary_and_json_requests_decode_to_the_images_sent():
    images = [b"\x89PNG first", b"", b"third \x00\xff image"]
    for binary in (True, False):
        body, size = client_request(images if binary else [base64.b64encode(i) for i in images], binary,
                                    request_id="req-7", timeout=2_500_000)
        req = decode_infer(body, size, MODEL)
        assert req.images == images and req.id == "req-7" and req.timeout_s == 2.5
        assert req.outputs[0] == "label" and all(req.binary.values())  # no outputs asked: all, binary


@pytest.mark.parametrize(("mutate", "status", "message"), [
    (lambda h: h["inputs"][0].update(name="pixels"), 400, "unexpected inference input 'pixels'"),
    (lambda h: h["inputs"][0].update(datatype="FP32"), 400, "datatype 'FP32'"),
    (lambda h: h["inputs"][0].update(shape=[2, 3]), 400, "shape"),
    (lambda h: h["inputs"][0].update(shape=[9, 1]), 413, "over the 8-image limit"),
    (lambda h: h.update(outputs=[{"name": "logits"}]), 400, "unknown output 'logits'"),
    (lambda h: h.setdefault("parameters", {}).update(timeout=-3), 400, "parameters.timeout"),
    # issue 35's probe: each of these was a bare 500 (or, for the last three, silently misread)
    (lambda h: h.update(outputs=[{"name": ["label"]}]), 400, r"outputs\[0\].name"),
    (lambda h: h.update(outputs=[{"name": "label", "parameters": [1]}]), 400, r"outputs\[0\].parameters"),
    (lambda h: h["inputs"][0].update(parameters="binary_data_size"), 400, r"inputs\[0\].parameters"),
    (lambda h: h["inputs"][0].update(parameters=7), 400, r"inputs\[0\].parameters"),
    (lambda h: h.update(parameters=[]), 400, "^parameters: .*dictionary"),
    (lambda h: h.update(outputs=[{"name": "label", "parameters": {"binary_data": "no"}}]), 400, "binary_data"),
    (lambda h: h.update(id={"a": 1}), 400, "^id: .*string"),
    (lambda h: h["inputs"][0].update(shape=[True, 1]), 400, r"inputs\[0\].shape\[0\]"),
    (lambda h: h.update(inputs=[]), 400, "^inputs: .*at least 1"),
    (lambda h: h.pop("inputs"), 400, "^inputs: Field required .*'image'"),
])
def test_bad_requests_are_refused_naming_the_problem(mutate, status, message):
    head = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1, 1],
                        "data": [base64.b64encode(b"img").decode()]}]}
    mutate(head)
    with pytest.raises(ProtocolError, match=message) as e:
        decode_infer(json.dumps(head).encode(), None, MODEL)
    assert e.value.status == status


def test_oversized_header_torn_binary_and_non_json_are_refused():
    body, size = client_request([b"abc"])
    with pytest.raises(ProtocolError, match="over the 16-byte limit") as e:
        decode_infer(body, size, MODEL, max_header_bytes=16)
    assert e.value.status == 413
    with pytest.raises(ProtocolError, match="binary_data_size"):
        decode_infer(body[:-1], size, MODEL)  # the binary section lost a byte
    with pytest.raises(ProtocolError, match="does not fit"):
        decode_infer(body, str(len(body) + 1), MODEL)
    with pytest.raises(ProtocolError, match="not valid JSON"):
        decode_infer(b"\xff\xfe{", None, MODEL)
    deep = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(ProtocolError):
        decode_infer(deep, None, MODEL)


def test_responses_parse_back_through_tritonclient():
    ok = ImageResult(0, "a", label=7, class_name="seven", rethought=True, backbone_label=1, max_prob=0.25,
                     topk=[(1, 0.25), (7, 0.2), (2, 0.1)], unet_evals=180)
    skipped = ImageResult(1, "b", label=3, class_name="three", backbone_label=3, max_prob=0.3,
                          topk=[(3, 0.3), (5, 0.2), (8, 0.1)], rethink_skipped="deadline")
    bad = ImageResult(2, "c", error="not a readable image")
    for binary in (True, False):
        body, size = client_request([b"x"] * 3, request_id="r1")
        req = decode_infer(body, size, MODEL)
        req.binary = dict.fromkeys(req.outputs, binary)
        payload, headers = encode_infer(req, [ok, skipped, bad], MODEL)
        header_length = headers.get("inference-header-content-length")
        res = httpclient.InferResult.from_response_body(payload, header_length=None if header_length is None
                                                        else int(header_length))
        assert res.get_response()["id"] == "r1"
        assert list(res.as_numpy("label")) == [7, 3, -1]
        assert [x.decode() if isinstance(x, bytes) else x for x in res.as_numpy("class_name")] == ["seven", "three",
                                                                                                   ""]
        assert list(res.as_numpy("rethought")) == [True, False, False]
        assert res.as_numpy("topk").tolist()[0] == [1, 7, 2] and res.as_numpy("topk").shape == (3, 3)
        np.testing.assert_allclose(res.as_numpy("topk_prob")[1], [0.3, 0.2, 0.1], rtol=1e-6)
        assert list(res.as_numpy("unet_evals")) == [180, 0, 0]
        skip = [x.decode() if isinstance(x, bytes) else x for x in res.as_numpy("rethink_skipped")]
        err = [x.decode() if isinstance(x, bytes) else x for x in res.as_numpy("error")]
        assert skip == ["", "deadline", ""] and err == ["", "", "not a readable image"]
    meta = model_metadata(MODEL)
    assert meta["inputs"][0] == {"name": "image", "datatype": "BYTES", "shape": [-1, 1]}
    assert {o["name"] for o in meta["outputs"]} >= {"label", "class_name", "rethought", "topk", "unet_evals"}
