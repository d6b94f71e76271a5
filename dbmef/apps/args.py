"""The command-line options every runtime command shares, and the runtime they describe.

One place turns flags into a ``RuntimeSpec`` (which Ray workers and ``dbmef serve`` replicas
rebuild too), so ``classify``, ``calibrate``, ``eval``, ``serve`` and ``bench`` read a bundle,
a backend and scoring overrides the same way.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from dbmef.runtime.early_exit import POLICIES as EARLY_EXIT_MODES
from dbmef.runtime.early_exit import RENAMED_POLICIES, VARIANCES, VOTE_OPENINGS
from dbmef.runtime.early_exit import TESTS as EXIT_TESTS
from dbmef.runtime.method import DECISIONS

SCORING_FLAGS = ("k", "n_timesteps", "votes", "lam", "seed", "unet_batch", "early_exit", "exit_z", "exit_interval",
                 "exit_min_rows", "exit_keep", "exit_samples", "exit_order", "exit_test",
                 "exit_votes_open", "exit_variance", "decision", "fused_beta")


def add_runtime_args(p: argparse.ArgumentParser, prot_help: str | None = None) -> None:
    """The options every runtime command shares. ``prot_help``: calibrate's meaning of --prot."""
    from dbmef.runtime.backends import names

    p.add_argument("--bundle", required=True, help="bundle folder written by dbmef-export")
    p.add_argument("--backend", choices=list(names()), default="onnxruntime",
                   help="the engines' runtime: onnxruntime (the bundle's ONNX graphs), tensorrt (engines built by "
                        "`dbmef build-engines` on this GPU) or auto (TensorRT where built, else ONNX Runtime)")
    p.add_argument("--device", choices=["cpu", "cuda", "tensorrt", "auto"], default="auto",
                   help="ONNX Runtime execution provider")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: ONNX Runtime decides)")
    p.add_argument("--batch-size", type=int, default=16, help="images per batch")
    p.add_argument("--no-verify", action="store_true", help="skip the bundle's file-hash check")
    p.add_argument("--scorer", choices=["fused", "unet"],
                   help="with a bundle exported --scorer both: the fused graph (default) or the plain UNet")
    p.add_argument("--scorer-graph", choices=["scorer", "unet"], help=argparse.SUPPRESS)  # the old name of --scorer
    p.add_argument("--window", type=int, default=64,
                   help="images rethinking at once: more fill the UNet's calls better, each holds its latent and "
                        "k negative embeddings")
    p.add_argument("--rows-ahead", action=argparse.BooleanOptionalAction, default=True,
                   help="fill an engine call that would be padded with rows the plans will ask for next (answers "
                        "never change; --no-rows-ahead pads instead)")
    p.add_argument("--expect-digest", metavar="SHA256",
                   help="refuse any bundle whose digest (printed by `dbmef info`) is not this one")
    g = add_scoring_args(p)
    if prot_help:
        g.add_argument("--prot", type=float, default=0.95, help=prot_help)
    else:
        g.add_argument("--prot", type=float, help="rethink everything (0) or nothing (1) regardless of calibration")


def add_scoring_args(p: argparse.ArgumentParser) -> Any:
    """The scoring overrides (``SCORING_FLAGS``): the method's settings and early exit."""
    g = p.add_argument_group("scoring overrides (default: the bundle's)")
    g.add_argument("--k", type=int, help="candidates re-ranked: the backbone's top k (paper: 5)")
    g.add_argument("--timesteps", type=int, dest="n_timesteps",
                   help="timesteps per vote, on a uniform grid of the noise schedule (paper: 30)")
    g.add_argument("--votes", type=int, help="repeats with independent noise, decided by majority (paper: 5)")
    g.add_argument("--lam", type=float, help="guidance weight: 1 is the positive condition alone (paper: 1.1)")
    g.add_argument("--seed", type=int, help="root of every noise bank (same seed, same answers)")
    g.add_argument("--unet-batch", type=int,
                   help="rows per UNet engine call (fixed; the bundle's fused graph was exported for one size)")
    g.add_argument("--early-exit", choices=[*EARLY_EXIT_MODES, *RENAMED_POLICIES],
                   help="off: every UNet row (the paper); exact (default): stop voting once the majority is "
                        "settled, same decisions; adaptive: also drop clearly losing candidates; keep_best: Li et "
                        "al.'s fixed pruning (--exit-keep, --exit-samples; formerly 'schedule')")
    g.add_argument("--exit-z", type=float, help="adaptive: drop a candidate this many standard errors behind")
    g.add_argument("--exit-interval", type=int, help="adaptive: timesteps per vote between checkpoints")
    g.add_argument("--exit-min-rows", type=int, help="adaptive: paired rows needed before any drop")
    g.add_argument("--exit-test", choices=list(EXIT_TESTS),
                   help="adaptive: the drop threshold: z (normal), t (Student's t at --exit-z's level: stricter "
                        "while few rows are in) or mixture (a normal-mixture boundary, valid however often it looks)")
    g.add_argument("--exit-votes-open", choices=list(VOTE_OPENINGS),
                   help="adaptive: rounds (V//2 + 1 votes, then one at a time, as exact) or all (every vote from "
                        "the first stage, rows interleaved across votes)")
    g.add_argument("--exit-variance", choices=list(VARIANCES),
                   help="adaptive: the paired test's standard error from each candidate's own differences "
                        "(candidate) or from the two-way residual over every surviving candidate (pooled)")
    g.add_argument("--exit-keep", type=int, nargs="+", metavar="N", help="keep_best: candidates kept after each stage")
    g.add_argument("--exit-samples", type=int, nargs="+", metavar="N", help="keep_best: timesteps done by each stage")
    g.add_argument("--exit-order", type=int, nargs="+", metavar="I",
                   help="adaptive/keep_best: the order a vote visits the timestep grid positions 0..n-1 (a "
                        "permutation; default van der Corput)")
    g.add_argument("--decision", choices=list(DECISIONS),
                   help="what decides a rethought image: paper (the least diffusion error, by vote) or fused (the "
                        "backbone's log-probability minus beta times the diffusion error, by vote; beta from "
                        "`dbmef calibrate --decision fused`)")
    g.add_argument("--fused-beta", type=float, metavar="B",
                   help="fused: the diffusion error's weight (default: the bundle's calibrated one)")
    g.add_argument("--zero-shot", action="store_true",
                   help="Diffusion Classifier mode: every class a candidate, the positive condition only (lam 1), "
                        "no protector")
    return g


def runtime_spec(args: argparse.Namespace, prot_override: bool = True) -> Any:
    """The command line's runtime as a ``RuntimeSpec`` (what Ray workers rebuild, too). Backend
    options travel as a dict the backend turns into its own settings."""
    from dbmef.runtime import RuntimeSpec

    overrides = {k: getattr(args, k) for k in SCORING_FLAGS if getattr(args, k, None) is not None}
    for k in ("exit_keep", "exit_samples", "exit_order"):
        if k in overrides:
            overrides[k] = tuple(overrides[k])
    if getattr(args, "zero_shot", False):
        overrides.update(zero_shot=True, lam=overrides.get("lam", 1.0))
    _refuse_ignored_exit_settings(args, overrides)
    options = {"device": args.device, "intra_op_threads": args.threads}  # checked by the backend's options
    return RuntimeSpec(bundle=str(args.bundle), backend=args.backend, options=options, verify=not args.no_verify,
                       batch_size=args.batch_size, scoring=overrides,
                       prot=getattr(args, "prot", None) if prot_override else None,
                       expect_digest=args.expect_digest, scorer=_scorer(args), window=args.window,
                       rows_ahead=args.rows_ahead)


def _refuse_ignored_exit_settings(args: argparse.Namespace, overrides: dict[str, Any]) -> None:
    """An early-exit flag the mode in force does not read (``--exit-order`` under ``exact``) would be
    silently ignored: refuse it, naming the mode that reads it."""
    from dbmef.errors import BundleError, ConfigError
    from dbmef.runtime.config import EXIT_SETTING_MODES

    given = sorted(set(overrides) & set(EXIT_SETTING_MODES))
    if not given:
        return
    mode = overrides.get("early_exit")
    if mode is None:
        from dbmef.runtime.bundle import read_manifest

        try:
            mode = read_manifest(args.bundle).scoring.early_exit
        except (BundleError, OSError):
            return  # the bundle is unreadable: building the runtime says so
    mode = RENAMED_POLICIES.get(mode, mode)
    for name in given:
        if mode not in EXIT_SETTING_MODES[name]:
            flag, modes = "--" + name.replace("_", "-"), EXIT_SETTING_MODES[name]
            raise ConfigError(f"{flag} has no effect with early exit {mode!r} (it is a setting of "
                              f"{' and '.join(modes)}); add --early-exit {modes[0]}, or drop {flag}")


def _scorer(args: argparse.Namespace) -> str | None:
    """--scorer, or the old --scorer-graph (its 'scorer' is 'fused')."""
    if args.scorer_graph is not None:
        if args.scorer is not None:
            raise SystemExit("give --scorer only (--scorer-graph is its old name)")
        print("dbmef: --scorer-graph is now called --scorer (fused|unet); the old flag will stop working in a "
              "later release", file=sys.stderr)
        return "fused" if args.scorer_graph == "scorer" else str(args.scorer_graph)  # said once, here
    return args.scorer


def make_runtime(args: argparse.Namespace) -> Any:
    """The runtime the command line asks for."""
    return runtime_spec(args).build()


def add_ray_args(p: argparse.ArgumentParser) -> None:
    r = p.add_argument_group("Ray Data (pip install 'dbmef[ray]')")
    r.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                   help="run as a Ray Data pipeline: on a local Ray instance, or join ADDRESS (e.g. auto, "
                        "ray://head:10001); image paths must be readable from every node")
    r.add_argument("--ray-fast-actors", type=int, default=1, help="backbone + protector actors")
    r.add_argument("--ray-rethink-actors", type=int, default=1, help="rethink (VAE + text + UNet) actors")
    r.add_argument("--ray-gpus-per-actor", type=float, default=0.0,
                   help="GPUs per rethink actor (1: one per GPU, 0.5: two per GPU)")
