import pytest
import torch
import torch.nn.functional as F

from gross import expand


@pytest.mark.parametrize("d,g,h", [(8, 1, 2), (8, 2, 8), (12, 3, 6), (16, 4, 16), (6, 6, 6)])
@pytest.mark.parametrize("kernel", [(3, 3), (1, 3), (2, 1)])
def test_expand_gives_identical_outputs(d, g, h, kernel):
    torch.manual_seed(0)
    w = torch.randn(d, g, *kernel, dtype=torch.float64)
    x = torch.randn(2, d, 7, 6, dtype=torch.float64)
    wide = expand(w, g, h)
    assert wide.shape == (d, h, *kernel)
    torch.testing.assert_close(F.conv2d(x, wide, groups=d // h), F.conv2d(x, w, groups=d // g), rtol=0, atol=1e-12)


def test_expand_matches_explicit_loop():
    d, g, h = 12, 2, 6
    w = torch.randn(d, g, 3, 3, dtype=torch.float64)
    ref = torch.zeros(d, h, 3, 3, dtype=torch.float64)
    for o in range(d):
        offset = (o // g * g) % h
        ref[o, offset : offset + g] = w[o]
    torch.testing.assert_close(expand(w, g, h), ref, rtol=0, atol=0)


def test_expand_composes():
    w = torch.randn(16, 1, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(expand(expand(w, 1, 4), 4, 16), expand(w, 1, 16), rtol=0, atol=0)


def test_expand_gradcheck():
    w = torch.randn(8, 2, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: expand(t, 2, 8), (w,))


@pytest.mark.parametrize(
    "shape,g,h,match",
    [
        ((8, 2, 3, 3), 2, 3, "divides|need"),
        ((8, 2, 3, 3), 4, 8, "group size"),
        ((8, 2, 3), 2, 4, "4-d"),
        ((12, 4, 3, 3), 4, 8, "need"),
    ],
)
def test_expand_bad_input(shape, g, h, match):
    with pytest.raises(ValueError, match=match):
        expand(torch.zeros(shape), g, h)
