"""The scorer against hand-computed values and a naive loop over a toy numpy UNet."""

import math

import numpy as np
import pytest

from dbmef.errors import EngineError
from dbmef.runtime.config import ScoringConfig
from dbmef.runtime.engine import FunctionEngine
from dbmef.runtime.method import combine_and_error, error_from_terms, vote
from dbmef.runtime.noise import NoiseBank
from dbmef.runtime.noise_schedule import alphas_cumprod, timestep_grid
from dbmef.runtime.scorer import DiffusionScorer
from tests.runtime.conftest import LATENT, make_fused_engine, make_unet_engine, score, toy_unet


def test_lam_and_error_by_hand():
    eps = np.array([1.0, -1.0], np.float32).reshape(1, 1, 1, 2)
    pos = np.array([0.5, -0.5], np.float32).reshape(1, 1, 1, 2)
    neg = np.array([1.5, 0.5], np.float32).reshape(1, 1, 1, 2)
    # eps_hat = neg + 1.1 (pos - neg) = [0.4, -0.6]; diff = [0.6, -0.4]; mean sq = (0.36 + 0.16) / 2
    assert combine_and_error(eps, pos, neg, 1.1)[0] == pytest.approx(0.26, rel=1e-6)
    # lam = 1 is positive-only: (1-0.5)^2 and (-1+0.5)^2 -> 0.25
    assert combine_and_error(eps, pos, neg, 1.0)[0] == pytest.approx(0.25, rel=1e-6)


def test_vote_majority():
    e = np.array([[0.3, 0.1, 0.5], [0.3, 0.2, 0.1], [0.9, 0.1, 0.2]])
    w, counts = vote(e)
    assert w == 1 and list(counts) == [0, 2, 1]


def test_vote_three_way_tie_goes_to_least_mean_error():
    e = np.array([[0.5, 0.3, 0.4], [0.2, 0.6, 0.7], [0.9, 0.8, 0.1]])
    # one vote each; mean errors 0.533, 0.567, 0.400 -> candidate 2
    w, counts = vote(e)
    assert list(counts) == [1, 1, 1] and w == 2


def test_vote_two_way_tie_ignores_untied_candidate():
    e = np.array([[0.1, 0.2, 0.3], [0.1, 0.5, 0.9], [0.5, 0.2, 0.3], [0.6, 0.1, 0.05]])
    # votes: 0, 0, 1, 2 -> candidate 0 has the majority although candidate 2 has a low error
    w, counts = vote(e)
    assert list(counts) == [2, 1, 1] and w == 0
    e2 = np.array([[0.1, 0.2, 0.3], [0.1, 0.5, 0.9], [0.5, 0.2, 0.3], [0.6, 0.1, 0.3]])
    # votes 0,0,1,1: tie; mean c0 = 0.325, c1 = 0.25 -> 1
    w2, c2 = vote(e2)
    assert list(c2) == [2, 2, 0] and w2 == 1


@pytest.fixture
def problem():
    rng = np.random.default_rng(0)
    M, C, k, L, D = 3, 7, 3, 5, 6
    return {
        "latents": rng.standard_normal((M, *LATENT)).astype(np.float32),
        "candidates": np.array([[1, 4, 6], [0, 2, 3], [6, 5, 4]]),
        "pos": rng.standard_normal((C, L, D)).astype(np.float32),
        "neg": rng.standard_normal((M, k, L, D)).astype(np.float32),
    }


def naive_errors(cfg, p):
    """The paper's loop, one image, vote, candidate and timestep at a time."""
    abar = alphas_cumprod()
    grid = timestep_grid(cfg.n_timesteps)
    bank = NoiseBank(cfg.votes, cfg.n_timesteps, LATENT, cfg.seed).eps
    M = len(p["latents"])
    out = np.zeros((M, cfg.votes, cfg.k))
    for m in range(M):
        for v in range(cfg.votes):
            for c in range(cfg.k):
                total = 0.0
                for i, t in enumerate(grid):
                    eps = bank[v, i]
                    xt = math.sqrt(abar[t]) * p["latents"][m] + math.sqrt(1 - abar[t]) * eps
                    tt = np.array([t])
                    pp = toy_unet(xt[None], tt, p["pos"][p["candidates"][m, c]][None])["noise_pred"][0]
                    nn_ = toy_unet(xt[None], tt, p["neg"][m, c][None])["noise_pred"][0]
                    hat = nn_ + cfg.lam * (pp - nn_)
                    total += float(np.mean((eps.astype(np.float64) - hat) ** 2))
                out[m, v, c] = total / cfg.n_timesteps
    return out


@pytest.mark.parametrize("kind", ["unet", "fused"])
def test_scorer_matches_naive_loop_and_uses_fixed_batches(problem, kind):
    cfg = ScoringConfig(k=3, n_timesteps=4, votes=3, lam=1.1, unet_batch=7, early_exit="off")
    log: list[int] = []
    engine = make_unet_engine(log) if kind == "unet" else make_fused_engine(log)
    assert DiffusionScorer(cfg, engine, LATENT).mode == kind
    r = score(cfg, engine, problem["latents"], problem["candidates"], problem["pos"], problem["neg"])
    expected = naive_errors(cfg, problem)
    np.testing.assert_allclose(r.errors, expected, rtol=1e-5, atol=1e-6)
    rows = 3 * 3 * 4 * 3
    assert r.rows.sum() == rows and r.stats.engine_calls == math.ceil(rows / 7)
    assert list(r.unet_evals) == [2 * 3 * 4 * 3] * 3
    per_call = 14 if kind == "unet" else 7  # both conditions in one UNet call
    assert set(log) == {per_call}  # every call has the fixed shape, the tail padded
    for m in range(3):
        w, counts = vote(expected[m])
        assert r.labels[m] == problem["candidates"][m, w]
        assert list(r.votes[m]) == list(counts)


def test_same_answer_alone_or_in_a_batch(problem):
    cfg = ScoringConfig(k=3, n_timesteps=3, votes=2, unet_batch=5)
    engine = make_unet_engine([])
    together = score(cfg, engine, problem["latents"], problem["candidates"], problem["pos"], problem["neg"])
    for m in range(3):
        alone = score(cfg, engine, problem["latents"][m : m + 1], problem["candidates"][m : m + 1], problem["pos"],
                      problem["neg"][m : m + 1])
        np.testing.assert_array_equal(alone.errors[0], together.errors[m])
        assert alone.labels[0] == together.labels[m]


def test_scorer_rejects_unknown_engine_and_bad_shapes(problem):
    cfg = ScoringConfig(k=3, n_timesteps=2, votes=1)
    bad = FunctionEngine("x", ("a",), ("b",), lambda a: a)
    with pytest.raises(EngineError, match="neither a fused scorer"):
        DiffusionScorer(cfg, bad, LATENT)
    with pytest.raises(EngineError, match=r"candidates have shape \(2,\), expected \(3,\)"):
        score(cfg, make_unet_engine([]), problem["latents"], problem["candidates"][:, :2], problem["pos"],
              problem["neg"])
    with pytest.raises(EngineError, match=r"latent has shape \(4, 4, 2\)"):
        score(cfg, make_unet_engine([]), problem["latents"][..., :2], problem["candidates"], problem["pos"],
              problem["neg"])
    with pytest.raises(EngineError, match="inputs"):
        make_unet_engine([])({"sample": problem["latents"]})


def test_error_terms_give_every_lam_and_the_negative_only_error(problem):
    """One pass of UNet rows gives the error for any lam: checked against the naive loop at two
    lams, and the negative-only term against ||eps - eps_neg||^2 computed row by row."""
    base = ScoringConfig(k=3, n_timesteps=4, votes=2, lam=1.1, unet_batch=5)
    sc = DiffusionScorer(base, make_unet_engine([]), LATENT)
    terms = sc.score_terms(problem["latents"], problem["candidates"], problem["pos"], problem["neg"])
    assert terms.shape == (3, 2, 4, 3, 3)
    for lam in (1.0, 1.1, 2.5):
        expected = naive_errors(base.replace(lam=lam), problem)
        np.testing.assert_allclose(error_from_terms(terms, lam).mean(axis=2), expected, rtol=1e-5, atol=1e-6)
    # negative only: lam = 0 in eps_hat = neg + lam (pos - neg)
    abar = alphas_cumprod()
    t = timestep_grid(4)[2]
    eps = NoiseBank(2, 4, LATENT, 0).eps[1, 2]
    xt = math.sqrt(abar[t]) * problem["latents"][0] + math.sqrt(1 - abar[t]) * eps
    neg_pred = toy_unet(xt[None], np.array([t]), problem["neg"][0, 1][None])["noise_pred"][0]
    want = float(np.mean((eps.astype(np.float64) - neg_pred) ** 2))
    assert terms[0, 1, 2, 1, 0] == pytest.approx(want, rel=1e-5)
    assert error_from_terms(terms, 0.0)[0, 1, 2, 1] == pytest.approx(want, rel=1e-5)
    fused = DiffusionScorer(base, make_fused_engine([]), LATENT)
    with pytest.raises(EngineError, match="plain UNet"):
        fused.score_terms(problem["latents"], problem["candidates"], problem["pos"], problem["neg"])
