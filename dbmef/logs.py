"""How both command lines (``dbmef`` and ``dbmef-export``) configure logging: the one place that
does. Library modules only ever call ``logging.getLogger(__name__)``."""

from __future__ import annotations

import logging


def configure(verbose: int, quiet: bool) -> None:
    """``-q``: errors only; default: warnings (the commands print their own progress); ``-v``:
    what each step does; ``-vv``: debug."""
    level = logging.ERROR if quiet else logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
