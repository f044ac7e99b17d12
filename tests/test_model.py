import copy
import logging

import pytest
import torch
import torch.nn.functional as F
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
    assert len(left) == 1 and "conv1" in left[0] and "conv2 (skipped by skip)" in left[0]
    assert gross.search_space(model) == ((1, 2, 4, 8), (1, 2, 4, 8, 16))


def test_decompose_resnet_with_batchnorm_and_residuals():
    torch.manual_seed(0)
    model = resnet20().eval()
    original = copy.deepcopy(model)
    x = torch.randn(2, 3, 32, 32)
    gross.decompose(model, group_sizes=(1, 4, 16, 32), max_iter=30)
    layers = gross.gross_layers(model)
    # The 18 3x3 block convs; the 3-channel stem has one size, the 1x1 shortcuts stay dense.
    assert len(layers) == 18
    assert all(m.kernel_size == (3, 3) for _, m in layers) and any(m.stride == (2, 2) for _, m in layers)
    assert gross.search_space(model)[0] == (1, 4, 16)
    # At a group size equal to the width D = C_in the bottleneck Q . R . P (rank <= C_in) can be
    # any conv with C_out <= C_in: those layers reproduce the original conv, on the activations
    # the original network feeds them, to 1e-5 relative. The others cannot, and do not: a layer
    # with 64 input channels stops at size 32, and a 3x3 conv widening 16 -> 32 or 32 -> 64 has
    # rank C_out > C_in.
    inputs = {}
    hooks = [original.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: inputs.__setitem__(n, (i[0], o)))
             for n, _ in layers]
    with torch.no_grad():
        original(x)
    for h in hooks:
        h.remove()
    exact = {n for n, m in layers if m.group_sizes[-1] == m.width and m.out_channels <= m.in_channels}
    assert len(exact) == 11  # the six 16-channel block convs and five of the 32-channel ones
    with torch.no_grad():
        for name, layer in layers:
            layer.group_size = layer.group_sizes[-1]
            a, want = inputs[name]
            error = float((layer(a) - want).norm() / want.norm())
            assert (error < 1e-5) if name in exact else (error > 0.1), (name, error)


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
    with pytest.raises(ValueError, match=r"skip names or patterns that match no module: \['nope'\]"):
        gross.decompose(small_paper_net(), skip=["nope"])
    with pytest.raises(ValueError, match=r"only names or patterns that match no module: \['x\*'\]"):
        gross.decompose(small_paper_net(), only=["x*"])


def test_decompose_leaves_1x1_depthwise_and_unmatched_convs_dense():
    model = nn.Sequential(
        nn.Conv2d(8, 16, 3, padding=1),  # 0: decomposed
        nn.Conv2d(16, 16, 3, padding=1, groups=16),  # 1: depthwise
        nn.Conv2d(16, 32, 1),  # 2: 1x1
        nn.Conv2d(32, 32, 3, padding=1, dilation=2),  # 3: decomposed unless excluded
    )
    plan = {p.name: p for p in gross.model.plan_decomposition(model)}
    assert plan["0"].sizes == (1, 2, 4, 8) and plan["3"].sizes == (1, 2, 4, 8, 16, 32)
    assert "depthwise" in plan["1"].reason and "1x1" in plan["2"].reason
    gross.decompose(model, skip=["3"], max_iter=2)
    assert [n for n, _ in gross.gross_layers(model)] == ["0"]
    # only= with a pattern selects among the eligible convs; a 1x1 conv only when named exactly.
    model = nn.Sequential(nn.Conv2d(8, 16, 3), nn.Conv2d(16, 32, 1), nn.Conv2d(32, 32, 3))
    assert [p.name for p in gross.model.plan_decomposition(model, only=["*"]) if p.sizes] == ["0", "2"]
    assert [p.name for p in gross.model.plan_decomposition(model, only=["1", "2"]) if p.sizes] == ["1", "2"]
    assert [p.name for p in gross.model.plan_decomposition(model, skip=["[02]"]) if p.sizes] == []
    # A module's name covers the convs inside it.
    nested = nn.Sequential(nn.Sequential(nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 3)), nn.Conv2d(8, 8, 3))
    assert [p.name for p in gross.model.plan_decomposition(nested, skip=["0"]) if p.sizes] == ["1"]
    assert [p.name for p in gross.model.plan_decomposition(nested, only=["0"]) if p.sizes] == ["0.0", "0.1"]
    assert [p.name for p in gross.model.plan_decomposition(nested, only=["0.1"]) if p.sizes] == ["0.1"]


def test_sample_config_is_deterministic_and_tempered():
    model = gross.decompose(small_paper_net(), max_iter=10)
    def draw(seed, alpha, form="normalised"):
        gen = torch.Generator().manual_seed(seed)
        return [gross.sample_config(model, alpha, gen, form) for _ in range(50)]

    assert draw(3, 4.0) == draw(3, 4.0)
    hot = draw(0, 8.0, "literal")
    assert sum(c == (1, 1, 1) for c in hot) >= 45
    assert sum(c == (1, 1, 1) for c in draw(0, 8.0)) < 45  # normalised: the index over N
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


@pytest.mark.parametrize("nested", [False, True])
def test_workers_make_the_fits_one_process_makes(nested):
    # Each fit is deterministic, so processes only change where it runs; the workers run with
    # one thread each, and so does the reference, which keeps the sums in the same order.
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        calls = []
        shared = gross.decompose(small_paper_net(), nested=nested, max_iter=15, workers=2, progress=lambda *a: calls.append(a))
        torch.set_num_threads(1)
        alone = gross.decompose(small_paper_net(), nested=nested, max_iter=15)
    finally:
        torch.set_num_threads(threads)
    assert gross.search_space(shared) == gross.search_space(alone)
    for (name, a), (_, b) in zip(gross.gross_layers(shared), gross.gross_layers(alone)):
        for s in a.group_sizes:
            torch.testing.assert_close(a.dense_weight(s), b.dense_weight(s), rtol=0, atol=0, msg=f"{name} at {s}")
    fits = sum(len(layer.group_sizes) for _, layer in gross.gross_layers(alone))
    assert len(calls) == (len(gross.gross_layers(alone)) if nested else fits)
    assert calls[-1][4] == pytest.approx(calls[-1][5])  # done == work at the end
    with pytest.raises(ValueError, match="workers must be a positive int"):
        gross.decompose(small_paper_net(), workers=0)


# --- BatchNorm recalibration -----------------------------------------------------------------------


def test_recalibrate_batchnorm_gives_the_statistics_of_the_activations():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, momentum=0.3), nn.ReLU(), nn.Dropout(0.5),
                          nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4))
    model.train()
    x1, x2 = torch.randn(6, 3, 9, 9, dtype=torch.float64), torch.randn(6, 3, 9, 9, dtype=torch.float64)
    model.double()
    assert gross.recalibrate_batchnorm(model, [x1, x2]) == 2
    with torch.no_grad():
        a1, a2 = model[0](x1), model[0](x2)
    # Every batch weighs the same: the mean of the batch means and of the unbiased batch variances.
    mean = (a1.mean((0, 2, 3)) + a2.mean((0, 2, 3))) / 2
    var = (a1.var((0, 2, 3), unbiased=True) + a2.var((0, 2, 3), unbiased=True)) / 2
    torch.testing.assert_close(model[1].running_mean, mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model[1].running_var, var, rtol=1e-12, atol=1e-12)
    # The second BatchNorm saw the first one's batch-normalised output, without dropout.
    with torch.no_grad():
        bn = model[1]
        h = torch.cat([model[4](torch.relu(F.batch_norm(a, None, None, bn.weight, bn.bias, True, 0.0, bn.eps))) for a in (a1, a2)])
    torch.testing.assert_close(model[5].running_mean, (h[:6].mean((0, 2, 3)) + h[6:].mean((0, 2, 3))) / 2, rtol=1e-12, atol=1e-12)
    assert model.training and all(m.training for m in model.modules())
    assert model[1].momentum == 0.3 and model[5].momentum == 0.1


def test_batchnorm_state_round_trips_and_rejects_another_model():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    state = gross.batchnorm_state(model)
    gross.recalibrate_batchnorm(model, [torch.randn(4, 3, 5, 5)])
    assert not torch.equal(model[1].running_mean, state[0][0])
    gross.load_batchnorm_state(model, state)
    assert torch.equal(model[1].running_mean, state[0][0]) and torch.equal(model[1].running_var, state[0][1])
    with pytest.raises(ValueError, match="BatchNorm layers"):
        gross.load_batchnorm_state(nn.Sequential(nn.BatchNorm2d(4), nn.BatchNorm2d(4)), state)
    with pytest.raises(ValueError, match="no images"):
        gross.recalibrate_batchnorm(model, [])
    assert gross.recalibrate_batchnorm(nn.Conv2d(3, 4, 1), [torch.randn(1, 3, 2, 2)]) == 0
