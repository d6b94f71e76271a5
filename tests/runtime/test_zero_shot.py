"""Diffusion Classifier mode (issue 25): Li et al.'s fixed pruning schedule, the positive-only
kernel at lam = 1, zero-shot classification over every class, and bundles without a classifier.

Expectations come from other code paths: a plain-Python replay of the schedule, the fused scorer
graph (which always evaluates both conditions), and a non-zero-shot runtime at k = C, Prot = 0."""

import json
import shutil

import numpy as np
import pytest

from dbmef.errors import BundleError, ConfigError
from dbmef.runtime import Protector, ScoringConfig
from dbmef.runtime.bundle import Bundle
from dbmef.runtime.early_exit import ExitPolicy, ImagePlan, van_der_corput_order
from dbmef.runtime.system import DBMEFRuntime
from tests.conftest import needs_ort, needs_torch


def li_schedule(errors: np.ndarray, keep: tuple[int, ...], samples: tuple[int, ...]) -> tuple[int, int]:
    """Li et al.'s eval_prob_adaptive over a (n, k) error table, written as loops: stage j adds the
    timesteps up to samples[j] (van der Corput order) for the survivors, ranks them by their mean
    error over every timestep so far and keeps keep[j]. Returns (winner, rows evaluated)."""
    order = list(van_der_corput_order(errors.shape[0]))
    alive = list(range(errors.shape[1]))
    seen: list[int] = []
    rows = 0
    for n_keep, upto in zip(keep, samples):
        new = order[len(seen):upto]
        rows += len(new) * len(alive)
        seen += new
        means = {c: sum(float(errors[t, c]) for t in seen) / len(seen) for c in alive}
        alive = sorted(alive, key=lambda c: (means[c], c))[:n_keep]
    return alive[0], rows


@pytest.mark.parametrize("keep,samples", [((5, 1), (4, 16)), ((3, 2, 1), (2, 6, 16)), ((1,), (16,))])
def test_keep_best_matches_a_plain_replay_of_li_et_al(keep, samples):
    rng = np.random.default_rng(7)
    policy = ExitPolicy("keep_best", keep=keep, samples=samples)
    for _ in range(20):
        table = rng.random((16, 6)).astype(np.float32)
        plan = ImagePlan(1, 16, 6, policy)
        while not plan.done:
            rows = plan.next_rows()
            plan.feed(rows, table[rows[:, 1], rows[:, 2]])
        assert (plan.winner, plan.rows) == li_schedule(table, keep, samples)


def test_keep_best_refuses_what_it_cannot_run_and_its_old_name_is_still_read():
    with pytest.raises(ConfigError, match="keep decreasing to 1"):
        ExitPolicy("keep_best", keep=(2, 3), samples=(4, 8))
    with pytest.raises(ConfigError, match="one vote over n_timesteps = samples"):
        ImagePlan(2, 8, 5, ExitPolicy("keep_best", keep=(2, 1), samples=(4, 8)))
    with pytest.warns(FutureWarning, match="'schedule' is now called 'keep_best'"):
        cfg = ScoringConfig.from_dict({"early_exit": "schedule", "exit_keep": [5, 1], "exit_samples": [4, 30],
                                       "votes": 1})
    assert cfg.early_exit == cfg.exit_policy.mode == "keep_best"
    with pytest.raises(ConfigError, match="zero-shot"):
        ScoringConfig(zero_shot=True, lam=1.1)


def errors(result) -> np.ndarray:
    """(V, k) noise errors, NaN where early exit evaluated none."""
    return np.array(result.noise_errors, dtype=float)


CFG = ScoringConfig(k=5, n_timesteps=4, votes=3, lam=1.0, seed=0, unet_batch=16)
EVERY = Protector(np.inf, 0.0)


@needs_torch
@needs_ort
def test_lam_one_runs_the_positive_condition_alone(tiny_bundle, many_images):
    """At lam = 1 the plain UNet graph runs once per row; the fused graph (both conditions, the
    combine inside) gives the same decisions at twice the UNet evaluations."""
    one = DBMEFRuntime(tiny_bundle, scoring=CFG, protector=EVERY).classify(many_images[:6])
    two = DBMEFRuntime(tiny_bundle, scoring=CFG, protector=EVERY, scorer="fused").classify(many_images[:6])
    assert [r.label for r in one] == [r.label for r in two]
    for a, b in zip(one, two):
        assert a.unet_evals * 2 == b.unet_evals > 0
        np.testing.assert_allclose(errors(a), errors(b), rtol=1e-4, atol=1e-6)


@needs_torch
@needs_ort
def test_zero_shot_is_the_method_over_every_class_without_a_protector(tiny_bundle, many_images):
    names = Bundle.open(tiny_bundle).manifest.class_names
    zs = DBMEFRuntime(tiny_bundle, scoring=CFG.replace(zero_shot=True)).classify(many_images[:6])
    # the same work asked for explicitly: k = every class, rethink everything, fused graph at lam 1
    ref = DBMEFRuntime(tiny_bundle, scoring=CFG.replace(k=len(names)), protector=EVERY,
                       scorer="fused").classify(many_images[:6])
    assert all(r.rethought for r in zs)
    assert [r.label for r in zs] == [r.label for r in ref]
    assert all(len(r.candidates) == len(names) for r in zs)


@needs_torch
@needs_ort
def test_zero_shot_needs_the_plain_unet_graph(tiny_bundle, tmp_path):
    fused_only = tmp_path / "fused_only"
    shutil.copytree(tiny_bundle, fused_only)
    b = Bundle.open(fused_only)
    b.save(b.manifest.replace(components={k: v for k, v in b.manifest.components.items() if k != "unet"}))
    with pytest.raises(BundleError, match="plain UNet"):
        DBMEFRuntime(fused_only, scoring=CFG.replace(zero_shot=True))


@needs_torch
@needs_ort
def test_a_bundle_without_a_classifier_runs_zero_shot_only(tiny_bundle, many_images, tmp_path):
    from dbmef.export.exporter import ExportConfig, export_bundle

    names = Bundle.open(tiny_bundle).manifest.class_names
    (tmp_path / "names.json").write_text(json.dumps(list(names)))
    out = export_bundle(ExportConfig(backbone="none", sd="tiny", class_names=str(tmp_path / "names.json"),
                                     out=str(tmp_path / "zs"), scorer="unet"))
    assert "backbone" not in Bundle.open(out).manifest.components
    with pytest.raises(ConfigError, match="no classifier: it can only run zero-shot"):
        DBMEFRuntime(out, scoring=CFG)
    got = DBMEFRuntime(out, scoring=CFG.replace(zero_shot=True)).classify(many_images[:3])
    # the same diffusion side as the tiny bundle (same seed), every class in class order
    ref = DBMEFRuntime(tiny_bundle, scoring=CFG.replace(zero_shot=True)).classify(many_images[:3])
    assert all(r.rethought and r.error is None for r in got)
    assert all(list(r.candidates) == list(range(len(names))) for r in got)
    for a, b in zip(got, ref):
        order = list(b.candidates)
        np.testing.assert_allclose(errors(a)[:, order], errors(b), rtol=1e-4, atol=1e-6)


def test_zero_shot_adaptive_takes_its_own_defaults_unless_given(tiny_bundle):
    """`--zero-shot --early-exit adaptive` uses the settings chosen for zero-shot (ten candidates, one
    vote), not the bundle's DBMEF ones; a setting given explicitly wins; DBMEF mode is unchanged."""
    from dbmef.runtime import RuntimeSpec
    from dbmef.runtime.config import ZERO_SHOT_EXIT

    b = Bundle.open(tiny_bundle)
    manifest = b.manifest.scoring
    zs = RuntimeSpec(bundle=str(tiny_bundle), scoring={"zero_shot": True, "lam": 1.0, "early_exit": "adaptive"})
    cfg = zs.scoring_config(b)
    for name, value in ZERO_SHOT_EXIT.items():
        assert getattr(cfg, name) == value, name
    given = zs.replace(scoring={**zs.scoring, "exit_z": 3.5}).scoring_config(b)
    assert given.exit_z == 3.5 and given.exit_interval == ZERO_SHOT_EXIT["exit_interval"]
    dbmef = RuntimeSpec(bundle=str(tiny_bundle), scoring={"early_exit": "adaptive"}).scoring_config(b)
    assert (dbmef.exit_z, dbmef.exit_interval, dbmef.exit_min_rows) == (manifest.exit_z, manifest.exit_interval,
                                                                         manifest.exit_min_rows)
    exact = zs.replace(scoring={"zero_shot": True, "lam": 1.0, "early_exit": "exact"}).scoring_config(b)
    assert exact.exit_z == manifest.exit_z
