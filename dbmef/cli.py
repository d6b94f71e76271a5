"""The ``dbmef`` command: a thin argparse layer over library functions."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from dbmef.errors import DBMEFError

log = logging.getLogger("dbmef")


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.ERROR if quiet else (logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def cmd_demo(args: argparse.Namespace) -> int:
    from dbmef.demo import run_demo

    print(run_demo(args.out))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dbmef", description="DBMEF: diffusion re-ranking of uncertain classifications.")
    p.add_argument("-v", "--verbose", action="count", default=0)
    p.add_argument("-q", "--quiet", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="build the tiny demo system and classify the sample image")
    d.add_argument("--out", default="engines/demo", help="where the demo system is written")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose, args.quiet)
    try:
        return int(args.func(args))
    except DBMEFError as exc:
        print(f"dbmef: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
