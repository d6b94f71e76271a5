import math

import numpy as np
import pytest

from dbmef.errors import ConfigError
from dbmef.runtime.method import softmax
from dbmef.runtime.protector import Protector


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


def test_gate_by_hand():
    """softmax, S = max p, rethink iff S <= threshold, top-k in rank order with ties to the lower id."""
    import math

    import numpy as np

    from dbmef.runtime.protector import Protector

    logits = np.array([[2.0, 0.0, 2.0, 1.0], [0.0, 5.0, 0.0, 0.0]])
    e = [math.exp(2), 1.0, math.exp(2), math.e]
    p0 = [x / sum(e) for x in e]  # 0.3992, 0.0540, 0.3992, 0.1469
    g = Protector(0.5).gate(logits, 3)
    assert g.top.tolist() == [[0, 2, 3], [1, 0, 2]]
    np.testing.assert_allclose(g.top_p[0], [p0[0], p0[2], p0[3]], rtol=1e-6)
    p1 = math.exp(5) / (math.exp(5) + 3)
    assert g.top_p[1, 0] == np.float32(p1)
    assert g.rethink.tolist() == [True, False]  # 0.399 <= 0.5; 0.980 > 0.5
