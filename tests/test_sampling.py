import math

import pytest
import torch

from gross import group_size_probs
from gross.sampling import sample_index


@pytest.mark.parametrize("n,alpha", [(1, 4.0), (6, 0.0), (7, 4.0), (6, 8.0), (3, -1.0)])
def test_probs_follow_the_formula(n, alpha):
    p = group_size_probs(n, alpha, form="literal")
    z = sum(math.exp(-alpha * j) for j in range(1, n + 1))
    expected = torch.tensor([math.exp(-alpha * i) / z for i in range(1, n + 1)], dtype=torch.float64)
    torch.testing.assert_close(p, expected)


def test_samples_match_probs():
    gen = torch.Generator().manual_seed(0)
    n, alpha, draws = 4, 0.5, 20000
    counts = torch.bincount(torch.tensor([sample_index(n, alpha, gen) for _ in range(draws)]), minlength=n)
    expected = group_size_probs(n, alpha) * draws
    # Five standard deviations of a binomial count: fails only on a wrong distribution.
    assert torch.all((counts - expected).abs() <= 5 * (expected * (1 - expected / draws)).sqrt())


def test_bad_input():
    with pytest.raises(ValueError, match="at least one"):
        group_size_probs(0, 1.0)
    with pytest.raises(ValueError, match="finite"):
        group_size_probs(3, float("nan"))


@pytest.mark.parametrize("n,alpha", [(1, 4.0), (6, 0.0), (7, 4.0), (6, 8.0)])
def test_normalised_form_follows_the_formula(n, alpha):
    p = group_size_probs(n, alpha, form="normalised")
    z = sum(math.exp(-alpha * j / n) for j in range(1, n + 1))
    expected = torch.tensor([math.exp(-alpha * i / n) / z for i in range(1, n + 1)], dtype=torch.float64)
    torch.testing.assert_close(p, expected)


def test_literal_alpha_4_gives_smallest_size_almost_every_draw():
    assert float(group_size_probs(6, 4.0, form="literal")[0]) > 0.98
    assert 0.4 < float(group_size_probs(6, 4.0, form="normalised")[0]) < 0.6


def test_sampling_setting_is_validated():
    from gross.config import ConfigError, resolve_config

    assert resolve_config([], ["finetune.sampling=normalised"]).finetune.sampling == "normalised"
    with pytest.raises(ConfigError, match="finetune.sampling"):
        resolve_config([], ["finetune.sampling=linear"])
    with pytest.raises(ValueError, match="form"):
        group_size_probs(3, 1.0, form="linear")
