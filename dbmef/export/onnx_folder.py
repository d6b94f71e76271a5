"""Stable Diffusion already in ONNX (issue 18): a folder in optimum's layout, read and adapted to the
runtime's component contracts by graph editing, never by re-tracing; no torch, diffusers or
transformers (onnx, numpy and tokenizers only).

optimum's layout (``optimum-cli export onnx`` / ``ORTStableDiffusionPipeline.save_pretrained``):
``text_encoder/model.onnx`` (input_ids -> last_hidden_state, pooler_output), ``unet/model.onnx``
(sample, timestep, encoder_hidden_states -> out_sample), ``vae_encoder/model.onnx`` (sample ->
latent_parameters: the latent distribution's mean and log-variance along the channel axis),
``tokenizer/``, ``scheduler/scheduler_config.json``, ``model_index.json``.

The adaptations: integer and float casts at the I/O so every component keeps the runtime's
contract (int64 ids and timesteps, float32 tensors); the text encoder keeps its last hidden state
only; the VAE encoder's output becomes ``mean * scaling_factor`` (a slice and a multiply after
its last node; a folder whose encoder only emits a sampled ``latent_sample`` is refused: a sample
is not the method's latent); the fused scorer is composed around the folder's UNet graph: noising
from the scheduler's tables, both conditions as one 2B batch, guidance and the per-row error.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dbmef.errors import ExportError

log = logging.getLogger(__name__)

COMPONENT_FILES = {"text_encoder": "text_encoder/model.onnx", "unet": "unet/model.onnx",
                   "vae_encoder": "vae_encoder/model.onnx"}
CLIP_MERGES = 49152 - 256 - 2  # CLIP's BPE uses the first 48 894 merges of merges.txt (as transformers does)


def is_onnx_sd_folder(path: str | Path) -> bool:
    """A folder laid out as optimum writes ONNX Stable Diffusion (told apart from a diffusers one)."""
    return (Path(path) / COMPONENT_FILES["unet"]).is_file()


@dataclass
class OnnxSdFolder:
    root: Path
    scheduler_config: dict[str, Any]
    vae_config: dict[str, Any]

    @classmethod
    def open(cls, root: str | Path) -> OnnxSdFolder:
        """Check the layout; every missing piece is named with the file it expected."""
        r = Path(root)
        if not r.is_dir():
            raise ExportError(f"--sd {r}: no such folder")
        for rel in (*COMPONENT_FILES.values(), "scheduler/scheduler_config.json"):
            if not (r / rel).is_file():
                raise ExportError(f"{r / rel} is missing: an ONNX Stable Diffusion folder (optimum's layout) holds "
                                  f"{', '.join(COMPONENT_FILES.values())}, tokenizer/ and scheduler/")
        tok = r / "tokenizer"
        if not (tok / "tokenizer.json").is_file() and not ((tok / "vocab.json").is_file() and
                                                          (tok / "merges.txt").is_file()):
            raise ExportError(f"{tok}: no tokenizer files (need tokenizer.json, or vocab.json and merges.txt); copy "
                              "the tokenizer/ folder of the same Stable Diffusion model into it")
        vae_cfg = r / "vae_encoder" / "config.json"
        return cls(r, _read_json(r / "scheduler" / "scheduler_config.json"),
                   _read_json(vae_cfg) if vae_cfg.is_file() else {})

    def load(self, component: str) -> Any:
        import onnx

        path = self.root / COMPONENT_FILES[component]
        try:
            return onnx.load(str(path))  # external data is resolved next to the file
        except Exception as exc:
            raise ExportError(f"{path} cannot be read as ONNX: {exc}") from exc

    @property
    def scaling_factor(self) -> float:
        if "scaling_factor" not in self.vae_config:
            log.warning("%s has no scaling_factor: using SD v1's 0.18215", self.root / "vae_encoder" / "config.json")
        return float(self.vae_config.get("scaling_factor", 0.18215))

    def image_size(self, default: int) -> int:
        return int(self.vae_config.get("sample_size", default))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ExportError(f"{path} cannot be read as JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ExportError(f"{path} must hold a JSON object")
    return data


# -- tokenizer -------------------------------------------------------------------------------
def write_tokenizer_json(tok_dir: Path, out: Path, max_length: int = 77) -> int:
    """``tokenizer/`` -> one ``tokenizer.json`` for the runtime; returns the pad id. A folder with
    vocab.json + merges.txt (CLIP's slow format) is converted the way transformers' CLIPConverter
    does: NFC, whitespace runs to one space, lower case; CLIP's split pattern then byte-level
    pre-tokenisation; BPE with the ``</w>`` end-of-word suffix; ``<|startoftext|> ... <|endoftext|>``."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    config = _read_json(tok_dir / "tokenizer_config.json") if (tok_dir / "tokenizer_config.json").is_file() else {}

    def special(key: str, default: str) -> str:
        v = config.get(key, default)
        return str(v["content"] if isinstance(v, dict) else v)

    bos, eos = special("bos_token", "<|startoftext|>"), special("eos_token", "<|endoftext|>")
    if (tok_dir / "tokenizer.json").is_file():
        tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    else:
        vocab = _read_json(tok_dir / "vocab.json")
        lines = (tok_dir / "merges.txt").read_text(encoding="utf-8").strip().split("\n")[1 : CLIP_MERGES + 1]
        merges = [(a, b) for a, b in (line.split() for line in lines)]
        tok = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                            end_of_word_suffix="</w>", fuse_unk=False, unk_token=special("unk_token", eos)))
        tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                               normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""),
                                 behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ])
        tok.decoder = decoders.ByteLevel()
        # (sep, cls): the template <|startoftext|> ... <|endoftext|>
        tok.post_processor = processors.RobertaProcessing((eos, _token_id(tok, eos)), (bos, _token_id(tok, bos)),
                                                          trim_offsets=False, add_prefix_space=False)
    pad = special("pad_token", eos)
    pad_id = _token_id(tok, pad)
    tok.enable_truncation(max_length)
    tok.enable_padding(length=max_length, pad_id=pad_id, pad_token=pad)
    tok.save(str(out))
    return pad_id


def _token_id(tok: Any, token: str) -> int:
    i = tok.token_to_id(token)
    if i is None:
        raise ExportError(f"the tokenizer has no {token!r} token; is tokenizer/ CLIP's?")
    return int(i)


# -- graph editing ---------------------------------------------------------------------------
def _rename(graph: Any, old: str, new: str) -> None:
    """Rename tensor ``old`` everywhere in ``graph``: node inputs/outputs, graph I/O, value_info."""
    for n in graph.node:
        n.input[:] = [new if x == old else x for x in n.input]
        n.output[:] = [new if x == old else x for x in n.output]
    for v in (*graph.input, *graph.output, *graph.value_info):
        if v.name == old:
            v.name = new


def _io(graph: Any, name: str, where: str, inputs: bool = True) -> Any:
    for v in graph.input if inputs else graph.output:
        if v.name == name:
            return v
    have = [v.name for v in (graph.input if inputs else graph.output)]
    raise ExportError(f"{where}: no {'input' if inputs else 'output'} {name!r} (it has {have})")


def _rank(v: Any) -> int | None:
    t = v.type.tensor_type
    return len(t.shape.dim) if t.HasField("shape") else None


def _cast_input(graph: Any, name: str, to_type: int) -> None:
    """Make graph input ``name`` of type ``to_type`` (the contract's), casting to what the graph
    expects right after it."""
    from onnx import helper

    v = next(v for v in graph.input if v.name == name)
    inner = v.type.tensor_type.elem_type
    if inner == to_type:
        return
    internal = f"dbmef_{name}_cast"
    for n in graph.node:
        n.input[:] = [internal if x == name else x for x in n.input]
    v.type.tensor_type.elem_type = to_type
    graph.node.insert(0, helper.make_node("Cast", [name], [internal], to=inner, name=f"dbmef_cast_{name}"))


def _cast_output(graph: Any, name: str, to_type: int) -> None:
    from onnx import helper

    v = next(v for v in graph.output if v.name == name)
    inner = v.type.tensor_type.elem_type
    if inner == to_type:
        return
    internal = f"dbmef_{name}_uncast"
    for n in graph.node:
        n.output[:] = [internal if x == name else x for x in n.output]
        n.input[:] = [internal if x == name else x for x in n.input]
    v.type.tensor_type.elem_type = to_type
    graph.node.append(helper.make_node("Cast", [internal], [name], to=to_type, name=f"dbmef_cast_{name}"))


def _keep_outputs(graph: Any, names: list[str]) -> None:
    keep = [v for v in graph.output if v.name in names]
    del graph.output[:]
    graph.output.extend(keep)


def adapt_text_encoder(model: Any, where: str = COMPONENT_FILES["text_encoder"]) -> Any:
    """input_ids (int64) -> last_hidden_state (float32) only."""
    from onnx import TensorProto

    m = copy.deepcopy(model)
    g = m.graph
    _io(g, "input_ids", where)
    _io(g, "last_hidden_state", where, inputs=False)
    _keep_outputs(g, ["last_hidden_state"])
    _cast_input(g, "input_ids", TensorProto.INT64)
    _cast_output(g, "last_hidden_state", TensorProto.FLOAT)
    return m


def adapt_vae_encoder(model: Any, scaling_factor: float, where: str = COMPONENT_FILES["vae_encoder"]) -> Any:
    """image (float32) -> latent = latent_parameters[:, :C/2] * scaling_factor (the mean)."""
    from onnx import TensorProto, helper, numpy_helper

    m = copy.deepcopy(model)
    g = m.graph
    outs = [v.name for v in g.output]
    if "latent_parameters" not in outs:
        if "latent_sample" in outs:
            raise ExportError(f"{where} emits only 'latent_sample', a sample of the latent distribution; DBMEF's "
                              "latent is its mean. Re-export the VAE encoder with a recent optimum (its output "
                              "'latent_parameters' holds the mean and log-variance) or from the diffusers folder")
        raise ExportError(f"{where}: no output 'latent_parameters' (it has {outs})")
    _rename(g, _io(g, "sample", where).name, "image")
    _cast_input(g, "image", TensorProto.FLOAT)
    _cast_output(g, "latent_parameters", TensorProto.FLOAT)
    _keep_outputs(g, ["latent_parameters"])
    params = g.output[0]
    dims = params.type.tensor_type.shape.dim
    channels = dims[1].dim_value if len(dims) > 1 and dims[1].dim_value else 8
    g.initializer.extend([
        numpy_helper.from_array(np.array([0], np.int64), "dbmef_c0"),
        numpy_helper.from_array(np.array([channels // 2], np.int64), "dbmef_c_half"),
        numpy_helper.from_array(np.array([1], np.int64), "dbmef_axis1"),
        numpy_helper.from_array(np.array(scaling_factor, np.float32), "dbmef_scaling_factor"),
    ])
    g.node.extend([
        helper.make_node("Slice", ["latent_parameters", "dbmef_c0", "dbmef_c_half", "dbmef_axis1"], ["dbmef_mean"],
                         name="dbmef_mean"),
        helper.make_node("Mul", ["dbmef_mean", "dbmef_scaling_factor"], ["latent"], name="dbmef_scale"),
    ])
    del g.output[:]
    g.output.append(helper.make_tensor_value_info("latent", TensorProto.FLOAT, ["B", channels // 2, "h", "w"]))
    return m


def adapt_unet(model: Any, where: str = COMPONENT_FILES["unet"]) -> Any:
    """sample, timestep (int64, one per row), encoder_hidden_states -> noise_pred (float32)."""
    from onnx import TensorProto

    m = copy.deepcopy(model)
    g = m.graph
    names = {v.name for v in g.input} - {i.name for i in g.initializer}
    extra = names - {"sample", "timestep", "encoder_hidden_states"}
    if extra:
        raise ExportError(f"{where} takes {sorted(extra)} besides sample, timestep and encoder_hidden_states "
                          "(an SDXL or LCM UNet); dbmef scores with Stable Diffusion 1.x/2.x UNets")
    t = _io(g, "timestep", where)
    if _rank(t) != 1:
        raise ExportError(f"{where}: input 'timestep' has rank {_rank(t)}, one timestep for the whole call; DBMEF "
                          "evaluates rows at different timesteps in one call and needs a per-row timestep of shape "
                          "(batch,). Export the UNet with a batch axis on timestep (diffusers' "
                          "convert_stable_diffusion_checkpoint_to_onnx.py, Olive's SD example), or give "
                          "dbmef-export the diffusers folder")
    _io(g, "sample", where)
    _io(g, "encoder_hidden_states", where)
    _rename(g, _io(g, "out_sample", where, inputs=False).name, "noise_pred")
    for name in ("sample", "encoder_hidden_states"):
        _cast_input(g, name, TensorProto.FLOAT)
    _cast_input(g, "timestep", TensorProto.INT64)
    _cast_output(g, "noise_pred", TensorProto.FLOAT)
    return m


def compose_scorer(unet: Any, abar: np.ndarray) -> Any:
    """The fused scorer around an adapted UNet graph (``adapt_unet``'s output): x0, eps, timestep,
    emb_pos, emb_neg, lam -> error (B,), the contract of ``dbmef.runtime.engine.SCORER``.

    x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (float64 roots cast to float32, the runtime's
    tables); the UNet runs once on [x_t; x_t] with [t; t] and [emb_pos; emb_neg]; eps_hat = neg +
    lam (pos - neg); error = mean over (C, h, w) of (eps - eps_hat)^2."""
    m = copy.deepcopy(unet)
    g = m.graph
    opset = max((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset < 13:
        raise ExportError(f"the UNet graph uses opset {opset}; composing the scorer needs opset 13 or later")
    sample, ehs = (next(v for v in g.input if v.name == n) for n in ("sample", "encoder_hidden_states"))
    lat_dims = [d.dim_value or d.dim_param or "?" for d in sample.type.tensor_type.shape.dim]
    emb_dims = [d.dim_value or d.dim_param or "?" for d in ehs.type.tensor_type.shape.dim]
    for old, new in (("sample", "dbmef_sample2"), ("timestep", "dbmef_t2"), ("encoder_hidden_states", "dbmef_ehs2"),
                     ("noise_pred", "dbmef_pred2")):
        _rename(g, old, new)
    _scorer_io(g, lat_dims, emb_dims, abar)
    pre, post = _scorer_nodes(opset)
    nodes = [*pre, *g.node, *post]
    del g.node[:]
    g.node.extend(nodes)
    return m


def _scorer_io(g: Any, lat_dims: list[Any], emb_dims: list[Any], abar: np.ndarray) -> None:
    """The scorer contract's inputs and output, and the constant tables its nodes read."""
    from onnx import TensorProto, helper, numpy_helper

    del g.input[:]
    del g.output[:]
    f32 = TensorProto.FLOAT
    g.input.extend([
        helper.make_tensor_value_info("x0", f32, ["B", *lat_dims[1:]]),
        helper.make_tensor_value_info("eps", f32, ["B", *lat_dims[1:]]),
        helper.make_tensor_value_info("timestep", TensorProto.INT64, ["B"]),
        helper.make_tensor_value_info("emb_pos", f32, ["B", *emb_dims[1:]]),
        helper.make_tensor_value_info("emb_neg", f32, ["B", *emb_dims[1:]]),
        helper.make_tensor_value_info("lam", f32, [1]),
    ])
    g.output.append(helper.make_tensor_value_info("error", f32, ["B"]))
    g.initializer.extend([
        numpy_helper.from_array(np.sqrt(abar).astype(np.float32), "dbmef_sqrt_abar"),
        numpy_helper.from_array(np.sqrt(1.0 - abar).astype(np.float32), "dbmef_sqrt_1m_abar"),
        numpy_helper.from_array(np.array([-1, 1, 1, 1], np.int64), "dbmef_shape_b111"),
        numpy_helper.from_array(np.array([0], np.int64), "dbmef_zero"),
        numpy_helper.from_array(np.array([1], np.int64), "dbmef_one"),
        numpy_helper.from_array(np.array([1, 2, 3], np.int64), "dbmef_chw"),
    ])


def _scorer_nodes(opset: int) -> tuple[list[Any], list[Any]]:
    """The nodes before the UNet (x_t, the doubled batch) and after it (CFG combine, the error)."""
    from onnx import helper

    node = helper.make_node
    pre = [
        node("Gather", ["dbmef_sqrt_abar", "timestep"], ["dbmef_a0"], axis=0, name="dbmef_gather_a"),
        node("Reshape", ["dbmef_a0", "dbmef_shape_b111"], ["dbmef_a"], name="dbmef_reshape_a"),
        node("Gather", ["dbmef_sqrt_1m_abar", "timestep"], ["dbmef_s0"], axis=0, name="dbmef_gather_s"),
        node("Reshape", ["dbmef_s0", "dbmef_shape_b111"], ["dbmef_s"], name="dbmef_reshape_s"),
        node("Mul", ["dbmef_a", "x0"], ["dbmef_ax0"], name="dbmef_ax0"),
        node("Mul", ["dbmef_s", "eps"], ["dbmef_seps"], name="dbmef_seps"),
        node("Add", ["dbmef_ax0", "dbmef_seps"], ["dbmef_xt"], name="dbmef_xt"),
        node("Concat", ["dbmef_xt", "dbmef_xt"], ["dbmef_sample2"], axis=0, name="dbmef_cat_sample"),
        node("Concat", ["timestep", "timestep"], ["dbmef_t2"], axis=0, name="dbmef_cat_t"),
        node("Concat", ["emb_pos", "emb_neg"], ["dbmef_ehs2"], axis=0, name="dbmef_cat_emb"),
    ]
    reduce = (node("ReduceMean", ["dbmef_sq", "dbmef_chw"], ["error"], keepdims=0, name="dbmef_mean")
              if opset >= 18 else node("ReduceMean", ["dbmef_sq"], ["error"], axes=[1, 2, 3], keepdims=0,
                                       name="dbmef_mean"))
    post = [
        node("Shape", ["x0"], ["dbmef_shape_x0"], name="dbmef_shape_x0"),
        node("Slice", ["dbmef_shape_x0", "dbmef_zero", "dbmef_one"], ["dbmef_b"], name="dbmef_b"),
        node("Concat", ["dbmef_b", "dbmef_b"], ["dbmef_split"], axis=0, name="dbmef_split_sizes"),
        node("Split", ["dbmef_pred2", "dbmef_split"], ["dbmef_pos", "dbmef_neg"], axis=0, name="dbmef_split"),
        node("Sub", ["dbmef_pos", "dbmef_neg"], ["dbmef_diff"], name="dbmef_pos_minus_neg"),
        node("Mul", ["lam", "dbmef_diff"], ["dbmef_ldiff"], name="dbmef_lam"),
        node("Add", ["dbmef_neg", "dbmef_ldiff"], ["dbmef_eps_hat"], name="dbmef_eps_hat"),
        node("Sub", ["eps", "dbmef_eps_hat"], ["dbmef_res"], name="dbmef_residual"),
        node("Mul", ["dbmef_res", "dbmef_res"], ["dbmef_sq"], name="dbmef_square"),
        reduce,
    ]
    return pre, post


def adapt_backbone(model: Any, where: str) -> Any:
    """A classifier graph with one image input and one output -> pixel_values -> logits (float32)."""
    from onnx import TensorProto

    m = copy.deepcopy(model)
    g = m.graph
    inputs = [v for v in g.input if v.name not in {i.name for i in g.initializer}]
    if len(inputs) != 1 or len(g.output) < 1:
        raise ExportError(f"{where}: a classifier graph has one input (the image batch) and its logits as first "
                          f"output; this one has inputs {[v.name for v in inputs]}, outputs "
                          f"{[v.name for v in g.output]}")
    _keep_outputs(g, [g.output[0].name])
    if _rank(inputs[0]) not in (None, 4) or _rank(g.output[0]) not in (None, 2):
        raise ExportError(f"{where}: expected an input of rank 4 (B, 3, H, W) and logits of rank 2 (B, C)")
    _rename(g, inputs[0].name, "pixel_values")
    _rename(g, g.output[0].name, "logits")
    _cast_input(g, "pixel_values", TensorProto.FLOAT)
    _cast_output(g, "logits", TensorProto.FLOAT)
    return m
