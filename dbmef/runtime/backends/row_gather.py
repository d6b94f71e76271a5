"""Where each scorer row's inputs come from, as a list of memory copies.

On a GPU the noise bank, the positive-embedding table, the batch's latents and negative
embeddings live on the device once; each fixed-size chunk of rows is then assembled by
device-to-device copies into the engine's input buffers, with no host round trip. This module
only plans those copies (pure numpy, testable anywhere): ``simulate`` applies a plan to host
arrays and must give exactly numpy's fancy-indexed gather.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Copy:
    """Copy ``nbytes`` from ``src[src_offset:]`` to ``dst[dst_offset:]`` (byte offsets)."""

    dst: str
    dst_offset: int
    src: str
    src_offset: int
    nbytes: int


def _coalesce(copies: list[Copy]) -> list[Copy]:
    """Merge copies that continue one another in both source and destination."""
    out: list[Copy] = []
    for c in copies:
        if out:
            p = out[-1]
            if (p.dst == c.dst and p.src == c.src and p.dst_offset + p.nbytes == c.dst_offset
                    and p.src_offset + p.nbytes == c.src_offset):
                out[-1] = Copy(p.dst, p.dst_offset, p.src, p.src_offset, p.nbytes + c.nbytes)
                continue
        out.append(c)
    return out


def plan_chunk(m: np.ndarray, v: np.ndarray, i: np.ndarray, c: np.ndarray, candidates: np.ndarray,
               latent_bytes: int, emb_bytes: int, n_timesteps: int, k: int) -> list[Copy]:
    """Copies that fill one chunk's inputs for rows (m, v, i, c) (each (B,), padding included).

    Sources (device-resident, C-contiguous): ``latents`` (M, *latent), ``noise`` (V, n, *latent),
    ``timesteps`` (n,) int64, ``positive`` (C, L, D), ``negative`` (M, k, L, D).
    Destinations: the engine inputs ``x0``, ``eps``, ``timestep``, ``emb_pos``, ``emb_neg``.
    """
    copies: list[Copy] = []
    for r in range(len(m)):
        mm, vv, ii, cc = int(m[r]), int(v[r]), int(i[r]), int(c[r])
        copies.append(Copy("x0", r * latent_bytes, "latents", mm * latent_bytes, latent_bytes))
        copies.append(Copy("eps", r * latent_bytes, "noise", (vv * n_timesteps + ii) * latent_bytes, latent_bytes))
        copies.append(Copy("timestep", r * 8, "timesteps", ii * 8, 8))
        copies.append(Copy("emb_pos", r * emb_bytes, "positive", int(candidates[mm, cc]) * emb_bytes, emb_bytes))
        copies.append(Copy("emb_neg", r * emb_bytes, "negative", (mm * k + cc) * emb_bytes, emb_bytes))
    # Group by destination so runs can merge (row r+1 of x0 often continues row r's source).
    copies.sort(key=lambda cp: (cp.dst, cp.dst_offset))
    return _coalesce(copies)


def simulate(plan: list[Copy], sources: dict[str, np.ndarray], dests: dict[str, np.ndarray]) -> None:
    """Apply a plan with host arrays standing in for device buffers (for tests)."""
    src_b = {k: np.ascontiguousarray(a).view(np.uint8).reshape(-1) for k, a in sources.items()}
    dst_b = {k: a.view(np.uint8).reshape(-1) for k, a in dests.items()}
    for cp in plan:
        chunk = src_b[cp.src][cp.src_offset : cp.src_offset + cp.nbytes]
        dst_b[cp.dst][cp.dst_offset : cp.dst_offset + cp.nbytes] = chunk
