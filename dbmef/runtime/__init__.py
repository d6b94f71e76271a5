"""The lean DBMEF runtime: numpy, Pillow, tokenizers and an engine backend.

Never imports torch, diffusers, timm or transformers (a test and an import-linter contract keep
it so). Backends with heavy packages (onnxruntime, tensorrt) are imported lazily.
"""

from __future__ import annotations

from dbmef.runtime.config import PromptTemplates, ScoringConfig
from dbmef.runtime.engine import COMPONENTS, ComponentSpec, Engine, FunctionEngine
from dbmef.runtime.noise import NoiseBank
from dbmef.runtime.pipeline import DBMEFPipeline, ImageResult, PipelineEngines
from dbmef.runtime.preprocess import BackbonePreprocess, VaePreprocess, load_image
from dbmef.runtime.prompts import negative_prompts, positive_prompt
from dbmef.runtime.protector import Protector, softmax
from dbmef.runtime.schedule import alphas_cumprod, scaled_linear_betas, timestep_grid
from dbmef.runtime.scorer import DiffusionScorer, ScoreResult, combine_and_error, vote
from dbmef.runtime.tokenizer import ClipTokenizer

__all__ = [
    "COMPONENTS",
    "BackbonePreprocess",
    "ClipTokenizer",
    "ComponentSpec",
    "DBMEFPipeline",
    "DiffusionScorer",
    "Engine",
    "FunctionEngine",
    "ImageResult",
    "NoiseBank",
    "PipelineEngines",
    "PromptTemplates",
    "Protector",
    "ScoreResult",
    "ScoringConfig",
    "VaePreprocess",
    "alphas_cumprod",
    "combine_and_error",
    "load_image",
    "negative_prompts",
    "positive_prompt",
    "scaled_linear_betas",
    "softmax",
    "timestep_grid",
    "vote",
]
