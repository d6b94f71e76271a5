"""The one exception root of dbmef and its subclasses.

Every error raised on purpose by dbmef derives from :class:`DBMEFError`, so a service can catch
one type. Messages name the file or field at fault and what to do about it.
"""

from __future__ import annotations


class DBMEFError(Exception):
    """Root of every error dbmef raises on purpose."""


class ConfigError(DBMEFError, ValueError):
    """A configuration value is out of range or inconsistent."""


class BundleError(DBMEFError):
    """A bundle is missing, incomplete, altered or of an unknown format version."""


class EngineError(DBMEFError):
    """An engine was fed the wrong inputs or its backend failed."""


class BackendUnavailableError(EngineError):
    """A backend's package or hardware (onnxruntime, TensorRT, a GPU) is not present."""


class ImageError(DBMEFError):
    """An input image could not be read or converted."""


class ExportError(DBMEFError):
    """Export failed: missing weights, a failed validation, an unsupported model."""


class ValidationError(ExportError):
    """An exported component disagrees with its torch source beyond tolerance."""


# The optional packages the commands import lazily, and the extra of pyproject.toml that installs each.
EXTRA_OF = {"torch": "export", "torchvision": "export", "diffusers": "export", "transformers": "export",
            "timm": "export", "safetensors": "export", "onnxscript": "export", "onnx_graphsurgeon": "export",
            "onnxconverter_common": "export", "onnx": "onnx", "onnxruntime": "cpu", "matplotlib": "plot",
            "ray": "ray", "prometheus_client": "ray", "sklearn": "digits", "tensorrt": "gpu", "cuda": "gpu"}


def missing_extra(exc: ModuleNotFoundError, command: str, extra: str | None = None) -> str | None:
    """The one-line message for an optional package that is not installed: what is missing and the
    command that installs it (None for a module that is not an optional dependency: a real bug).
    ``extra``: the extra this command needs as a whole (dbmef-export's torch path: ``export``, which
    also brings onnx), instead of the one that brings the missing module."""
    top = (exc.name or "").split(".")[0]
    if top not in EXTRA_OF:
        return None
    extra = extra or EXTRA_OF[top]
    return (f"{command}: error: this needs the '{top}' package, which is not installed: pip install 'dbmef[{extra}]' "
            f"(from a clone: pip install -e '.[{extra}]')")
