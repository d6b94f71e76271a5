"""Golden values for the schedule and grid, written from the method (docs/design.md §1.5)."""

import numpy as np
import pytest

from dbmef.errors import ConfigError
from dbmef.runtime.noise_schedule import alphas_cumprod, scaled_linear_betas, timestep_grid
from tests.conftest import needs_torch


def test_grid_n30_is_16_49_to_973():
    g = timestep_grid(30)
    assert g[0] == 16 and g[1] == 49 and g[-1] == 973
    assert list(g) == [16 + 33 * i for i in range(30)]
    assert g.dtype == np.int64


@pytest.mark.parametrize("n,expected", [(1, [500]), (2, [250, 750]), (4, [125, 375, 625, 875]), (1000, None)])
def test_grid_small_n(n, expected):
    g = timestep_grid(n)
    if expected is None:
        assert list(g) == list(range(1000))
    else:
        assert list(g) == expected


def test_grid_rejects_bad_n():
    with pytest.raises(ConfigError, match="n_timesteps"):
        timestep_grid(0)
    with pytest.raises(ConfigError):
        timestep_grid(1001)


def test_betas_endpoints_and_abar_by_hand():
    b = scaled_linear_betas()
    assert b[0] == pytest.approx(0.00085, rel=1e-12)
    assert b[-1] == pytest.approx(0.012, rel=1e-12)
    a = alphas_cumprod()
    assert a[0] == pytest.approx(1 - 0.00085, rel=1e-12)
    # abar_2 = (1-b0)(1-b1)(1-b2), b_i from the sqrt-linear formula written out
    bs = [(0.00085**0.5 + i * (0.012**0.5 - 0.00085**0.5) / 999) ** 2 for i in range(3)]
    assert a[2] == pytest.approx((1 - bs[0]) * (1 - bs[1]) * (1 - bs[2]), rel=1e-12)
    assert np.all(np.diff(a) < 0)


@needs_torch
def test_abar_matches_diffusers_ddpm_scheduler():
    from diffusers import DDPMScheduler

    s = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    ref = s.alphas_cumprod.double().numpy()
    ours = alphas_cumprod()
    # diffusers multiplies in float32; we keep float64: agreement to float32 rounding.
    np.testing.assert_allclose(ours, ref, rtol=2e-6, atol=0)
