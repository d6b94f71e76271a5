"""Throughput and latency of ``dbmef serve`` (Ray Serve) under a bounded concurrent load.

    python benchmarks/serve_load.py [--bundle DIR] [--requests 240] [--concurrency 1 4 16]

Starts a local Ray instance and the service on loopback, then for each concurrency level keeps
exactly that many requests in flight (each client POSTs the next test digit as soon as its last
answer arrives) and records requests/s, latency p50/p95 and the batch sizes the service formed.
In the same run, the in-process runtime classifies the same images one call per image and in
batches of 16, so the service's overhead and batching gain are measured against it. Writes
``benchmarks/results/serve.json``; ``run_benchmarks.py --report-only`` puts it in RESULTS.md.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import io
import json
import platform
import socket
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent


def _post(url: str, body: bytes) -> tuple[float, dict[str, Any]]:
    t0 = time.perf_counter()
    req = urllib.request.Request(url, data=body, method="POST")
    with urllib.request.urlopen(req, timeout=600) as r:
        out = json.loads(r.read())
    return time.perf_counter() - t0, out


def load(url: str, bodies: list[bytes], concurrency: int, n: int) -> dict[str, Any]:
    """Keep ``concurrency`` requests in flight until ``n`` are answered."""
    lat: list[float] = []
    batches: list[int] = []
    rethought = 0
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(concurrency) as ex:
        for dt, out in ex.map(lambda i: _post(url, bodies[i % len(bodies)]), range(n)):
            lat.append(dt)
            batches.append(int(out["batch_size"]))
            rethought += bool(out["rethought"])
    wall = time.perf_counter() - t0
    a = np.array(lat)
    return {"concurrency": concurrency, "requests": n, "wall_s": wall, "requests_per_s": n / wall,
            "latency_p50_ms": float(np.percentile(a, 50) * 1e3), "latency_p95_ms": float(np.percentile(a, 95) * 1e3),
            "mean_batch_size": float(np.mean(batches)), "rethought_fraction": rethought / n}


def in_process(bundle: str, bodies: list[bytes], n: int) -> dict[str, float]:
    from dbmef.runtime.system import DBMEFRuntime

    with DBMEFRuntime(bundle) as rt:
        rt.classify(bodies[:4])  # warm-up
        t0 = time.perf_counter()
        for i in range(n):
            rt.classify([bodies[i % len(bodies)]])
        one = n / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        for s in range(0, n, 16):
            rt.classify([bodies[i % len(bodies)] for i in range(s, min(s + 16, n))])
        batched = n / (time.perf_counter() - t0)
    return {"images_per_s_one_by_one": one, "images_per_s_batches_of_16": batched}


def section(r: dict[str, Any]) -> str:
    lines = [
        "## serve (Ray Serve, digits bundle)", "",
        f"`{r['command']}` on {r['machine']}, {r['date']}. Bundle `{r['bundle']}`; {r['replicas']} replica, "
        f"max batch {r['max_batch_size']}, batch wait {r['batch_wait_ms']} ms; requests are PNG test digits "
        f"posted to `/classify` over loopback HTTP, each level after {r['warmup']} warm-up requests.", "",
        "| concurrent requests | requests/s | p50 ms | p95 ms | mean batch | rethought |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for x in r["levels"]:
        lines.append(f"| {x['concurrency']} | {x['requests_per_s']:.1f} | {x['latency_p50_ms']:.1f} | "
                     f"{x['latency_p95_ms']:.1f} | {x['mean_batch_size']:.1f} | {x['rethought_fraction']:.0%} |")
    ip = r["in_process"]
    lines += ["", f"Same images in-process (`DBMEFRuntime.classify`, same run): {ip['images_per_s_one_by_one']:.1f} "
                  f"images/s one call per image, {ip['images_per_s_batches_of_16']:.1f} images/s in batches of 16.",
              ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", default=None, help="default: the committed digits bundle")
    ap.add_argument("--requests", type=int, default=240)
    ap.add_argument("--warmup", type=int, default=24)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--max-batch-size", type=int, default=16)
    ap.add_argument("--batch-wait-ms", type=float, default=10.0)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "serve.json")
    a = ap.parse_args(argv)

    import ray
    from ray import serve

    from dbmef.apps.digits import demo_bundle_dir, demo_test_split, render
    from dbmef.cluster import RuntimeSpec
    from dbmef.cluster.serve import ServeConfig, start

    bundle = a.bundle or str(demo_bundle_dir())
    split = demo_test_split()
    bodies = []
    for img in split.images:
        buf = io.BytesIO()
        render(img).save(buf, "PNG")
        bodies.append(buf.getvalue())
    ip = in_process(bundle, bodies, a.requests)
    print(f"in-process: {ip}", file=sys.stderr)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    try:
        start(RuntimeSpec(bundle), ServeConfig(max_batch_size=a.max_batch_size, batch_wait_ms=a.batch_wait_ms),
              port=port)
        url = f"http://127.0.0.1:{port}/classify"
        levels = []
        for c in a.concurrency:
            load(url, bodies[-a.warmup:], c, a.warmup)
            levels.append(load(url, bodies, c, a.requests))
            print(levels[-1], file=sys.stderr)
    finally:
        serve.shutdown()
        ray.shutdown()
    r = {"command": "python benchmarks/serve_load.py " + " ".join(argv or sys.argv[1:]), "bundle": bundle,
         "machine": f"{platform.platform()}, 2 cores, no GPU",
         "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
         "replicas": 1, "max_batch_size": a.max_batch_size, "batch_wait_ms": a.batch_wait_ms, "warmup": a.warmup,
         "levels": levels, "in_process": ip}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(r, indent=2) + "\n")
    print(section(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
