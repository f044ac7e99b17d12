import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gross
from gross import BTD, GroSSConv2d, btd, btd_to_weight, expand
from gross.btd import PENALTY, align

D64 = torch.float64

CONVS = {
    "plain": dict(in_channels=8, out_channels=8, kernel_size=3, padding=1),
    "stride2": dict(in_channels=8, out_channels=8, kernel_size=3, stride=2, padding=1),
    "nonsquare": dict(in_channels=8, out_channels=6, kernel_size=(1, 3), padding=(0, 1)),
    "tall": dict(in_channels=4, out_channels=4, kernel_size=(3, 1), stride=(2, 1)),
    "dilation": dict(in_channels=8, out_channels=8, kernel_size=3, padding=2, dilation=2),
    "wide_out": dict(in_channels=4, out_channels=12, kernel_size=3, padding=1),
    "narrow_out": dict(in_channels=8, out_channels=2, kernel_size=3, padding=1),
    "no_bias": dict(in_channels=8, out_channels=8, kernel_size=3, padding=1, bias=False),
    "reflect": dict(in_channels=4, out_channels=4, kernel_size=3, padding=1, padding_mode="reflect"),
    "pointwise": dict(in_channels=8, out_channels=16, kernel_size=1),
}


def make_conv(spec, seed=0):
    torch.manual_seed(seed)
    conv = nn.Conv2d(**spec).to(D64)
    if conv.bias is not None:
        nn.init.normal_(conv.bias)
    return conv


def bottleneck_ref(x, fit: BTD, conv: nn.Conv2d):
    """The three-layer bottleneck of METHOD.md section 1, written out with F.conv2d."""
    g = fit.core.shape[1]
    y = F.conv2d(x, fit.first)
    if conv.padding_mode != "zeros":
        ph, pw = conv.padding
        y = F.pad(y, [pw, pw, ph, ph], mode=conv.padding_mode)
        y = F.conv2d(y, fit.core, None, conv.stride, 0, conv.dilation, fit.core.shape[0] // g)
    else:
        y = F.conv2d(y, fit.core, None, conv.stride, conv.padding, conv.dilation, fit.core.shape[0] // g)
    return F.conv2d(y, fit.last, conv.bias)


def dense_ref(x, weight, conv):
    if conv.padding_mode != "zeros":
        ph, pw = conv.padding
        x = F.pad(x, [pw, pw, ph, ph], mode=conv.padding_mode)
        return F.conv2d(x, weight, conv.bias, conv.stride, 0, conv.dilation)
    return F.conv2d(x, weight, conv.bias, conv.stride, conv.padding, conv.dilation)


@pytest.mark.parametrize("name", sorted(CONVS))
def test_independent_series_equals_independent_btd(name):
    conv = make_conv(CONVS[name])
    layer = GroSSConv2d.from_conv(conv, nested=False, max_iter=200)
    x = torch.randn(2, conv.in_channels, 9, 8, dtype=D64)
    for s in layer.group_sizes:
        fit = btd(conv.weight.detach(), s, max_iter=200)
        layer.group_size = s
        out = layer(x)
        torch.testing.assert_close(out, bottleneck_ref(x, fit, conv), rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(out, dense_ref(x, btd_to_weight(fit), conv), rtol=1e-9, atol=1e-9)


def test_full_size_is_exact_for_narrow_output():
    conv = make_conv(CONVS["plain"])
    layer = GroSSConv2d.from_conv(conv)
    x = torch.randn(2, 8, 6, 6, dtype=D64)
    layer.group_size = 8
    torch.testing.assert_close(layer(x), conv(x), rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("penalty", [0.0, PENALTY])
def test_nested_series_reproduces_each_chained_fit(penalty):
    conv = make_conv(CONVS["wide_out"], seed=1)
    layer = GroSSConv2d.from_conv(conv, nested=True, max_iter=100, penalty=penalty)
    prev = None
    errors = []
    for s in layer.group_sizes:
        prev = btd(conv.weight.detach(), s, init=prev, max_iter=100, penalty=penalty)
        torch.testing.assert_close(layer.dense_weight(s), btd_to_weight(prev), rtol=1e-10, atol=1e-10)
        errors.append(prev.errors[-1])
    if penalty == 0:  # least-squares warm starts make the error non-increasing along the series
        assert all(b <= a + 1e-12 for a, b in zip(errors, errors[1:]))


def test_decomposition_is_the_bottleneck():
    # What the layer runs at a size, written out with F.conv2d from the decomposition it reports.
    conv = make_conv(CONVS["stride2"])
    layer = GroSSConv2d.from_conv(conv, max_iter=20)
    x = torch.randn(2, 8, 9, 8, dtype=D64)
    for s in layer.group_sizes:
        fit = layer.decomposition(s)
        assert fit.core.shape == (8, s, 3, 3) and not any(t.requires_grad for t in fit[:3])
        layer.group_size = s
        out = layer(x).detach()
        torch.testing.assert_close(bottleneck_ref(x, fit, conv), out, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(dense_ref(x, btd_to_weight(fit), conv), out, rtol=1e-10, atol=1e-10)


def test_series_terms_are_aligned_fits():
    # Each fit is rotated inside its blocks towards the previous one: same weight, same factor
    # norms per block, and a smaller difference term than the unrotated fit's.
    conv = make_conv(CONVS["plain"])
    fits = [btd(conv.weight.detach(), s, max_iter=50) for s in (1, 2, 4, 8)]
    layer = GroSSConv2d(8, 8, 3, padding=1, group_sizes=(1, 2, 4, 8), dtype=D64)
    layer.load_decompositions(fits)
    for i, (s, fit) in enumerate(zip(layer.group_sizes, fits)):
        torch.testing.assert_close(layer.dense_weight(s), btd_to_weight(fit), rtol=1e-10, atol=1e-12)
        first, core, last = layer.factors(s)
        n = 8 // s
        torch.testing.assert_close(first.reshape(n, -1).norm(dim=1), fit.first.reshape(n, -1).norm(dim=1))
        torch.testing.assert_close(core.reshape(n, -1).norm(dim=1), fit.core.reshape(n, -1).norm(dim=1))
        if i:
            assert float(layer.first[i].detach().norm()) <= float((fit.first - fits[i - 1].first).norm()) + 1e-12


def test_series_stores_differences():
    conv = make_conv(CONVS["plain"])
    fits = [btd(conv.weight.detach(), s, max_iter=50) for s in (1, 2, 4, 8)]
    layer = GroSSConv2d(8, 8, 3, padding=1, group_sizes=(1, 2, 4, 8), dtype=D64)
    layer.load_decompositions(fits)
    aligned = [fits[0]]
    for fit in fits[1:]:
        aligned.append(align(fit, aligned[-1]))
    torch.testing.assert_close(layer.core[2], aligned[2].core - expand(aligned[1].core, 2, 4), rtol=0, atol=0)
    torch.testing.assert_close(layer.first[3], aligned[3].first - aligned[2].first, rtol=0, atol=0)
    torch.testing.assert_close(layer.last[0], fits[0].last, rtol=0, atol=0)


def test_forward_runs_a_real_grouped_conv(monkeypatch):
    layer = GroSSConv2d(16, 8, (3, 5), stride=2, padding=(1, 2), dilation=1, group_sizes=(1, 4, 16))
    calls = []
    real = F.conv2d

    def spy(x, w, *args, **kwargs):
        calls.append((tuple(w.shape), args))
        return real(x, w, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "conv2d", spy)
    for s in (1, 4, 16):
        calls.clear()
        layer.group_size = s
        layer(torch.randn(1, 16, 10, 10))
        assert [c[0] for c in calls] == [(16, 16, 1, 1), (16, s, 3, 5), (8, 16, 1, 1)]
        assert calls[1][1] == (None, (2, 2), (1, 2), (1, 1), 16 // s)


def test_gradients_reach_only_active_and_smaller_terms():
    layer = GroSSConv2d(8, 8, 3, padding=1, group_sizes=(1, 2, 4, 8))
    for p in layer.parameters():
        nn.init.normal_(p)
    layer.group_size = 2
    layer(torch.randn(2, 8, 5, 5)).sum().backward()
    for i in range(4):
        for terms in (layer.first, layer.core, layer.last):
            assert (terms[i].grad is not None) == (i <= 1)


def test_series_forward_gradcheck():
    layer = GroSSConv2d(4, 3, 3, stride=2, padding=1, group_sizes=(1, 2, 4), dtype=D64)
    for p in layer.parameters():
        nn.init.normal_(p)
    x = torch.randn(1, 4, 5, 5, dtype=D64, requires_grad=True)
    layer.group_size = 2
    params = tuple(layer.parameters())

    def f(x, *ps):
        sd = dict(zip([n for n, _ in layer.named_parameters()], ps))
        return torch.func.functional_call(layer, sd, (x,))

    assert torch.autograd.gradcheck(f, (x, *params))


def test_bottleneck_and_dense_weight_match_forward():
    conv = make_conv(CONVS["stride2"])
    layer = GroSSConv2d.from_conv(conv, max_iter=30)
    x = torch.randn(2, 8, 9, 9, dtype=D64)
    for s in layer.group_sizes:
        layer.group_size = s
        seq = layer.bottleneck()
        assert [type(m) for m in seq] == [nn.Conv2d] * 3 and seq[1].groups == 8 // s
        torch.testing.assert_close(seq(x), layer(x), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(dense_ref(x, layer.dense_weight(), conv), layer(x), rtol=1e-9, atol=1e-9)


def test_group_size_validation_names_valid_sizes():
    layer = GroSSConv2d(8, 8, 3)
    assert layer.group_sizes == (1, 2, 4, 8)
    with pytest.raises(ValueError, match=r"\[1, 2, 4, 8\]"):
        layer.group_size = 3
    assert layer.group_size == 8


def test_constructor_and_from_conv_errors():
    with pytest.raises(ValueError, match="divisors"):
        GroSSConv2d(8, 8, 3, group_sizes=(3,))
    with pytest.raises(ValueError, match="groups=1"):
        GroSSConv2d.from_conv(nn.Conv2d(8, 8, 3, groups=2))
    with pytest.raises(TypeError):
        GroSSConv2d.from_conv(nn.Linear(3, 3))


def test_default_group_sizes():
    assert gross.default_group_sizes(64) == (1, 2, 4, 8, 16, 32, 64)
    # A width that is no power of two keeps its full-rank member, unless it has no other choice.
    assert gross.default_group_sizes(48) == (1, 2, 4, 8, 16, 48)
    assert gross.default_group_sizes(1) == (1,)
    assert gross.default_group_sizes(3) == (1,)
    assert gross.default_group_sizes(6) == (1, 2, 6)


def test_repr_is_short():
    text = repr(GroSSConv2d(8, 16, 3, stride=2, padding=1, group_sizes=(2, 8)))
    assert "group_sizes=(2, 8)" in text and "stride=(2, 2)" in text and len(text) < 200


@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("stride", [2, (2, 3)])
def test_strided_layer_pads_like_f_pad_then_conv(mode, stride):
    # The reference: pad the input with F.pad in the layer's mode, then one dense F.conv2d with
    # the layer's stride and no padding. At the full group size the layer is the original conv;
    # at every size it is the dense conv of its own reconstructed weight.
    conv = make_conv(dict(in_channels=4, out_channels=4, kernel_size=3, stride=stride, padding=(1, 2), padding_mode=mode))
    layer = GroSSConv2d.from_conv(conv, max_iter=20)
    x = torch.randn(2, 4, 9, 11, dtype=D64)

    def reference(weight):
        padded = F.pad(x, [2, 2, 1, 1], mode="constant" if mode == "zeros" else mode)
        return F.conv2d(padded, weight, conv.bias, stride)

    layer.group_size = 4
    torch.testing.assert_close(reference(conv.weight.detach()), conv(x), rtol=1e-12, atol=1e-12)  # the reference is torch's conv
    torch.testing.assert_close(layer(x), reference(conv.weight.detach()), rtol=1e-8, atol=1e-8)
    for s in layer.group_sizes:
        layer.group_size = s
        torch.testing.assert_close(layer(x), reference(layer.dense_weight(s).detach()), rtol=1e-9, atol=1e-9)
