import logging

import pytest
import torch
from torch import nn

import gross
from gross.models import PaperNet, resnet20


def small_paper_net():
    torch.manual_seed(0)
    return PaperNet(widths=(8, 8, 16, 16))


def test_decompose_replaces_eligible_convs_and_logs_the_rest(caplog):
    model = small_paper_net()
    with caplog.at_level(logging.INFO, logger="gross"):
        gross.decompose(model, skip=["conv2"], max_iter=20)
    names = [n for n, _ in gross.gross_layers(model)]
    assert names == ["conv3", "conv4"]
    assert type(model.conv1) is nn.Conv2d and type(model.conv2) is nn.Conv2d
    left = [r.getMessage() for r in caplog.records if "left alone" in r.getMessage()]
    assert len(left) == 1 and "conv1" in left[0] and "conv2 (skipped)" in left[0]
    assert gross.search_space(model) == ((1, 2, 4, 8), (1, 2, 4, 8, 16))


def test_decompose_resnet_with_batchnorm_and_residuals():
    torch.manual_seed(0)
    model = resnet20().eval()
    x = torch.randn(2, 3, 32, 32)
    before = model(x)
    gross.decompose(model, group_sizes=(1, 4, 16, 32), max_iter=30)
    layers = gross.gross_layers(model)
    # Every 3x3 and 1x1 conv with >= 2 sizes: 18 block convs and 2 strided shortcuts.
    assert len(layers) == 20
    assert any(m.stride == (2, 2) and m.kernel_size == (1, 1) for _, m in layers)
    assert gross.search_space(model)[0] == (1, 4, 16)
    gross.set_config(model, tuple(s[-1] for s in gross.search_space(model)))
    # The largest size of every layer has width = C_in >= C_out only where C_out <= C_in; the
    # network output stays close to the original.
    after = model(x)
    assert after.shape == before.shape
    gross.set_config(model, tuple(s[0] for s in gross.search_space(model)))
    assert torch.isfinite(model(x)).all()


def test_config_round_trip_and_dict():
    model = gross.decompose(small_paper_net(), max_iter=10)
    space = gross.search_space(model)
    assert len(space) == 3
    config = (2, 4, 16)
    gross.set_config(model, config)
    assert gross.get_config(model) == config
    gross.set_config(model, {"conv3": 1})
    assert gross.get_config(model) == (2, 1, 16)


def test_config_errors_are_clear():
    model = gross.decompose(small_paper_net(), max_iter=10)
    gross.set_config(model, (1, 1, 1))
    with pytest.raises(ValueError, match="3 GroSS layers"):
        gross.set_config(model, (1, 1))
    with pytest.raises(ValueError, match=r"conv4; valid: \[1, 2, 4, 8, 16\]"):
        gross.set_config(model, (1, 1, 32))
    assert gross.get_config(model) == (1, 1, 1)
    with pytest.raises(ValueError, match="not GroSS layers"):
        gross.set_config(model, {"fc1": 1})


def test_nothing_to_decompose():
    with pytest.raises(ValueError, match="nothing to decompose"):
        gross.decompose(nn.Sequential(nn.Linear(3, 3)))
    with pytest.raises(ValueError, match="nothing to decompose"):
        gross.decompose(nn.Sequential(nn.Conv2d(3, 8, 3)))
    with pytest.raises(ValueError, match="decompose"):
        gross.get_config(nn.Sequential(nn.Conv2d(4, 4, 3)))
    with pytest.raises(ValueError, match="do not exist"):
        gross.decompose(small_paper_net(), skip=["nope"])


def test_sample_config_is_deterministic_and_tempered():
    model = gross.decompose(small_paper_net(), max_iter=10)
    draw = lambda seed, alpha: [
        gross.sample_config(model, alpha, g) for g in [torch.Generator().manual_seed(seed)] for _ in range(50)
    ]
    assert draw(3, 4.0) == draw(3, 4.0)
    hot = draw(0, 8.0)
    assert sum(c == (1, 1, 1) for c in hot) >= 45
    uniform = draw(1, 0.0)
    assert len({c[2] for c in uniform}) == 5


def test_group_sizes_mapping_and_validation():
    model = gross.decompose(small_paper_net(), group_sizes={"conv4": [1, 4, 16]}, max_iter=10)
    assert [n for n, _ in gross.gross_layers(model)] == ["conv4"]
    assert gross.search_space(model) == ((1, 4, 16),)


def test_a_dict_builds_a_fixed_configuration():
    model = gross.decompose(small_paper_net(), group_sizes={"conv1": [1], "conv3": [2]}, nested=False, max_iter=10)
    assert [n for n, _ in gross.gross_layers(model)] == ["conv1", "conv3"]
    assert gross.search_space(model) == ((1,), (2,))
    with pytest.raises(ValueError, match="divisors of its width 8"):
        gross.decompose(small_paper_net(), group_sizes={"conv3": [3]})
    with pytest.raises(ValueError, match="not an nn.Conv2d"):
        gross.decompose(small_paper_net(), group_sizes={"fc1": [1]})
