"""The paper's Table 1 on the digits test split, from trained runs of ``benchmarks.digits.train``
(the ablation and the tables: ``dbmef.apps.digits_table``).

    python -m benchmarks.digits.table engines/digits/seed0 engines/digits/seed1 engines/digits/seed2
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

from dbmef.apps.digits import DigitsSplit
from dbmef.apps.digits_report import NOTES, early_exit_markdown, markdown, with_notes
from dbmef.apps.digits_table import ablate, early_exit_from


def run(runs: list[Path], ks: tuple[int, ...] = (3, 5), votes: int = 5,
        save: Any = None, skip: frozenset[tuple[int, str, int]] = frozenset()) -> dict[str, Any]:
    """Every (k, run, backbone) ablation, k outermost so the cheaper k completes for every seed
    first; ``save(data)`` is called after each one, so an interrupted run keeps what it finished,
    and ``skip`` holds the (seed, backbone, k) already done."""
    data: dict[str, Any] = {"machine": {"platform": platform.platform(), "processor": platform.processor(),
                                        "cpus": __import__("os").cpu_count()},
                            "date": time.strftime("%Y-%m-%d"), "results": []}
    for k in ks:
        for run_dir in runs:
            split = DigitsSplit.load(run_dir / "test_split.npz")
            report = json.loads((run_dir / "train_report.json").read_text())
            for backbone in ("weak", "strong"):
                if (report.get("seed"), backbone, k) in skip:
                    continue
                cal = run_dir / "calibration_split.npz"
                r = ablate(run_dir / f"bundle-{backbone}", split, k, votes, keep_errors=True,
                           calibration=DigitsSplit.load(cal) if cal.exists() else None)
                r.update({"seed": report.get("seed"), "backbone": backbone,
                          "train_seconds": report.get("seconds", {}),
                          "torch_test_accuracy": report.get("torch_test_accuracy", {}),
                          **({"diffusion_from": report["diffusion_from"]} if report.get("diffusion_from") else {})})
                data["results"].append(r)
                accs = ", ".join(f"{c} {v:.2%}" for c, v in r["accuracy"].items())
                print(f"seed {r['seed']} {backbone} k={k}: {accs}", flush=True)
                if save is not None:
                    save(data)
    return data


def measure_seconds_per_eval(bundle: Path, rows: int = 64, seconds: float = 5.0) -> float:
    """Seconds per UNet evaluation of the bundle's plain UNet on ONNX Runtime (CPU), 2*rows
    samples per call as the scorer sends them, median of repeated calls."""
    from dbmef.runtime.backends import open_engine
    from dbmef.runtime.bundle import Bundle

    b = Bundle.open(bundle, verify=False)
    m = b.manifest
    c, h, w = m.vae.latent_shape
    d = int(m.positive_embeddings.shape[-1])
    rng = np.random.default_rng(0)
    feeds = {"sample": rng.standard_normal((2 * rows, c, h, w)).astype(np.float32),
             "timestep": np.full(2 * rows, 500, np.int64),
             "encoder_hidden_states": rng.standard_normal((2 * rows, 77, d)).astype(np.float32)}
    eng = open_engine(b, "unet", "onnxruntime", None)
    eng(feeds)
    times = []
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end or len(times) < 5:
        t0 = time.perf_counter()
        eng(feeds)
        times.append(time.perf_counter() - t0)
    eng.close()
    return float(np.median(times)) / (2 * rows)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.digits.table", description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="*", type=Path, help="output folders of benchmarks.digits.train")
    p.add_argument("--k", type=int, nargs="+", default=[3, 5])
    p.add_argument("--votes", type=int, default=5)
    p.add_argument("--json", type=Path, default=Path("benchmarks/digits/results.json"),
                   help="results file; runs already in it are kept unless given again")
    p.add_argument("--markdown", type=Path, default=None,
                   help=f"also write the tables here (a '{NOTES}' section already in the file is kept)")
    p.add_argument("--redo", action="store_true", help="recompute ablations already in --json")
    p.add_argument("--replay-only", action="store_true",
                   help="recompute only the early-exit columns (at the runtime's current defaults) from the error "
                        "tensors the ablations saved beside each bundle, without a UNet pass")
    a = p.parse_args(argv)
    old = json.loads(a.json.read_text()) if a.json.is_file() else {"results": []}
    if a.replay_only:
        for r in old["results"]:
            b = Path(r["bundle"])
            r["early_exit"] = early_exit_from(np.load(b.parent / f"early_exit_errors_{b.name}_k{r['k']}.npz"),
                                              r["votes"])
        a.json.write_text(json.dumps(old, indent=1) + "\n")
        if a.markdown:
            a.markdown.write_text(with_notes(markdown(old, str(a.json)),
                                             a.markdown.read_text() if a.markdown.is_file() else ""))
        print("\n".join(early_exit_markdown(old["results"])))
        return

    def merged(data: dict[str, Any]) -> dict[str, Any]:
        new_keys = {(r["seed"], r["backbone"], r["k"]) for r in data["results"]}
        keep = [r for r in old["results"] if (r["seed"], r["backbone"], r["k"]) not in new_keys]
        rows = sorted(keep + data["results"], key=lambda r: (r["seed"], r["backbone"], r["k"]))
        return {**old, **data, "results": rows}

    def save(data: dict[str, Any]) -> None:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(merged(data), indent=1) + "\n")

    skip = frozenset() if a.redo else frozenset((r["seed"], r["backbone"], r["k"]) for r in old["results"])
    data = merged(run(a.runs, tuple(a.k), a.votes, save, skip) if a.runs else {"results": []})
    data["unet_seconds_per_eval"] = measure_seconds_per_eval(Path(data["results"][0]["bundle"]))
    save(data)
    md = markdown(data, str(a.json))
    if a.markdown:
        previous = a.markdown.read_text() if a.markdown.is_file() else ""
        a.markdown.write_text(with_notes(md, previous))
    print(md)


if __name__ == "__main__":
    main()
