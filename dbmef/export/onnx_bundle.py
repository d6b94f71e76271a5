"""``dbmef-export --sd ONNX_FOLDER --backbone-onnx FILE``: a bundle from graphs already in ONNX,
without torch (onnx, onnxruntime, numpy and tokenizers).

Steps: open the folder (``onnx_folder``) -> adapt each graph to the runtime's contract -> compose
the fused scorer around the folder's UNet -> validate every adapted graph against the graph it
came from on ONNX Runtime -> tokenizer and positive embeddings (the adapted text encoder) ->
decision check of the scorer against the host-side UNet path -> manifest.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dbmef.errors import ExportError, ValidationError
from dbmef.export.config import check_features
from dbmef.export.feature_bundle import with_features
from dbmef.runtime.bundle import Bundle, with_validation
from dbmef.runtime.config import ScoringConfig
from dbmef.runtime.features import FeatureSpec

log = logging.getLogger(__name__)


@dataclass
class OnnxExportConfig:
    """A bundle from ONNX graphs; saved beside it as ``export_config.json``.

    sd: an ONNX Stable Diffusion folder (optimum's layout). backbone_onnx: the classifier's graph
    (one image input, logits first output). class_names: JSON list or one name per line, in the
    classifier's order. data_config: timm's data config as JSON (a file or the JSON itself:
    input_size, interpolation, mean, std, crop_pct, crop_mode).
    """

    sd: str
    backbone_onnx: str
    class_names: str
    data_config: str
    out: str
    scorer: str = "fused"
    image_size: int | None = None  # None: the folder's VAE sample size
    precision: str | None = None  # None: the folder's; given, it must be the folder's (graphs are not converted)
    validate: bool = True
    decision_cases: int = 8
    seed: int = 0
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    features: FeatureSpec | None = None  # also write the features component (needs scorer unet or both)

    def __post_init__(self) -> None:
        check_features(self.features, self.scorer)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["scoring"] = self.scoring.to_dict()
        return d


def read_data_config(text_or_path: str) -> dict[str, Any]:
    p = Path(text_or_path)
    raw = p.read_text() if p.is_file() else text_or_path
    try:
        cfg = json.loads(raw)
    except ValueError as exc:
        raise ExportError(f"--backbone-data-config: {text_or_path!r} is neither a JSON file nor JSON ({exc}); give "
                          'timm\'s data config, e.g. {"input_size": [3, 224, 224], "interpolation": "bicubic", '
                          '"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "crop_pct": 0.875}') from exc
    if not isinstance(cfg, dict) or "input_size" not in cfg:
        raise ExportError(f"--backbone-data-config needs at least 'input_size' (got {cfg!r})")
    from dbmef.runtime.preprocess import BackbonePreprocess

    return BackbonePreprocess.from_data_config(cfg).to_dict()  # checked and normalised


def export_from_onnx_folder(cfg: OnnxExportConfig, progress: Any = None) -> Path:
    """Build and validate a bundle from ONNX graphs; returns its folder."""
    from dbmef.export.checks import check_scheduler
    from dbmef.export.onnx_folder import OnnxSdFolder
    from dbmef.reference.loading import read_class_names
    from dbmef.runtime.noise_schedule import NoiseSchedule

    def step(msg: str) -> None:
        log.info(msg)
        if progress is not None:
            progress(msg)

    t_start = time.perf_counter()
    folder = OnnxSdFolder.open(cfg.sd)
    check_scheduler(folder.scheduler_config)
    if folder.scheduler_config.get("prediction_type", "epsilon") != "epsilon":
        raise ExportError(f"{folder.root}/scheduler: prediction_type {folder.scheduler_config['prediction_type']!r}; "
                          "DBMEF scores noise predictions (epsilon)")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").unlink(missing_ok=True)  # a half-rewritten bundle must not look valid
    schedule = NoiseSchedule()
    step("adapting the graphs")
    graphs, sources = adapt_all(cfg, folder, schedule.alphas_cumprod())
    image_size = cfg.image_size or folder.image_size(512)
    found = _precision(graphs["unet" if "unet" in graphs else "scorer"])
    if cfg.precision is not None and cfg.precision != found:
        raise ExportError(f"--precision {cfg.precision}: the ONNX folder {cfg.sd} holds {found} graphs, and this path "
                          "adapts graphs without converting their precision; export the folder at that precision, "
                          "or drop --precision")
    records, latent_shape = write_and_validate(cfg, folder, graphs, sources, out, image_size, step)
    step("tokenizer and positive embeddings")
    names = read_class_names(cfg.class_names)
    pad_id, pos = _text_side(cfg, folder, names, out)
    manifest = _manifest(cfg, folder, records, schedule, names, pad_id, pos, (image_size, latent_shape), out)
    if cfg.validate and cfg.decision_cases > 0 and "scorer" in graphs:
        step("decision check: fused scorer vs the host-side UNet path")
        manifest = with_validation(manifest, "scorer", decision_check=_decision_check(cfg, manifest, graphs, out))
    manifest = manifest.replace(sources={**manifest.sources, "export_seconds": round(time.perf_counter() - t_start, 2)})
    (out / "export_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    Bundle(out, manifest).save(manifest)
    if cfg.features is not None:
        step(f"features component ({cfg.features.label()})")
        with_features(out, cfg.features)
    step(f"bundle written to {out}")
    return out


def adapt_all(cfg: OnnxExportConfig, folder: Any, abar: np.ndarray) -> tuple[dict[str, Any], dict[str, Path]]:
    """Each component's adapted graph and the file it came from."""
    import onnx

    from dbmef.export.onnx_folder import (
        COMPONENT_FILES,
        adapt_backbone,
        adapt_text_encoder,
        adapt_unet,
        adapt_vae_encoder,
        compose_scorer,
    )

    bb = Path(cfg.backbone_onnx)
    if not bb.is_file():
        raise ExportError(f"--backbone-onnx {bb}: no such file")
    sources = {"backbone": bb, **{k: folder.root / v for k, v in COMPONENT_FILES.items()}}
    graphs = {"backbone": adapt_backbone(onnx.load(str(bb)), str(bb)),
              "text_encoder": adapt_text_encoder(folder.load("text_encoder"), str(sources["text_encoder"])),
              "vae_encoder": adapt_vae_encoder(folder.load("vae_encoder"), folder.scaling_factor,
                                               str(sources["vae_encoder"])),
              "unet": adapt_unet(folder.load("unet"), str(sources["unet"]))}
    if cfg.scorer in ("fused", "both"):
        graphs["scorer"] = compose_scorer(graphs["unet"], abar)
        sources["scorer"] = sources["unet"]
    return graphs, sources


def write_and_validate(cfg: OnnxExportConfig, folder: Any, graphs: dict[str, Any], sources: dict[str, Path],
                       out: Path, image_size: int, step: Any) -> tuple[dict[str, Any], tuple[int, int, int]]:
    """Save the components the bundle keeps (the plain UNet only with ``--scorer unet|both``; it
    always goes to a temporary file for the decision check) and validate each against its source."""
    from dbmef.export.manifest import component_record
    from dbmef.export.onnx_io import save_onnx
    from dbmef.runtime.contracts import COMPONENTS

    keep = ["backbone", "text_encoder", "vae_encoder"] + {"fused": ["scorer"], "unet": ["unet"],
                                                           "both": ["scorer", "unet"]}[cfg.scorer]
    records: dict[str, Any] = {}
    latent_shape: tuple[int, int, int] = (4, image_size // 8, image_size // 8)
    for name in keep:
        step(f"writing {name}")
        path = save_onnx(graphs[name], out / f"{name}.onnx")
        validation: dict[str, Any] = {"status": "skipped"}
        if cfg.validate and name != "scorer":  # the scorer is checked by its decisions below
            step(f"validating {name} against {sources[name]}")
            validation = validate_adapted(name, path, sources[name], folder.scaling_factor, image_size, cfg.seed)
            if name == "vae_encoder":
                latent_shape = tuple(validation.pop("latent_shape"))  # type: ignore[assignment]
        source = {"kind": "onnx", "file": str(sources[name])}
        records[name] = component_record(COMPONENTS[name], path, _precision(graphs[name]),
                                 validation, source)
    return records, latent_shape


def _precision(model: Any) -> str:
    from onnx import TensorProto

    halves = sum(t.data_type == TensorProto.FLOAT16 for t in model.graph.initializer)
    return "fp16" if halves > len(model.graph.initializer) // 2 else "fp32"


def validate_adapted(name: str, adapted: Path, source: Path, scaling_factor: float, image_size: int,
                     seed: int) -> dict[str, Any]:
    """The adapted graph against the graph it came from, on ONNX Runtime (CPU), at batch 1 and 2:
    the same numbers (the VAE: the source's mean times the scaling factor)."""
    from dbmef.export.onnx_io import compare
    from dbmef.runtime.backends.onnxruntime import OrtEngine

    rng = np.random.default_rng(seed)
    a, src = OrtEngine.on_cpu(adapted, name), _source_session(source)
    checks = []
    for b in (1, 2):
        feeds, src_feeds = _sample_feeds(name, src, b, image_size, rng)
        got = a(feeds)[a.output_names[0]]
        ref = src.run(None, src_feeds)[0].astype(np.float32)
        if name == "vae_encoder":
            ref = ref[:, : ref.shape[1] // 2] * np.float32(scaling_factor)
        rep = compare(a.output_names[0], got, ref, 1e-5, 1e-5)
        rep["batch"] = b
        checks.append(rep)
        if not rep["ok"]:
            raise ValidationError(f"the adapted {name} differs from {source} at batch {b}: max abs "
                                  f"{rep.get('max_abs')} (tolerance 1e-5); the export is refused")
    a.close()
    out: dict[str, Any] = {"status": "passed", "runtime": "onnxruntime-cpu", "against": str(source), "checks": checks}
    if name == "vae_encoder":
        out["latent_shape"] = list(got.shape[1:])
    return out


def _source_session(path: Path) -> Any:
    from dbmef.runtime.backends.onnxruntime import import_onnxruntime

    ort = import_onnxruntime()
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
       "tensor(int32)": np.int32, "tensor(double)": np.float64}


def _sample_feeds(name: str, src: Any, b: int, image_size: int, rng: np.random.Generator
                  ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The same random inputs for the adapted graph (contract names and dtypes) and the source."""
    ins = {i.name: i for i in src.get_inputs()}
    if name == "backbone":
        (src_name, info), = ins.items()
        h, w = (d if isinstance(d, int) else 224 for d in info.shape[2:])
        x = rng.standard_normal((b, 3, h, w)).astype(np.float32)
        return {"pixel_values": x}, {src_name: x.astype(_NP[info.type])}
    if name == "text_encoder":
        ids = rng.integers(0, 400, (b, 77))
        return {"input_ids": ids}, {"input_ids": ids.astype(_NP[ins["input_ids"].type])}
    if name == "vae_encoder":
        x = (rng.uniform(size=(b, 3, image_size, image_size)) * 2 - 1).astype(np.float32)
        return {"image": x}, {"sample": x.astype(_NP[ins["sample"].type])}
    s = rng.standard_normal((b, 4, image_size // 8, image_size // 8)).astype(np.float32)
    t = rng.integers(0, 1000, (b,))
    e = rng.standard_normal((b, 77, ins["encoder_hidden_states"].shape[2])).astype(np.float32)
    return ({"sample": s, "timestep": t, "encoder_hidden_states": e},
            {"sample": s.astype(_NP[ins["sample"].type]), "timestep": t.astype(_NP[ins["timestep"].type]),
             "encoder_hidden_states": e.astype(_NP[ins["encoder_hidden_states"].type])})


def _text_side(cfg: OnnxExportConfig, folder: Any, names: list[str], out: Path) -> tuple[int, np.ndarray]:
    """tokenizer.json and the positive embedding of every class, with the adapted text encoder."""
    from dbmef.export.onnx_folder import write_tokenizer_json
    from dbmef.runtime.backends.onnxruntime import OrtEngine
    from dbmef.runtime.method import positive_prompt
    from dbmef.runtime.tokenizer import ClipTokenizer

    pad_id = write_tokenizer_json(folder.root / "tokenizer", out / "tokenizer.json")
    tok = ClipTokenizer(out / "tokenizer.json", pad_id=pad_id)
    te = OrtEngine.on_cpu(out / "text_encoder.onnx", "text_encoder")
    prompts = [positive_prompt(n, cfg.scoring.templates) for n in names]
    pos = np.concatenate([te({"input_ids": tok(prompts[s : s + 64])})["last_hidden_state"]
                          for s in range(0, len(prompts), 64)]).astype(np.float32)
    te.close()
    np.save(out / "positive_embeddings.npy", pos)
    return pad_id, pos


def _manifest(cfg: OnnxExportConfig, folder: Any, records: dict[str, Any], schedule: Any, names: list[str],
              pad_id: int, pos: np.ndarray, sizes: tuple[int, tuple[int, int, int]], out: Path) -> Any:
    from dbmef.export.manifest import new_manifest
    from dbmef.runtime.bundle import VaeRecord

    logits = records["backbone"].outputs[0]
    image_size, latent_shape = sizes
    vae = VaeRecord(image_size, latent_shape, float(folder.scaling_factor))
    return new_manifest(out, records, names, read_data_config(cfg.data_config), vae, schedule, folder.scheduler_config,
                        cfg.scoring, pad_id, pos, records["unet" if "unet" in records else "scorer"].precision,
                        {"sd": {"kind": "onnx-folder", "id": str(folder.root)},
                         "backbone": {"kind": "onnx", "id": cfg.backbone_onnx, "logits": logits.name}})


def _decision_check(cfg: OnnxExportConfig, manifest: Any, graphs: dict[str, Any], out: Path) -> dict[str, Any]:
    from dbmef.export.checks import compare_scorers
    from dbmef.export.onnx_io import save_onnx
    from dbmef.runtime.backends.onnxruntime import OrtEngine

    with tempfile.TemporaryDirectory(prefix="dbmef-unet-") as tmp:
        unet_path = out / "unet.onnx" if "unet" in manifest.components else save_onnx(graphs["unet"],
                                                                                        Path(tmp) / "unet.onnx")
        ref = OrtEngine.on_cpu(unet_path, "unet")
        try:
            return compare_scorers(out, manifest, ref, cfg.scoring, cfg.seed, cfg.decision_cases,
                                   "host-side UNet path (ONNX Runtime)")
        finally:
            ref.close()
