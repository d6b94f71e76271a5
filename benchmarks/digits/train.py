"""Train the digits DBMEF system on real images, then export it with ``dbmef-export``'s code path.

    python -m benchmarks.digits.train --seed 0 --out engines/digits/seed0

What is trained, on which splits, and what is written under ``--out``: ``dbmef.apps.digits_train``
(the networks) and ``dbmef.apps.digits_system`` (the system end to end); this script is their CLI.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging

from dbmef.apps.digits_system import train_system
from dbmef.apps.digits_train import TrainConfig


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.digits.train", description=__doc__.split("\n")[0])
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            typ = {"int": int, "float": float, "str": str}[str(f.type)]
            p.add_argument(flag, type=typ, default=f.default)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = TrainConfig(**{f.name: getattr(a, f.name) for f in dataclasses.fields(TrainConfig)})
    report = train_system(cfg)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
