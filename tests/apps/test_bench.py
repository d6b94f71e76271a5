"""dbmef bench produces a complete report (no test asserts a time: only structure and units)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import needs_ort, needs_torch

pytestmark = [needs_torch, needs_ort]


def test_run_bench_report_and_plot(tiny_bundle, tiny_system, tmp_path):
    from dbmef.apps.bench import plot, run_bench
    from dbmef.runtime import RuntimeSpec

    spec = RuntimeSpec(str(tiny_bundle), scoring={"n_timesteps": 2, "votes": 3, "unet_batch": 8})
    r = run_bench(spec, source=tiny_system, n_images=2, repeats=1, profile=True)
    st = r["dbmef"]["stages"]
    full = 2 * 3 * 2 * 5 * 2  # images x V x n x k x (positive, negative)
    # exact early exit (the default) runs at least the first 2 of 3 votes and never more than all
    assert 2 * 2 * 2 * 5 * 2 <= st["unet_evaluations"] <= full
    assert r["unet_evals_per_rethought_image"] == st["unet_evaluations"] / 2
    modes = r["early_exit_modes"]
    assert modes["off"]["unet_evals_per_rethought_image"] == full / 2
    assert r["paper_scripts_engines"]["unet_evals_per_rethought_image"] == full / 2
    # equal decisions: the paper's structure over the same engines decides as dbmef does
    assert modes["off"]["decisions_differing_from_paper_scripts"] == 0
    assert modes["exact"]["decisions_differing_from_paper_scripts"] == 0
    paper = r["paper_scripts_engines"]["wall_s"]["p50"]
    assert r["speedup_vs_paper_scripts_equal_decisions"] == paper / modes["exact"]["wall_s"]["p50"]
    assert r["speedup_vs_paper_scripts_equal_work"] == paper / modes["off"]["wall_s"]["p50"]
    assert set(st["stages_s_per_image"]) >= {"decode_preprocess", "backbone", "protector", "vae_encode",
                                             "text_encoder", "unet_scoring", "vote"}
    assert {"0%", "50%", "100%"} <= set(r["dbmef"]["throughput"])
    assert r["dbmef"]["throughput"]["0%"]["rethink_rate"] == 0.0
    assert r["dbmef"]["throughput"]["100%"]["rethink_rate"] == 1.0
    torch_paper = r["baselines"]["paper_scripts"]["wall_s"]["p50"]
    assert r["speedup_vs_paper_scripts"] == torch_paper / st["wall_s"]["p50"]
    roof = r["roofline"]
    # the tiny UNet's analytic FLOPs, recorded at export, equal a fresh count
    from dbmef.reference.baselines import read_unet_config, unet_flops_per_evaluation

    assert roof["flops_per_unet_evaluation"] == unet_flops_per_evaluation(read_unet_config(tiny_system), (8, 8))
    assert 0 < roof["dbmef"]["fraction_of_peak"] < 2
    assert sum(r["scorer_profile"]["share"].values()) == pytest.approx(1.0)
    png = plot(r, tmp_path / "b.png")
    assert png.stat().st_size > 10_000
    json.dumps(r, default=float)


def test_paper_scripts_baseline_answers_like_dbmef(tiny_system, sample_images):
    """Equal work must mean equal answers: the baseline is the same method, only slower."""
    from dbmef.reference.baselines import PaperScriptsBaseline
    from dbmef.reference.engines import reference_pipeline
    from dbmef.runtime import Protector, ScoringConfig

    cfg = ScoringConfig(n_timesteps=3, votes=2, unet_batch=8)
    ours = reference_pipeline(tiny_system, cfg, Protector(float("inf"), 0.0)).classify(sample_images[:3])
    paper = PaperScriptsBaseline(tiny_system, cfg).classify(sample_images[:3])
    assert [r.label for r in ours] == paper


def test_flops_of_sd15_unet_at_64x64():
    from dbmef.export.sources import SD15_UNET
    from dbmef.reference.baselines import unet_flops_per_evaluation

    assert unet_flops_per_evaluation(dict(SD15_UNET), (64, 64)) == pytest.approx(0.80e12, rel=0.02)


def test_gpu_check_picks_a_scorer_batch_that_fits():
    """Issue 14.12: ONNX Runtime's CUDA attention is not fused; SD v1.5 at 64x64 needs ~1 GB per
    scorer row in fp16, so a 24 GB card gets 12 rows per call, not the bundle's 32."""
    from types import SimpleNamespace

    from benchmarks.gpu_check import fitting_unet_batch

    sd15 = SimpleNamespace(vae={"latent_shape": [4, 64, 64]}, precision="fp16",
                           sources={"sd": {"unet_config": {"attention_head_dim": 8}}})
    assert fitting_unet_batch(sd15, 80 << 30) == 32
    assert fitting_unet_batch(sd15, 24 << 30) == 12  # 2 samples x 8 heads x 4096^2 x 2 B x 2 = 1 GiB a row
    assert fitting_unet_batch(sd15, 1 << 30) == 1
