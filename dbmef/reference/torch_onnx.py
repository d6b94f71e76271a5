"""An ONNX graph run node by node with torch: the bundle's own graphs and weights on a CUDA device
that has torch but neither TensorRT nor onnxruntime-gpu (the GPU machine the device check runs on).

It is a check tool, not a backend for production: it interprets every node on every call (no
fusion, no graph optimisation), and it knows the operators dbmef's exports use (the digits and
tiny bundles, SD v1.5's UNet and VAE encoder, CLIP's text encoder, timm's resnets). An operator or
attribute it does not know is refused by name when the graph is opened, never guessed at run time.

Shape arithmetic (``Shape``, its ``Gather``/``Concat``/``Unsqueeze``, int64 constants) stays on the
host, so a call reads the device once, when its outputs are copied back: what the issue's "syncs
counted" counts (``TorchOnnxEngine.syncs``).

    from dbmef.reference.torch_onnx import register_torch_backend
    register_torch_backend("cuda")          # then DBMEFRuntime(bundle, backend="torch-onnx")
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from dbmef.errors import EngineError
from dbmef.runtime.engine import Engine

BACKEND = "torch-onnx"
# ONNX TensorProto element types -> numpy
_NP = {1: np.float32, 2: np.uint8, 3: np.int8, 5: np.int16, 6: np.int32, 7: np.int64, 9: np.bool_, 10: np.float16,
       11: np.float64}


def _torch() -> Any:
    import torch

    return torch


def _attrs(node: Any) -> dict[str, Any]:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _dtype(onnx_type: int) -> Any:
    torch = _torch()
    return {1: torch.float32, 2: torch.uint8, 3: torch.int8, 5: torch.int16, 6: torch.int32, 7: torch.int64,
            9: torch.bool, 10: torch.float16, 11: torch.float64}[onnx_type]


def _on(*xs: Any) -> list[Any]:
    """The tensors on one device: the accelerator's if any of them is there (host shape values meet
    device data only in broadcasting arithmetic)."""
    dev = next((x.device for x in xs if x.device.type != "cpu"), xs[0].device)
    return [x if x.device == dev else x.to(dev) for x in xs]


def _ints(x: Any) -> list[int]:
    return [int(v) for v in x.reshape(-1).tolist()]


def _pads2d(pads: list[int]) -> tuple[list[int], bool]:
    """ONNX pads [top, left, bottom, right] -> torch's symmetric padding, or F.pad's list."""
    t, l, b, r = pads
    return ([t, l], True) if (t, l) == (b, r) else ([l, r, t, b], False)


def _conv(n: Any, a: dict[str, Any], x: Any, w: Any, b: Any = None) -> Any:
    F = _torch().nn.functional
    if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise EngineError(f"{n.name}: Conv auto_pad={a['auto_pad']!r} is not supported")
    pads, sym = _pads2d(list(a.get("pads", [0, 0, 0, 0])))
    if not sym:
        x, pads = F.pad(x, pads), [0, 0]
    return F.conv2d(x, w, b, stride=a.get("strides", [1, 1]), padding=pads, dilation=a.get("dilations", [1, 1]),
                    groups=a.get("group", 1))


def _pool(kind: str) -> Callable[..., Any]:
    def op(n: Any, a: dict[str, Any], x: Any) -> Any:
        F = _torch().nn.functional
        pads, sym = _pads2d(list(a.get("pads", [0, 0, 0, 0])))
        if not sym:
            raise EngineError(f"{n.name}: {kind} with asymmetric pads is not supported")
        k, s, ceil = a["kernel_shape"], a.get("strides", [1, 1]), bool(a.get("ceil_mode", 0))
        if kind == "MaxPool":
            return F.max_pool2d(x, k, s, pads, ceil_mode=ceil)
        return F.avg_pool2d(x, k, s, pads, ceil_mode=ceil, count_include_pad=bool(a.get("count_include_pad", 0)))

    return op


def _gather(n: Any, a: dict[str, Any], x: Any, idx: Any) -> Any:
    axis = a.get("axis", 0) % x.dim()
    idx = idx.to(x.device)
    flat = idx.reshape(-1).long() % x.shape[axis]
    return x.index_select(axis, flat).reshape((*x.shape[:axis], *idx.shape, *x.shape[axis + 1:]))


def _gemm(n: Any, a: dict[str, Any], A: Any, B: Any, C: Any = None) -> Any:
    A = A.T if a.get("transA", 0) else A
    B = B.T if a.get("transB", 0) else B
    y = a.get("alpha", 1.0) * (A @ B)
    return y if C is None else y + a.get("beta", 1.0) * C


def _layer_norm(n: Any, a: dict[str, Any], x: Any, w: Any, b: Any = None) -> Any:
    axis = a.get("axis", -1) % x.dim()
    return _torch().nn.functional.layer_norm(x, x.shape[axis:], w, b, a.get("epsilon", 1e-5))


def _reduce_mean(n: Any, a: dict[str, Any], x: Any, axes: Any = None) -> Any:
    dims = _ints(axes) if axes is not None else list(a.get("axes", range(x.dim())))
    return x.mean(dim=dims, keepdim=bool(a.get("keepdims", 1)))


def _reshape(n: Any, a: dict[str, Any], x: Any, shape: Any) -> Any:
    s = _ints(shape)
    if not a.get("allowzero", 0):
        s = [x.shape[j] if v == 0 else v for j, v in enumerate(s)]
    return x.reshape(s)


def _resize(n: Any, a: dict[str, Any], x: Any, roi: Any = None, scales: Any = None, sizes: Any = None) -> Any:
    mode = a.get("mode", b"nearest")
    ctm = a.get("coordinate_transformation_mode", b"half_pixel")
    if mode not in (b"nearest", "nearest") or ctm not in (b"asymmetric", "asymmetric") or \
            a.get("nearest_mode", b"round_prefer_floor") not in (b"floor", "floor"):
        raise EngineError(f"{n.name}: Resize mode={mode!r} coordinate_transformation_mode={ctm!r} is not supported "
                          "(only nearest, asymmetric, floor: what torch's nearest upsampling exports)")
    F = _torch().nn.functional
    if sizes is not None and sizes.numel():
        return F.interpolate(x, size=_ints(sizes)[2:], mode="nearest")
    sc = [float(v) for v in scales.reshape(-1).tolist()]
    return F.interpolate(x, scale_factor=sc[2:], mode="nearest")


def _slice(n: Any, a: dict[str, Any], x: Any, starts: Any, ends: Any, axes: Any = None, steps: Any = None) -> Any:
    st, en = _ints(starts), _ints(ends)
    ax = _ints(axes) if axes is not None else list(range(len(st)))
    sp = _ints(steps) if steps is not None else [1] * len(st)
    index: list[Any] = [slice(None)] * x.dim()
    for s, e, d, k in zip(st, en, ax, sp):
        if k != 1:
            raise EngineError(f"{n.name}: Slice with step {k} is not supported")
        dim = x.shape[d % x.dim()]
        s, e = max(-dim, min(s, dim)), max(-dim, min(e, dim))
        index[d % x.dim()] = slice(s, e)
    return x[tuple(index)]


def _unsqueeze(n: Any, a: dict[str, Any], x: Any, axes: Any = None) -> Any:
    ax = _ints(axes) if axes is not None else list(a["axes"])
    rank = x.dim() + len(ax)
    for d in sorted(v % rank for v in ax):
        x = x.unsqueeze(d)
    return x


def _pad(n: Any, a: dict[str, Any], x: Any, pads: Any, value: Any = None, axes: Any = None) -> Any:
    if a.get("mode", b"constant") not in (b"constant", "constant") or axes is not None:
        raise EngineError(f"{n.name}: Pad mode={a.get('mode')!r} (or with axes) is not supported")
    p = _ints(pads)
    r = len(p) // 2
    torch_pads: list[int] = []
    for d in reversed(range(r)):  # F.pad: last dimension first, (begin, end) pairs
        torch_pads += [p[d], p[d + r]]
    v = 0.0 if value is None or not value.numel() else float(value.reshape(-1)[0])
    return _torch().nn.functional.pad(x, torch_pads, value=v)


def _div(n: Any, a: dict[str, Any], x: Any, y: Any) -> Any:
    x, y = _on(x, y)
    if x.is_floating_point():
        return x / y
    return _torch().div(x, y, rounding_mode="trunc")  # ONNX integer division truncates


def _binary(f: Callable[[Any, Any], Any]) -> Callable[..., Any]:
    return lambda n, a, x, y: f(*_on(x, y))


def _unary(f: Callable[[Any], Any]) -> Callable[..., Any]:
    return lambda n, a, x: f(x)


def _constant_of_shape(n: Any, a: dict[str, Any], shape: Any) -> Any:
    from onnx import numpy_helper

    torch = _torch()
    v = np.array(numpy_helper.to_array(a["value"])) if "value" in a else np.zeros(1, np.float32)
    return torch.full(_ints(shape), v.reshape(-1)[0].item(), dtype=torch.from_numpy(v).dtype)


def _constant(n: Any, a: dict[str, Any]) -> Any:
    from onnx import numpy_helper

    if "value" not in a:
        raise EngineError(f"{n.name}: Constant without a tensor value is not supported")
    return _torch().from_numpy(np.array(numpy_helper.to_array(a["value"])))


def _trilu(n: Any, a: dict[str, Any], x: Any, k: Any = None) -> Any:
    kk = 0 if k is None else _ints(k)[0]
    torch = _torch()
    return torch.triu(x, kk) if a.get("upper", 1) else torch.tril(x, kk)


def _ops() -> dict[str, Callable[..., Any]]:
    torch = _torch()
    F = torch.nn.functional
    return {
        "Add": _binary(torch.add), "Sub": _binary(torch.sub), "Mul": _binary(torch.mul), "Div": _div,
        "Pow": _binary(torch.pow), "Equal": _binary(torch.eq), "MatMul": _binary(torch.matmul),
        "Where": lambda n, a, c, x, y: torch.where(*_on(c, x, y)),
        "Sqrt": _unary(torch.sqrt), "Sin": _unary(torch.sin), "Cos": _unary(torch.cos), "Erf": _unary(torch.erf),
        "Sigmoid": _unary(torch.sigmoid), "Relu": _unary(torch.relu), "Identity": _unary(lambda x: x),
        "Cast": lambda n, a, x: x.to(_dtype(a["to"])),
        "Concat": lambda n, a, *xs: torch.cat(_on(*xs), dim=a["axis"]),
        "ConstantOfShape": _constant_of_shape, "Constant": _constant,
        "Conv": _conv, "MaxPool": _pool("MaxPool"), "AveragePool": _pool("AveragePool"),
        "GlobalAveragePool": lambda n, a, x: x.mean(dim=tuple(range(2, x.dim())), keepdim=True),
        "Flatten": lambda n, a, x: x.reshape(math.prod(x.shape[: a.get("axis", 1)]), -1),
        "Expand": lambda n, a, x, s: x.expand(torch.broadcast_shapes(tuple(x.shape), tuple(_ints(s)))),
        "Gather": _gather, "Gemm": _gemm,
        "InstanceNormalization": lambda n, a, x, w, b: F.instance_norm(x, weight=w, bias=b, eps=a.get("epsilon", 1e-5)),
        "LayerNormalization": _layer_norm, "ReduceMean": _reduce_mean, "Reshape": _reshape, "Resize": _resize,
        "Shape": lambda n, a, x: torch.tensor(list(x.shape)[a.get("start", 0): a.get("end", None)], dtype=torch.int64),
        "Slice": _slice, "Softmax": lambda n, a, x: torch.softmax(x, dim=a.get("axis", -1)),
        "Transpose": lambda n, a, x: x.permute(*(a.get("perm") or list(reversed(range(x.dim()))))),
        "Unsqueeze": _unsqueeze, "Pad": _pad, "Trilu": _trilu,
    }


SUPPORTED = frozenset(
    "Add Sub Mul Div Pow Equal MatMul Where Sqrt Sin Cos Erf Sigmoid Relu Identity Cast Concat ConstantOfShape "
    "Constant Conv MaxPool AveragePool GlobalAveragePool Flatten Expand Gather Gemm InstanceNormalization "
    "LayerNormalization ReduceMean Reshape Resize Shape Slice Softmax Transpose Unsqueeze Pad Trilu".split())


class TorchOnnxEngine(Engine):
    """One ONNX graph interpreted with torch on ``device`` (``cuda`` or ``cpu``), float32 as exported."""

    def __init__(self, path: str | Path, name: str | None = None, device: str = "cpu"):
        import onnx
        from onnx import numpy_helper

        torch = _torch()
        self.path, self.name = Path(path), name or Path(path).stem
        model = onnx.load(str(self.path))
        unknown = sorted({n.op_type for n in model.graph.node} - SUPPORTED)
        if unknown:
            raise EngineError(f"{self.path.name}: operators {unknown} are not supported by the torch interpreter")
        self.dev = torch.device(device)
        self.device = "cuda" if self.dev.type == "cuda" else "cpu"
        self.values: dict[str, Any] = {}
        for init in model.graph.initializer:
            arr = np.array(numpy_helper.to_array(init))
            t = torch.from_numpy(arr)
            # integer constants are shapes, axes and indices: the host reads them, so they stay there
            self.values[init.name] = t if arr.dtype.kind in "iub" and arr.size <= 64 else t.to(self.dev)
        self.nodes = [(n, _attrs(n)) for n in model.graph.node]
        self.ops = _ops()
        inits = {i.name for i in model.graph.initializer}
        self.input_names = tuple(i.name for i in model.graph.input if i.name not in inits)
        self.output_names = tuple(o.name for o in model.graph.output)
        self._in_types = {i.name: _NP[i.type.tensor_type.elem_type] for i in model.graph.input if i.name not in inits}
        self.calls = self.syncs = 0

    @property
    def providers(self) -> list[str]:
        return [f"torch:{self.dev}"]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = _torch()
        env = dict(self.values)
        for n in self.input_names:
            env[n] = torch.from_numpy(np.ascontiguousarray(feeds[n], dtype=self._in_types[n])).to(self.dev)
        with torch.inference_mode():
            for node, attrs in self.nodes:
                args = [env[i] if i else None for i in node.input]
                try:
                    out = self.ops[node.op_type](node, attrs, *args)
                except EngineError:
                    raise
                except Exception as exc:
                    raise EngineError(f"{self.path.name}: node {node.name} ({node.op_type}) failed: {exc}") from exc
                env[node.output[0]] = out
        self.calls += 1
        self.syncs += 1  # the copies back below wait for the device: the call's one host sync
        return {n: env[n].to("cpu").numpy() for n in self.output_names}


def register_torch_backend(device: str = "cpu") -> None:
    """Register ``torch-onnx`` (every component of a bundle interpreted with torch on ``device``)."""
    from dbmef.runtime.backends import register

    def open_torch(bundle: Any, component: str, options: Any) -> Engine:
        return TorchOnnxEngine(bundle.path(bundle.manifest.components[component].file), component, device)

    register(BACKEND, open_torch, f"ONNX graphs interpreted by torch on {device} (device check only)")
