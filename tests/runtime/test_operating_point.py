"""The operating point (issue 17): the curve from one rethink-all pass, the four rules, the
statistics; and the pass's answers against real classify runs at three thresholds."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dbmef.errors import ConfigError
from dbmef.runtime.operating_point import (
    RethinkAllPass,
    choose,
    curve,
    mcnemar_p,
    point,
    sweep,
    thresholds,
    wilson,
)
from dbmef.runtime.protector import Protector
from tests.conftest import needs_ort


def _synthetic(n: int = 300, seed: int = 0) -> RethinkAllPass:
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 10, n)
    s = np.round(rng.uniform(0.1, 1.0, n), 2)  # rounded: many ties in S, as float32 softmax gives
    backbone = np.where(rng.uniform(size=n) < s, truth, (truth + 1) % 10)  # confident answers are right more often
    dbmef = np.where(rng.uniform(size=n) < 0.9, truth, backbone)
    return RethinkAllPass(s=s, backbone=backbone, dbmef=dbmef, truth=truth, unet_evals=rng.integers(100, 1500, n),
                          fast_s=rng.uniform(1e-3, 2e-3, n), slow_s=rng.uniform(0.5, 1.0, n))


def test_wilson_interval_matches_published_values():
    # Wilson (1927) 95 % intervals as tabulated by Newcombe (1998), Table I: 81/263, 15/148, 0/20, 1/29
    for (k, n), (lo, hi) in {(81, 263): (0.2553, 0.3662), (15, 148): (0.0624, 0.1605),
                             (0, 20): (0.0, 0.1611), (1, 29): (0.0061, 0.1718)}.items():
        got = wilson(k, n)
        assert got[0] == pytest.approx(lo, abs=1e-4) and got[1] == pytest.approx(hi, abs=1e-4), (k, n, got)


def test_sweep_equals_brute_force_at_every_threshold():
    cp = _synthetic()
    sw = sweep(cp)
    for j, t in enumerate(thresholds(cp)):
        re = cp.s <= t  # written out here, not through RethinkAllPass
        ans = np.where(re, cp.dbmef, cp.backbone)
        assert sw["rethink_rate"][j] == pytest.approx(re.mean())
        assert sw["accuracy"][j] == pytest.approx((ans == cp.truth).mean())
        assert sw["mean_ms"][j] == pytest.approx(((cp.fast_s + cp.slow_s * re) * 1e3).mean())
        p = point(cp, t)
        assert (p.rethink_rate, p.accuracy) == pytest.approx((sw["rethink_rate"][j], sw["accuracy"][j]))
    assert sw["rethink_rate"][0] == 0 and sw["rethink_rate"][-1] == 1


def test_rules_pick_what_they_promise():
    cp = _synthetic()
    sw = sweep(cp)
    # prot: the paper's quantile rule, exactly Protector.calibrate on the backbone's answers
    c = choose(cp, "prot", 0.95)
    assert c.point.threshold == Protector.calibrate(cp.s, cp.backbone == cp.truth, 0.95).threshold
    # max rethink rate: within the budget, and no threshold within it is more accurate
    c = choose(cp, "max_rethink_rate", 0.10)
    within = sw["rethink_rate"] <= 0.10
    assert c.point.rethink_rate <= 0.10 and c.point.accuracy == pytest.approx(sw["accuracy"][within].max())
    # target accuracy: reaches it, and every cheaper threshold falls short
    target = float(np.quantile(sw["accuracy"], 0.6))
    c = choose(cp, "target_accuracy", target)
    assert c.point.accuracy >= target
    assert (sw["accuracy"][sw["rethink_rate"] < c.point.rethink_rate] < target).all()
    # latency budget: fits, and the next rethink rate up would not
    budget = float(np.median(sw["mean_ms"]))
    c = choose(cp, "latency_budget_ms", budget)
    assert c.point.mean_ms <= budget + 1e-9  # the sweep sums in another order than point()
    assert (sw["mean_ms"][sw["rethink_rate"] > c.point.rethink_rate] > budget).all()
    assert sw["accuracy"].max() < 1.0  # so a perfect score is out of reach
    with pytest.raises(ConfigError, match="no threshold reaches"):
        choose(cp, "target_accuracy", 1.0)
    with pytest.raises(ConfigError, match=r"must lie in \(0, 1\]"):
        choose(cp, "target_accuracy", 1.01)
    with pytest.raises(ConfigError, match="latency-budget-ms"):
        choose(cp, "latency_budget_ms", 1e-6)
    with pytest.raises(ConfigError, match="not one of"):
        choose(cp, "cheapest", 1.0)


def test_mcnemar_p_values():
    # exact binomial: 0 vs 5 discordant -> 2 * 0.5**5; 3 vs 3 -> 1; published chi-square example
    # (Agresti 2002, presidential approval: b = 150, c = 86) -> chi2 = 17.36 uncorrected, p < 1e-4
    assert mcnemar_p(5, 0) == pytest.approx(2 * 0.5**5)
    assert mcnemar_p(3, 3) == 1.0 and mcnemar_p(0, 0) == 1.0
    assert mcnemar_p(2, 10) == pytest.approx(2 * sum(math.comb(12, i) for i in range(3)) / 2**12)
    assert mcnemar_p(150, 86) < 1e-4 and mcnemar_p(300, 290) > 0.5


def test_indistinguishable_choices_are_warned_about():
    cp = _synthetic(n=12)  # a handful of images: no gain is significant
    c = choose(cp, "max_rethink_rate", 0.5)
    assert any("not significant" in w for w in c.warnings), c.warnings
    big = _synthetic(n=20000, seed=1)  # many images: the gain is resolved
    c = choose(big, "max_rethink_rate", 1.0)
    assert not any("not significant" in w for w in c.warnings)
    # every fix sits in the 100 least confident images: rethinking all 1000 buys nothing over
    # rethinking the first 95 (5 more fixes are p = 0.0625 paired; 6 would be p = 0.031)
    n = 1000
    only_low = RethinkAllPass(s=np.linspace(0.1, 1.0, n), backbone=(np.arange(n) < 100).astype(np.int64),
                              dbmef=np.zeros(n, np.int64), truth=np.zeros(n, np.int64), unet_evals=np.ones(n, np.int64),
                              fast_s=np.full(n, 1e-3), slow_s=np.full(n, 1.0))
    c = choose(only_low, "latency_budget_ms", 1e9)
    assert c.point.rethink_rate == 1.0
    assert any("rethink rate 9.5%" in w and "cannot be told apart" in w for w in c.warnings), c.warnings


def test_curve_has_the_prot_points_and_the_rate_grid():
    cp = _synthetic()
    pts = curve(cp)
    prots = {p.prot for p in pts if p.prot is not None}
    assert prots == {0.8, 0.85, 0.9, 0.95, 0.97, 0.99}
    assert [p.rethink_rate for p in pts] == sorted(p.rethink_rate for p in pts)
    assert pts[0].rethink_rate == 0 and pts[-1].rethink_rate == 1 and math.isinf(pts[0].threshold)


def test_records_from_a_run_with_a_protector_are_refused():
    rec = {"error": None, "rethought": False, "max_prob": 0.9, "backbone_label": 1, "label": 1, "label_true": 1,
           "timings": {}}
    with pytest.raises(ConfigError, match="rethink every image"):
        RethinkAllPass.from_records([rec])


@needs_ort
def test_one_rethink_all_pass_equals_classify_at_three_thresholds(digits_calibration_pass):
    """The curve's premise: at any threshold, the pass's answers are the runtime's answers. The pass
    is the run's shared one (what ``dbmef calibrate`` records over the digits calibration split);
    30 of its digits, every class, are classified again at three thresholds."""
    from dbmef.apps.digits import demo_bundle_dir
    from dbmef.runtime import DBMEFRuntime
    from dbmef.runtime.data import load_labelled
    from dbmef.runtime.evaluate import read_results

    with DBMEFRuntime(demo_bundle_dir(), protector=Protector.fixed(0.0)) as rt:
        every = load_labelled(digits_calibration_pass / "calibration", rt.class_names)
        items = [every[j] for j in np.linspace(0, len(every) - 1, 30).astype(int)]
        assert len(items) == 30 and len({it.label for it in items}) == 10
        recs = read_results(digits_calibration_pass / "calibration.jsonl")
        records = [recs[it.path] for it in items]
        cp = RethinkAllPass.from_records(records)
        for q in (0.2, 0.5, 0.8):
            t = float(np.quantile(cp.s, q))
            res = rt.with_protector(Protector(t)).classify([it.path for it in items])
            assert [r.rethought for r in res] == list(cp.rethink(t)), q
            assert [r.label for r in res] == list(cp.answers(t)), q
            # a threshold's slow-path work is the pass's work on the images it rethinks
            assert sum(r.unet_evals for r in res) == int(cp.unet_evals[cp.rethink(t)].sum())
        assert rt.protector.threshold == math.inf  # with_protector left the runtime itself as it was
    assert int(cp.unet_evals.sum()) == sum(r["unet_evals"] for r in records)
