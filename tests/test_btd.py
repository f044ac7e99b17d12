import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from gross.btd import BTD, PENALTY, align, btd, btd_to_weight, conditioning

btd_module = sys.modules["gross.btd"]  # `gross.btd` the attribute is the function


def random_btd(c_out, c_in, d, g, kh=3, kw=3, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    first = torch.randn(d, c_in, 1, 1, generator=gen, dtype=dtype)
    core = torch.randn(d, g, kh, kw, generator=gen, dtype=dtype)
    last = torch.randn(c_out, d, 1, 1, generator=gen, dtype=dtype)
    return BTD(first, core, last, [])


def rel_error(w_hat, w):
    return float((w_hat - w).norm() / w.norm())


def he_weight(c_out, c_in, kh=3, kw=3, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(c_out, c_in, kh, kw, generator=gen, dtype=dtype) * (2.0 / (c_out * kh * kw)) ** 0.5


def reference_weight(result):
    """Dense block-diagonal core, one explicit term per group."""
    d, c_in = result.first.shape[:2]
    _, g, kh, kw = result.core.shape
    dense = torch.zeros(d, d, kh, kw, dtype=result.core.dtype)
    for r in range(d // g):
        dense[r * g : (r + 1) * g, r * g : (r + 1) * g] = result.core[r * g : (r + 1) * g]
    p, q = result.first[:, :, 0, 0], result.last[:, :, 0, 0]
    return torch.einsum("od,dehw,ei->oihw", q, dense, p)


def block_weights(result):
    """Dense weight of each block on its own, ``(G, C_out, C_in, kh, kw)``."""
    d = result.first.shape[0]
    g = result.core.shape[1]
    p, q = result.first[:, :, 0, 0].double(), result.last[:, :, 0, 0].double()
    return torch.stack([
        torch.einsum("od,dehw,ei->oihw", q[:, r * g : (r + 1) * g], result.core[r * g : (r + 1) * g].double(), p[r * g : (r + 1) * g])
        for r in range(d // g)
    ])


def reference_kappa(result):
    blocks = block_weights(result)
    return float((blocks.flatten(1).norm(dim=1) ** 2).sum() / blocks.sum(0).norm() ** 2)


def objective(result, w, mu):
    """``e (1 + mu k)``, computed block by block."""
    blocks = block_weights(result)
    norm_sq = float(w.double().norm()) ** 2
    e = float((w.double() - blocks.sum(0)).norm()) ** 2 / norm_sq
    k = float((blocks.flatten(1).norm(dim=1) ** 2).sum()) / norm_sq
    return e * (1 + mu * k)


TRAINED = load_file(Path(__file__).parent / "data" / "paper_cifar10_convs.safetensors")


# --- btd_to_weight -------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(16, 8, 8, 2, 3, 3), (6, 10, 12, 4, 1, 3), (9, 5, 6, 6, 3, 1), (4, 4, 8, 1, 1, 1)])
def test_btd_to_weight_matches_reference(shape):
    c_out, c_in, d, g, kh, kw = shape
    fac = random_btd(c_out, c_in, d, g, kh, kw)
    torch.testing.assert_close(btd_to_weight(fac), reference_weight(fac), rtol=1e-12, atol=1e-12)


def test_btd_to_weight_is_the_bottleneck():
    # first 1x1 conv, grouped conv (padding on it), last 1x1 conv == one conv with W_hat.
    fac = random_btd(12, 8, 8, 4, 3, 3)
    x = torch.randn(2, 8, 7, 7, dtype=torch.float64)
    y = F.conv2d(x, fac.first)
    y = F.conv2d(y, fac.core, padding=1, groups=8 // 4)
    y = F.conv2d(y, fac.last)
    torch.testing.assert_close(y, F.conv2d(x, btd_to_weight(fac), padding=1), rtol=1e-10, atol=1e-10)


# --- exact recovery --------------------------------------------------------------------------------


@pytest.mark.parametrize("g", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("c_out", [16, 24])
def test_recovers_exact_btd(c_out, g):
    w = btd_to_weight(random_btd(c_out, 16, 16, g, seed=g + c_out))
    fit = btd(w, g)
    assert rel_error(btd_to_weight(fit), w) < 1e-8
    assert fit.errors[-1] < 1e-8


@pytest.mark.parametrize("c_out, g", [(8, 1), (8, 8), (8, 16), (12, 1), (12, 16)])
def test_recovers_exact_btd_fewer_outputs(c_out, g):
    # C_out < D: no algebraic start; these sizes are still recovered by ALS.
    w = btd_to_weight(random_btd(c_out, 16, 16, g, seed=3))
    assert rel_error(btd_to_weight(btd(w, g)), w) < 1e-5


@pytest.mark.parametrize("kh, kw, g", [(1, 3, 2), (3, 1, 4), (1, 1, 2), (1, 1, 8), (5, 5, 4)])
def test_recovers_exact_btd_other_kernels(kh, kw, g):
    w = btd_to_weight(random_btd(12, 8, 8, g, kh, kw, seed=5))
    fit = btd(w, g)
    assert fit.core.shape == (8, g, kh, kw)
    assert rel_error(btd_to_weight(fit), w) < 1e-8


def test_recovers_exact_btd_narrower_width():
    w = btd_to_weight(random_btd(16, 12, 8, 2, seed=7))
    fit = btd(w, 2, width=8)
    assert fit.first.shape == (8, 12, 1, 1) and fit.last.shape == (16, 8, 1, 1)
    assert rel_error(btd_to_weight(fit), w) < 1e-8


def test_recovers_exact_btd_conjugate_gradient_core(monkeypatch):
    # D * g above the direct-solve limit: the core step runs CG.
    monkeypatch.setattr(btd_module, "_DIRECT_MAX", 16)
    monkeypatch.setattr(btd_module, "_DIRECT_MIN_GROUPS", 1000)
    w = btd_to_weight(random_btd(20, 16, 16, 4, seed=11))
    assert rel_error(btd_to_weight(btd(w, 4)), w) < 1e-8


def test_conjugate_gradient_core_matches_direct(monkeypatch):
    w = he_weight(12, 16)
    direct = btd(w, 4, max_iter=5)
    monkeypatch.setattr(btd_module, "_DIRECT_MAX", 0)
    monkeypatch.setattr(btd_module, "_DIRECT_MIN_GROUPS", 1000)
    monkeypatch.setattr(btd_module, "_CG_MAX_ITER", 500)
    monkeypatch.setattr(btd_module, "_CG_REL_TOL", 1e-13)
    cg = btd(w, 4, max_iter=5)
    assert cg.errors == pytest.approx(direct.errors, rel=1e-8)


@pytest.mark.parametrize("c_out, kh, kw", [(16, 3, 3), (8, 3, 3), (16, 1, 1), (5, 1, 3)])
def test_one_group_is_exact_tucker(c_out, kh, kw):
    w = he_weight(c_out, 16, kh, kw, seed=1)
    fit = btd(w, 16)
    assert rel_error(btd_to_weight(fit), w) < 1e-12


def test_one_group_more_outputs_is_best_tucker():
    # C_out > C_in: the out-mode rank is limited to D; the SVD start is the (near-)optimal Tucker fit.
    w = he_weight(24, 8, seed=2)
    fit = btd(w, 8)
    u = torch.linalg.svd(w.permute(0, 1, 2, 3).reshape(24, -1), full_matrices=False)[0][:, :8]
    projected = torch.einsum("oa,pa,pihw->oihw", u, u, w)
    assert fit.errors[-1] <= rel_error(projected, w) + 1e-12


# --- behaviour on weights that are not a BTD -----------------------------------------------------


def test_errors_monotone_and_converged():
    # Plain least squares (penalty 0): the error itself decreases.
    w = he_weight(16, 16, seed=4)
    fit = btd(w, 4, tol=1e-5, rtol=0, max_iter=1000, penalty=0)
    e = fit.errors
    assert all(b <= a + 1e-12 for a, b in zip(e, e[1:]))
    assert len(e) < 1001 and e[-2] - e[-1] < 1e-5
    assert rel_error(btd_to_weight(fit), w) == pytest.approx(e[-1], abs=1e-12)
    assert 0.0 < e[-1] < e[0] < 1.0
    # rtol stops where the last ten steps gained less than rtol of the error (penalty 0: the
    # objective is the error), and not a step earlier.
    early = btd(w, 4, tol=0, rtol=1e-2, max_iter=1000, penalty=0).errors
    assert early == e[: len(early)]
    assert early[-11] - early[-1] < 1e-2 * early[-1]
    assert all(early[j - 10] - early[j] >= 1e-2 * early[j] for j in range(10, len(early) - 1))


def test_default_rtol_only_on_large_layers(monkeypatch):
    # By default the relative stop applies from RTOL_MIN_WORK multiply-adds per data product
    # (C_out C_in kh kw D); below it the fit is tol's alone.
    w = he_weight(16, 16, seed=4)
    assert btd(w, 4).errors == btd(w, 4, rtol=0).errors
    monkeypatch.setattr(btd_module, "RTOL_MIN_WORK", w.numel() * 16)
    assert btd(w, 4).errors == btd(w, 4, rtol=btd_module.RTOL).errors
    assert len(btd(w, 4).errors) < len(btd(w, 4, rtol=0).errors)


@pytest.mark.parametrize("init", ["random", None])
def test_penalised_objective_decreases(init):
    # F = e (1 + mu k) after n steps never rises with n (each run retraces the shorter ones).
    w = TRAINED["conv2"].double()
    values = [objective(btd(w, 4, init=init, max_iter=n, tol=0), w, PENALTY) for n in (0, 1, 2, 5, 20, 60)]
    assert all(b <= a * (1 + 1e-12) for a, b in zip(values, values[1:]))
    assert values[-1] < values[0]


def test_conditioning_matches_reference():
    fac = random_btd(12, 8, 8, 2, seed=15)
    assert conditioning(fac) == pytest.approx(reference_kappa(fac), rel=1e-10)
    # Blocks on disjoint channels are orthogonal: kappa 1.
    first = torch.zeros(4, 4, 1, 1, dtype=torch.float64)
    first[:, :, 0, 0] = torch.eye(4)
    disjoint = BTD(first, torch.randn(4, 2, 3, 3, dtype=torch.float64), first.clone(), [])
    assert conditioning(disjoint) == pytest.approx(1.0, rel=1e-12)
    # Two blocks on the same channels, the second -0.99 times the first: 1.98 / 0.01^2.
    both = torch.cat([torch.eye(2), torch.eye(2)]).double()  # (4, 2)
    core = torch.randn(2, 2, 3, 3, dtype=torch.float64)
    cancelling = BTD(both[:, :, None, None], torch.cat([core, -0.99 * core]), both.T[:, :, None, None].contiguous(), [])
    assert conditioning(cancelling) == pytest.approx(reference_kappa(cancelling), rel=1e-10)
    assert conditioning(cancelling) == pytest.approx((1 + 0.99**2) / 0.01**2, rel=1e-8)


@pytest.mark.parametrize("name, g", [("conv2", 4), ("conv3", 1), ("conv3", 8)])
def test_penalty_keeps_trained_fits_well_conditioned(name, g):
    # On trained CIFAR-10 weights plain least squares drifts into large cancelling blocks; the
    # penalised fit stays near orthogonal at (almost) the same error.
    w = TRAINED[name]
    fit = btd(w, g)
    plain = btd(w, g, penalty=0, tol=0, max_iter=300)
    assert conditioning(fit) < 2.0
    assert conditioning(plain) > 3 * conditioning(fit)
    assert fit.errors[-1] < 1.05 * plain.errors[-1]
    # Converged by the default rule well before max_iter (65-120 steps when written), a
    # machine-independent stand-in for its speed.
    assert len(fit.errors) - 1 < 250


def test_align_undoes_a_rotation_inside_blocks():
    fit = random_btd(12, 8, 8, 4, seed=16)
    gen = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(2, 4, 4, generator=gen, dtype=torch.float64))[0]  # one rotation per block
    v = torch.linalg.qr(torch.randn(2, 4, 4, generator=gen, dtype=torch.float64))[0]
    p = (u @ fit.first.reshape(2, 4, 8)).reshape(8, 8, 1, 1)
    q = (fit.last.reshape(12, 2, 4).transpose(0, 1) @ v.transpose(1, 2)).transpose(0, 1).reshape(12, 8, 1, 1)
    x = fit.core.reshape(2, 4, 4, 9).permute(0, 3, 1, 2)
    x = (v[:, None] @ x @ u.transpose(1, 2)[:, None]).permute(0, 2, 3, 1).reshape(8, 4, 3, 3)
    rotated = BTD(p, x, q, [0.5])
    torch.testing.assert_close(btd_to_weight(rotated), btd_to_weight(fit))
    back = align(rotated, fit)
    for a, b in zip(back[:3], fit[:3]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert back.errors == [0.5]
    # Against a smaller group size: the weight is kept whatever the reference.
    other = align(fit, random_btd(12, 8, 8, 2, seed=17))
    torch.testing.assert_close(btd_to_weight(other), btd_to_weight(fit))
    with pytest.raises(ValueError, match="align"):
        align(random_btd(12, 8, 8, 2), fit)  # 4 does not divide 2


@pytest.mark.parametrize("shape", [(12, 40), (40, 12), (3, 2, 30), (3, 30, 2)])
def test_leading_left_spans_the_svd_subspace(shape):
    # Both branches (Gram of the short side, or of the long side then QR), batched or not.
    gen = torch.Generator().manual_seed(18)
    m = torch.randn(*shape, generator=gen, dtype=torch.float64)
    r = 2
    u = btd_module._leading_left(m, r)
    ref = torch.linalg.svd(m, full_matrices=False)[0][..., :r]
    torch.testing.assert_close(u.transpose(-2, -1) @ u, torch.eye(r, dtype=m.dtype).expand(u.shape[:-2] + (r, r)))
    torch.testing.assert_close(u @ u.transpose(-2, -1), ref @ ref.transpose(-2, -1), rtol=0, atol=1e-10)


def test_extrapolated_qtw_matches_the_product():
    # Q^T W carried through the per-block QR equals the product with the data.
    w = he_weight(10, 12).reshape(10, 12, 9).permute(2, 0, 1).contiguous()
    fit = btd_module._Fit(w, 4, 12, 0, PENALTY)
    gen = torch.Generator().manual_seed(19)
    p, q = (torch.randn(*s, generator=gen, dtype=torch.float64) for s in ((12, 12), (10, 12)))
    x = torch.randn(9, 3, 4, 4, generator=gen, dtype=torch.float64)
    p2, q2, x2, qtw = fit._normalise_with_qtw(p, q, x, fit._qtw(q))
    reference = (q2.T @ w).transpose(0, 1).reshape(12, -1)  # [d, (k, i)]
    torch.testing.assert_close(qtw, reference, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(q2 @ fit._inner(p2, x2), q @ fit._inner(p, x), rtol=1e-12, atol=1e-12)


def test_max_iter_zero_returns_start():
    w = he_weight(8, 8, seed=4)
    fit = btd(w, 2, max_iter=0)
    assert len(fit.errors) == 1
    assert rel_error(btd_to_weight(fit), w) == pytest.approx(fit.errors[0], abs=1e-12)


def test_larger_group_size_fits_better():
    w = he_weight(16, 16, seed=6)
    errs = [btd(w, g).errors[-1] for g in (1, 4, 16)]
    assert errs[0] > errs[1] > errs[2]


@pytest.mark.parametrize("init", [None, "random"])
def test_deterministic(init):
    w = he_weight(12, 8, seed=8)
    a, b = btd(w, 2, init=init, seed=3, max_iter=30), btd(w, 2, init=init, seed=3, max_iter=30)
    for x, y in zip(a[:3], b[:3]):
        assert torch.equal(x, y)
    assert a.errors == b.errors


def test_random_init_depends_on_seed():
    w = he_weight(12, 8, seed=8)
    a, b = btd(w, 2, init="random", seed=0, max_iter=3), btd(w, 2, init="random", seed=1, max_iter=3)
    assert not torch.equal(a.first, b.first)


@pytest.mark.parametrize("penalty", [0.0, PENALTY])
@pytest.mark.parametrize("g_small, g", [(1, 2), (2, 8), (4, 4), (2, 16)])
def test_warm_start_never_worse(g_small, g, penalty):
    w = he_weight(16, 16, seed=9)
    small = btd(w, g_small, max_iter=40, penalty=penalty)
    fit = btd(w, g, init=small, max_iter=40, penalty=penalty)
    assert fit.core.shape[1] == g
    assert fit.errors[0] == pytest.approx(small.errors[-1], abs=1e-12)
    mu = penalty if g < 16 else 0.0  # one group: nothing to penalise
    assert objective(fit, w, mu) <= objective(btd(w, g, init=small, max_iter=0), w, mu) * (1 + 1e-10)
    if penalty == 0:
        assert all(b <= a + 1e-12 for a, b in zip(fit.errors, fit.errors[1:]))
    # Zero steps: the warm start itself, expanded.
    same = btd(w, g, init=small, max_iter=0)
    torch.testing.assert_close(btd_to_weight(same), btd_to_weight(small), rtol=1e-10, atol=1e-12)


def test_warm_start_from_float32_and_exact():
    w = btd_to_weight(random_btd(16, 16, 16, 2, seed=12))
    exact = btd(w, 2)
    fit = btd(w, 4, init=exact, max_iter=5)
    assert fit.errors[0] < 1e-10 and fit.errors[-1] < 1e-10
    fit32 = btd(w.float(), 8, init=btd(w.float(), 4), max_iter=5)
    assert fit32.core.dtype == torch.float32 and fit32.errors[-1] < 1e-5


@pytest.mark.parametrize("c, g", [(12, 4), (64, 8)])  # core step by Cholesky, and by CG
def test_float32(c, g):
    # A float32 weight is fitted in float32 while the error is large: the same fit as in float64
    # to float32's rounding, and an exact one still continues (in float64) to an exact fit.
    w64 = he_weight(16 if c == 12 else c, c, seed=10)
    fit = btd(w64.float(), g, max_iter=40, rtol=0)
    assert all(t.dtype == torch.float32 for t in fit[:3])
    ref = btd(w64, g, max_iter=40, rtol=0)
    assert fit.errors[-1] == pytest.approx(ref.errors[-1], abs=1e-4)
    assert conditioning(fit) == pytest.approx(conditioning(ref), abs=1e-3)
    assert rel_error(btd_to_weight(fit).double(), w64) == pytest.approx(fit.errors[-1], abs=1e-5)
    exact = btd_to_weight(random_btd(c, c, c, g, seed=13)).float()
    assert rel_error(btd_to_weight(btd(exact, g, init="random")), exact) < 1e-5


def test_float32_fit_stops_where_float64_does():
    # With C_out < D the fit creeps for hundreds of steps at an error of a few percent, where
    # float32's rounding of the objective (~1e-6) mimics a stall: the stop is decided in float64.
    w64 = he_weight(16, 64, seed=21)
    fit32, fit64 = btd(w64.float(), 8), btd(w64, 8)
    assert 0.02 < fit64.errors[-1] < 0.1 and len(fit64.errors) > 300
    assert fit32.errors[-1] == pytest.approx(fit64.errors[-1], rel=5e-3)


@pytest.mark.parametrize("c_out, c_in, d, g", [(12, 8, 8, 2), (6, 16, 16, 4), (16, 16, 16, 16), (16, 8, 8, 1)])
def test_blocks_are_balanced(c_out, c_in, d, g):
    # Per block: the rows of first, the core and the columns of last have equal norms, and the
    # balancing leaves the fitted weight as it was (the error history ends at the returned error).
    w = he_weight(c_out, c_in, seed=14)
    fit = btd(w, g, width=d, max_iter=20)
    n = d // g
    a = fit.first.reshape(n, -1).norm(dim=1)
    b = fit.core.reshape(n, -1).norm(dim=1)
    c = fit.last.reshape(c_out, n, g).norm(dim=(0, 2))
    torch.testing.assert_close(a, b, rtol=1e-10, atol=0)
    torch.testing.assert_close(c, b, rtol=1e-10, atol=0)
    assert rel_error(btd_to_weight(fit), w) == pytest.approx(fit.errors[-1], abs=1e-12)


def test_zero_weight():
    fit = btd(torch.zeros(4, 4, 3, 3), 2)
    assert fit.errors == [0.0] and not btd_to_weight(fit).any()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda():
    w = btd_to_weight(random_btd(16, 16, 16, 4, seed=14))
    fit = btd(w.cuda(), 4)
    assert fit.core.is_cuda and fit.errors[-1] < 1e-8
    fit32 = btd(he_weight(32, 32).float().cuda(), 4, max_iter=20)
    assert fit32.core.dtype == torch.float32 and fit32.errors[-1] < fit32.errors[0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("g", [1, 8, 32])
def test_cuda_matches_cpu(g):
    # The same steps on either device: errors agree to rounding, and so does the fitted weight.
    w = he_weight(48, 64, seed=20)
    cpu, gpu = btd(w, g, max_iter=15, tol=0), btd(w.cuda(), g, max_iter=15, tol=0)
    assert gpu.first.is_cuda and gpu.core.is_cuda and gpu.last.is_cuda
    assert gpu.errors == pytest.approx(cpu.errors, rel=1e-6)
    torch.testing.assert_close(btd_to_weight(gpu).cpu(), btd_to_weight(cpu), rtol=1e-5, atol=1e-7)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_decompose_fits_on_the_device():
    from gross import decompose, gross_layers

    net = torch.nn.Sequential(torch.nn.Conv2d(16, 16, 3, padding=1)).cuda()
    decompose(net, group_sizes=[4, 16], max_iter=5)
    (_, layer), = gross_layers(net)
    assert all(p.is_cuda for p in layer.parameters())


# --- errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"group_size": 3}, "group_size"),
        ({"group_size": 0}, "group_size"),
        ({"group_size": -2}, "group_size"),
        ({"group_size": 2.0}, "group_size"),
        ({"group_size": 16}, "group_size"),
        ({"group_size": 4, "width": 6}, "group_size"),
        ({"group_size": 2, "width": 0}, "width"),
        ({"group_size": 2, "init": "tucker"}, "init"),
        ({"group_size": 2, "tol": -1.0}, "tol"),
        ({"group_size": 2, "penalty": -0.1}, "penalty"),
        ({"group_size": 2, "penalty": float("nan")}, "penalty"),
        ({"group_size": 2, "penalty": "0.1"}, "penalty"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        btd(he_weight(8, 8), **kwargs)


@pytest.mark.parametrize(
    "weight, match",
    [
        (torch.zeros(8, 8, 3), "4-d"),
        (torch.zeros(8, 8, 3, 3, 1), "4-d"),
        ([[1.0]], "4-d"),
        (torch.zeros(8, 8, 3, 3, dtype=torch.int64), "floating"),
        (torch.full((8, 8, 3, 3), float("nan")), "finite"),
    ],
)
def test_bad_weight(weight, match):
    with pytest.raises(ValueError, match=match):
        btd(weight, 2)


def test_bad_init():
    w = he_weight(8, 8)
    good = btd(w, 2, max_iter=2)
    with pytest.raises(ValueError, match="group size"):
        btd(w, 2, init=btd(w, 4, max_iter=2))  # 4 does not divide 2
    with pytest.raises(ValueError, match="first"):
        btd(w, 2, init=good._replace(first=good.first[:4]))
    with pytest.raises(ValueError, match="last"):
        btd(w, 2, init=good._replace(last=good.last[:, :4]))
    with pytest.raises(ValueError, match="core"):
        btd(w, 2, init=good._replace(core=good.core[..., :1]))
    with pytest.raises(ValueError, match="first"):
        btd(he_weight(8, 6), 2, init=good)


def test_decompose_reports_every_fit_with_its_share_of_the_work():
    from gross import decompose

    net = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3), torch.nn.Conv2d(8, 16, 1), torch.nn.Conv2d(16, 4, 3))
    calls = []
    decompose(net, group_sizes=[2, 4, 8], only=["0", "2"], max_iter=2, progress=lambda *a: calls.append(a))
    # One call before each fit, layer by layer, sizes smallest first; the work is numel * D per fit.
    assert [(c[0], c[1], c[2], c[3]) for c in calls] == [("0", 0, 2, s) for s in (2, 4, 8)] + [("2", 1, 2, s) for s in (2, 4, 8)]
    cost0, cost2 = 8 * 8 * 9 * 8, 4 * 16 * 9 * 16
    assert [c[4] for c in calls] == [0, cost0, 2 * cost0, 3 * cost0, 3 * cost0 + cost2, 3 * cost0 + 2 * cost2]
    assert all(c[5] == 3 * cost0 + 3 * cost2 for c in calls)
