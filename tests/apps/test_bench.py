"""dbmef bench produces a complete report on real data (no test asserts a time: only structure,
counts that must agree, and units)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import needs_ort, needs_torch

pytestmark = [needs_ort]


def test_bench_on_the_digits_test_split_by_default(tmp_path):
    """The digits bundle measures on its own test split; the row scheduler changes no answer and
    no row count of any image, sends no more rows than the batch-synchronous path, and the paper's
    structure over the same engines decides as dbmef does."""
    from dbmef.apps.bench import plot, run_bench
    from dbmef.apps.digits import demo_bundle_dir
    from dbmef.runtime import RuntimeSpec

    spec = RuntimeSpec(str(demo_bundle_dir()), scoring={"k": 3, "votes": 3, "n_timesteps": 6})
    r = run_bench(spec, n_images=48, repeats=1)
    assert r["data"]["source"].startswith("the digits test split") and r["data"]["images"] == 48
    n_re = r["data"]["rethought"]
    assert 0 < n_re < 48
    for mode, v in r["modes"].items():
        sync, sched = v["stream"]["sync"], v["stream"]["scheduler"]
        assert v["images_differing_sync_vs_scheduler"] == 0, mode
        assert sync["rows"]["rows_needed"] == sched["rows"]["rows_needed"] == n_re * sched[
            "unet_evals_per_rethought_image"] / 2
        assert sched["rows"]["rows_sent"] <= sync["rows"]["rows_sent"]
        st = sched["rows"]  # every row sent was asked for, ran ahead, or padded
        assert st["rows_sent"] == st["rows_needed"] - st["rows_ahead_used"] + st["rows_ahead"] + st[
            "rows_padding"]
        assert v["all_at_once"]["unet_evals_per_rethought_image"] == sched["unet_evals_per_rethought_image"]
        assert len(v["all_at_once"]["latencies"]) == n_re and v["at_rate"]["rate_per_s"] > 0
    assert r["modes"]["off"]["stream"]["scheduler"]["unet_evals_per_rethought_image"] == 3 * 6 * 3 * 2
    assert r["paper_scripts_engines"]["unet_evals_per_rethought_image"] == 3 * 6 * 3 * 2
    assert r["modes"]["off"]["decisions_differing_from_paper_scripts"] == 0
    assert r["modes"]["exact"]["decisions_differing_from_paper_scripts"] == 0
    assert {"speedup_vs_paper_scripts_equal_decisions", "speedup_vs_paper_scripts_equal_work",
            "speedup_vs_paper_scripts_adaptive", "rows_sent_per_row_needed"} <= set(r)
    assert set(r["modes"]["exact"]["all_at_once"]["stages_s_per_image"]) >= {"backbone", "unet_scoring", "vote"}
    assert plot(r, tmp_path / "b.png").stat().st_size > 10_000
    json.dumps(r, default=float)


@needs_torch
def test_bench_with_a_source_runs_the_torch_baselines_and_a_profile(tiny_bundle, tiny_system):
    from dbmef.apps.bench import run_bench
    from dbmef.reference.baselines import read_unet_config, unet_flops_per_evaluation
    from dbmef.runtime import RuntimeSpec

    spec = RuntimeSpec(str(tiny_bundle), scoring={"n_timesteps": 2, "votes": 3, "unet_batch": 8}, prot=0.0)
    r = run_bench(spec, source=tiny_system, n_images=2, repeats=1, modes=["exact"], profile=True)
    assert r["data"]["source"].startswith("seeded synthetic") and r["data"]["rethought"] == 2
    assert set(r["baselines"]) == {"paper_scripts", "torch_batched"}
    roof = r["roofline"]
    # the tiny UNet's analytic FLOPs, recorded at export, equal a fresh count
    assert roof["flops_per_unet_evaluation"] == unet_flops_per_evaluation(read_unet_config(tiny_system), (8, 8))
    assert {"dbmef", "paper_scripts", "torch_batched"} <= set(roof)
    assert sum(r["scorer_profile"]["share"].values()) == pytest.approx(1.0)


@needs_torch
def test_paper_scripts_baseline_answers_like_dbmef(tiny_system, sample_images):
    """Equal work must mean equal answers: the baseline is the same method, only slower."""
    from dbmef.reference.engines import reference_pipeline
    from dbmef.reference.paper_scripts import PaperScripts
    from dbmef.runtime import Protector, ScoringConfig

    cfg = ScoringConfig(n_timesteps=3, votes=2, unet_batch=8)
    ours = reference_pipeline(tiny_system, cfg, Protector(float("inf"), 0.0)).classify(sample_images[:3])
    paper = PaperScripts.on_torch(tiny_system, cfg).classify(sample_images[:3])
    assert [r.label for r in ours] == paper


def test_flops_of_sd15_unet_at_64x64():
    from dbmef.export.sources import SD15_UNET
    from dbmef.reference.baselines import unet_flops_per_evaluation

    assert unet_flops_per_evaluation(dict(SD15_UNET), (64, 64)) == pytest.approx(0.80e12, rel=0.02)


def test_gpu_check_picks_a_scorer_batch_that_fits():
    """Issue 14.12: ONNX Runtime's CUDA attention is not fused; SD v1.5 at 64x64 needs ~1 GB per
    scorer row in fp16, so a 24 GB card gets 12 rows per call, not the bundle's 32."""
    from types import SimpleNamespace

    from dbmef.apps.roofline import fitting_unet_batch

    sd15 = SimpleNamespace(vae=SimpleNamespace(latent_shape=(4, 64, 64)), precision="fp16",
                           sources={"sd": {"unet_config": {"attention_head_dim": 8}}})
    assert fitting_unet_batch(sd15, 80 << 30) == 32
    assert fitting_unet_batch(sd15, 24 << 30) == 12  # 2 samples x 8 heads x 4096^2 x 2 B x 2 = 1 GiB a row
    assert fitting_unet_batch(sd15, 1 << 30) == 1
