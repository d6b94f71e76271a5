"""The Open Inference Protocol (KServe v2, NVIDIA Triton's HTTP/REST API) for a dbmef model.

Pure functions over bytes and dicts, so the protocol is tested without a server and any HTTP
front can use it. What dbmef speaks:

* one input, ``image``: BYTES of shape ``[N, 1]`` (or ``[N]``), each element one encoded image
  (JPEG, PNG, ...). As JSON ``data`` each element is a base64 string; with the binary tensor data
  extension (what ``tritonclient.http`` sends by default) the raw bytes follow the JSON header,
  each element a 4-byte little-endian length and then its bytes.
* outputs (all by default; ``outputs`` picks some): ``label`` INT64 [N], ``class_name`` BYTES [N],
  ``rethought`` BOOL [N], ``max_prob`` FP32 [N], ``backbone_label`` INT64 [N], ``topk`` INT64 [N, k]
  and ``topk_prob`` FP32 [N, k] (the backbone's candidates), ``unet_evals`` INT64 [N],
  ``rethink_skipped`` BYTES [N] (empty, or why a rethink was not done), ``error`` BYTES [N] (empty,
  or why that image could not be read; its other outputs are then -1 / empty / NaN).
* ``parameters.timeout``: microseconds the client waits (Triton's unit); the request's
  deadline. The request ``id`` is echoed.

Errors are ``{"error": "..."}`` with a 4xx status (``ProtocolError.status``).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

from dbmef.errors import DBMEFError
from dbmef.runtime.results import ImageResult

__all__ = ["InferRequest", "ModelInfo", "ProtocolError", "decode_infer", "encode_infer", "model_metadata",
           "server_metadata"]

OUTPUTS = ("label", "class_name", "rethought", "max_prob", "backbone_label", "topk", "topk_prob", "unet_evals",
           "rethink_skipped", "error")
_NP = {"INT64": np.int64, "FP32": np.float32, "BOOL": np.bool_}


class ProtocolError(DBMEFError):
    """A request the protocol layer refuses; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ModelInfo:
    """What the server says of its one model."""

    name: str
    version: str
    k: int
    classes: int
    platform: str = "dbmef"
    max_batch: int = 64  # images per request

    def outputs(self) -> list[tuple[str, str, list[int]]]:
        k = self.k
        return [("label", "INT64", [-1]), ("class_name", "BYTES", [-1]), ("rethought", "BOOL", [-1]),
                ("max_prob", "FP32", [-1]), ("backbone_label", "INT64", [-1]), ("topk", "INT64", [-1, k]),
                ("topk_prob", "FP32", [-1, k]), ("unet_evals", "INT64", [-1]), ("rethink_skipped", "BYTES", [-1]),
                ("error", "BYTES", [-1])]


def server_metadata(version: str) -> dict[str, Any]:
    return {"name": "dbmef", "version": version, "extensions": ["binary_tensor_data"]}


def model_metadata(m: ModelInfo) -> dict[str, Any]:
    return {"name": m.name, "versions": [m.version], "platform": m.platform,
            "inputs": [{"name": "image", "datatype": "BYTES", "shape": [-1, 1]}],
            "outputs": [{"name": n, "datatype": d, "shape": s} for n, d, s in m.outputs()]}


@dataclass
class InferRequest:
    id: str | None
    images: list[bytes]
    timeout_s: float | None  # the client's deadline, seconds from now
    outputs: list[str]  # in the order to answer them
    binary: dict[str, bool]  # output -> answer as binary data


def _header(body: bytes, header_length: str | None, max_header_bytes: int) -> tuple[dict[str, Any], bytes]:
    """Split the body into the JSON header and the binary section."""
    if header_length is None:
        size = len(body)
    else:
        try:
            size = int(header_length)
        except ValueError:
            raise ProtocolError(f"Inference-Header-Content-Length {header_length!r} is not a byte count") from None
        if size < 0 or size > len(body):
            raise ProtocolError(f"Inference-Header-Content-Length {size} does not fit the {len(body)}-byte body")
    if size > max_header_bytes:
        raise ProtocolError(f"the JSON inference header is {size} bytes, over the {max_header_bytes}-byte limit; "
                            "send images as binary tensor data, not in the header", 413)
    try:
        head = json.loads(body[:size].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ProtocolError(f"the inference header is not valid JSON ({type(exc).__name__}: {exc})"[:300]) from None
    if not isinstance(head, dict):
        raise ProtocolError("the inference header must be a JSON object with 'inputs'")
    return head, body[size:]


def bytes_elements(raw: bytes, count: int) -> list[bytes]:
    """BYTES tensor data: ``count`` elements, each a 4-byte little-endian length and its bytes."""
    out, pos = [], 0
    for j in range(count):
        if pos + 4 > len(raw):
            raise ProtocolError(f"input 'image': binary data ends before element {j} of {count}")
        (n,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + n > len(raw):
            raise ProtocolError(f"input 'image': element {j} declares {n} bytes, {len(raw) - pos} remain")
        out.append(raw[pos : pos + n])
        pos += n
    if pos != len(raw):
        raise ProtocolError(f"input 'image': {len(raw) - pos} bytes after its {count} elements")
    return out


def _flat(data: Any) -> list[Any]:
    out: list[Any] = []
    stack = [data]
    while stack:  # iterative: a deeply nested list is no recursion hazard
        x = stack.pop()
        if isinstance(x, list):
            stack.extend(reversed(x))
        else:
            out.append(x)
    return out


def _json_images(data: Any, count: int) -> list[bytes]:
    items = _flat(data)
    if len(items) != count:
        raise ProtocolError(f"input 'image': shape holds {count} elements, 'data' has {len(items)}")
    out = []
    for j, s in enumerate(items):
        if not isinstance(s, str):
            raise ProtocolError(f"input 'image': element {j} is a {type(s).__name__}; in JSON each image is a "
                                "base64 string (or send binary tensor data)")
        try:
            out.append(base64.b64decode(s, validate=True))
        except (binascii.Error, ValueError):
            raise ProtocolError(f"input 'image': element {j} is not valid base64") from None
    return out


# The request header as typed models (strict: JSON's true is not an integer, a number not a string):
# a structural defect is refused naming the field as a JSON path before any semantic check runs.
Param = StrictBool | StrictInt | StrictFloat | StrictStr  # an OIP parameter value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class InputTensor(_Strict):
    name: str
    datatype: str
    shape: list[StrictInt]
    parameters: dict[str, Param] | None = None
    data: Any = None


class RequestedOutput(_Strict):
    name: str
    parameters: dict[str, Param] | None = None


class InferHeader(_Strict):
    """The JSON header of an OIP v2 inference request."""

    id: str | None = None
    parameters: dict[str, Param] | None = None
    inputs: list[InputTensor] = Field(min_length=1)
    outputs: list[RequestedOutput] | None = None


def parse_header(head: dict[str, Any]) -> InferHeader:
    """``head`` as an ``InferHeader``; a ``ProtocolError`` naming the first bad field otherwise."""
    try:
        return InferHeader.model_validate(head)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"]).lstrip(".") or "header"
        hint = " (the header needs 'inputs': [{'name': 'image', 'datatype': 'BYTES', ...}])" \
            if err["loc"][:1] == ("inputs",) and len(err["loc"]) == 1 else ""
        raise ProtocolError(f"{where}: {err['msg']}{hint}"[:300]) from None


def decode_infer(body: bytes, header_length: str | None, model: ModelInfo,
                 max_header_bytes: int = 1 << 20) -> InferRequest:
    """An infer request's images, deadline and wanted outputs; ``ProtocolError`` naming what is wrong."""
    raw_head, binary = _header(body, header_length, max_header_bytes)
    head = parse_header(raw_head)
    spec = head.inputs[0]
    count = image_count([i.name for i in head.inputs], spec.datatype, spec.shape, model)
    ip = spec.parameters or {}
    if "binary_data_size" in ip:
        size = ip["binary_data_size"]
        if not _is_int(size) or size != len(binary):
            raise ProtocolError(f"input 'image' declares binary_data_size {size!r}, the body carries {len(binary)} "
                                "bytes after the header")
        images = bytes_elements(binary, count)
    elif spec.data is not None:
        images = _json_images(spec.data, count)
    else:
        raise ProtocolError("input 'image' has neither 'data' nor binary data ('binary_data_size')")
    params = head.parameters or {}
    timeout = params.get("timeout")
    if timeout is not None and (isinstance(timeout, (bool, str)) or not math.isfinite(timeout) or timeout <= 0):
        raise ProtocolError(f"parameters.timeout = {timeout!r}: microseconds, a positive number")
    default_binary = _flag(params, "binary_data_output", False, "parameters")
    if head.outputs is None:
        outputs, flags = list(OUTPUTS), dict.fromkeys(OUTPUTS, default_binary)
    else:
        outputs = known_outputs([o.name for o in head.outputs], model)
        flags = {o.name: _flag(o.parameters or {}, "binary_data", default_binary, f"outputs[{j}]")
                 for j, o in enumerate(head.outputs)}
    return InferRequest(head.id, images, None if timeout is None else float(timeout) / 1e6, outputs, flags)


def image_count(names: list[str], datatype: str, shape: list[int], model: ModelInfo) -> int:
    """The number of images an inference request sends, after checking its inputs (``names``) and
    the ``image`` input's datatype and shape against the model: what both transports check."""
    if names != ["image"]:
        wrong = [n for n in names if n != "image"]
        raise ProtocolError(f"unexpected inference input {wrong[0]!r} for model '{model.name}': it takes one input, "
                            "'image' (BYTES, shape [N, 1], encoded images)" if wrong else
                            f"model '{model.name}' takes input 'image' once, got {names}")
    if datatype != "BYTES":
        raise ProtocolError(f"input 'image' has datatype {datatype!r}; it is BYTES (encoded images)")
    if not (len(shape) in (1, 2) and shape[0] >= 1 and (len(shape) == 1 or shape[1] == 1)):
        raise ProtocolError(f"input 'image' has shape {shape}; it is [N, 1] (or [N]) with N >= 1")
    if shape[0] > model.max_batch:
        raise ProtocolError(f"{shape[0]} images in one request, over the {model.max_batch}-image limit", 413)
    return shape[0]


def known_outputs(names: list[str], model: ModelInfo) -> list[str]:
    """``names``, refused if any is not one of ``OUTPUTS``."""
    bad = [o for o in names if o not in OUTPUTS]
    if bad:
        raise ProtocolError(f"unknown output {bad[0]!r}; model '{model.name}' has {list(OUTPUTS)}")
    return names


def unknown_model(name: str, version: str | None, have_name: str, have_version: str) -> str | None:
    """Why a request for model ``name`` (``version``: None or "" for any) is refused by a server
    with the one model ``have_name`` / ``have_version``; None when it is that model."""
    if name == have_name and version in (None, "", have_version):
        return None
    return (f"unknown model {name!r}" + (f" version {version!r}" if version else "")
            + f"; this server has model {have_name!r} version {have_version!r}")


def _is_int(x: Any) -> bool:
    """A JSON integer (JSON's true is not 1 here)."""
    return isinstance(x, int) and not isinstance(x, bool)


def _flag(params: dict[str, Any], name: str, default: bool, where: str) -> bool:
    value = params.get(name, default)
    if not isinstance(value, bool):
        raise ProtocolError(f"{where}.parameters.{name} = {json.dumps(value)[:60]} must be true or false")
    return value


def _columns(results: list[ImageResult], k: int) -> dict[str, np.ndarray]:
    n = len(results)
    ok = [r.error is None for r in results]
    cols: dict[str, np.ndarray] = {
        "label": np.array([r.label if o else -1 for r, o in zip(results, ok)], np.int64),
        "class_name": np.array([(r.class_name or "").encode() for r in results], object),
        "rethought": np.array([bool(r.rethought) for r in results], np.bool_),
        "max_prob": np.array([r.max_prob if o else np.nan for r, o in zip(results, ok)], np.float32),
        "backbone_label": np.array([r.backbone_label if o else -1 for r, o in zip(results, ok)], np.int64),
        "topk": np.full((n, k), -1, np.int64), "topk_prob": np.full((n, k), np.nan, np.float32),
        "unet_evals": np.array([r.unet_evals for r in results], np.int64),
        "rethink_skipped": np.array([(r.rethink_skipped or "").encode() for r in results], object),
        "error": np.array([(r.error or "").encode() for r in results], object),
    }
    for j, r in enumerate(results):
        for c, (cls, p) in enumerate(r.topk[:k]):
            cols["topk"][j, c], cols["topk_prob"][j, c] = cls, p
    return cols


def output_tensors(names: list[str], results: list[ImageResult], model: ModelInfo) -> list[tuple[str, str, np.ndarray]]:
    """The outputs ``names`` of ``results`` as (name, datatype, array): what either transport sends."""
    cols = _columns(results, model.k)
    dtypes = {n: d for n, d, _ in model.outputs()}
    return [(name, dtypes[name], cols[name]) for name in names]


def raw_bytes(a: np.ndarray) -> bytes:
    """A tensor as the protocol's binary data: BYTES elements each a 4-byte little-endian length and
    its bytes; numbers little-endian, row-major (HTTP's binary extension and gRPC's raw contents)."""
    if a.dtype == object:
        return b"".join(struct.pack("<I", len(x)) + x for x in a.reshape(-1))
    return np.ascontiguousarray(a).astype(a.dtype.newbyteorder("<"), copy=False).tobytes()


def encode_infer(req: InferRequest, results: list[ImageResult], model: ModelInfo) -> tuple[bytes, dict[str, str]]:
    """The response body and its headers (``Inference-Header-Content-Length`` when any output is
    binary, as the extension says)."""
    outs, blobs = [], []
    for name, dtype, a in output_tensors(req.outputs, results, model):
        entry: dict[str, Any] = {"name": name, "datatype": dtype, "shape": list(a.shape)}
        if req.binary.get(name):
            raw = raw_bytes(a)
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        elif a.dtype == object:
            entry["data"] = [x.decode("utf-8", "replace") for x in a.reshape(-1)]
        else:
            entry["data"] = [None if isinstance(x, float) and math.isnan(x) else x for x in a.reshape(-1).tolist()]
        outs.append(entry)
    head: dict[str, Any] = {"model_name": model.name, "model_version": model.version, "outputs": outs}
    if req.id is not None:
        head["id"] = req.id
    text = json.dumps(head).encode()
    if not blobs:
        return text, {"content-type": "application/json"}
    return text + b"".join(blobs), {"content-type": "application/octet-stream",
                                    "inference-header-content-length": str(len(text))}
