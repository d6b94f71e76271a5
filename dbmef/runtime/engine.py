"""The one ``Engine`` interface every backend implements, and the component contracts.

An engine maps named numpy inputs to named numpy outputs. Backends: ONNX Runtime
(``dbmef.runtime.backends.onnxruntime``), native TensorRT, and the torch reference (``dbmef.reference``),
which exists for parity tests and baselines.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from dbmef.errors import EngineError


class Engine:
    """Named inputs -> named outputs (host numpy arrays both ways): the one interface the runtime
    asks of every backend. The base owns what all engines share: the names, input checking, the
    context manager and the capabilities (``device``, ``providers``, ``max_batch``, ``rows``), so
    a backend implements ``run`` (and ``close`` if it holds anything) and declares what differs.
    """

    name: str
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    device: str = "cpu"  # where it computes: cpu, cuda, tensorrt
    max_batch: int | None = None  # rows per call it accepts (a TensorRT profile's maximum); None: any

    @property
    def providers(self) -> list[str]:
        """What runs it, most preferred first (ONNX Runtime's providers, "TensorRT", "torch")."""
        return [self.device]

    def rows(self) -> RowScorer | None:
        """The device-side row path of a fused scorer engine, or None (rows are gathered on the host)."""
        return None

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_feeds(self, feeds)
        return self.run(feeds)

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def close(self) -> None:
        """Free what the engine holds; calling it twice is harmless."""

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RowScorer(abc.ABC):
    """A fused-scorer engine that gathers scorer rows on its device (the native TensorRT backend).
    ``open_rows`` puts the tables every row reads on the device (noise bank (V,n,4,h,w), timestep
    grid (n,), positive embeddings (C,L,D), lam (1,)) and sizes ``capacity`` image slots;
    ``load_rows`` fills one slot (latent (4,h,w), candidates (k,), negatives (k,L,D)) without
    waiting; ``launch_rows`` starts one call of exactly ``batch`` rows (B, 4) = (slot, v, i, c)
    without waiting and returns a ticket; ``collect_rows`` waits for that call (one host sync) and
    returns its (B,) errors. At most two calls are in flight."""

    @abc.abstractmethod
    def open_rows(self, noise: np.ndarray, timesteps: np.ndarray, positive: np.ndarray, lam: np.ndarray,
                  batch: int, capacity: int, k: int) -> None: ...

    @abc.abstractmethod
    def load_rows(self, slot: int, latent: np.ndarray, candidates: np.ndarray, negatives: np.ndarray) -> None: ...

    @abc.abstractmethod
    def launch_rows(self, rows: np.ndarray) -> int: ...

    @abc.abstractmethod
    def collect_rows(self, ticket: int) -> np.ndarray: ...

    def close_rows(self) -> None:  # noqa: B027 - optional, and nothing to do is a fine default
        """Release what one scheduler's use needed (nothing, where the tables are kept)."""


def max_batch(engine: Engine, default: int) -> int:
    """Rows per call to send: ``default``, capped by the engine's ``max_batch`` (a TensorRT
    engine's profile maximum). Every chunked call in the pipeline goes through this, so a larger
    ``--batch-size`` is split to fit the engine instead of failing inside it."""
    return max(1, min(default, engine.max_batch)) if engine.max_batch else default


def chunked(engine: Engine, feed: str, arrays: np.ndarray, output: str, default: int,
            extra: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
    """``engine`` over ``arrays`` in calls of at most ``max_batch(engine, default)`` rows, fed as
    input ``feed``; the ``output`` of every call, concatenated. The one chunked call."""
    step = max_batch(engine, default)
    return np.concatenate([engine({feed: arrays[s : s + step], **(extra or {})})[output]
                           for s in range(0, len(arrays), step)])


class LazyEngine(Engine):
    """An engine opened on its first use. Its names come from the manifest, so building a scorer
    around it opens nothing: a worker that only runs the fast path never loads the UNet, and one
    that only rethinks never loads the backbone."""

    def __init__(self, name: str, input_names: Sequence[str], output_names: Sequence[str],
                 opener: Callable[[], Engine]):
        self.name = name
        self.input_names = tuple(input_names)
        self.output_names = tuple(output_names)
        self._opener = opener
        self._engine: Engine | None = None

    @property
    def opened(self) -> bool:
        return self._engine is not None

    def resolve(self) -> Engine:
        """The real engine, opened now if it was not yet."""
        if self._engine is None:
            self._engine = self._opener()
        return self._engine

    @property
    def device(self) -> str:  # type: ignore[override]
        """The real engine's device; "unopened" until then (asking never opens it)."""
        return self._engine.device if self._engine is not None else "unopened"

    @property
    def providers(self) -> list[str]:
        return self._engine.providers if self._engine is not None else ["unopened"]

    @property
    def max_batch(self) -> int | None:  # type: ignore[override]
        return self.resolve().max_batch  # asked right before a call: opening it now costs nothing extra

    def rows(self) -> RowScorer | None:
        return self.resolve().rows()

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.resolve()(feeds)

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()


@dataclass(frozen=True)
class ComponentSpec:
    """The I/O contract of one exported component (names, dtypes, symbolic shapes)."""

    name: str
    inputs: tuple[tuple[str, str, tuple[str | int, ...]], ...]
    outputs: tuple[tuple[str, str, tuple[str | int, ...]], ...]

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(i[0] for i in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(o[0] for o in self.outputs)


# The contracts shared by export, validation, engine building and the runtime. Symbolic dims:
# B batch, C classes, H/W image size, L token length (77), D text width, h/w latent size.
BACKBONE = ComponentSpec(
    "backbone",
    inputs=(("pixel_values", "float32", ("B", 3, "H", "W")),),
    outputs=(("logits", "float32", ("B", "C")),),
)
TEXT_ENCODER = ComponentSpec(
    "text_encoder",
    inputs=(("input_ids", "int64", ("B", "L")),),
    outputs=(("last_hidden_state", "float32", ("B", "L", "D")),),
)
VAE_ENCODER = ComponentSpec(
    "vae_encoder",
    inputs=(("image", "float32", ("B", 3, "H", "W")),),
    outputs=(("latent", "float32", ("B", 4, "h", "w")),),
)
UNET = ComponentSpec(
    "unet",
    inputs=(
        ("sample", "float32", ("B", 4, "h", "w")),
        ("timestep", "int64", ("B",)),
        ("encoder_hidden_states", "float32", ("B", "L", "D")),
    ),
    outputs=(("noise_pred", "float32", ("B", 4, "h", "w")),),
)
# The fused scorer: noising, both conditions, the lam combination and the squared error in one
# graph, so only B floats leave the device per call.
SCORER = ComponentSpec(
    "scorer",
    inputs=(
        ("x0", "float32", ("B", 4, "h", "w")),
        ("eps", "float32", ("B", 4, "h", "w")),
        ("timestep", "int64", ("B",)),
        ("emb_pos", "float32", ("B", "L", "D")),
        ("emb_neg", "float32", ("B", "L", "D")),
        ("lam", "float32", (1,)),
    ),
    outputs=(("error", "float32", ("B",)),),
)
COMPONENTS: dict[str, ComponentSpec] = {
    s.name: s for s in (BACKBONE, TEXT_ENCODER, VAE_ENCODER, UNET, SCORER)
}


def check_feeds(engine: Engine, feeds: Mapping[str, np.ndarray]) -> None:
    """Raise EngineError naming missing or unexpected inputs (shared by every backend)."""
    missing = [n for n in engine.input_names if n not in feeds]
    extra = [n for n in feeds if n not in engine.input_names]
    if missing or extra:
        raise EngineError(
            f"engine '{engine.name}' expects inputs {list(engine.input_names)}; "
            f"missing {missing}, unexpected {extra}"
        )


class FunctionEngine(Engine):
    """An engine over a plain Python function; for tests and simple host-side components."""

    def __init__(self, name: str, input_names: tuple[str, ...], output_names: tuple[str, ...], fn):  # type: ignore[no-untyped-def]
        self.name = name
        self.input_names = input_names
        self.output_names = output_names
        self._fn = fn
        self.calls = 0

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.calls += 1
        out = self._fn(**{n: feeds[n] for n in self.input_names})
        if not isinstance(out, dict):
            out = {self.output_names[0]: out}
        return out
