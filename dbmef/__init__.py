"""dbmef: a deployment package for DBMEF (AAAI 2025), training-free diffusion re-ranking of an
image classifier's uncertain answers.

``import dbmef`` is light: the runtime needs numpy, Pillow and tokenizers; the export side
(torch, diffusers, timm, onnx) is imported only by ``dbmef.export`` and ``dbmef.reference``.
"""

from __future__ import annotations

from dbmef.errors import DBMEFError

__version__ = "0.1.0"

__all__ = ["DBMEFError", "__version__"]
