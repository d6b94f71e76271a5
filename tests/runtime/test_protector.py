import math

import numpy as np
import pytest

from dbmef.errors import ConfigError
from dbmef.runtime.protector import Protector, softmax


def test_quantile_by_hand():
    # correct S sorted: 0.2 0.4 0.6 0.8 0.9 ; alpha = 0.25 -> lower quantile at position 0.25*4 = 1 -> 0.4
    s = np.array([0.9, 0.2, 0.99, 0.6, 0.4, 0.8, 0.1])
    ok = np.array([1, 1, 0, 1, 1, 1, 0], bool)
    p = Protector.calibrate(s, ok, prot=0.75)
    assert p.threshold == 0.4 and p.n_samples == 5
    assert list(p.rethink(np.array([0.39, 0.4, 0.41]))) == [True, True, False]


def test_prot_zero_rethinks_everything_and_one_nothing():
    s = np.array([0.3, 0.5, 0.7, 1.0, 0.0])
    ok = np.array([1, 0, 1, 1, 0], bool)
    assert Protector.calibrate(s, ok, 0.0).rethink(s).all()
    assert not Protector.calibrate(s, ok, 1.0).rethink(s).any()


def test_roundtrip_with_infinity():
    p = Protector.calibrate(np.array([0.5]), np.array([True]), 0.0)
    q = Protector.from_dict(p.to_dict())
    assert q.threshold == math.inf and q.prot == 0.0


def test_errors():
    with pytest.raises(ConfigError, match="prot"):
        Protector.calibrate(np.array([0.5]), np.array([True]), 1.5)
    with pytest.raises(ConfigError, match="none of the"):
        Protector.calibrate(np.array([0.5, 0.6]), np.array([False, False]), 0.95)
    with pytest.raises(ConfigError, match="entries"):
        Protector.calibrate(np.array([0.5, 0.6]), np.array([False]), 0.95)


def test_softmax_stable_and_normalised():
    z = np.array([[1000.0, 1000.0, -1000.0], [0.0, np.log(3.0), 0.0]])
    p = softmax(z)
    np.testing.assert_allclose(p[0], [0.5, 0.5, 0.0], atol=1e-7)
    np.testing.assert_allclose(p[1], [0.2, 0.6, 0.2], rtol=1e-6)
