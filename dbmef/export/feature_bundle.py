"""A bundle gains diffusion features, then a classifier over them (torch-free: ONNX and ONNX Runtime).

``add_features`` writes the ``features`` component into a bundle that has the plain UNet graph
(``unet.onnx``: ``dbmef-export --scorer unet|both``, as the committed digits bundle has), checked
against the separate graphs it was composed from. ``add_head`` then makes the bundle's backbone the
features graph followed by a linear head: the bundle stays an ordinary bundle (the runtime, the
protector, calibration, TensorRT builds and the service take it unchanged), whose fast path is one
VAE encoding and one UNet evaluation per image, and whose unsure answers DBMEF rethinks as usual.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from dbmef.errors import BundleError, ExportError, ValidationError
from dbmef.export.features import attach_head, cut_unet, feature_graph
from dbmef.export.manifest import component_record
from dbmef.export.onnx_io import compare, save_onnx
from dbmef.runtime.bundle import Bundle, TensorRTRecord, sha256_file, with_validation
from dbmef.runtime.contracts import BACKBONE, FEATURES
from dbmef.runtime.features import FeatureSpec, feature_noise, noised, pool_features
from dbmef.runtime.preprocess import BackbonePreprocess

log = logging.getLogger(__name__)
ATOL, RTOL = 1e-5, 1e-4  # float32 graphs of the same operators, composed: differences are rounding only


@contextlib.contextmanager
def bundle_copy(src: Path, dst: Path) -> Iterator[Path]:
    """A copy of bundle ``src`` at ``dst`` for the ``with`` body to change (refused where ``dst``
    holds anything). Where the body fails the copy is removed: a half-built bundle is never left
    behind to be served by mistake. ``src`` is never modified."""
    if dst.exists() and any(dst.iterdir()):
        raise ExportError(f"--out {dst} exists and is not empty: choose a new folder (the source bundle {src} is "
                          "never modified)")
    shutil.copytree(src, dst, dirs_exist_ok=True, ignore=shutil.ignore_patterns("engines", ".manifest-*"))
    try:
        yield dst
    except BaseException:
        shutil.rmtree(dst, ignore_errors=True)
        raise


def session(model_or_path: Any) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    src = str(model_or_path) if isinstance(model_or_path, (str, Path)) else model_or_path.SerializeToString()
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])


def empty_embedding(bundle: Bundle) -> np.ndarray:
    """The bundle's text encoder on the empty prompt: (1, L, D) float32."""
    from dbmef.runtime.tokenizer import ClipTokenizer

    m = bundle.manifest
    ids = ClipTokenizer(bundle.path(m.tokenizer.file), m.tokenizer.max_length, m.tokenizer.pad_id)([""])
    te = session(bundle.path(m.components["text_encoder"].file))
    return np.asarray(te.run(None, {"input_ids": ids})[0], np.float32)


def sample_images(image_size: int, n: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (n, 3, image_size, image_size)).astype(np.float32)


def host_features(bundle: Bundle, spec: FeatureSpec, embedding: np.ndarray, images: np.ndarray) -> np.ndarray:
    """The same features from the separate graphs (VAE encoder, the UNet cut at the block) with
    the noising and pooling on the host: what the composed graph is checked against."""
    import onnx

    m = bundle.manifest
    latent = session(bundle.path(m.components["vae_encoder"].file)).run(None, {"image": images})[0]
    abar = m.schedule.alphas_cumprod()
    xt = noised(latent, feature_noise(spec.seed, m.vae.latent_shape), float(abar[spec.timestep]))
    cut = session(cut_unet(onnx.load(str(bundle.path(m.components["unet"].file))), {"act": spec.block}))
    b = len(images)
    act = cut.run(None, {"sample": xt, "timestep": np.full(b, spec.timestep, np.int64),
                         "encoder_hidden_states": np.repeat(embedding, b, axis=0)})[0]
    return pool_features(act, spec.pool)


def add_features(bundle_dir: str | Path, spec: FeatureSpec) -> Bundle:
    """Write ``features.onnx`` for ``spec`` into the bundle and record it (validated) in its manifest."""
    bundle = Bundle.open(bundle_dir)
    m = bundle.manifest
    if "unet" not in m.components:
        raise BundleError(f"bundle {bundle.dir} has no plain UNet graph (unet.onnx) to take features from: re-export "
                          "it with `dbmef-export ... --scorer both` (the fused scorer graph alone cannot be cut)")
    emb = empty_embedding(bundle)
    graph = feature_graph(bundle.path(m.components["vae_encoder"].file), bundle.path(m.components["unet"].file), spec,
                          m.schedule.alphas_cumprod(), m.vae.latent_shape, emb)
    images = sample_images(m.vae.image_size)
    want = host_features(bundle, spec, emb, images)  # first: it names a pool size that does not fit the block
    path = save_onnx(graph, bundle.dir / "features.onnx")
    got = session(path).run(None, {"pixel_values": images})[0]
    check = compare("features", got, want, ATOL, RTOL)
    if not check["ok"]:
        path.unlink()
        raise ValidationError(f"the composed features graph disagrees with the separate VAE and UNet graphs: {check}")
    source = {"kind": "unet-features", **spec.to_dict(), "prompt": "", "dim": int(got.shape[1]),
              "unet_sha256": m.components["unet"].sha256, "vae_encoder_sha256": m.components["vae_encoder"].sha256}
    validation = {"status": "passed", "runtime": "onnxruntime-cpu", "against": "vae_encoder.onnx + unet.onnx cut "
                  "at the block, noising and pooling on the host", "checks": [{**check, "batch": len(images)}]}
    rec = component_record(FEATURES, path, "fp32", validation, source)
    manifest = m.replace(components={**m.components, "features": rec})
    return bundle.save(manifest)


def with_features(bundle_dir: Path, spec: FeatureSpec, check: Any = None) -> Bundle:
    """``add_features`` as the last step of an export, with ``check(bundle)`` (the torch path's
    comparison against torch) recorded in the component's validation; a failure of either leaves no
    manifest behind, as every failed export check does."""
    try:
        bundle = add_features(bundle_dir, spec)
        if check is not None:
            result = check(bundle)
            bundle = bundle.save(with_validation(bundle.manifest, "features", torch=result))
            if not result["ok"]:
                raise ValidationError(f"the features graph disagrees with torch's forward hook on "
                                      f"{spec.module}: {result}")
        return bundle
    except BaseException:
        (Path(bundle_dir) / "manifest.json").unlink(missing_ok=True)
        raise


def feature_spec_of(bundle: Bundle) -> FeatureSpec:
    rec = bundle.manifest.components.get("features")
    if rec is None:
        raise BundleError(f"bundle {bundle.dir} has no features component; run `dbmef features` to add one")
    return FeatureSpec.from_dict(rec.source)


def add_head(bundle_dir: str | Path, weight: np.ndarray, bias: np.ndarray, fit: dict[str, Any]) -> Bundle:
    """Make the bundle's backbone ``features -> logits = features @ weight.T + bias``. Its preprocessing
    becomes the VAE's (the features graph's input), its protector is dropped (it was calibrated for
    another classifier: `dbmef calibrate` the new one, as is the fused rule's beta) and its TensorRT
    engines are forgotten (the copy holds none of their files)."""
    import onnx

    bundle = Bundle.open(bundle_dir)
    m = bundle.manifest
    spec = feature_spec_of(bundle)
    if weight.shape != (len(m.class_names), m.components["features"].source.get("dim", weight.shape[1])):
        raise ExportError(f"head weight {weight.shape} does not map this bundle's "
                          f"{m.components['features'].source.get('dim')} features to its {len(m.class_names)} classes")
    path = save_onnx(attach_head(onnx.load(str(bundle.path("features.onnx"))), weight, bias),
                     bundle.dir / "backbone.onnx")
    images = sample_images(m.vae.image_size)
    feats = session(bundle.path("features.onnx")).run(None, {"pixel_values": images})[0]
    ref = (feats.astype(np.float64) @ weight.T.astype(np.float64) + bias).astype(np.float32)
    check = compare("logits", session(path).run(None, {"pixel_values": images})[0], ref, ATOL, RTOL)
    if not check["ok"]:
        raise ValidationError(f"the head graph disagrees with features @ weight.T + bias: {check}")
    s = m.vae.image_size
    preprocess = BackbonePreprocess.from_data_config(
        {"input_size": (3, s, s), "interpolation": "bicubic", "crop_pct": 1.0, "crop_mode": "center",
         "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)})  # exactly the VAE's: resize, crop, to [-1, 1]
    source = {"id": f"diffusion-features {spec.label()}", "kind": "diffusion-features-head",
              "features": spec.to_dict(), "head": fit,
              "features_sha256": m.components["features"].sha256, "replaced": m.sources.get("backbone")}
    validation = {"status": "passed", "runtime": "onnxruntime-cpu", "against": "features.onnx @ weight.T + bias",
                  "checks": [{**check, "batch": len(images)}]}
    rec = component_record(BACKBONE, path, "fp32", validation, source)
    # What was calibrated for the old classifier goes with it: the threshold, its record, the fused rule's beta.
    sources = {k: v for k, v in m.sources.items() if k != "calibration"}
    scoring = dataclasses.replace(m.scoring, decision="paper", fused_beta=None)
    manifest = m.replace(components={**m.components, "backbone": rec}, backbone_preprocess=preprocess,
                         protector=None, tensorrt=TensorRTRecord(), scoring=scoring,
                         sources={**sources, "backbone": source},
                         created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    log.info("backbone.onnx is now the %s head (sha256 %s)", spec.label(), sha256_file(path)[:12])
    return bundle.save(manifest)
