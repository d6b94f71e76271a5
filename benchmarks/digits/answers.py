"""Per-image answers and row accounting of the slow path in the early-exit modes given, on the
committed digits bundle's 597 test digits at k 5, V 5 (its protector): JSON, to compare two versions
of dbmef image by image (a refactor of the slow path must change none of it).

    python benchmarks/digits/answers.py OUT.json off exact adaptive
    cd /tmp && PYTHONPATH=/path/to/other/checkout python /path/to/answers.py OTHER.json off exact adaptive

Each mode: every image's [label, rethought, UNet evaluations, votes], the rows sent and needed, the
engine calls. It runs on versions from before the row scheduler's module was renamed, too.
"""

import json
import sys

import numpy as np

from dbmef.apps.digits import demo_bundle_dir, demo_test_split, render
from dbmef.runtime import RuntimeSpec

try:
    from dbmef.runtime.row_scheduler import SchedulerStats
except ImportError:  # dbmef before issue 33
    from dbmef.runtime.scheduler import SchedulerStats  # type: ignore[no-redef]

split = demo_test_split()
images = [np.asarray(render(a)) for a in split.images]
out = {}
for mode in sys.argv[2:]:
    stats = SchedulerStats()
    with RuntimeSpec(str(demo_bundle_dir()), scoring={"k": 5, "votes": 5, "early_exit": mode}).build() as rt:
        res = sorted(rt.stream(images, stats=stats), key=lambda r: r.index)
    d = stats.to_dict()
    out[mode] = {"answers": [[r.label, r.rethought, r.unet_evals, r.votes] for r in res],
                 "rows_sent": d["rows_sent"], "rows_needed": d["rows_needed"], "engine_calls": d["engine_calls"],
                 "rows_sent_per_row_needed": d["rows_sent_per_row_needed"],
                 "rethought": sum(r.rethought for r in res),
                 "unet_evals_per_rethought": float(np.mean([r.unet_evals for r in res if r.rethought]))}
    print(mode, {k: v for k, v in out[mode].items() if k != "answers"}, file=sys.stderr)
json.dump(out, open(sys.argv[1], "w"))
