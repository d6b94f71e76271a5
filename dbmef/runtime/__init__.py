"""The lean DBMEF runtime: numpy, Pillow, tokenizers and an engine backend.

Never imports torch, diffusers, timm or transformers (a test and an import-linter contract keep
it so). Backends with heavy packages (onnxruntime, tensorrt) are imported lazily.
"""

from __future__ import annotations

from dbmef.runtime.backends import register as register_backend
from dbmef.runtime.config import ScoringConfig
from dbmef.runtime.early_exit import ExitPolicy, RowPlanner, replay
from dbmef.runtime.engine import COMPONENTS, ComponentSpec, Engine, FunctionEngine, LazyEngine, RowScorer
from dbmef.runtime.method import (
    Gate,
    PromptTemplates,
    add_noise,
    combine_and_error,
    gate,
    negative_prompts,
    positive_prompt,
    softmax,
    top_k,
    vote,
)
from dbmef.runtime.noise import NoiseBank
from dbmef.runtime.pipeline import DBMEFPipeline, PipelineEngines
from dbmef.runtime.preprocess import BackbonePreprocess, VaePreprocess, load_image
from dbmef.runtime.protector import Protector
from dbmef.runtime.results import Batch, ImageResult
from dbmef.runtime.schedule import NoiseSchedule, alphas_cumprod, scaled_linear_betas, timestep_grid
from dbmef.runtime.scorer import DiffusionScorer, ScoreResult
from dbmef.runtime.system import DBMEFRuntime, RuntimeSpec
from dbmef.runtime.tokenizer import ClipTokenizer

__all__ = [
    "COMPONENTS",
    "BackbonePreprocess",
    "Batch",
    "ClipTokenizer",
    "ComponentSpec",
    "DBMEFPipeline",
    "DBMEFRuntime",
    "DiffusionScorer",
    "Engine",
    "ExitPolicy",
    "FunctionEngine",
    "Gate",
    "ImageResult",
    "LazyEngine",
    "NoiseBank",
    "NoiseSchedule",
    "PipelineEngines",
    "PromptTemplates",
    "Protector",
    "RowPlanner",
    "RowScorer",
    "RuntimeSpec",
    "ScoreResult",
    "ScoringConfig",
    "VaePreprocess",
    "add_noise",
    "alphas_cumprod",
    "combine_and_error",
    "gate",
    "load_image",
    "negative_prompts",
    "positive_prompt",
    "register_backend",
    "replay",
    "scaled_linear_betas",
    "softmax",
    "timestep_grid",
    "top_k",
    "vote",
]
