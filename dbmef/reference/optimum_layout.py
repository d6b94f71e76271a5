"""Write a diffusers Stable Diffusion folder as ONNX in optimum's layout, with dbmef's own writer.

optimum's exporter (optimum-onnx) pins transformers < 4.58 and cannot share this project's
environment, so the tests produce the fixture here, following the names and shapes optimum
documents for ``ORTStableDiffusionPipeline.save_pretrained`` (optimum's ``UNetOnnxConfig``,
``VaeEncoderOnnxConfig`` and ``CLIPTextOnnxConfig``):

- ``text_encoder/model.onnx``: input_ids int32 (batch, sequence) -> last_hidden_state, pooler_output
- ``unet/model.onnx``: sample, timestep, encoder_hidden_states -> out_sample. ``timestep="rows"``
  gives one int64 timestep per row (batch,), as diffusers' ONNX converter and Olive export it;
  ``"scalar"`` one for the call (rank 0, as recent optimum exports it)
- ``vae_encoder/model.onnx``: sample -> latent_parameters (mean and log-variance, 2C channels), or
  with ``vae_output="latent_sample"`` the older single output
- ``tokenizer/`` (vocab.json, merges.txt, ...), ``scheduler/scheduler_config.json``,
  ``vae_encoder/config.json``, ``model_index.json``
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn


class _TextEncoder(nn.Module):
    def __init__(self, te: nn.Module):
        super().__init__()
        self.te = te

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.te(input_ids.long())
        return out.last_hidden_state, out.pooler_output


class _Unet(nn.Module):
    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, ehs: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, timestep, ehs).sample


class _VaeEncoder(nn.Module):
    def __init__(self, vae: Any, output: str):
        super().__init__()
        self.vae, self.output = vae, output

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        dist = self.vae.encode(sample).latent_dist
        # latent_sample: what an older export emits; here the mean under that name (only its name is
        # inspected: such a folder is refused before anything runs)
        return dist.parameters if self.output == "latent_parameters" else dist.mean


def write_onnx_sd_folder(sd_dir: str | Path, out: str | Path, image_size: int, timestep: str = "rows",
                         vae_output: str = "latent_parameters", opset: int = 17) -> Path:
    """Export the diffusers folder ``sd_dir`` to ``out`` in optimum's ONNX layout (see above)."""
    from dbmef.reference.loading import load_sd

    sd = load_sd(sd_dir)
    root = Path(out)
    for sub in ("text_encoder", "unet", "vae_encoder", "scheduler"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    L, D = 77, int(sd.text_encoder.config.hidden_size)
    down = 2 ** (len(sd.vae.config.block_out_channels) - 1)
    h = image_size // down
    ids = torch.zeros(2, L, dtype=torch.int32)
    _export(_TextEncoder(sd.text_encoder), (ids,), root / "text_encoder/model.onnx", ["input_ids"],
            ["last_hidden_state", "pooler_output"], {"input_ids": {0: "batch_size", 1: "sequence_length"}}, opset)
    t = torch.tensor([10, 500]) if timestep == "rows" else torch.tensor(500)
    axes = {"sample": {0: "batch_size", 2: "height", 3: "width"}, "encoder_hidden_states": {0: "batch_size"}}
    if timestep == "rows":
        axes["timestep"] = {0: "batch_size"}
    _export(_Unet(sd.unet), (torch.randn(2, 4, h, h), t, torch.randn(2, L, D)), root / "unet/model.onnx",
            ["sample", "timestep", "encoder_hidden_states"], ["out_sample"], axes, opset)
    _export(_VaeEncoder(sd.vae, vae_output), (torch.rand(2, 3, image_size, image_size) * 2 - 1,),
            root / "vae_encoder/model.onnx", ["sample"], [vae_output], {"sample": {0: "batch_size"}}, opset)
    src = Path(sd_dir)
    shutil.copytree(src / "tokenizer", root / "tokenizer", dirs_exist_ok=True)
    shutil.copy(src / "scheduler" / "scheduler_config.json", root / "scheduler" / "scheduler_config.json")
    shutil.copy(src / "vae" / "config.json", root / "vae_encoder" / "config.json")
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "ORTStableDiffusionPipeline", "text_encoder": ["optimum", "ORTModelTextEncoder"],
        "unet": ["optimum", "ORTModelUnet"], "vae_encoder": ["optimum", "ORTModelVaeEncoder"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDPMScheduler"]}, indent=1))
    return root


def _export(module: nn.Module, args: tuple[torch.Tensor, ...], path: Path, inputs: list[str], outputs: list[str],
            axes: dict[str, dict[int, str]], opset: int) -> None:
    with torch.no_grad():
        torch.onnx.export(module.eval(), args, str(path), input_names=inputs, output_names=outputs,
                          dynamic_axes=axes, opset_version=opset, dynamo=False)
