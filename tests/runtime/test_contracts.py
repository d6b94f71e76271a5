"""The component contracts (issue 33): written once, in dbmef/runtime/contracts.py; the bundle's
tensor records, the TensorRT row path's dtypes and the scorer's mode are derived from them; every
engine call is checked against them, naming the tensor; one scorer vocabulary, old spellings read."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dbmef.apps.digits import demo_bundle_dir
from dbmef.errors import ConfigError, EngineError
from dbmef.runtime import RuntimeSpec
from dbmef.runtime.contracts import COMPONENTS, SCORER, UNET, kind_of_component, scorer_kind
from dbmef.runtime.engine import FunctionEngine
from dbmef.runtime.scorer import scorer_mode
from tests.runtime.conftest import make_unet_engine


def test_the_committed_bundles_tensor_records_are_the_contracts():
    """Written by the export from the contracts: read back as JSON, field by field."""
    m = json.loads((demo_bundle_dir() / "manifest.json").read_text())
    for name, rec in m["components"].items():
        spec = COMPONENTS[name]
        assert [(t["name"], t["dtype"], tuple(t["shape"])) for t in rec["inputs"]] == \
            [(t.name, t.dtype, t.shape) for t in spec.inputs], name
        assert [t["name"] for t in rec["outputs"]] == list(spec.output_names)


def test_the_row_paths_dtypes_and_the_scorer_mode_come_from_the_contracts():
    from dbmef.runtime.backends.tensorrt import SCORER_DTYPES

    assert {n: d.name for n, d in SCORER_DTYPES.items()} == {
        "x0": "float32", "eps": "float32", "timestep": "int64", "emb_pos": "float32", "emb_neg": "float32",
        "lam": "float32"}
    fused = FunctionEngine("x", SCORER.input_names, ("error",), lambda **kw: kw)
    assert scorer_mode(fused) == "fused" and scorer_mode(make_unet_engine([])) == "unet"
    with pytest.raises(EngineError, match="neither a fused scorer"):
        scorer_mode(FunctionEngine("x", ("sample",), ("y",), lambda sample: sample))


def test_an_engine_call_is_checked_against_its_contract_naming_the_tensor():
    unet = make_unet_engine(calls := [])
    x = np.zeros((2, 4, 4, 4), np.float32)
    t = np.array([1, 2], np.int64)
    e = np.zeros((2, 5, 6), np.float32)
    assert unet({"sample": x, "timestep": t, "encoder_hidden_states": e})["noise_pred"].shape == x.shape
    with pytest.raises(EngineError, match=r"input 'sample' is float64 \(2, 4, 4, 4\), its contract is float32 "
                                          r"\(B, 4, h, w\); cast it first"):
        unet({"sample": x.astype(np.float64), "timestep": t, "encoder_hidden_states": e})
    with pytest.raises(EngineError, match=r"input 'timestep' is int32"):
        unet({"sample": x, "timestep": t.astype(np.int32), "encoder_hidden_states": e})
    with pytest.raises(EngineError, match=r"input 'sample' is float32 \(2, 3, 4, 4\)"):  # 3 channels, not 4
        unet({"sample": x[:, :3], "timestep": t, "encoder_hidden_states": e})
    with pytest.raises(EngineError, match=r"input 'encoder_hidden_states' is float32 \(2, 30\)"):  # rank 2
        unet({"sample": x, "timestep": t, "encoder_hidden_states": e.reshape(2, 30)})
    with pytest.raises(EngineError, match=r"input 'timestep' is a list"):
        unet({"sample": x, "timestep": [1, 2], "encoder_hidden_states": e})  # type: ignore[dict-item]
    assert len(calls) == 1
    # check=False: the hot loop's opt-out, once its feeds were checked
    unet({"sample": x, "timestep": t.astype(np.int32), "encoder_hidden_states": e}, check=False)
    assert len(calls) == 2


def test_one_scorer_vocabulary_with_the_old_spelling_still_read():
    assert scorer_kind("fused") == "fused" and scorer_kind("unet") == "unet"
    assert kind_of_component("scorer") == "fused" and kind_of_component(UNET.name) == "unet"
    with pytest.warns(FutureWarning, match="'scorer' is now called 'fused'"):
        spec = RuntimeSpec(str(demo_bundle_dir()), scorer="scorer")
    assert spec.scorer == "fused"
    with pytest.raises(ConfigError, match=r"scorer 'vae' is not one of \['fused', 'unet'\]"):
        RuntimeSpec(str(demo_bundle_dir()), scorer="vae")


def test_runtime_settings_are_one_list():
    """DBMEFRuntime(bundle, **settings) takes RuntimeSpec's fields and refuses others by name."""
    from dbmef.runtime import DBMEFRuntime

    with pytest.raises(ConfigError, match=r"unknown runtime setting\(s\) \['windw'\]"):
        DBMEFRuntime(demo_bundle_dir(), windw=8)
    with pytest.raises(ConfigError, match="window = 0"):
        RuntimeSpec(str(demo_bundle_dir()), window=0)
    with DBMEFRuntime(demo_bundle_dir(), window=3, rows_ahead=False, batch_size=4) as rt:
        assert rt.spec == RuntimeSpec(str(demo_bundle_dir()), window=3, rows_ahead=False, batch_size=4)
        assert (rt.pipeline.window, rt.pipeline.rows_ahead, rt.pipeline.backbone_batch) == (3, False, 4)
        other = rt.with_protector(rt.protector)
        assert other.pipeline.engines is rt.pipeline.engines and other.spec == rt.spec and other is not rt
