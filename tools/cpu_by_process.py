"""Where a command's CPU goes, by kind of process, including the ones it does not wait for.

``/usr/bin/time`` counts only the children a command reaps: Ray's daemons and workers detach, so a
``make test`` that keeps both cores busy reports a quarter less CPU than the machine spent. This
samples every process on the machine twice a second while the command runs, keeps each one's last
user + system time, and prints the machine's busy core-seconds beside the total per kind
(docs/testing.md has a reading):

    python tools/cpu_by_process.py make test

Processes that live under half a second are missed; everything else on the machine is counted too,
so run it on an otherwise idle machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter

KINDS = (  # (kind, any of these in the lower-cased command line), first match wins
    ("pytest main suite", ("xdist", "exec(eval(sys.stdin.readline()))")),
    ("pytest service", ("test_serve",)),
    ("pytest multi-node", ("test_multinode",)),
    ("mypy", ("mypy",)),
    ("ray daemons", ("raylet", "gcs_server", "dashboard", "log_monitor", "monitor.py", "runtime_env", "runtimeenv")),
    ("ray workers and actors", ("ray::", "default_worker")),
    ("dbmef CLI subprocesses", ("dbmef.apps.cli", "bin/dbmef")),
    ("export subprocesses", ("dbmef.export.cli", "dbmef-export")),
    ("benchmark scripts", ("benchmarks/",)),
    ("pip and venv", ("-m pip", "bin/pip", "-m venv")),
    ("ruff and import-linter", ("ruff", "lint-imports")),
)


def machine_busy() -> float:
    """Busy core-seconds since boot: every /proc/stat cpu field but idle and iowait."""
    with open("/proc/stat") as fh:
        f = [int(x) for x in fh.readline().split()[1:]]
    return (sum(f) - f[3] - f[4]) / os.sysconf("SC_CLK_TCK")


def sample(seen: dict[tuple[int, int], tuple[str, float]]) -> None:
    """Every process's (command line, user + system seconds so far), keyed by (pid, start time): a
    pid reused by a new process is a new key, and a kernel thread that renames itself is not."""
    hz = os.sysconf("SC_CLK_TCK")
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as fh:
                stat = fh.read()
            with open(f"/proc/{pid}/cmdline") as fh:
                cmd = fh.read().replace("\0", " ").strip()
        except OSError:  # gone meanwhile
            continue
        fields = stat.rsplit(")", 1)[1].split()
        key = (int(pid), int(fields[19]))  # fields[19]: starttime, the 22nd field of /proc/PID/stat
        seen[key] = (cmd or stat.split("(", 1)[1].split(")")[0], (int(fields[11]) + int(fields[12])) / hz)


def kind(cmd: str) -> str:
    low = cmd.lower()
    return next((k for k, marks in KINDS if any(m in low for m in marks)), "other")


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    before: dict[tuple[int, int], tuple[str, float]] = {}
    sample(before)
    busy0, t0 = machine_busy(), time.perf_counter()
    proc = subprocess.Popen(argv)
    seen: dict[tuple[int, int], tuple[str, float]] = {}
    while proc.poll() is None:
        sample(seen)
        time.sleep(0.5)
    sample(seen)
    wall, busy = time.perf_counter() - t0, machine_busy() - busy0
    totals: Counter[str] = Counter()
    for key, (cmd, cpu) in seen.items():
        totals[kind(cmd)] += cpu - before.get(key, ("", 0.0))[1]
    print(f"\nwall {wall:.0f} s, machine busy {busy:.0f} core-s ({busy / wall / os.cpu_count() * 100:.0f} % of "
          f"{os.cpu_count()} cores), sampled {sum(totals.values()):.0f} core-s", file=sys.stderr)
    for k, v in totals.most_common():
        print(f"{v:8.1f} core-s  {k}", file=sys.stderr)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
