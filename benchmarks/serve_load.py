"""``dbmef serve`` under load, as its operators would measure it (issue 23).

    python benchmarks/serve_load.py                      # every scenario on the committed digits bundle
    python benchmarks/serve_load.py --overload-s 10      # a shorter overload (the test's size)

Starts a local Ray instance and the service on loopback; clients POST PNG test digits to
``/classify`` (the 597 of the digits test split, in order, round and round):

1. **three deployments**: nothing rethought (``--prot 1``); the bundle's protector (about 13 %
   rethought) with the bundle's early exit; the same with ``--early-exit adaptive``. Each under a
   **closed loop** of ``--concurrency`` clients (each sends its next request as soon as its answer
   arrives) and, with the protector, **open loops** at ``--open-rates`` requests/s (40/s: what the
   batch-synchronous service sustained), since in a closed loop the clients the fast path frees
   pile up behind the slow path (Little's law). Latency of confident and of rethought requests
   separately, and the service's own work counts from ``/metrics`` (UNet evaluations, rows sent
   and needed).
2. **overload**: open-loop arrivals of rethought digits at ``--overload-factor`` times the slow
   path's capacity (measured on the second deployment) for ``--overload-s`` seconds, with a probe of
   confident digits at 10 requests/s beside them: every request must be answered (no loss, no
   hang), rethinks the slow path cannot finish in time are answered with the fast label
   (``rethink_skipped``), confident answers stay fast, the replica's memory stays bounded
   (resident set sampled every second from /proc).

The deployments run with the service's default deadline (60 s, so no rethink is skipped); the
service is then redeployed with ``--deadline-s`` for the overload and the big-image probe.

Writes ``benchmarks/results/serve.json`` and ``benchmarks/SERVE.md``.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import io
import json
import platform
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent


def post(url: str, body: bytes) -> tuple[float, int, dict[str, Any]]:
    t0 = time.perf_counter()
    req = urllib.request.Request(url, data=body, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            status, out = r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        status, out = e.code, json.loads(e.read() or b"{}")
    return time.perf_counter() - t0, status, out


def wait_ready(url: str, timeout: float = 300) -> None:
    """Until ``/v2/health/ready`` answers 200 (the replica opens its engines in the background)."""
    ready = url.rsplit("/", 1)[0] + "/v2/health/ready"
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(ready, timeout=10) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{ready} did not answer 200 within {timeout:.0f} s")


def ms(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs) * 1e3, q)) if xs else float("nan")


def lat(xs: list[float]) -> dict[str, float]:
    """p50 / p95 / mean in milliseconds."""
    return {"p50": ms(xs, 50), "p95": ms(xs, 95), "mean": float(np.mean(xs) * 1e3) if xs else float("nan")}


def closed_loop(url: str, bodies: list[bytes], concurrency: int, n: int) -> dict[str, Any]:
    """``concurrency`` clients, each posting its next digit when its answer arrives, ``n`` in all."""
    conf: list[float] = []
    slow: list[float] = []
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(concurrency) as ex:
        for dt, status, out in ex.map(lambda i: post(url, bodies[i % len(bodies)]), range(n)):
            assert status == 200, out
            (slow if out["rethought"] else conf).append(dt)
    wall = time.perf_counter() - t0
    return {"concurrency": concurrency, "requests": n, "wall_s": wall, "requests_per_s": n / wall,
            "rethought": len(slow), "confident_ms": lat(conf), "rethought_ms": lat(slow)}


def open_loop(url: str, bodies: list[bytes], rate: float, n: int) -> dict[str, Any]:
    """``n`` requests (``bodies`` in order) arriving every ``1 / rate`` seconds, whatever the answers."""
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(256) as ex:
        futures = []
        for i in range(n):
            time.sleep(max(0.0, t0 + i / rate - time.perf_counter()))
            futures.append(ex.submit(post, url, bodies[i % len(bodies)]))
        done = [f.result() for f in futures]
    wall = time.perf_counter() - t0
    assert all(status == 200 for _, status, _ in done), [out for _, status, out in done if status != 200][:3]
    conf = [dt for dt, _, out in done if not out["rethought"]]
    slow = [dt for dt, _, out in done if out["rethought"]]
    return {"rate_per_s": rate, "requests": n, "wall_s": wall, "requests_per_s": n / wall, "rethought": len(slow),
            "confident_ms": lat(conf), "rethought_ms": lat(slow)}


def slow_capacity(url: str, slow_bodies: list[bytes], n: int = 32) -> float:
    """Rethinks per second the slow path sustains: ``n`` rethought digits posted at once."""
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(n) as ex:
        assert all(out["rethought"] for _, _, out in ex.map(lambda j: post(url, slow_bodies[j % len(slow_bodies)]),
                                                            range(n)))
    return n / (time.perf_counter() - t0)


def replica_pid() -> int:
    """The replica's process (Ray titles it ``ray::ServeReplica:dbmef:...``), found in /proc: the Ray
    state API would need the dashboard, which this benchmark does not start."""
    pids = [int(d.name) for d in Path("/proc").iterdir() if d.name.isdigit()
            and b"ServeReplica:dbmef" in _cmdline(d)]
    if len(pids) != 1:
        raise RuntimeError(f"expected one dbmef replica process, found {pids}")
    return pids[0]


def _cmdline(d: Path) -> bytes:
    try:
        return (d / "cmdline").read_bytes()
    except OSError:  # the process ended while the directory was listed
        return b""


def scrape(url: str) -> dict[str, float]:
    """The service's work counters from ``/metrics``: scorer rows by kind (``rows_sent``,
    ``rows_needed``, ``rows_padding``, ...) and ``unet_evals``."""
    with urllib.request.urlopen(url.rsplit("/", 1)[0] + "/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("dbmef_engine_rows_total{"):
            kind = line.split('kind="', 1)[1].split('"', 1)[0]
            out[f"rows_{kind}"] = float(line.rsplit(" ", 1)[1])
        elif line.startswith("dbmef_unet_evaluations_total "):
            out["unet_evals"] = float(line.rsplit(" ", 1)[1])
    return out


def measured(url: str, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``run()``'s latencies with the service's work during it (counter differences)."""
    before = scrape(url)
    out = run()
    after = scrape(url)
    out["work"] = {k: after[k] - before.get(k, 0.0) for k in after}
    return out


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class RssSampler:
    """The replica's resident set, sampled every ``period`` seconds while in the ``with`` block."""

    def __init__(self, period: float = 1.0) -> None:
        self.pid, self.period = replica_pid(), period
        self.samples = [rss_mb(self.pid)]
        self._stop = threading.Event()

    def __enter__(self) -> RssSampler:
        threading.Thread(target=self._run, daemon=True).start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self.samples.append(rss_mb(self.pid))

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.samples.append(rss_mb(self.pid))

    def summary(self) -> dict[str, float]:
        return {"before": self.samples[0], "peak": max(self.samples), "after": self.samples[-1]}


def overload(url: str, slow_bodies: list[bytes], fast_bodies: list[bytes], rate: float, seconds: float
             ) -> dict[str, Any]:
    """Open-loop rethought arrivals at ``rate``/s and a 10/s confident probe for ``seconds``."""
    rss = RssSampler()
    rss.__enter__()
    futures: list[tuple[str, cf.Future]] = []
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(256) as ex:
        k_slow = k_fast = 0
        while (now := time.perf_counter() - t0) < seconds:
            while k_slow < now * rate:
                futures.append(("slow", ex.submit(post, url, slow_bodies[k_slow % len(slow_bodies)])))
                k_slow += 1
            while k_fast < now * 10:
                futures.append(("fast", ex.submit(post, url, fast_bodies[k_fast % len(fast_bodies)])))
                k_fast += 1
            time.sleep(0.005)
        done = [(kind, f.result()) for kind, f in futures]
    drained = time.perf_counter() - t0
    rss.__exit__()
    statuses: dict[str, int] = {}
    skipped: dict[str, int] = {}
    for _, (_, status, out) in done:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
        if out.get("rethink_skipped"):
            skipped[out["rethink_skipped"]] = skipped.get(out["rethink_skipped"], 0) + 1
    fast = [dt for kind, (dt, status, out) in done if kind == "fast"]
    slow_done = [dt for kind, (dt, status, out) in done if kind == "slow" and out.get("rethought")]
    return {"seconds": seconds, "rethought_rate_per_s": rate, "requests": len(done), "statuses": statuses,
            "rethought": len(slow_done), "rethink_skipped": skipped, "drained_after_s": drained,
            "confident_probe_ms": {"p50": ms(fast, 50), "p95": ms(fast, 95), "max": ms(fast, 100)},
            "rethought_ms": {"p50": ms(slow_done, 50), "p95": ms(slow_done, 95)},
            "replica_rss_mb": rss.summary()}


def big_images(url: str, good: bytes, n: int = 16, side: int = 8192) -> dict[str, Any]:
    """``n`` concurrent ``side`` x ``side`` RGBA PNGs (exactly the 64 M-pixel limit at 8192) with a
    good digit posted every 0.25 s beside them: every big one answered, the good ones' latency,
    the replica's peak memory (issue 27)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGBA", (side, side), (20, 40, 60, 128)).save(buf, "PNG", compress_level=9)
    big = buf.getvalue()
    with RssSampler(period=0.2) as rss, cf.ThreadPoolExecutor(n + 1) as ex:
        t0 = time.perf_counter()
        bigs = [ex.submit(post, url, big) for _ in range(n)]
        probe = []
        while not all(f.done() for f in bigs):
            probe.append(post(url, good))
            time.sleep(0.25)
        answers = [f.result() for f in bigs]
        wall = time.perf_counter() - t0
    statuses: dict[str, int] = {}
    for _, status, _ in answers:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    good_ms = [dt for dt, status, _ in probe if status == 200]
    return {"images": n, "side": side, "png_kb": len(big) / 1024, "statuses": statuses, "wall_s": wall,
            "good_requests": len(probe), "good_ok": len(good_ms),
            "good_ms": {"p50": ms(good_ms, 50), "max": ms(good_ms, 100)}, "replica_rss_mb": rss.summary()}


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Each number the median over ``runs`` (dicts of the same keys, nested)."""
    out: dict[str, Any] = {}
    for k, v in runs[0].items():
        if isinstance(v, dict):
            out[k] = median_of([r[k] for r in runs])
        elif isinstance(v, (int, float)):
            out[k] = float(np.median([r[k] for r in runs]))
        else:
            out[k] = v
    return out


def _row(c: dict[str, Any]) -> str:
    w, cm, sm = c["work"], c["confident_ms"], c["rethought_ms"]
    slow = f"{sm['p50']:.0f} / {sm['p95']:.0f}" if c["rethought"] else "-"
    evals = f"{w['unet_evals'] / c['rethought']:.0f}" if c["rethought"] else "-"
    rows = f"{w['rows_sent']:.0f} / {w['rows_needed']:.0f}" if c["rethought"] else "-"
    return (f"| {c['deployment']} | {c['load']} | {cm['p50']:.0f} / {cm['p95']:.0f} | {slow} | "
            f"{c['requests_per_s']:.1f} | {c['rethought'] / c['requests']:.0%} | {evals} | {rows} |")


def in_slow_path(c: dict[str, Any]) -> float:
    """Little's law: rethought requests in the service on average (their rate times their mean latency)."""
    return c["rethought"] / c["wall_s"] * c["rethought_ms"]["mean"] / 1e3


def infeasible(c: dict[str, Any], clients: int, target_s: float = 0.484, before_s: float = 0.074) -> str:
    """Why the closed loop cannot meet both targets on this machine: with ``clients`` clients,
    throughput X and a fraction f rethought, clients = X ((1 - f) W_conf + f W_rethought), and
    X <= C / f, C the rethinks per second the slow path sustains under this load."""
    f = c["rethought"] / c["requests"]
    cap = c["rethought"] / c["wall_s"]
    w_conf = (clients * f / cap - f * target_s) / (1 - f)
    need = clients * f / ((1 - f) * 1.5 * before_s + f * target_s)
    return (f"**Both targets at once are out of reach in this closed loop here.** With {clients} clients, throughput "
            f"X and a fraction f = {f:.2f} rethought, {clients} = X ((1 - f) W_confident + f W_rethought), and X <= "
            f"C / f, where C = {cap:.1f} rethinks/s is what the slow path sustained in this loop. A rethought mean "
            f"of {target_s * 1e3:.0f} ms would then force a confident mean of at least {w_conf * 1e3:.0f} ms, "
            f"{w_conf / before_s:.1f}x the issue's nothing-rethought {before_s * 1e3:.0f} ms; both (confident at 1.5x, "
            f"rethought at {target_s * 1e3:.0f} ms) need C >= {need:.1f}/s, {need / cap:.1f}x this slow path. The "
            "service spends the slow path's capacity on rethinks and answers confident requests at once: the "
            "trade the two-path design makes.")


def adaptive_note(sc: list[dict[str, Any]]) -> str:
    """What the adaptive rows say, beside the bundle's early exit at the same loads."""
    pairs = [(b, c) for b in sc for c in sc if b["deployment"].endswith("its early exit")
             and "adaptive" in c["deployment"] and b["load"] == c["load"]]
    evals = [(b["work"]["unet_evals"] / b["rethought"], c["work"]["unet_evals"] / c["rethought"]) for b, c in pairs]
    return ("**`--early-exit adaptive`** needs fewer UNet evaluations per rethink ("
            + ", ".join(f"{x:.0f} -> {y:.0f}" for x, y in evals[:1])
            + ") but runs a rethink's stages one after another, each waiting for the errors of the call "
              "before, so a rethink takes more engine round trips. Rethought p50 beside the bundle's early exit: "
            + "; ".join(f"{b['load']}: {c['rethought_ms']['p50']:.0f} ms against {b['rethought_ms']['p50']:.0f} ms"
                        for b, c in pairs)
            + ". On this machine it saves work, not latency; its agreement with the full method is measured in "
              "benchmarks/digits/STREAM.md.")


def section(r: dict[str, Any]) -> str:
    sc, o, g = r["scenarios"], r["overload"], r["big_images"]
    none, mixed = sc[0], sc[1]
    closed = [c for c in sc if c["load"].startswith("closed") and c["rethought"]]
    lines = [
        "# dbmef serve under load", "",
        f"`{r['command']}` on {r['machine']}, {r['date']}. Bundle `{r['bundle']}`, one replica; PNG test digits "
        f"(the {none['requests']:.0f} of the digits test split, in order) posted to `/classify` over loopback HTTP by "
        "clients on the same 2 cores, after a warm-up; each figure the median of "
        f"{r['repeats']} runs. Closed loop: each client posts its next digit when its "
        "answer arrives. Open loop: a digit every 1/rate seconds whatever the answers. The service's default "
        "60 s deadline: no rethink is skipped in these rows.", "",
        "| deployment | load | confident p50 / p95 ms | rethought p50 / p95 ms | requests/s | rethought | "
        "UNet evals / rethink | rows sent / needed |", "|---|---|---:|---:|---:|---:|---:|---:|",
        *[_row(c) for c in sc], "",
        f"**Confident answers**: under the issue's load (closed loop, {none['load'].split(', ')[1]}) their p50 is "
        f"**{mixed['confident_ms']['p50'] / none['confident_ms']['p50']:.2f}x** the nothing-rethought p50 "
        "(required <= 1.5x; the batch-synchronous service: 321 ms against 74 ms, 4.3x). With nothing rethought "
        "all the clients queue for the fast path, so that p50 is mostly queueing; with the protector most of "
        "them wait in the slow path and the fast path is nearly idle.", "",
        "**Rethought answers** (the batch-synchronous service: p50 484 ms at 40 requests/s in the closed loop). "
        "Throughput is what the slow path sustains, and the work per rethink is the same as before (the "
        "UNet evaluations column), so the time rethought requests spend in the service is set by how many "
        "of them are in it at once (Little's law: rate x mean latency): "
        + "; ".join(f"{c['deployment']}, {c['load']}: {in_slow_path(c):.1f} of {r['concurrency']} clients"
                    for c in closed)
        + ". In a closed loop the clients the fast path now frees at once post again, until nearly all of "
          "them wait behind the slow path; before, every client waited for its batch's rethinks, so the "
          "queue was spread over confident requests too. The open-loop rows compare at a fixed arrival rate.", "",
        infeasible(mixed, r["concurrency"]), "",
        adaptive_note(sc), "",
        f"## Overload: rethought digits at {o['rethought_rate_per_s']:.1f}/s ({r['overload_factor']:g}x the "
        f"{r['slow_capacity_per_s']:.2f}/s the slow path sustains: 32 rethought digits posted at once) "
        f"for {o['seconds']:.0f} s, plus confident "
        f"digits at 10/s; the service redeployed with a {r['deadline_s']:g} s rethink deadline", "",
        f"- requests: {o['requests']}, answered with status {o['statuses']}; the last answered "
        f"{o['drained_after_s'] - o['seconds']:.1f} s after the load stopped (none lost, none hung)",
        f"- rethought {o['rethought']}, answered with the fast label instead: {o['rethink_skipped']} "
        "(`rethink_skipped`: the slow path could not finish them within the deadline)",
        f"- confident probe latency p50 / p95 / max: {o['confident_probe_ms']['p50']:.0f} / "
        f"{o['confident_probe_ms']['p95']:.0f} / {o['confident_probe_ms']['max']:.0f} ms",
        f"- rethought latency p50 / p95: {o['rethought_ms']['p50']:.0f} / {o['rethought_ms']['p95']:.0f} ms",
        f"- replica resident memory: {o['replica_rss_mb']['before']:.0f} MB before, "
        f"{o['replica_rss_mb']['peak']:.0f} MB peak, {o['replica_rss_mb']['after']:.0f} MB after", "",
        f"## {g['images']} concurrent {g['side']} x {g['side']} RGBA PNGs ({g['png_kb']:.0f} KB each, at the "
        "64 M-pixel limit), a confident digit every 0.25 s beside them", "",
        f"- the big ones answered with status {g['statuses']} in {g['wall_s']:.1f} s",
        f"- the digits beside them: {g['good_ok']} of {g['good_requests']} answered 200, p50 / max "
        f"{g['good_ms']['p50']:.0f} / {g['good_ms']['max']:.0f} ms",
        f"- replica resident memory: {g['replica_rss_mb']['before']:.0f} MB before, "
        f"{g['replica_rss_mb']['peak']:.0f} MB peak, {g['replica_rss_mb']['after']:.0f} MB after "
        "(before issue 27: 260 MB -> 3.1 GB peak, 1.8 GB after; a good request waited 20.6 s)", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", default=None, help="default: the committed digits bundle")
    ap.add_argument("--requests", type=int, default=597)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--open-rates", type=float, nargs="+", default=[20.0, 40.0],
                    help="open-loop arrivals per second (40: the batch-synchronous service's throughput)")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each load; the tables show medians")
    ap.add_argument("--overload-factor", type=float, default=10.0)
    ap.add_argument("--overload-s", type=float, default=60.0)
    ap.add_argument("--deadline-s", type=float, default=5.0, help="the service's rethink deadline during overload")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "serve.json")
    ap.add_argument("--from-json", type=Path, help="only write SERVE.md again from a results file")
    a = ap.parse_args(argv)
    if a.from_json:
        (HERE / "SERVE.md").write_text(section(json.loads(a.from_json.read_text())))
        return 0

    import ray
    from ray import serve

    from dbmef.apps.digits import demo_bundle_dir, demo_test_split, render
    from dbmef.cluster import RuntimeSpec
    from dbmef.cluster.serve import ServeConfig, start
    from dbmef.runtime.worker import WorkerConfig

    bundle = a.bundle or str(demo_bundle_dir())
    split = demo_test_split()
    bodies = []
    for img in split.images:
        buf = io.BytesIO()
        render(img).save(buf, "PNG")
        bodies.append(buf.getvalue())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/classify"
    deployments = [("nothing rethought (`--prot 1`)", RuntimeSpec(bundle, prot=1.0)),
                   ("the bundle's protector, its early exit", RuntimeSpec(bundle)),
                   ("the bundle's protector, `--early-exit adaptive`",
                    RuntimeSpec(bundle, scoring={"early_exit": "adaptive"}))]
    r: dict[str, Any] = {"scenarios": []}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    try:
        for j, (name, spec) in enumerate(deployments):
            start(spec, ServeConfig(), port=port)
            wait_ready(url)
            closed_loop(url, bodies[-48:], a.concurrency, 48)  # warm-up
            loads: list[tuple[str, Callable[[], dict[str, Any]]]] = [
                (f"closed loop, {a.concurrency} clients", lambda: closed_loop(url, bodies, a.concurrency, a.requests))]
            if j > 0:
                loads += [(f"open loop, {rate:g} req/s", lambda rate=rate: open_loop(url, bodies, rate, a.requests))
                          for rate in a.open_rates]
            for load, run in loads:
                runs = [measured(url, run) for _ in range(a.repeats)]
                res = {"deployment": name, "load": load, **median_of(runs), "runs": runs}
                r["scenarios"].append(res)
                print(json.dumps(res), file=sys.stderr)
            if j == 1:
                answers = [post(url, b) for b in bodies[:200]]
                slow_bodies = [b for b, (_, _, out) in zip(bodies, answers) if out["rethought"]]
                fast_bodies = [b for b, (_, _, out) in zip(bodies, answers) if not out["rethought"]]
                r["slow_capacity_per_s"] = slow_capacity(url, slow_bodies)
            serve.delete("dbmef")
        start(RuntimeSpec(bundle), ServeConfig(worker=WorkerConfig(deadline_s=a.deadline_s)), port=port)
        wait_ready(url)
        closed_loop(url, bodies[-48:], a.concurrency, 48)
        rate = a.overload_factor * r["slow_capacity_per_s"]
        r["overload"] = overload(url, slow_bodies, fast_bodies, rate, a.overload_s)
        print("overload", r["overload"], file=sys.stderr)
        r["big_images"] = big_images(url, fast_bodies[0])
        print("big_images", r["big_images"], file=sys.stderr)
    finally:
        serve.shutdown()
        ray.shutdown()
    r.update({"command": "python benchmarks/serve_load.py " + " ".join(argv or sys.argv[1:]), "bundle": bundle,
              "machine": f"{platform.platform()}, 2 cores, no GPU",
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "overload_factor": a.overload_factor,
              "concurrency": a.concurrency, "repeats": a.repeats,
              "deadline_s": a.deadline_s})
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(r, indent=2) + "\n")
    (HERE / "SERVE.md").write_text(section(r))
    print(section(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
