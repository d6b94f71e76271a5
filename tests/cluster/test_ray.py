"""Ray Data evaluation on a local Ray instance (loopback, 2 CPUs), with the committed digits bundle:
a calibrated system, so some images are rethought and some not."""

from __future__ import annotations

import pytest

ray = pytest.importorskip("ray")

from dbmef.runtime.data import load_labelled  # noqa: E402
from dbmef.runtime.evaluate import evaluate, read_results  # noqa: E402
from tests.cluster.conftest import (  # noqa: E402
    N_IMAGES,
    SPEC,
    same_record,
)


@pytest.mark.parametrize("flags", [["--ray-fast-actors", "0"], ["--ray-rethink-actors", "-1"],
                                   ["--ray-gpus-per-actor", "nan"], ["--ray", "ray://127.0.0.1:9"]])
def test_bad_ray_options_are_refused_before_ray_starts(digits_folder, tmp_path, capsys, flags):
    """Issue 35's probe: each ended in a traceback after Ray had started; now rc 2 and one line.
    (First in the module: the shared local Ray session must not be up yet.)"""
    from dbmef.apps.cli import main

    assert not ray.is_initialized()
    rc = main(["-q", "eval", "--bundle", SPEC.bundle, "--data", str(digits_folder), "--results",
               str(tmp_path / "r.jsonl"), "--ray", *flags])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert (flags[0] if flags[0] != "--ray" else "Ray cluster") in err
    assert not ray.is_initialized()


def test_gpus_the_cluster_lacks_are_refused_not_waited_for(local_ray, digits_folder, tmp_path):
    from dbmef.cluster.ray_eval import ray_evaluate
    from dbmef.errors import ConfigError

    with SPEC.build() as rt:
        items = load_labelled(digits_folder, rt.class_names)[:4]
    with pytest.raises(ConfigError, match="has 0 GPUs"):
        ray_evaluate(SPEC, items, tmp_path / "gpu.jsonl", gpus_per_rethink_actor=1.0)


def test_ray_data_eval_equals_single_process_image_by_image_and_resumes(local_ray, digits_folder, tmp_path):
    from dbmef.cluster.ray_eval import ray_evaluate

    with SPEC.build() as rt:
        items = load_labelled(digits_folder, rt.class_names)
        single = evaluate(rt, items, tmp_path / "single.jsonl")
    assert single["n_errors"] == 1 and 0 < single["rethink_rate"] < 1
    # Start from a results file that already holds a third of the images (as a crashed run
    # leaves it, torn last line included): the Ray run must finish exactly the rest.
    lines = (tmp_path / "single.jsonl").read_text().splitlines()
    part = tmp_path / "ray.jsonl"
    part.write_text("\n".join(lines[:12]) + "\n" + lines[12][:40])
    dist = ray_evaluate(SPEC, items, part, batch_size=5, fast_actors=1, rethink_actors=1)
    a, b = read_results(tmp_path / "single.jsonl"), read_results(part)
    assert set(a) == set(b) and len(a) == N_IMAGES + 1
    for key in a:
        same_record(a[key], b[key])
    assert len(part.read_text().splitlines()) == 1 + N_IMAGES + 1  # the header, then each image once
    for k in ("n_images", "n_errors", "backbone_accuracy", "dbmef_accuracy", "rethink_rate",
              "flips_true_to_false", "flips_false_to_true"):
        assert dist[k] == single[k], k


def test_calibrate_on_ray_gives_the_single_process_curve(local_ray, digits_folder, tmp_path):
    """``dbmef calibrate --ray``: the rethink-all pass as a Ray Data pipeline; the same curve."""
    from dbmef.apps.calibrate import calibrate_operating_point

    with SPEC.build() as rt:
        items = load_labelled(digits_folder, rt.class_names)
    kw = {"rule": "max_rethink_rate", "value": 0.5, "data": "digits", "write": False, "min_samples": 1}
    a = calibrate_operating_point(SPEC, items, results=tmp_path / "a.jsonl", **kw)
    b = calibrate_operating_point(SPEC, items, results=tmp_path / "b.jsonl", ray="local", **kw)
    assert a["n_images"] == b["n_images"] == N_IMAGES and a["n_unreadable"] == b["n_unreadable"] == 1
    assert a["unet_evaluations"] == b["unet_evaluations"] and b["device"].startswith("Ray")
    keys = ("threshold", "rethink_rate", "accuracy", "fixed", "broken", "unet_evals_per_image", "prot")
    assert [[p[k] for k in keys] for p in a["curve"]] == [[p[k] for k in keys] for p in b["curve"]]
    assert a["chosen"]["point"]["threshold"] == b["chosen"]["point"]["threshold"]


def test_actors_run_onnx_runtime_on_the_cpus_ray_gave_them(local_ray):
    """A replica's or actor's runtime gets ONNX Runtime threads = its Ray CPUs (ONNX Runtime's own
    default, every core of the node, would ignore them); a count the spec sets is kept, and outside
    an actor nothing changes."""
    import dataclasses

    from dbmef.cluster import for_this_actor

    @ray.remote
    def threads(spec):
        spec = for_this_actor(spec)
        with spec.build() as rt:
            sessions = {e.session.get_session_options().intra_op_num_threads for _, e in rt.pipeline.engines.items()}
        return spec.options, sessions

    assert ray.get(threads.options(num_cpus=1).remote(SPEC)) == ({"intra_op_threads": 1}, {1})
    assert ray.get(threads.options(num_cpus=2).remote(SPEC)) == ({"intra_op_threads": 2}, {2})
    assert ray.get(threads.options(num_cpus=0.5).remote(SPEC))[0] == {"intra_op_threads": 1}
    set_by_user = dataclasses.replace(SPEC, options={"intra_op_threads": 2})
    assert ray.get(threads.options(num_cpus=1).remote(set_by_user))[0] == {"intra_op_threads": 2}
    assert for_this_actor(SPEC) is SPEC  # the driver: no CPUs assigned to it
    trt = dataclasses.replace(SPEC, backend="tensorrt", options={}, verify=False)
    assert ray.get(ray.remote(for_this_actor).options(num_cpus=1).remote(trt)).options == {}
