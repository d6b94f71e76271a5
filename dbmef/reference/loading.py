"""Load a DBMEF system's torch models from local folders (never from the network).

A *system folder* holds what the method needs, in the layouts real weights use:
``sd/`` a diffusers Stable Diffusion folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/),
``backbone/`` a timm model saved with ``timm.models.save_for_hf`` (config.json + weights), and
``class_names.json``. Real SD v1.5 and timm folders load through exactly the same calls.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dbmef.errors import ExportError

log = logging.getLogger(__name__)


@dataclass
class SDComponents:
    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler_config: dict[str, Any]
    source: str


def _require_dir(path: Path, what: str, fix: str) -> None:
    if not path.is_dir():
        raise ExportError(f"{what} not found at {path}; {fix}")


def load_sd(path: str | Path, dtype: Any = None) -> SDComponents:
    """Load the UNet, VAE, CLIP text encoder and tokenizer of a local diffusers SD folder."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    root = Path(path)
    fix = "pass a local diffusers folder of SD v1.5 (with unet/, vae/, text_encoder/, tokenizer/)"
    for sub in ("unet", "vae", "text_encoder", "tokenizer"):
        _require_dir(root / sub, f"SD component '{sub}'", fix)
    dtype = dtype or torch.float32
    quiet_hf_logging()
    kw: dict[str, Any] = {"local_files_only": True}
    # low_cpu_mem_usage=False: without `accelerate` diffusers falls back to it anyway, loudly.
    dkw = {**kw, "torch_dtype": dtype, "low_cpu_mem_usage": False}
    unet = UNet2DConditionModel.from_pretrained(root, subfolder="unet", **dkw).eval()
    vae = AutoencoderKL.from_pretrained(root, subfolder="vae", **dkw).eval()
    text_encoder = CLIPTextModel.from_pretrained(root, subfolder="text_encoder", dtype=dtype, **kw).eval()
    tokenizer = CLIPTokenizer.from_pretrained(root, subfolder="tokenizer", **kw)
    sched_file = root / "scheduler" / "scheduler_config.json"
    sched = json.loads(sched_file.read_text()) if sched_file.is_file() else {}
    return SDComponents(unet, vae, text_encoder, tokenizer, sched, str(root))


def latent_shape(vae_config: Any, image_size: int) -> tuple[int, int, int]:
    """(C, h, w) of the VAE latent for ``image_size`` inputs: each encoder block after the first
    halves the resolution (8x for SD)."""
    down = 2 ** (len(vae_config.block_out_channels) - 1)
    return int(vae_config.latent_channels), image_size // down, image_size // down


def quiet_hf_logging() -> None:
    """Keep diffusers/transformers to errors and off the progress bars: dbmef owns the output."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()


def load_backbone(path_or_name: str | Path, weights: str | Path | None = None, random_init: bool = False,
                  num_classes: int | None = None) -> Any:
    """A timm classifier from a local folder (``save_for_hf`` layout), or by model name from the
    local timm/Hugging Face cache, a weights file, or random init. Never downloads."""
    import timm
    import torch

    p = Path(path_or_name)
    if p.is_dir():
        return timm.create_model(f"local-dir:{p}", pretrained=True).eval()
    name = str(path_or_name)
    known = timm.list_models()
    if name not in known and name.split(".")[0] not in known:
        import difflib

        close = difflib.get_close_matches(name.split(".")[0], known, n=3, cutoff=0.75)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else \
            " (timm.list_models() lists the names)"
        raise ExportError(f"'{name}' is neither a local timm folder nor a timm model name{hint}")
    kwargs: dict[str, Any] = {}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if random_init or weights is not None:
        model = timm.create_model(name, pretrained=False, **kwargs)
        if weights is not None:
            wp = Path(weights)
            if not wp.is_file():
                raise ExportError(f"backbone weights file {wp} not found; check --weights")
            state: Any
            if wp.suffix == ".safetensors":
                from safetensors.torch import load_file

                state = load_file(str(wp))
            else:
                state = torch.load(wp, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state) if isinstance(state, dict) else state
            model.load_state_dict(state)
        return model.eval()
    # pretrained from the local cache only: HF_HUB_OFFLINE makes a miss fail at once, not hang.
    import os

    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        return timm.create_model(name, pretrained=True, **kwargs).eval()
    except Exception as exc:  # hub errors come in many types
        raise ExportError(
            f"pretrained weights for backbone '{name}' are not in the local timm/Hugging Face cache "
            f"({type(exc).__name__}); pass --weights FILE, or --random-init for the architecture only"
        ) from exc
    finally:
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old


def backbone_data_config(model: Any) -> dict[str, Any]:
    """The model's own preprocessing (timm's ``resolve_model_data_config``), JSON-ready."""
    from timm.data import resolve_model_data_config

    cfg = resolve_model_data_config(model)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()}


def save_tokenizer_json(tokenizer: Any, out_path: str | Path, max_length: int = 77) -> int:
    """Write the CLIP tokenizer as a single ``tokenizer.json`` the lean runtime reads with the
    ``tokenizers`` library. Returns the pad id (SD pads with ``<|endoftext|>``)."""
    backend = tokenizer.backend_tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    backend.enable_truncation(max_length)
    backend.enable_padding(length=max_length, pad_id=pad_id, pad_token=tokenizer.convert_ids_to_tokens(pad_id))
    backend.save(str(out_path))
    return int(pad_id)


def read_class_names(path: str | Path) -> list[str]:
    """Class names from a JSON list or a text file with one name per line."""
    p = Path(path)
    if not p.is_file():
        raise ExportError(f"class-names file {p} not found")
    text = p.read_text()
    if p.suffix == ".json":
        names = json.loads(text)
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ExportError(f"{p} must hold a JSON list of class-name strings")
        return names
    return [line.strip() for line in text.splitlines() if line.strip()]
