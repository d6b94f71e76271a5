"""The fused decision (issue 34): the rule against a plain implementation written here, every
early-exit policy making its decisions, the likelihood fit against a direct minimization, and the
runtime and config around them."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dbmef.errors import ConfigError
from dbmef.runtime.config import ScoringConfig
from dbmef.runtime.early_exit import ExitPolicy
from dbmef.runtime.fusion import FusionInputs, fit_beta
from dbmef.runtime.method import fused_offsets, fused_vote
from dbmef.runtime.replay import replay
from tests.conftest import needs_ort, needs_torch


def plain_fused(errors: np.ndarray, probs: np.ndarray, beta: float) -> int:
    """The fused rule as issue 34 states it, with loops: each vote's candidate with the highest
    log p(c) - beta * (e_v(c) - best of the vote); most votes wins; a tie goes to the highest mean
    score over the votes, then to the better rank."""
    V, k = errors.shape
    scores = [[math.log(probs[c]) - beta * (float(errors[v][c]) - min(float(x) for x in errors[v])) for c in range(k)]
              for v in range(V)]
    counts = [0] * k
    for v in range(V):
        counts[max(range(k), key=lambda c: (scores[v][c], -c))] += 1
    tied = [c for c in range(k) if counts[c] == max(counts)]
    return max(tied, key=lambda c: (sum(scores[v][c] for v in range(V)) / V, -c))


def problems(seed: int, m: int, V: int, n: int, k: int):
    """Errors (M, V, n, k) around a per-image candidate mean, and decreasing probabilities (M, k)."""
    rng = np.random.default_rng(seed)
    means = 0.1 + 0.004 * rng.standard_normal((m, 1, 1, k))
    errors = (means + 0.01 * rng.standard_normal((m, V, n, k))).astype(np.float32)
    logits = rng.standard_normal((m, k)) * 1.5
    probs = np.sort(np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True), axis=1)[:, ::-1] * 0.9
    return np.abs(errors), probs.astype(np.float32)


@pytest.mark.parametrize("beta", [50.0, 400.0, 3000.0])
def test_fused_vote_is_the_stated_rule(beta):
    errors, probs = problems(0, 300, 5, 6, 4)
    per_vote = errors.astype(np.float32).mean(axis=2, dtype=np.float64).astype(np.float32)
    ours = [fused_vote(per_vote[j], probs[j], beta)[0] for j in range(len(errors))]
    assert ours == [plain_fused(per_vote[j], probs[j], beta) for j in range(len(errors))]
    # both extremes are in it: a tiny beta is the classifier's top-1, a huge one the paper's rule
    assert all(fused_vote(per_vote[j], probs[j], 1e-6)[0] == 0 for j in range(50))
    from dbmef.runtime.method import vote

    assert all(fused_vote(per_vote[j], probs[j], 1e12)[0] == vote(per_vote[j])[0] for j in range(300))


@pytest.mark.parametrize("beta", [100.0, 1000.0])
def test_every_policy_makes_the_fused_rules_decisions(beta):
    errors, probs = problems(1, 200, 5, 8, 4)
    offsets = fused_offsets(probs, beta)
    per_vote = errors.mean(axis=2, dtype=np.float64).astype(np.float32)
    expected = np.array([plain_fused(per_vote[j], probs[j], beta) for j in range(len(errors))])
    off = replay(errors, ExitPolicy("off"), offsets)
    exact = replay(errors, ExitPolicy("exact"), offsets)
    no_drop = replay(errors, ExitPolicy("adaptive", z=math.inf), offsets)
    for plans in (off, exact, no_drop):
        assert (plans.winner == expected).all()
    # exact spends fewer rows than off, and the classifier's term settles some images sooner than
    # under the paper's rule on the same errors
    assert exact.rows.sum() < off.rows.sum()
    assert (exact.rows < replay(errors, ExitPolicy("exact")).rows).any()
    # the fused rule differs from the paper's on these images (else the test proves nothing)
    assert (expected != replay(errors, ExitPolicy("off")).winner).sum() >= 10


def test_adaptive_tests_the_fused_margin():
    """A candidate the classifier all but excludes is dropped at the first check, with no error
    gap at all: the offset difference is known exactly."""
    errors = np.full((1, 1, 30, 3), 0.1, np.float32) + 1e-3 * np.random.default_rng(2).standard_normal((1, 1, 30, 3))
    probs = np.array([[0.98, 0.0199, 0.0001]])
    plans = replay(errors.astype(np.float32), ExitPolicy("adaptive", votes_open="all"), fused_offsets(probs, 100.0))
    assert plans.winner[0] == 0 and plans.rows[0] < 30 * 3
    paper = replay(errors.astype(np.float32), ExitPolicy("adaptive", votes_open="all"))
    assert plans.rows[0] < paper.rows[0]


def test_fit_beta_is_the_likelihood_minimum():
    from scipy.optimize import minimize_scalar
    from scipy.special import logsumexp

    rng = np.random.default_rng(3)
    n, k, true_beta = 400, 4, 800.0
    e = 0.1 + 0.003 * rng.standard_normal((n, k))
    logp = np.log(rng.dirichlet(np.ones(k) * 2, size=n))
    post = logp - true_beta * e
    post = np.exp(post - logsumexp(post, axis=1, keepdims=True))
    truth = np.array([rng.choice(k, p=p) for p in post])

    def nll(log_b: float) -> float:
        s = logp - math.exp(log_b) * e
        return float(-(s[np.arange(n), truth] - logsumexp(s, axis=1)).mean())

    direct = math.exp(minimize_scalar(nll, bounds=(0, 12), method="bounded", options={"xatol": 1e-8}).x)
    fit = fit_beta(e, np.exp(logp), truth)
    assert fit.beta == pytest.approx(direct, rel=1e-3) and fit.at_bound is None
    assert 400 < fit.beta < 1600  # and near the beta the labels were drawn with
    assert fit.nll == pytest.approx(nll(math.log(direct)), rel=1e-6) and fit.nll < fit.nll_classifier
    # images whose label is not a candidate are left out; errors that point away from the truth
    # leave beta at the bottom of its range (the diffusion evidence does not help)
    assert fit_beta(e, np.exp(logp), np.where(np.arange(n) < 10, -1, truth)).n_images == n - 10
    against = e.copy()
    against[np.arange(n), truth] += 0.01
    assert fit_beta(against, np.exp(logp), truth).at_bound == "low"


def test_inputs_from_records_refuse_a_pass_without_every_vote():
    rec = {"image": "a.png", "topk": [[7, 0.6], [1, 0.3], [4, 0.1]], "noise_errors": [[0.1, 0.2, 0.3]]}
    inputs = FusionInputs.from_records([rec], votes=1)
    assert inputs.candidates.tolist() == [[7, 1, 4]] and inputs.answers(1e-6).tolist() == [7]
    assert inputs.answers(1e9).tolist() == [7]  # the least error is the top candidate's too
    with pytest.raises(ConfigError, match="without early exit"):
        FusionInputs.from_records([{**rec, "noise_errors": [[0.1, None, 0.3]]}], votes=1)
    with pytest.raises(ConfigError, match="1 of 3 votes"):
        FusionInputs.from_records([rec], votes=3)


def test_config_fields_and_their_errors():
    cfg = ScoringConfig(decision="fused", fused_beta=1200.0)
    assert ScoringConfig.from_json(cfg.to_json()) == cfg
    assert ScoringConfig().decision == "paper" and ScoringConfig().decision_offsets(np.ones(5)) is None
    with pytest.raises(ConfigError, match="decision"):
        ScoringConfig(decision="bayes")
    for bad in (0.0, -3.0, math.inf, math.nan):
        with pytest.raises(ConfigError, match="fused_beta"):
            ScoringConfig(fused_beta=bad)
    with pytest.raises(ConfigError, match="zero-shot"):
        ScoringConfig(zero_shot=True, lam=1.0, decision="fused", fused_beta=1.0)
    with pytest.raises(ConfigError, match="calibrate"):
        ScoringConfig(decision="fused").decision_offsets(np.ones(5))


@needs_torch
@needs_ort
def test_runtime_decides_by_the_fused_rule_on_every_path(tiny_bundle, many_images):
    """classify (the stream), a batch's rethink and the service worker all answer a rethought image
    by the fused rule computed here from its recorded per-vote errors and probabilities; exact
    makes off's fused decisions for fewer UNet evaluations."""
    from dbmef.runtime import Protector
    from dbmef.runtime.system import DBMEFRuntime
    from dbmef.runtime.worker import ClassifierWorker, WorkerConfig

    images, every = many_images[:8], Protector.fixed(0.0)
    base = ScoringConfig(k=4, n_timesteps=4, votes=3, lam=1.1, seed=0, unet_batch=16, early_exit="off")
    paper = DBMEFRuntime(tiny_bundle, scoring=base, protector=every).classify(images)
    spread = np.median([np.ptp(np.array(r.noise_errors), axis=1).mean() for r in paper])
    cfg = base.replace(decision="fused", fused_beta=float(1.0 / spread))  # both terms matter at this scale
    with DBMEFRuntime(tiny_bundle, scoring=cfg, protector=every) as rt:
        fused = rt.classify(images)
        batch = rt.pipeline.rethink(rt.pipeline.fast_path(images))
        with ClassifierWorker(rt.pipeline, WorkerConfig(batch_size=8)) as w:
            served = [f.result(timeout=120) for f in w.submit_many(images)]
    expected = [r.candidates[plain_fused(np.array(r.noise_errors), np.array([p for _, p in r.topk]),
                                         cfg.fused_beta)] for r in fused]
    assert [r.label for r in fused] == expected == batch.label.tolist() == [r.label for r in served]
    assert [r.noise_errors for r in fused] == [r.noise_errors for r in paper]  # the same errors, decided anew
    assert sum(a.label != b.label for a, b in zip(fused, paper)) >= 1  # the rule mattered somewhere
    exact = DBMEFRuntime(tiny_bundle, scoring=cfg.replace(early_exit="exact"), protector=every).classify(images)
    assert [r.label for r in exact] == expected
    # this random tiny UNet's votes disagree, so exact saves work where the classifier's term
    # settles the majority: at a smaller beta, the same decisions as the plain rule, fewer evaluations
    small = cfg.replace(early_exit="exact", fused_beta=cfg.fused_beta / 100)
    quick = DBMEFRuntime(tiny_bundle, scoring=small, protector=every).classify(images)
    assert [r.label for r in quick] == [
        r.candidates[plain_fused(np.array(r.noise_errors), np.array([p for _, p in r.topk]), small.fused_beta)]
        for r in fused]
    assert sum(r.unet_evals for r in quick) < sum(r.unet_evals for r in fused) == 8 * base.unet_evaluations_per_image
    with pytest.raises(ConfigError, match="dbmef calibrate"):
        DBMEFRuntime(tiny_bundle, scoring=base.replace(decision="fused"))
