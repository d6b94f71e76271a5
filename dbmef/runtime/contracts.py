"""The component contracts: each exported graph's inputs and outputs (names, dtypes, symbolic
shapes), written once. Everything else derives from these: the export's sample inputs and dynamic
axes (``export/specs.py``), the bundle's tensor records (``bundle.ComponentRecord``), TensorRT's
shape profiles and row-path dtypes, the scorer's mode, and every engine's input check
(``engine.Engine.__call__``).

Symbolic dims: B rows per call, C classes, H/W image size, L token length (77), D text width, h/w
latent size. Every contract has float32 floating-point I/O whatever the graph's internal
precision (an fp16 export casts at its boundary).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from dbmef.errors import ConfigError, EngineError


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: its name, numpy dtype name and shape (ints fixed, strings symbolic)."""

    name: str
    dtype: str
    shape: tuple[str | int, ...]

    def check(self, array: Any, component: str) -> None:
        """Raise EngineError naming this tensor unless ``array`` is a numpy array of this dtype and
        rank whose fixed dims match."""
        if not isinstance(array, np.ndarray):
            raise EngineError(f"engine '{component}': input '{self.name}' is a {type(array).__name__}, not a numpy "
                              f"array of {self.dtype} {self.text}")
        wrong = array.dtype != np.dtype(self.dtype)
        if wrong or array.ndim != len(self.shape) or any(
                isinstance(d, int) and d != n for d, n in zip(self.shape, array.shape)):
            raise EngineError(f"engine '{component}': input '{self.name}' is {array.dtype} {tuple(array.shape)}, its "
                              f"contract is {self.dtype} {self.text}" + (
                                  f"; cast it first (np.asarray(x, np.{self.dtype}))" if wrong else ""))

    @property
    def text(self) -> str:
        return "(" + ", ".join(map(str, self.shape)) + ")"


class TensorIO:
    """The names of a component's tensors, for the two records that hold them: the contract
    (``ComponentSpec``) and the bundle's record of the exported graph (``bundle.ComponentRecord``)."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.outputs)


@dataclass(frozen=True)
class ComponentSpec(TensorIO):
    """The I/O contract of one exported component."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def input_dtypes(self) -> dict[str, np.dtype]:
        return {t.name: np.dtype(t.dtype) for t in self.inputs}

    def check(self, feeds: Mapping[str, Any]) -> None:
        """Raise EngineError naming the tensor unless ``feeds`` has exactly these inputs, each of
        its dtype, rank and fixed dims (Polygraphy's ``check_inputs``)."""
        check_names(self.name, self.input_names, feeds)
        for t in self.inputs:
            t.check(feeds[t.name], self.name)


def check_names(component: str, input_names: tuple[str, ...], feeds: Mapping[str, Any]) -> None:
    """Raise EngineError naming missing or unexpected inputs."""
    missing = [n for n in input_names if n not in feeds]
    extra = [n for n in feeds if n not in input_names]
    if missing or extra:
        raise EngineError(f"engine '{component}' expects inputs {list(input_names)}; missing {missing}, "
                          f"unexpected {extra}")


def _io(*specs: tuple[str, str, tuple[str | int, ...]]) -> tuple[TensorSpec, ...]:
    return tuple(TensorSpec(*s) for s in specs)


BACKBONE = ComponentSpec("backbone", _io(("pixel_values", "float32", ("B", 3, "H", "W"))),
                         _io(("logits", "float32", ("B", "C"))))
TEXT_ENCODER = ComponentSpec("text_encoder", _io(("input_ids", "int64", ("B", "L"))),
                             _io(("last_hidden_state", "float32", ("B", "L", "D"))))
VAE_ENCODER = ComponentSpec("vae_encoder", _io(("image", "float32", ("B", 3, "H", "W"))),
                            _io(("latent", "float32", ("B", 4, "h", "w"))))
UNET = ComponentSpec(
    "unet",
    _io(("sample", "float32", ("B", 4, "h", "w")), ("timestep", "int64", ("B",)),
        ("encoder_hidden_states", "float32", ("B", "L", "D"))),
    _io(("noise_pred", "float32", ("B", 4, "h", "w"))),
)
# The fused scorer: noising, both conditions, the lam combination and the squared error in one
# graph, so only B floats leave the device per call.
SCORER = ComponentSpec(
    "scorer",
    _io(("x0", "float32", ("B", 4, "h", "w")), ("eps", "float32", ("B", 4, "h", "w")), ("timestep", "int64", ("B",)),
        ("emb_pos", "float32", ("B", "L", "D")), ("emb_neg", "float32", ("B", "L", "D")), ("lam", "float32", (1,))),
    _io(("error", "float32", ("B",))),
)
# Diffusion features (``dbmef features``): the VAE image (in [-1, 1]) -> one block's pooled activation at
# one timestep, the empty prompt and one fixed noise baked in (``dbmef.runtime.features``).
FEATURES = ComponentSpec("features", _io(("pixel_values", "float32", ("B", 3, "H", "W"))),
                         _io(("features", "float32", ("B", "F"))))
COMPONENTS: dict[str, ComponentSpec] = {s.name: s for s in (BACKBONE, TEXT_ENCODER, VAE_ENCODER, UNET, SCORER,
                                                            FEATURES)}

# The one scorer vocabulary (export, runtime, CLI): "fused" is the fused scoring graph, stored as the
# bundle's component "scorer"; "unet" the plain UNet, noising and error on the host. Export also takes
# "both". The runtime's older spelling "scorer" for "fused" is still read, with a FutureWarning.
SCORER_KINDS: dict[str, ComponentSpec] = {"fused": SCORER, "unet": UNET}
_OLD_SCORER_NAMES = {"scorer": "fused"}


def scorer_kind(name: str, what: str = "scorer") -> str:
    """``"fused"`` or ``"unet"`` for ``name`` (``"scorer"``, the old name of ``"fused"``, accepted
    with a FutureWarning: users typed it); a ConfigError naming the choices otherwise."""
    if name in _OLD_SCORER_NAMES:
        new = _OLD_SCORER_NAMES[name]
        warnings.warn(f"{what} {name!r} is now called {new!r}; the old name will stop working in a later release",
                      FutureWarning, stacklevel=3)
        return new
    if name not in SCORER_KINDS:
        raise ConfigError(f"{what} {name!r} is not one of {list(SCORER_KINDS)}")
    return name


def kind_of_component(component: str) -> str:
    """The scorer kind a bundle component implements (``"scorer"`` -> ``"fused"``)."""
    return next(k for k, spec in SCORER_KINDS.items() if spec.name == component)
