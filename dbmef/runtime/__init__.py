"""The lean DBMEF runtime: numpy, Pillow, tokenizers and an engine backend.

Never imports torch, diffusers, timm or transformers (a test and an import-linter contract keep
it so). Backends with heavy packages (onnxruntime, tensorrt) are imported lazily.
"""

from __future__ import annotations

from dbmef.runtime.backends import register as register_backend
from dbmef.runtime.config import ScoringConfig
from dbmef.runtime.contracts import COMPONENTS, ComponentSpec, TensorSpec
from dbmef.runtime.early_exit import ExitPolicy
from dbmef.runtime.engine import Engine, FunctionEngine, LazyEngine, RowScorer
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
from dbmef.runtime.noise_schedule import NoiseSchedule, alphas_cumprod, scaled_linear_betas, timestep_grid
from dbmef.runtime.pipeline import DBMEFPipeline, PipelineEngines
from dbmef.runtime.preprocess import BackbonePreprocess, VaePreprocess, load_image
from dbmef.runtime.protector import Protector
from dbmef.runtime.replay import LockstepPlans, replay
from dbmef.runtime.results import Batch, ImageResult
from dbmef.runtime.row_scheduler import RowScheduler, SchedulerStats, Settled
from dbmef.runtime.scorer import DiffusionScorer, Executor
from dbmef.runtime.slow_path import SlowPath
from dbmef.runtime.system import DBMEFRuntime, RuntimeSpec
from dbmef.runtime.tokenizer import ClipTokenizer
from dbmef.runtime.worker import ClassifierWorker, WorkerConfig

__all__ = [
    "COMPONENTS",
    "BackbonePreprocess",
    "Batch",
    "ClassifierWorker",
    "ClipTokenizer",
    "ComponentSpec",
    "DBMEFPipeline",
    "DBMEFRuntime",
    "DiffusionScorer",
    "Engine",
    "Executor",
    "ExitPolicy",
    "FunctionEngine",
    "Gate",
    "ImageResult",
    "LazyEngine",
    "LockstepPlans",
    "NoiseBank",
    "NoiseSchedule",
    "PipelineEngines",
    "PromptTemplates",
    "Protector",
    "RowScheduler",
    "RowScorer",
    "RuntimeSpec",
    "SchedulerStats",
    "ScoringConfig",
    "Settled",
    "SlowPath",
    "TensorSpec",
    "VaePreprocess",
    "WorkerConfig",
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
