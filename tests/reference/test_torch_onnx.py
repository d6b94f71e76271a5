"""dbmef/reference/torch_onnx.py: the bundle's ONNX graphs interpreted by torch (the device check's CUDA
row kernel) give ONNX Runtime's outputs, and what it cannot interpret is refused by name."""

from __future__ import annotations

import numpy as np
import pytest

from dbmef.apps.digits import demo_bundle_dir
from tests.conftest import needs_ort

pytestmark = needs_ort


def _feeds(rng: np.random.Generator) -> dict[str, dict[str, np.ndarray]]:
    lat = (3, 4, 8, 8)
    emb = (3, 77, 64)
    return {
        "backbone": {"pixel_values": rng.standard_normal((3, 3, 16, 16)).astype(np.float32)},
        "vae_encoder": {"image": rng.standard_normal((3, 3, 16, 16)).astype(np.float32)},
        "text_encoder": {"input_ids": rng.integers(0, 300, (2, 77)).astype(np.int64)},
        "unet": {"sample": rng.standard_normal(lat).astype(np.float32), "timestep": np.array([10, 500, 999]),
                 "encoder_hidden_states": rng.standard_normal(emb).astype(np.float32)},
        "scorer": {"x0": rng.standard_normal(lat).astype(np.float32),
                   "eps": rng.standard_normal(lat).astype(np.float32),
                   "timestep": np.array([10, 500, 999]), "emb_pos": rng.standard_normal(emb).astype(np.float32),
                   "emb_neg": rng.standard_normal(emb).astype(np.float32), "lam": np.array([1.1], np.float32)},
    }


@pytest.mark.parametrize("component", ["backbone", "vae_encoder", "text_encoder", "unet", "scorer"])
def test_every_digits_component_matches_onnx_runtime(component):
    from dbmef.reference.torch_onnx import TorchOnnxEngine
    from dbmef.runtime.backends.onnxruntime import OrtEngine

    path = demo_bundle_dir() / f"{component}.onnx"
    feeds = _feeds(np.random.default_rng(0))[component]
    got = TorchOnnxEngine(path).run(feeds)
    want = OrtEngine.on_cpu(path).run(feeds)
    assert set(got) == set(want)
    for name, w in want.items():
        assert got[name].shape == w.shape and got[name].dtype == w.dtype
        np.testing.assert_allclose(got[name], w, rtol=1e-4, atol=1e-5 * float(np.abs(w).max()))


def _model(op: str, **attrs):
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 2, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    inputs = ["x"] if op != "Resize" else ["x", "", "scales"]
    inits = [] if op != "Resize" else [helper.make_tensor("scales", TensorProto.FLOAT, [4], [1, 1, 2, 2])]
    g = helper.make_graph([helper.make_node(op, inputs, ["y"], name="n0", **attrs)], "g", [x], [y], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_what_it_cannot_interpret_is_refused_by_name(tmp_path):
    import onnx

    from dbmef.errors import EngineError
    from dbmef.reference.torch_onnx import TorchOnnxEngine

    onnx.save(_model("Hardmax"), tmp_path / "h.onnx")
    with pytest.raises(EngineError, match=r"\['Hardmax'\] are not supported"):
        TorchOnnxEngine(tmp_path / "h.onnx")
    onnx.save(_model("Resize", mode="linear"), tmp_path / "r.onnx")
    with pytest.raises(EngineError, match=r"Resize mode=b?'linear'"):
        TorchOnnxEngine(tmp_path / "r.onnx").run({"x": np.ones((1, 1, 2, 2), np.float32)})
