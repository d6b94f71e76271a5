"""Labelled image sets for calibration and evaluation: an ImageFolder tree (sub-folders named by
class index, class name or ImageNet wnid) or a file list of ``path label`` lines."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dbmef.errors import ConfigError

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".jfif"}


@dataclass(frozen=True)
class LabelledImage:
    path: str
    label: int


class LabelResolver:
    """Maps a folder name or label field to a class index: an index, a class name (case and
    ``_``/space insensitive) or an ImageNet wnid."""

    def __init__(self, class_names: Sequence[str], wnids: Sequence[str] | None = None):
        self.n = len(class_names)
        self.by_name: dict[str, int] = {}
        for i, n in enumerate(class_names):
            self.by_name.setdefault(self._norm(n), i)
        self.by_wnid = {w: i for i, w in enumerate(wnids or [])}

    @staticmethod
    def _norm(s: str) -> str:
        return " ".join(s.replace("_", " ").lower().split())

    def __call__(self, key: str) -> int | None:
        if key.isdigit() and int(key) < self.n:
            return int(key)
        if key in self.by_wnid:
            return self.by_wnid[key]
        return self.by_name.get(self._norm(key))


def list_images(folder: Path) -> list[Path]:
    """Every non-hidden entry under ``folder`` that is not a folder, sorted: unreadable ones
    (dangling or looping symbolic links, sockets, files without permission) are kept so that each
    is reported with its error instead of silently dropped. The walk keeps its own stack (any
    depth, no recursion limit) and never follows a symbolic link to a folder (no cycles)."""
    out: list[Path] = []
    stack = [folder]
    while stack:
        d = stack.pop()
        try:
            entries = list(os.scandir(d))
        except OSError as exc:  # a folder we may not read: reported as one failed input
            log.warning("cannot list %s: %s", d, exc)
            out.append(d)
            continue
        for e in entries:
            if e.name.startswith("."):
                continue
            try:
                is_dir = e.is_dir(follow_symlinks=False)
            except OSError:
                is_dir = False
            (stack if is_dir else out).append(Path(e.path))
    return sorted(out)


def _is_dir(p: Path) -> bool:
    try:
        return p.is_dir()
    except OSError:  # a symlink loop: not a folder; load_image reports it
        return False


def load_labelled(data: str | Path, class_names: Sequence[str], wnids: Sequence[str] | None = None
                  ) -> list[LabelledImage]:
    """Read a labelled set. ``data`` is an ImageFolder root or a text file of ``path label`` lines
    (paths relative to the file's folder; label as index, class name or wnid)."""
    root = Path(data)
    resolve = LabelResolver(class_names, wnids)
    if root.is_file():
        items = []
        for lineno, line in enumerate(root.read_text().splitlines(), start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.rsplit(maxsplit=1) if "\t" not in line else line.rsplit("\t", 1)
            if len(parts) != 2:
                raise ConfigError(f"{root}:{lineno}: expected 'path label', got {line!r}")
            label = resolve(parts[1].strip())
            if label is None:
                raise ConfigError(f"{root}:{lineno}: label {parts[1]!r} is not a class index, name or wnid of "
                                  f"this bundle's {len(class_names)} classes")
            p = Path(parts[0].strip())
            items.append(LabelledImage(str(p if p.is_absolute() else root.parent / p), label))
        if not items:
            raise ConfigError(f"file list {root} names no images")
        return items
    if not root.is_dir():
        raise ConfigError(f"--data {root}: no such folder or file list")
    subdirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not subdirs:
        raise ConfigError(f"--data {root} has no class sub-folders; use the ImageFolder layout "
                          "(root/<class index|name|wnid>/image.jpg) or pass a file list of 'path label' lines")
    unknown = [d.name for d in subdirs if resolve(d.name) is None]
    if unknown:
        raise ConfigError(f"--data {root}: sub-folders {unknown[:5]} match no class index, name or wnid of this "
                          f"bundle ({len(class_names)} classes, e.g. {list(class_names[:3])})")
    items = [LabelledImage(str(p), resolve(d.name)) for d in subdirs for p in list_images(d)]  # type: ignore[arg-type]
    if not items:
        raise ConfigError(f"--data {root}: the class sub-folders hold no files")
    return items


def expand_inputs(paths: Sequence[str | Path]) -> list[str]:
    """Command-line inputs: files as given, folders expanded to their image files (sorted)."""
    out: list[str] = []
    if any(str(p).strip() == "" for p in paths):
        raise ConfigError("an input path is empty (''): name image files or folders; '.' for the current folder")
    for p in map(Path, paths):
        found: list[str] = []
        if _is_dir(p):
            listed = list_images(p)
            found = [str(f) for f in listed if f.suffix.lower() in IMAGE_SUFFIXES]
            if len(found) < len(listed):
                other = sorted({f.suffix.lower() or "(none)" for f in listed if f.suffix.lower() not in IMAGE_SUFFIXES})
                log.warning("%s: skipped %d file(s) that are not images by their extension (%s; images are %s)", p,
                            len(listed) - len(found), ", ".join(other[:5]), " ".join(sorted(IMAGE_SUFFIXES)))
        # A folder without images (say, one named x.jpg) stays one input: it fails alone, with its
        # reason, instead of refusing the whole call.
        out.extend(found or [str(p)])
    return out
