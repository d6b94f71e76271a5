"""The ``dbmef`` command: a thin argparse layer over library functions.

Sub-commands: classify, calibrate, eval (``--ray``), serve, info, demo (and bench, build-engines where installed).
Every feature is reachable from Python: see ``dbmef.runtime.system.DBMEFRuntime`` and
``dbmef.runtime.evaluate``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from dbmef.apps.args import add_ray_args, add_runtime_args, make_runtime, runtime_spec
from dbmef.apps.report import interrupted, progress_bar, table
from dbmef.apps.tools_cli import add_tools
from dbmef.errors import DBMEFError, missing_extra
from dbmef.logs import configure as configure_logging

log = logging.getLogger("dbmef")


# -- sub-commands --------------------------------------------------------------------------------
def cmd_classify(args: argparse.Namespace) -> int:
    from dbmef.apps.outputs import COLUMNS, check_output, rows, write_output
    from dbmef.runtime.data import expand_inputs

    check_output(args.output)
    rt = make_runtime(args)
    images = expand_inputs(args.images)
    bar = progress_bar(len(images), "classify", args.quiet or args.json)
    results = rt.classify(images, progress=bar.update)
    bar.close()
    if args.output:
        log.info("wrote %s", write_output(args.output, results, rt.class_names))
    if args.json:
        print(json.dumps([r.to_dict() for r in results], indent=2))
    else:
        print(table(rows(results, rt.class_names), COLUMNS))
    return 1 if all(r.error for r in results) else 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from dbmef.apps.calibrate import run_from_args

    return run_from_args(args, runtime_spec(args, prot_override=False))


def cmd_eval(args: argparse.Namespace) -> int:
    from dbmef.runtime.bundle import read_manifest
    from dbmef.runtime.data import load_labelled
    from dbmef.runtime.evaluate import default_results, evaluate

    results = str(args.results or default_results(args.bundle, args.data, "eval"))
    spec = runtime_spec(args)
    with contextlib.ExitStack() as stack:  # a bad flag is refused (the runtime built) before the data is read
        rt = None if args.ray is not None else stack.enter_context(spec.build())
        m = read_manifest(args.bundle)
        items = load_labelled(args.data, m.class_names, m.sources.get("class_wnids"))
        bar = progress_bar(len(items), "eval (ray)" if rt is None else "eval", args.quiet or args.json)
        try:
            if rt is None:
                from dbmef.cluster.ray_eval import ray_evaluate

                summary = ray_evaluate(spec, items, results, address=None if args.ray == "local" else args.ray,
                                       resume=not args.no_resume, fast_actors=args.ray_fast_actors,
                                       rethink_actors=args.ray_rethink_actors,
                                       gpus_per_rethink_actor=args.ray_gpus_per_actor, batch_size=args.batch_size,
                                       progress=bar.update)
            else:
                summary = evaluate(rt, items, results, resume=not args.no_resume, progress=bar.update)
        except KeyboardInterrupt:
            bar.close()
            return interrupted("dbmef eval", results, len(items))
    bar.close()
    summary["results_file"] = results
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    keys = ["n_images", "n_errors", "backbone_accuracy", "dbmef_accuracy", "rethink_rate",
            "flips_true_to_false", "flips_false_to_true", "results_file"]
    print(table([[k, summary[k]] for k in keys], ["metric", "value"]))
    lat = summary["latency_s_per_image"]
    print()
    print(table([[s, lat[s] * 1e3, summary["latency_s_per_rethought_image"][s] * 1e3] for s in lat],
                ["stage", "ms/image", "ms/rethought image"]))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import signal
    import threading

    from dbmef.cluster import require_ray

    ray = require_ray()
    from dbmef.cluster.serve import ServeConfig, drain_and_stop, start
    from dbmef.runtime.worker import WorkerConfig

    worker = WorkerConfig(batch_size=args.max_batch_size, batch_wait_s=args.batch_wait_ms / 1e3,
                          max_queued=args.max_queued, max_rethinking=args.max_rethinking, deadline_s=args.deadline_s,
                          on_overload=args.on_overload, fill_wait_s=args.fill_wait_ms / 1e3)
    cfg = ServeConfig(worker=worker, replicas=args.replicas, gpus_per_replica=args.gpus_per_replica,
                      cpus_per_replica=args.cpus_per_replica, max_replicas_per_node=args.max_replicas_per_node,
                      max_body_bytes=int(args.max_body_mb * 2**20), max_ongoing_requests=args.max_ongoing_requests,
                      body_timeout_s=args.body_timeout_s, request_timeout_s=args.request_timeout_s,
                      keep_alive_timeout_s=args.keep_alive_timeout_s, graceful_shutdown_s=args.graceful_shutdown_s,
                      model_name=args.model_name, proxy_location=args.proxy_location, grpc_port=args.grpc_port,
                      grpc_host=args.host)
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        log.warning("%s: draining (no new requests; in-flight ones are answered)", signal.Signals(signum).name)
        stop.set()

    started_ray = not ray.is_initialized() and not args.address
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    try:
        start(runtime_spec(args), cfg, host=args.host, port=args.port, address=args.address)
        for sig in (signal.SIGTERM, signal.SIGINT):  # Ray installs its own while starting: ours win
            signal.signal(sig, on_signal)
        grpc = f" and grpc://{args.host}:{args.grpc_port} (OIP gRPC)" if args.grpc_port is not None else ""
        print(f"serving {args.bundle} on http://{args.host}:{args.port} (POST /classify, /v2/models/"
              f"{cfg.model_name}/infer, GET /v2/health/ready, /metrics){grpc}; SIGTERM or Ctrl-C drains and stops",
              flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        drain_and_stop(started_ray)
    print("drained; stopped", flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from dbmef.apps.calibrate import MIN_SAMPLES

    p = argparse.ArgumentParser(prog="dbmef", description="DBMEF: diffusion re-ranking of uncertain classifications.")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log lines (-vv: debug)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress and no info lines")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("classify", help="classify images (files or folders)")
    add_runtime_args(c)
    c.add_argument("images", nargs="+", help="image files or folders")
    c.add_argument("--json", action="store_true", help="print a JSON list, one object per input")
    c.add_argument("--output", metavar="FILE", help="also write the results: .csv (the table's columns) or .jsonl "
                                                    "(one full result per line)")
    c.set_defaults(func=cmd_classify)

    k = sub.add_parser("calibrate", help="choose the operating point (protector threshold) on a labelled set from "
                                          "one rethink-all pass; writes the threshold, the rule and the curve")
    add_runtime_args(k, prot_help="rule: the paper's Prot = 1 - alpha (0.95; 0.99 for strong backbones)")
    k.add_argument("--data", required=True, help="ImageFolder root or a 'path label' file list")
    rule = k.add_argument_group("rule (one; default --prot 0.95)").add_mutually_exclusive_group()
    rule.add_argument("--max-rethink-rate", type=float, metavar="R",
                      help="the best accuracy whose calibration rethink rate is at most R (e.g. 0.10)")
    rule.add_argument("--target-accuracy", type=float, metavar="A", help="the cheapest threshold reaching accuracy A")
    rule.add_argument("--latency-budget-ms", type=float, metavar="L",
                      help="the highest rethink rate whose expected mean latency per image fits L ms")
    k.add_argument("--backbone-only", action="store_true",
                   help="only the backbone pass (--prot only; no curve, no slow path): the quick calibration")
    k.add_argument("--results", help="per-image JSONL of the pass (default: ~/.cache/dbmef/calibration/"
                                     "<bundle>-<digest>/<data name>.jsonl; $DBMEF_HOME replaces ~/.cache/dbmef)")
    k.add_argument("--min-samples", type=int, default=MIN_SAMPLES, metavar="N",
                   help=f"correctly classified calibration images a threshold needs before it is written "
                        f"(default {MIN_SAMPLES})")
    k.add_argument("--no-resume", action="store_true", help="start the pass over instead of resuming")
    k.add_argument("--plot", metavar="PNG", help="write the curve (default: beside the results file)")
    k.add_argument("--dry-run", action="store_true", help="report the curve and the choice; leave the bundle as is")
    k.add_argument("--json", action="store_true", help="print the report as JSON")
    add_ray_args(k)
    k.set_defaults(func=cmd_calibrate)

    _add_eval(sub)
    _add_serve(sub)
    add_tools(sub)
    for sp in sub.choices.values():  # -v / -q also after the sub-command (`dbmef classify -q ...`)
        g = sp.add_argument_group("output")
        g.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS, help="more log lines (-vv: debug)")
        g.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                       help="no progress and no info lines")
    return p


def _add_eval(sub: Any) -> None:
    e = sub.add_parser("eval", help="accuracy of backbone vs DBMEF on a labelled set, resumable")
    add_runtime_args(e)
    e.add_argument("--data", required=True, help="ImageFolder root or a 'path label' file list")
    e.add_argument("--results", help="per-image JSONL (default: ~/.cache/dbmef/eval/<bundle>-<digest>/<data "
                                     "name>.jsonl; $DBMEF_HOME replaces ~/.cache/dbmef)")
    e.add_argument("--no-resume", action="store_true", help="start over instead of resuming")
    e.add_argument("--json", action="store_true", help="print the summary as JSON")
    add_ray_args(e)
    e.set_defaults(func=cmd_eval)


def _add_serve(sub: Any) -> None:
    sv = sub.add_parser("serve", help="HTTP service on Ray Serve: /classify, the Open Inference Protocol (/v2), "
                                      "/metrics", epilog=SERVE_EPILOG,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_runtime_args(sv)
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 to serve other machines)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--grpc-port", type=int, metavar="PORT",
                    help="also serve the Open Inference Protocol over gRPC (stock tritonclient.grpc) on this port, "
                         "from every replica (8001 is Triton's); default: HTTP only")
    sv.add_argument("--address", help="join this Ray cluster (e.g. auto) instead of starting a local instance")
    sv.add_argument("--replicas", type=int, default=1)
    sv.add_argument("--gpus-per-replica", type=float, default=0.0, help="1: one replica per GPU, 0.5: two")
    sv.add_argument("--cpus-per-replica", type=float, default=1.0)
    sv.add_argument("--max-replicas-per-node", type=int, default=None, help="1 spreads the replicas over the nodes")
    sv.add_argument("--max-batch-size", type=int, default=16, help="requests per fast-path batch")
    sv.add_argument("--batch-wait-ms", type=float, default=2.0,
                    help="after the first waiting request, how long the fast path waits for more")
    sv.add_argument("--deadline-s", type=float, default=60.0,
                    help="a rethink that cannot end within this (or the request's OIP timeout) is skipped: the "
                         "fast answer, with rethink_skipped=deadline")
    sv.add_argument("--on-overload", choices=["fast_answer", "reject"], default="fast_answer",
                    help="when the slow path is full or late: answer with the fast label (default) or 503")
    sv.add_argument("--max-queued", type=int, default=4096, help="requests waiting for the fast path, then 503")
    sv.add_argument("--max-rethinking", type=int, default=1024,
                    help="images waiting for or in the slow path; more are answered by the fast path")
    sv.add_argument("--fill-wait-ms", type=float, default=50.0,
                    help="how long an engine call that would not be full waits for rows the fast path is producing")
    sv.add_argument("--graceful-shutdown-s", type=float, default=30.0,
                    help="on SIGTERM, in-flight requests get this long to finish")
    sv.add_argument("--model-name", default="dbmef", help="the model's name under /v2/models/")
    sv.add_argument("--proxy-location", choices=["EveryNode", "HeadOnly"], default="EveryNode",
                    help="where Ray Serve runs HTTP proxies (HeadOnly when several nodes share one machine)")
    sv.add_argument("--max-body-mb", type=float, default=10.0, help="larger requests get 413")
    sv.add_argument("--body-timeout-s", type=float, default=10.0,
                    help="a request body must arrive within this (slow clients get 408)")
    sv.add_argument("--request-timeout-s", type=float, default=300.0, help="end-to-end limit per request")
    sv.add_argument("--keep-alive-timeout-s", type=float, default=5.0, help="idle keep-alive connections close")
    sv.add_argument("--max-ongoing-requests", type=int, default=1024, help="requests a replica holds at once")
    sv.set_defaults(func=cmd_serve)


SERVE_EPILOG = """endpoints:
  POST /classify                         one encoded image -> JSON result
  POST /v2/models/NAME/infer             Open Inference Protocol (KServe v2 / Triton HTTP): input 'image' BYTES [N,1]
  GET  /v2/health/live, /v2/health/ready liveness; readiness (503 until the engines are open and warmed up)
  GET  /v2, /v2/models/NAME[/ready]      server / model metadata and readiness
  GET  /metrics                          Prometheus
  gRPC inference.GRPCInferenceService    with --grpc-port: ServerLive/Ready, ModelReady, ServerMetadata,
                                         ModelMetadata, ModelInfer (the client's deadline is the request's)

Kubernetes probes (the container runs `dbmef serve --host 0.0.0.0 --bundle /bundle`):
  livenessProbe:  {httpGet: {path: /v2/health/live, port: 8000}, periodSeconds: 10}
  readinessProbe: {httpGet: {path: /v2/health/ready, port: 8000}, periodSeconds: 5, failureThreshold: 1}
  startupProbe:   {httpGet: {path: /v2/health/ready, port: 8000}, periodSeconds: 5, failureThreshold: 120}
  terminationGracePeriodSeconds: 60      # > --graceful-shutdown-s: SIGTERM drains, then exits 0
"""


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose, args.quiet)
    try:
        rc = int(args.func(args))
        sys.stdout.flush()  # a reader that left surfaces here, inside the handlers, not at interpreter exit
        return rc
    except DBMEFError as exc:
        print(f"dbmef: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        msg = missing_extra(exc, f"dbmef {args.command}")
        if msg is None:
            raise
        print(msg, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dbmef {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `dbmef info | head`: the reader left; say nothing more (Python's own advice)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
