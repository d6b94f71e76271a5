"""The one ``Engine`` interface every backend implements.

An engine maps named numpy inputs to named numpy outputs, checked at the boundary against its
component's contract (``contracts.py``). Backends: ONNX Runtime (``dbmef.runtime.backends.onnxruntime``),
native TensorRT, and the torch reference (``dbmef.reference``), which exists for parity tests and
baselines.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from dbmef.runtime.contracts import COMPONENTS, ComponentSpec, check_names


class Engine:
    """Named inputs -> named outputs (host numpy arrays both ways): the one interface the runtime
    asks of every backend. The base owns what all engines share: the names, input checking, the
    context manager and the capabilities (``device``, ``providers``, ``max_batch``, ``rows``), so
    a backend implements ``run`` (and ``close`` if it holds anything) and declares what differs.

    ``engine(feeds)`` checks the feeds against the engine's ``contract`` (the component's, when its
    name is a bundle component: names, dtypes, ranks and fixed dims; otherwise the names) and raises
    an EngineError naming the tensor; nothing is cast silently. ``engine(feeds, check=False)`` skips
    the check, for hot loops whose feeds were checked once and are built the same way every call.
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

    @property
    def contract(self) -> ComponentSpec | None:
        """The I/O contract the feeds are checked against: the component's, by name."""
        return COMPONENTS.get(self.name)

    def __call__(self, feeds: Mapping[str, np.ndarray], check: bool = True) -> dict[str, np.ndarray]:
        if check:
            spec = self.contract
            if spec is not None and set(spec.input_names) == set(self.input_names):
                spec.check(feeds)
            else:  # an engine of another contract (a user's backend, a test double): names only
                check_names(self.name, tuple(self.input_names), feeds)
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
    input ``feed``; the ``output`` of every call, concatenated. The one chunked call. Its inputs
    come from outside the package (decoded pictures, token ids), so every call is checked."""
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
        return self.resolve().run(feeds)  # checked by this engine's __call__ already

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()


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
