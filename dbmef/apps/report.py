"""Plain-text tables, progress bars and PNG figures for the command line (shared by the sub-commands)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    """A plain-text table; numbers right-aligned."""
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    numeric = [all(isinstance(r[i], (int, float)) or r[i] is None for r in rows) for i in range(len(headers))]

    def line(r: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(r, widths, numeric)).rstrip()

    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths)] + [line(r) for r in cells[1:]])


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def progress_bar(total: int, desc: str, quiet: bool, stream: Any = None, every_s: float = 30.0) -> Any:
    """A progress bar on a terminal; on a file or a pipe (the log of a batch job), one line every
    ``every_s`` seconds and one at the end (tqdm alone draws nothing there, or carriage returns);
    nothing when ``quiet``. Either has ``update(n)`` and ``close()``."""
    out = stream or sys.stderr
    if quiet:
        return LogProgress(total, desc, out, every_s, enabled=False)
    if getattr(out, "isatty", lambda: False)():
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit="img", file=out, dynamic_ncols=True)
    return LogProgress(total, desc, out, every_s)


class LogProgress:
    """Progress as log lines: ``desc: 120/597 images (20%), 3.1 img/s, about 154 s left``."""

    def __init__(self, total: int, desc: str, stream: Any, every_s: float, enabled: bool = True,
                 clock: Any = None) -> None:
        import time

        self.total, self.desc, self.stream, self.every_s, self.enabled = total, desc, stream, every_s, enabled
        self.clock = clock or time.monotonic
        self.n = 0
        self.start = self.last = self.clock()
        if enabled:
            print(f"{desc}: {total} images", file=stream, flush=True)

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self.clock()
        if self.enabled and now - self.last >= self.every_s:
            self.last = now
            self._line(now)

    def _line(self, now: float) -> None:
        rate = self.n / max(now - self.start, 1e-9)
        pct = f" ({self.n / self.total:.0%})" if self.total else ""
        left = f", about {(self.total - self.n) / rate:.0f} s left" if rate > 0 and self.n < self.total else ""
        print(f"{self.desc}: {self.n}/{self.total} images{pct}, {rate:.3g} img/s{left}", file=self.stream, flush=True)

    def close(self) -> None:
        if self.enabled and self.n:
            self._line(self.clock())
        self.enabled = False


def pyplot() -> Any:
    """matplotlib.pyplot on the headless Agg backend (reports are written to files, never shown)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | Path) -> Path:
    """Lay out ``fig``, write it as a PNG (creating the folder) and free it."""
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    pyplot().close(fig)
    return out



def interrupted(command: str, results: str | Path, total: int) -> int:
    """Ctrl-C during a resumable pass: one line saying what is saved and how to go on; exit status 130."""
    from dbmef.runtime.evaluate import read_results

    n = len(read_results(Path(results)))
    print(f"{command}: interrupted: {n} of {total} images saved in {results}; run the same command to resume",
          file=sys.stderr, flush=True)
    return 130
