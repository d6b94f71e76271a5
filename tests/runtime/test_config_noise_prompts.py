import numpy as np
import pytest

from dbmef.errors import ConfigError
from dbmef.runtime.config import ScoringConfig
from dbmef.runtime.method import PromptTemplates, negative_prompts, positive_prompt
from dbmef.runtime.noise import NoiseBank


def test_config_json_roundtrip(tmp_path):
    c = ScoringConfig(k=3, n_timesteps=7, lam=1.3, votes=2, seed=9,
                      templates=PromptTemplates(positive="an image of {name}", negative="not {names}", separator=";"))
    assert ScoringConfig.from_json(c.to_json()) == c
    c.to_json(tmp_path / "scoring.json")
    assert ScoringConfig.from_json(tmp_path / "scoring.json") == c
    assert c.unet_evaluations_per_image == 2 * 7 * 3 * 2
    assert ScoringConfig().unet_evaluations_per_image == 1500


@pytest.mark.parametrize("field,value", [("k", 1), ("lam", 0.9), ("votes", 0), ("n_timesteps", 0), ("unet_batch", 0)])
def test_config_rejects(field, value):
    with pytest.raises(ConfigError, match=field):
        ScoringConfig(**{field: value})


def test_config_unknown_field():
    with pytest.raises(ConfigError, match="unknown field"):
        ScoringConfig.from_dict({"kk": 3})


def test_templates_need_placeholders():
    with pytest.raises(ConfigError, match="positive"):
        PromptTemplates(positive="a photo")


def test_prompts_paper_form():
    assert positive_prompt("goldfish") == "a photo of a goldfish."
    negs = negative_prompts(["cat", "dog", "car"])
    assert negs == ["the features of dog,car.", "the features of cat,car.", "the features of cat,dog."]


def test_noise_bank_seeded_independent_and_prefix_stable():
    a = NoiseBank(3, 4, (4, 8, 8), seed=5)
    b = NoiseBank(3, 4, (4, 8, 8), seed=5)
    c = NoiseBank(2, 4, (4, 8, 8), seed=5)
    d = NoiseBank(3, 4, (4, 8, 8), seed=6)
    assert a.eps.shape == (3, 4, 4, 8, 8) and a.eps.dtype == np.float32
    np.testing.assert_array_equal(a.eps, b.eps)
    np.testing.assert_array_equal(a.eps[:2], c.eps)  # a vote's noise ignores how many votes there are
    assert not np.allclose(a.eps, d.eps)
    assert not np.allclose(a.eps[0], a.eps[1])  # votes differ
    assert abs(float(a.eps.std()) - 1.0) < 0.1
