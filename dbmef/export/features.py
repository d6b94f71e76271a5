"""The ``features`` component: one ONNX graph from an image to its diffusion features, composed by
graph editing from the bundle's own VAE encoder and UNet graphs (torch-free, so a bundle exported
from torch, an ONNX folder's UNet and the committed digits bundle all take the same path).

    pixel_values [B,3,S,S] in [-1,1] -> VAE encoder (mean * scaling) -> x_t = sqrt(abar_t) x0
    + sqrt(1-abar_t) eps (one fixed eps, baked in) -> UNet (t and the empty prompt's embedding baked
    in, expanded to the batch) cut at the block's output -> p x p average pool -> features [B, C p p]

A block is found by its module scope in the node names both torch exporters write
(``/unet/up_blocks.1/attentions.1/Add``; optimum's ``/up_blocks.1/...``): its output is the last
tensor produced inside the scope and read outside it (a down block's residuals leave too, earlier;
the last one is the block's output). A graph without scope names is refused. The cut is checked
against torch's forward hook in the tests; the composition against the separate graphs here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from dbmef.errors import ExportError
from dbmef.runtime.features import FeatureSpec, block_module

SCOPE = re.compile(r"/(down_blocks\.\d+|mid_block|up_blocks\.\d+)/")
# ops whose outputs are shapes or indices, never a block's activation
SHAPE_OPS = frozenset({"Shape", "Size", "Constant", "ConstantOfShape", "Gather", "Unsqueeze", "Squeeze", "Concat",
                       "Cast", "Range", "Slice", "Equal"})
UNET_INPUTS = ("sample", "timestep", "encoder_hidden_states")


def blocks_of(unet: Any) -> list[str]:
    """The block names (``down.0``, ``mid``, ``up.1``...) whose scopes the UNet graph's nodes carry."""
    found = {m.group(1) for n in unet.graph.node for m in [SCOPE.search(n.name + "/")] if m}
    names = [s.replace("_blocks", "").replace("mid_block", "mid") for s in found]
    return sorted(names, key=lambda b: ({"down": 0, "mid": 1, "up": 2}[b.split(".")[0]], b))


def block_output(unet: Any, block: str) -> str:
    """The name of the tensor the block outputs in the UNet graph (see the module doc)."""
    token = f"/{block_module(block)}/"
    nodes = list(unet.graph.node)
    scope = {i for i, n in enumerate(nodes) if token in n.name + "/"}
    if not scope:
        have = blocks_of(unet)
        raise ExportError(f"the UNet graph has no nodes named in scope {token!r} (block {block!r}): "
                          + (f"its blocks are {have}" if have else "its node names carry no module scopes, so a "
                             "block cannot be located; export the UNet with torch.onnx.export (as dbmef-export and "
                             "optimum do), which names nodes by module"))
    read_outside = {x for i, n in enumerate(nodes) if i not in scope for x in n.input}
    read_outside |= {o.name for o in unet.graph.output}
    for i in sorted(scope, reverse=True):
        n = nodes[i]
        if n.op_type in SHAPE_OPS:
            continue
        hits = [o for o in n.output if o in read_outside]
        if hits:
            return hits[0]
    raise ExportError(f"no tensor leaves the UNet graph's scope {token!r}: the block {block!r} cannot be cut out")


def prune(graph: Any, outputs: list[str]) -> tuple[list[Any], set[str]]:
    """The nodes (in order) that ``outputs`` depend on, and the tensor names they read."""
    need, keep = set(outputs), []
    for n in reversed(list(graph.node)):
        if any(o in need for o in n.output):
            keep.append(n)
            need.update(x for x in n.input if x)
    return keep[::-1], need


def cut_unet(unet: Any, outputs: Mapping[str, str]) -> Any:
    """The UNet graph cut at block outputs: a model whose outputs are ``{name: block}``'s blocks'
    activations, renamed to ``name``; nothing past them kept."""
    import onnx
    from onnx import helper

    tensors = {name: block_output(unet, block) for name, block in outputs.items()}
    nodes, read = prune(unet.graph, list(tensors.values()))
    renames = [helper.make_node("Identity", [t], [name], name=f"output/{name}") for name, t in tensors.items()]
    inits = [t for t in unet.graph.initializer if t.name in read]
    inputs = [i for i in unet.graph.input if i.name in read]
    outs = [helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in tensors]
    g = helper.make_graph([*nodes, *renames], "unet_blocks", inputs, outs, inits)
    return helper.make_model(g, opset_imports=list(unet.opset_import), ir_version=unet.ir_version)


def opset_of(model: Any) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def compose(vae: Any, unet: Any, outputs: Mapping[str, tuple[str, int | None]], timestep: int, abar_t: float,
            eps: np.ndarray, embedding: np.ndarray) -> Any:
    """The one graph pixel_values -> each output ``name: (block, pool)`` (pool None: the raw
    (B, C, H, W) activation; else (B, C p p)). ``eps`` (1, C, h, w) and ``embedding`` (1, L, D) are
    baked in as constants."""
    import onnx
    from onnx import compose as onnx_compose
    from onnx import helper, numpy_helper

    if opset_of(vae) != opset_of(unet):
        raise ExportError(f"the VAE encoder (opset {opset_of(vae)}) and the UNet (opset {opset_of(unet)}) graphs "
                          "differ in opset; re-export them with one opset")
    cut = cut_unet(unet, {f"act/{name}": block for name, (block, _) in outputs.items()})
    vae = onnx_compose.add_prefix(vae, "vae/")
    cut = onnx_compose.add_prefix(cut, "unet/")
    const = [
        numpy_helper.from_array(np.array(np.sqrt(abar_t), np.float32), "glue/a"),
        numpy_helper.from_array(np.array(np.sqrt(1.0 - abar_t), np.float32), "glue/b"),
        numpy_helper.from_array(np.ascontiguousarray(eps, np.float32), "glue/eps"),
        numpy_helper.from_array(np.array([timestep], np.int64), "glue/t"),
        numpy_helper.from_array(np.ascontiguousarray(embedding, np.float32), "glue/emb"),
        numpy_helper.from_array(np.array([0], np.int64), "glue/zero"),
        numpy_helper.from_array(np.array([1], np.int64), "glue/one"),
        numpy_helper.from_array(np.array(embedding.shape[1:], np.int64), "glue/emb_dims"),
    ]
    n = helper.make_node
    pre = [n("Identity", ["pixel_values"], ["vae/image"], name="glue/image"),
           n("Shape", ["pixel_values"], ["glue/shape"], name="glue/shape"),
           n("Slice", ["glue/shape", "glue/zero", "glue/one"], ["glue/batch"], name="glue/batch")]
    mid = [n("Mul", ["vae/latent", "glue/a"], ["glue/x0a"], name="glue/x0a"),
           n("Mul", ["glue/eps", "glue/b"], ["glue/epsb"], name="glue/epsb"),
           n("Add", ["glue/x0a", "glue/epsb"], ["unet/sample"], name="glue/noised"),
           n("Expand", ["glue/t", "glue/batch"], ["unet/timestep"], name="glue/timestep"),
           n("Concat", ["glue/batch", "glue/emb_dims"], ["glue/emb_shape"], axis=0, name="glue/emb_shape"),
           n("Expand", ["glue/emb", "glue/emb_shape"], ["unet/encoder_hidden_states"], name="glue/emb")]
    post: list[Any] = []
    for name, (_, pool) in outputs.items():
        post += pool_nodes(f"unet/act/{name}", name, pool, opset_of(unet), const)
    graph = helper.make_graph(
        [*pre, *vae.graph.node, *mid, *cut.graph.node, *post], "dbmef_features",
        [helper.make_tensor_value_info("pixel_values", onnx.TensorProto.FLOAT, ["B", 3, "H", "W"])],
        [helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in outputs],
        [*vae.graph.initializer, *cut.graph.initializer, *const])
    return helper.make_model(graph, opset_imports=list(unet.opset_import), ir_version=max(vae.ir_version,
                                                                                          unet.ir_version))


def pool_nodes(src: str, dst: str, pool: int | None, opset: int, const: list[Any]) -> list[Any]:
    """(B, C, H, W) -> (B, C p p): reshape to (B, C, p, H/p, p, W/p), mean over the tile axes,
    flatten (what ``pool_features`` computes on the host); pool None: an Identity."""
    from onnx import helper, numpy_helper

    n = helper.make_node
    if pool is None:
        return [n("Identity", [src], [dst], name=f"pool/{dst}")]
    p = f"pool/{dst}"
    const += [numpy_helper.from_array(np.array([pool], np.int64), f"{p}/p"),
              numpy_helper.from_array(np.array([0, 1], np.int64), f"{p}/bc_idx"),
              numpy_helper.from_array(np.array([2], np.int64), f"{p}/h_idx"),
              numpy_helper.from_array(np.array([3], np.int64), f"{p}/w_idx")]
    nodes = [n("Shape", [src], [f"{p}/shape"], name=f"{p}/shape"),
             n("Gather", [f"{p}/shape", f"{p}/bc_idx"], [f"{p}/bc"], axis=0, name=f"{p}/bc"),
             n("Gather", [f"{p}/shape", f"{p}/h_idx"], [f"{p}/h"], axis=0, name=f"{p}/h"),
             n("Gather", [f"{p}/shape", f"{p}/w_idx"], [f"{p}/w"], axis=0, name=f"{p}/w"),
             n("Div", [f"{p}/h", f"{p}/p"], [f"{p}/hp"], name=f"{p}/hp"),
             n("Div", [f"{p}/w", f"{p}/p"], [f"{p}/wp"], name=f"{p}/wp"),
             n("Concat", [f"{p}/bc", f"{p}/p", f"{p}/hp", f"{p}/p", f"{p}/wp"], [f"{p}/tiles_shape"], axis=0,
               name=f"{p}/tiles_shape"),
             n("Reshape", [src, f"{p}/tiles_shape"], [f"{p}/tiles"], name=f"{p}/tiles")]
    if opset >= 18:  # ReduceMean's axes became an input in opset 18
        const.append(numpy_helper.from_array(np.array([3, 5], np.int64), f"{p}/axes"))
        nodes.append(n("ReduceMean", [f"{p}/tiles", f"{p}/axes"], [f"{p}/mean"], keepdims=0, name=f"{p}/mean"))
    else:
        nodes.append(n("ReduceMean", [f"{p}/tiles"], [f"{p}/mean"], axes=[3, 5], keepdims=0, name=f"{p}/mean"))
    nodes.append(n("Flatten", [f"{p}/mean"], [dst], axis=1, name=f"{p}/flatten"))
    return nodes


def attach_head(features: Any, weight: np.ndarray, bias: np.ndarray) -> Any:
    """The feature graph with a linear head after its ``features`` output: pixel_values -> logits,
    the backbone contract (``weight`` (C, F), ``bias`` (C,))."""
    import onnx
    from onnx import helper, numpy_helper

    g = features.graph
    if [o.name for o in g.output] != ["features"]:
        raise ExportError("a head attaches to a graph with the one output 'features'")
    inits = [numpy_helper.from_array(np.ascontiguousarray(weight, np.float32), "head/weight"),
             numpy_helper.from_array(np.ascontiguousarray(bias, np.float32), "head/bias")]
    head = helper.make_node("Gemm", ["features", "head/weight", "head/bias"], ["logits"], transB=1, name="head/gemm")
    graph = helper.make_graph([*g.node, head], "dbmef_feature_head", list(g.input),
                              [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["B", "C"])],
                              [*g.initializer, *inits])
    return helper.make_model(graph, opset_imports=list(features.opset_import), ir_version=features.ir_version)


def feature_graph(vae_path: Path, unet_path: Path, spec: FeatureSpec, abar: np.ndarray, latent_shape: tuple[int, ...],
                  embedding: np.ndarray, raw_blocks: list[str] | None = None) -> Any:
    """The ``features`` graph of ``spec`` from two graph files; with ``raw_blocks``, instead one
    graph with each block's raw activation as output ``act.<block>`` (the ablation's: all blocks
    at one t from one UNet pass)."""
    import onnx

    from dbmef.runtime.features import feature_noise

    if not 0 <= spec.timestep < len(abar):
        raise ExportError(f"feature timestep {spec.timestep} is outside the schedule's 0..{len(abar) - 1}")
    outputs: dict[str, tuple[str, int | None]] = (
        {f"act.{b}": (b, None) for b in raw_blocks} if raw_blocks else {"features": (spec.block, spec.pool)})
    return compose(onnx.load(str(vae_path)), onnx.load(str(unet_path)), outputs, spec.timestep,
                   float(abar[spec.timestep]), feature_noise(spec.seed, tuple(latent_shape)), embedding)
