"""Issue 35's hostile-probe findings in the CLI: each refused with one line (rc 2) before any work."""

from __future__ import annotations

import pytest

from dbmef.apps.cli import main
from dbmef.apps.digits import demo_bundle_dir


@pytest.mark.parametrize("n", ["0", "-5"])
def test_calibrate_refuses_min_samples_below_one(n, tmp_path, capsys):
    """Before: accepted, and the threshold was rewritten from whatever images there were."""
    rc = main(["-q", "calibrate", "--bundle", str(demo_bundle_dir()), "--data", str(tmp_path / "none"),
               "--min-samples", n, "--dry-run"])
    err = capsys.readouterr().err
    assert rc == 2 and "--min-samples" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(("flags", "named"), [
    (["--early-exit", "exact", "--exit-order", "2", "0", "1"], "--exit-order"),
    (["--exit-z", "2"], "--exit-z"),  # the bundle's mode is exact: an adaptive setting alone does nothing
    (["--early-exit", "adaptive", "--exit-keep", "1"], "--exit-keep"),
])
def test_an_early_exit_setting_the_mode_ignores_is_refused(flags, named, tmp_path, capsys):
    """Before: silently ignored, so the user believed a setting was in force that was not."""
    img = tmp_path / "x.png"
    img.write_bytes((demo_bundle_dir().parents[1] / "sample.png").read_bytes())
    rc = main(["-q", "classify", str(img), "--bundle", str(demo_bundle_dir()), "--timesteps", "3", *flags])
    err = capsys.readouterr().err
    assert rc == 2 and named in err and "has no effect" in err, err


def test_the_same_settings_with_their_mode_are_taken(tmp_path, capsys):
    from dbmef.apps.args import runtime_spec
    from dbmef.apps.cli import build_parser
    from dbmef.runtime.bundle import Bundle

    args = build_parser().parse_args(["classify", "x.png", "--bundle", str(demo_bundle_dir()), "--timesteps", "3",
                                      "--early-exit", "adaptive", "--exit-order", "2", "0", "1", "--exit-z", "2"])
    cfg = runtime_spec(args).scoring_config(Bundle.open(demo_bundle_dir(), verify=False))
    assert cfg.exit_order == (2, 0, 1) and cfg.exit_z == 2.0
