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
