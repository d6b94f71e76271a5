"""CLIP tokenization with the ``tokenizers`` library: no transformers in the runtime."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dbmef.errors import BundleError


class ClipTokenizer:
    """Reads a ``tokenizer.json`` (as written by transformers' CLIPTokenizer.save_pretrained) and
    encodes text to (N, max_length) int64 ids, padded and truncated exactly as SD's pipeline does
    (``padding="max_length", truncation=True``)."""

    def __init__(self, path: str | Path, max_length: int = 77, pad_id: int | None = None):
        from tokenizers import Tokenizer  # light (a Rust wheel), but only needed here

        p = Path(path)
        if not p.is_file():
            raise BundleError(f"tokenizer file {p} is missing; re-export the bundle with dbmef-export")
        try:
            tok = Tokenizer.from_file(str(p))
        except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
            raise BundleError(f"tokenizer file {p} cannot be read: {exc}") from exc
        if pad_id is None:
            pad_id = tok.token_to_id("<|endoftext|>")
            if pad_id is None:
                raise BundleError(f"tokenizer {p} has no '<|endoftext|>' token; pass pad_id explicitly")
        tok.enable_truncation(max_length)
        tok.enable_padding(length=max_length, pad_id=pad_id, pad_token=tok.id_to_token(pad_id) or "")
        self._tok = tok
        self.max_length = max_length
        self.pad_id = pad_id

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """texts -> (N, max_length) int64 token ids."""
        enc = self._tok.encode_batch(list(texts))
        return np.asarray([e.ids for e in enc], dtype=np.int64).reshape(len(texts), self.max_length)
