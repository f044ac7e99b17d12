"""Block term decomposition (BTD) of one convolution weight.

A weight ``W`` of shape ``(C_out, C_in, kh, kw)`` is approximated by a sum of ``G = D / g`` Tucker
terms over its two channel modes, which is the three-layer bottleneck

    W_hat[o, i] = sum_d sum_e  last[o, d] * core[d, e - (d // g) * g] * first[e, i],

where ``e`` runs over the ``g`` channels of ``d``'s group: a 1x1 conv ``C_in -> D`` (``first``), a
grouped ``kh x kw`` conv ``D -> D`` with ``D / g`` groups (``core``) and a 1x1 conv ``D -> C_out``
(``last``).

Algorithm
---------
Alternating least squares over all blocks at once. With two factor sets fixed, each of ``first``,
the block-diagonal ``core`` and ``last`` is one linear least-squares problem: the ``first`` and
``last`` steps have ``D`` unknowns per row and share one ``D x D`` Gram matrix; the core step's
normal equations are the Kronecker product of the two Gram matrices restricted to the
block-diagonal entries, solved in closed form for one group, by Cholesky when ``D * g`` is small
and by conjugate gradients (warm started, hence still monotone) otherwise. After each update the
blocks of ``last`` and ``first`` are re-orthonormalised (QR, triangular factors absorbed into the
core), which makes each block's own part of the core's normal equations the identity. Each step
is followed by an extrapolation along the step's change, kept only when it lowers the objective.
The returned factors are rescaled per block to equal norms (the orthonormal form puts all the
scale in the core, and SGD on such factors diverged at the paper's reconstruction learning rate).

Cost
----
A step touches the weight only through two products, ``Q^T W`` and ``W (B P)^T`` (``2 K O I D``
flops each, one GEMM on the out-mode unfolding each); the extrapolated point's ``Q^T W`` follows
from the step's by linearity and the blocks' QR factors. Everything else is ``O(K D^2 g)``: the
two Gram sandwiches ``sum_k B_k C B_k^T``, the core's normal operator (a few CG iterations, each
one operator), and the extrapolated point's error (one operator), run over chunks of taps whose
``D x D`` intermediates fit in cache. All of it runs in float32 for a float32 weight until the
error falls below 1% or the fit would stop (see ``btd``'s ``weight``). So at 512 channels and small ``g`` the data products are the step,
and at ``g = D / 2`` the operators are (``benchmarks/btd_speed.py --profile``, below).

Measured (``benchmarks/btd_speed.py --profile --against OLD``, ``OLD`` the previous version of
this file; random He ``C x C x 3 x 3``; 1 thread on a 2-core VM shared with other jobs, load
average 6: its float64 matrix-product rate in the same run was 10.2 GFLOP/s, against 77 idle,
so every time here is ~3-7x an idle machine's; ``benchmarks/results/btd_profile.md``). Time per
step, GFLOP per step as counted by ``step_flops``, and time over arithmetic at that float64 rate:

    C    g     before                      after
    32   1     12 ms   0.002 GF  52x       1.4 ms  0.002 GF   8x
    32   16    23 ms   0.012 GF  19x       11 ms   0.007 GF  14x
    128  1     46 ms   0.14  GF   3.3x     81 ms   0.11  GF   7.7x
    128  8     77 ms   0.22  GF   3.6x     93 ms   0.15  GF   6.4x
    128  64    236 ms  0.78  GF   3.1x     128 ms  0.48  GF   2.7x
    512  1     1.60 s  9.1   GF   1.8x     0.90 s  6.6   GF   1.4x
    512  8     2.88 s  10.2  GF   2.9x     1.93 s  7.2   GF   2.7x
    512  64    4.43 s  19.0  GF   2.4x     2.98 s  12.3  GF   2.5x
    512  256   9.65 s  50.0  GF   2.0x     6.28 s  30.6  GF   2.1x

Before, a step made three products with the data and ten CG iterations; the remaining
difference is memory traffic. At 512 channels a step is now within ~2.5x of its arithmetic at
the float64 rate (less at float32's), so what is left is the number of steps: 100-170 at the
default tol on random He weights, where the error still falls by 1e-5 to 1e-4 per step when the
fit stops, unchanged by this version. The 3x3 starts were worse: LAPACK's SVD of the unfoldings
(and of the deflation start's small matrices, slowed 60x by two oversubscribed threads) took
40-125 s of a 512-channel fit; they are now ``eigh`` of Gram matrices and a float32 residual.
Those changes made whole 512x512x3x3 fits 1.3-1.7x faster at the same error. What was left
is the steps, and most of them are a creep: on a random 128x128x3x3 weight at ``g = 8`` the
error falls by 7% in the first 50 steps, then by 0.6% over the next 107 to ``tol``'s stop,
and by another 0.6% over 1,343 steps after it (``--stopping``, ``btd_stopping_fits.md``).
Nothing tried cut through it: Anderson acceleration of the ALS map (depth 1-5, safeguarded by
the objective; tried on 128-channel He weights and not kept) took as many steps as the
extrapolation below or more, and warm starts from the next smaller size (the nested series)
saved little over a whole series. So the fit also stops when ten steps gained less than
``rtol`` (1e-3) of the objective (by default on layers of 256 x 256 x 3 x 3 and up; see
``btd``). With that, the blocks' norms in the objective taken from the core (the factors are
orthonormal when it is computed), the core's first CG residual taken from the error's operator
product, and a float32 weight fitted in float32 while its error is above 1% (each step 1.5-1.8x
cheaper at 512 channels, at the same errors and kappa: float32 rounding is far below the error
of such fits), whole fits of a 512x512x3x3 He weight (float32, 1 thread), against the file
before this work (``6575cd6``) in one process (``--large --against OLD``,
``benchmarks/results/btd_large.md``, load 2.2-2.9 from other jobs): g = 8: 105 -> 17 s (6.2x),
g = 64: 146 -> 19 s (7.5x), g = 256: 311 -> 53 s (5.9x), errors 0.34-0.36% higher, kappa
1.29-1.34 in both; 52-84 steps against 117-136. The goal of 10x is not met: a step costs 2.8-3.9x
less and there are 1.5-2.3x fewer.

Conditioning
------------
Least-squares BTD is degenerate on real weights: the error keeps falling, ever more slowly, while
blocks grow and cancel each other. On a trained CIFAR-10 layer (conv2 of the paper network, g = 4)
plain ALS went from error 0.394 at kappa 1.1 to 0.312 at kappa 415 (:func:`conditioning`), and a
series built from such fits diverged at the paper's finetuning rate within 33 steps: a small
relative step on a factor is a large step on the weight. The fit therefore minimises

    F = e (1 + mu k),   e = ||W - W_hat||^2 / ||W||^2,   k = sum_r ||W_r||^2 / ||W||^2,

so that an increase of the blocks' norms must pay for itself in relative error (with ``mu``
``= 0.1``, a 1% lower error is worth a 0.2 higher ``k``). ``F`` is minimised by majorisation:
each step solves the three least-squares problems with the ridge ``lam sum_r ||W_r||^2``,
``lam = mu e_t / (1 + mu k_t)``, which adds ``lam`` times the diagonal blocks of each normal
matrix (block ``r``'s own terms). Because ``log`` is concave, a step that lowers ``e + lam k``
lowers ``F``, so the iteration is monotone, and an exact fit (``e = 0``) is unpenalised: exact
BTDs are still recovered. Why not the other known remedies (not measured here): a ridge on the
step (Tikhonov ALS with a decreasing ridge) leaves the degenerate minimiser in place and only
slows the way to it; stopping early bounds kappa only by chance (kappa 18 after 30 steps on the
layer above); exact BTDs need not have orthogonal blocks, so forcing orthogonality would cost
exact recovery.
Measured on the 100-epoch paper network (``benchmarks/btd_speed.py --weights``, all sizes of
conv2-4): ``mu = 0.1`` gives kappa 1.1-1.6, against 2.7-6.3 for the authors' per-block algorithm
(capped at 25 s), at relative errors from 0.9% below to 1.7% above theirs; on an earlier
checkpoint ``mu = 0.01`` gave kappa 2.5-3.4 and ``mu = 0`` up to 1,574. The penalty also removes
the swamps, so ALS stops in fewer steps than without it.

Starts
------
ALS is a local method, and the start decides which local minimum it reaches:

* ``"svd"`` (default) is the better (lower objective) of two data-driven starts: the algebraic
  start block-diagonalises the pencil of kernel slices (``D`` generalised eigenvectors, grouped
  into blocks by how the other slices couple them) and recovers an exact BTD when
  ``C_out >= D`` and ``C_in >= D``; the deflation start fits one block at a time to what the
  previous blocks left (the authors' first sweep), cheaply. With one group (``g = D``, a Tucker
  decomposition, exact when ``C_out <= C_in = D``) the start is the truncated SVD of the channel
  unfoldings. (Screening four deflation starts, which lowered the error of plain ALS a little,
  changed the penalised fits' errors by under 1% on 8 trained layers and cost 1.4-2.4x the time.)
* A :class:`BTD` warm start at a smaller group size is expanded with :func:`gross.expand.expand`;
  it is already a valid decomposition, and the result's objective is never above its own.

With ``C_out < D`` there is no algebraic start, and ALS may stop in a local minimum even on an
exact BTD (seen for ``C_out = 8``, ``D = 16``, ``g = 2, 4``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from gross.expand import expand

__all__ = ["BTD", "align", "btd", "btd_to_weight", "conditioning"]

# Weight mu of the block-norm penalty (module notes).
PENALTY = 0.1

# Relative ridge added to Gram matrices: small enough to keep exact decompositions exact to ~1e-12,
# large enough that rank-deficient Grams (C_out < D, 1x1 kernels) still factorise.
_RIDGE = 1e-13
# Core steps with at most this many unknowns per kernel tap (D * g) are solved directly, and so are
# those with up to twice as many in at least _DIRECT_MIN_GROUPS groups, where CG's many tiny
# per-block products cost more than a Cholesky factorisation (measured on 1 CPU thread: 256 x 256,
# g = 2: direct 14 ms, CG 56 ms; 32 x 32, g = 16: direct 13 ms, CG 4 ms per step).
_DIRECT_MAX = 256
_DIRECT_MIN_GROUPS = 16
# Three CG iterations per core step: the ALS step count was unchanged against ten (128 x 128
# He weights, g = 8: 157 steps either way; g = 32: 166 against 157), at 40% of the core's cost.
_CG_MAX_ITER = 3
_CG_REL_TOL = 1e-6
# Taps per chunk of the Gram-side products: about this many elements (8 MB) of D x D intermediates
# (at 512 channels, g = 8, 1 thread, load ~7: 2^18, 2^20 and all 9 taps gave 1.60, 1.34, 1.46 s per step).
_CHUNK_ELEMENTS = 1 << 20
# Below this relative error, fits of float32 weights continue in float64 (_Fit.__init__).
_FLOAT32_MIN_ERROR = 1e-2
# Errors below this are computed from the residual instead of from Gram matrices.
_GRAM_ERROR_MIN = 1e-4
# The default rtol, the number of steps it looks back over, and the least work per step
# (C_out C_in kh kw D, the products with the weight) of the fits it applies to by default (see btd's rtol).
RTOL = 1e-3
_RTOL_WINDOW = 10
RTOL_MIN_WORK = 1 << 27
# A step that lowers the error by this fraction of itself continues even below tol.
_MIN_RELATIVE_DECREASE = 0.01
# The error below which a fit is exact (no steps).
_EXACT = 1e-12
# Extrapolation factor bounds (grown on success, shrunk on failure).
_EXTRAP_INIT, _EXTRAP_MIN, _EXTRAP_MAX = 0.5, 0.1, 4.0


class BTD(NamedTuple):
    """A block term decomposition of one conv weight, as the weights of a bottleneck.

    Attributes
    ----------
    first : Tensor, shape (D, C_in, 1, 1)
        First pointwise conv weight ``P``: the stacked ``A_r^T``.
    core : Tensor, shape (D, g, kh, kw)
        Grouped conv weight ``R`` with ``D // g`` groups: the stacked block cores.
    last : Tensor, shape (C_out, D, 1, 1)
        Last pointwise conv weight ``Q``: the stacked ``B_r``.
    errors : list of float
        Relative error ``||W - W_hat||_F / ||W||_F`` after initialisation and after every step.
    """

    first: Tensor
    core: Tensor
    last: Tensor
    errors: list[float]


def btd_to_weight(result: BTD) -> Tensor:
    """Dense conv weight of a decomposition.

    Parameters
    ----------
    result : BTD
        ``first (D, C_in, 1, 1)``, ``core (D, g, kh, kw)``, ``last (C_out, D, 1, 1)``.

    Returns
    -------
    Tensor, shape (C_out, C_in, kh, kw)
        ``W_hat[o, i] = sum_d last[o, d] sum_{e in group(d)} core[d, e mod g] first[e, i]``.
    """
    d, c_in = result.first.shape[:2]
    c_out = result.last.shape[0]
    _, g, kh, kw = result.core.shape
    x = _core_to_blocks(result.core)
    p = result.first.reshape(d, c_in)
    q = result.last.reshape(c_out, d)
    w = q @ (x @ p.reshape(d // g, g, c_in)).reshape(kh * kw, d, c_in)
    return w.permute(1, 2, 0).reshape(c_out, c_in, kh, kw)


def btd(
    weight: Tensor,
    group_size: int,
    *,
    width: int | None = None,
    tol: float = 1e-5,
    rtol: float | None = None,
    max_iter: int = 2000,
    init: str | BTD | None = None,
    seed: int = 0,
    penalty: float = PENALTY,
) -> BTD:
    """Block term decomposition of a conv weight into a grouped-conv bottleneck.

    Parameters
    ----------
    weight : Tensor, shape (C_out, C_in, kh, kw)
        Floating-point conv weight, on any device; the fit runs on that device, in float64 for a
        float64 weight; a float32 (or lower precision) weight is fitted in float32 while the
        relative error is above 1% and the fit would not stop, then in float64.
    group_size : int
        ``g``: channels per group of the grouped conv; must divide ``width``.
    width : int, optional
        ``D``: bottleneck width (default ``C_in``).
    tol : float
        Stop when the objective (the relative error, times ``sqrt(1 + penalty k)``) decreases by
        less than ``tol`` in one step (and by less than 1% of itself, which only matters for
        nearly exact fits). The paper stops at 1e-6; on the trained paper network that took 2.6x
        the steps of 1e-5 for a mean relative error 0.5% lower.
    rtol : float, optional
        Also stop when the last ten steps together lowered the objective by less than ``rtol``
        times its value. Default: ``RTOL`` (1e-3) where a step's products with the weight are
        large (``C_out C_in kh kw D >= 2^27``: 256 x 256 x 3 x 3 and up, where a fit to ``tol``
        alone takes over ~10 s on one core), else 0: the creep is cheap to follow on small
        layers, and cutting it may cost accuracy (below). ALS creeps: on a random 128x128x3x3
        weight at ``g = 8`` the error fell from 0.6858 at ``tol``'s stop (157 steps) to 0.6815
        after 1,500 steps, and the creep is what ``tol`` alone pays for on large layers. The default 1e-3 stopped 2.0-2.8x sooner
        than ``rtol = 0`` on random 128- and 512-channel weights, at errors 0.3-0.5% higher
        (``benchmarks/btd_speed.py --stopping``). Trained alone (short protocol) after such
        fits, two configurations of the paper network scored the same on val (mean -0.02
        points over two seeds) and 0.17-0.43 lower on test in all four pairs than after the
        paper's stop (``experiments/btd_stopping.py``): a small cost is likely. On such small
        layers the default is therefore ``tol`` alone; whether the cost persists after full-length
        training, or on large layers, is not measured. ``0``: ``tol`` alone, the paper's stop.
    max_iter : int
        Maximum number of ALS steps (each updates ``last``, ``first`` and ``core`` once).
    init : {None, "svd", "random"} or BTD
        ``None``/``"svd"``: the best of a few deterministic data-driven starts (see the module
        notes). ``"random"``: Gaussian factors drawn from ``seed``. A ``BTD`` with the same ``D``,
        ``C_in``, ``C_out`` and kernel and a group size dividing ``group_size``: warm start (the
        result's error is at most the warm start's).
    seed : int
        Seed of every random draw, so equal arguments give equal results.
    penalty : float
        ``mu``: the fit minimises ``e (1 + mu k)`` with ``e`` the squared relative error and
        ``k = sum_r ||W_r||^2 / ||W||^2`` (``W_r``: block ``r``'s dense weight), which keeps the
        blocks from growing large and cancelling (see the module notes). ``0``: plain least
        squares, whose fits on trained weights can be accurate but degenerate. Ignored with one
        group, where nothing can cancel.

    Returns
    -------
    BTD
        Factors in ``weight``'s dtype and device, and the error history (first entry: the start).
        :func:`conditioning` gives the fit's ``kappa``.

    Raises
    ------
    ValueError
        On a weight that is not a 4-d floating-point tensor, a group size or width that does not
        fit, or an ``init`` that does not match.
    """
    if not isinstance(weight, Tensor) or weight.dim() != 4:
        raise ValueError(f"expected a 4-d conv weight (C_out, C_in, kh, kw), got {_describe(weight)}")
    if not weight.is_floating_point():
        raise ValueError(f"expected a floating-point weight, got dtype {weight.dtype}")
    c_out, c_in, kh, kw = weight.shape
    d = c_in if width is None else width
    if not isinstance(d, int) or d <= 0:
        raise ValueError(f"width must be a positive int, got {width!r}")
    if not isinstance(group_size, int) or group_size <= 0 or d % group_size:
        raise ValueError(f"group_size must be a positive divisor of the width D={d}, got {group_size!r}")
    if rtol is None:
        rtol = RTOL if weight.numel() * d >= RTOL_MIN_WORK else 0.0
    if tol < 0 or rtol < 0 or max_iter < 0:
        raise ValueError(f"tol, rtol and max_iter must be non-negative, got tol={tol}, rtol={rtol}, max_iter={max_iter}")
    if not isinstance(penalty, (int, float)) or not penalty >= 0 or not math.isfinite(penalty):
        raise ValueError(f"penalty must be a finite number >= 0, got {penalty!r}")
    if weight.numel() == 0:
        raise ValueError(f"cannot decompose an empty weight of shape {tuple(weight.shape)}")

    w = weight.detach().to(torch.float64).reshape(c_out, c_in, kh * kw).permute(2, 0, 1).contiguous()
    if not bool(torch.isfinite(w).all()):
        raise ValueError("weight has non-finite entries")
    fit = _Fit(w, group_size, d, seed, float(penalty), weight.dtype)
    if not isinstance(init, BTD) and init not in (None, "svd", "random"):
        raise ValueError(f"init must be None, 'svd', 'random' or a BTD, got {init!r}")
    if bool((w == 0).all()):  # nothing to fit, and every Gram matrix would be zero
        p, q, x = fit.zeros()
        errors = [0.0]
    else:
        if isinstance(init, BTD):
            state = fit.from_btd(init, kh, kw)
        elif init == "random":
            state = fit.random_init()
        else:
            state = fit.data_init()
        p, q, x, errors = fit.als(state, tol, rtol, max_iter)

    first, core, last = _balance(p.reshape(d, c_in), _blocks_to_core(x, kh, kw), q.reshape(c_out, d), group_size)
    dtype = weight.dtype
    return BTD(
        first=first.reshape(d, c_in, 1, 1).to(dtype),
        core=core.to(dtype),
        last=last.reshape(c_out, d, 1, 1).to(dtype),
        errors=errors,
    )


def conditioning(result: BTD) -> float:
    """``kappa = sum_r ||W_r||_F^2 / ||sum_r W_r||_F^2`` of a decomposition.

    ``W_r`` is the dense weight of block ``r``. ``kappa`` is 1 when the blocks are orthogonal
    and large when large blocks cancel each other: such a fit is ill-conditioned, a small step on
    its factors is a large step on the weight. ``nan`` for a zero fit.

    Parameters
    ----------
    result : BTD
        ``first (D, C_in, 1, 1)``, ``core (D, g, kh, kw)``, ``last (C_out, D, 1, 1)``.
    """
    d, c_in = result.first.shape[:2]
    g = result.core.shape[1]
    first, core, last = (t.detach().double() for t in result[:3])
    total = float(btd_to_weight(BTD(first, core, last, [])).norm()) ** 2
    blocks = _block_sq_norms(first.reshape(d, c_in), last.reshape(-1, d), _core_to_blocks(core), g)
    return blocks / total if total > 0 else float("nan")


def align(result: BTD, reference: BTD) -> BTD:
    """The same decomposition with each block's factors rotated to be closest to ``reference``'s.

    A block's factors are defined up to a change of basis inside the block: ``(Q_r V^T, V X_r U^T,
    U P_r)`` gives the same weight for any orthogonal ``U``, ``V``. Fits at two group sizes can
    therefore differ by such rotations alone, and a series that stores their differences
    (:class:`gross.GroSSConv2d`) would store them as large terms. Each block gets the ``U`` and
    ``V`` (orthogonal Procrustes) that bring its ``first`` rows and ``last`` columns nearest to
    those of ``reference`` expanded to this group size. The weight is unchanged, and so are the
    norms of each block's factors.

    Parameters
    ----------
    result : BTD
        ``first (D, C_in, 1, 1)``, ``core (D, g, kh, kw)``, ``last (C_out, D, 1, 1)``.
    reference : BTD
        The same ``D``, ``C_in``, ``C_out`` and kernel, at a group size ``g0`` dividing ``g``.

    Returns
    -------
    BTD
        ``result`` rotated, with its error history.
    """
    d, c_in = result.first.shape[:2]
    c_out = result.last.shape[0]
    _, g, kh, kw = result.core.shape
    g0 = reference.core.shape[1]
    if reference.first.shape != result.first.shape or reference.last.shape != result.last.shape or g % g0:
        raise ValueError(
            f"cannot align a fit of group size {g} with first {tuple(result.first.shape)} to one of group size {g0} "
            f"with first {tuple(reference.first.shape)}: need equal shapes and {g0} dividing {g}"
        )
    n_groups = d // g
    p = result.first.reshape(n_groups, g, c_in)
    q = result.last.reshape(c_out, n_groups, g).transpose(0, 1)  # (G, O, g)
    p_ref = reference.first.to(p).reshape(n_groups, g, c_in)
    q_ref = reference.last.to(q).reshape(c_out, n_groups, g).transpose(0, 1)
    u = _nearest_orthogonal(p_ref @ p.transpose(1, 2))  # argmin ||U P_r - P_ref_r||
    v_t = _nearest_orthogonal(q.transpose(1, 2) @ q_ref)  # argmin ||Q_r V^T - Q_ref_r||
    x = result.core.reshape(n_groups, g, g, kh * kw).permute(0, 3, 1, 2)  # (G, K, out, in)
    x = v_t.transpose(1, 2)[:, None] @ x @ u.transpose(1, 2)[:, None]
    return BTD(
        first=(u @ p).reshape(d, c_in, 1, 1),
        core=x.permute(0, 2, 3, 1).reshape(d, g, kh, kw),
        last=(q @ v_t).transpose(0, 1).reshape(c_out, d, 1, 1),
        errors=list(result.errors),
    )


def _nearest_orthogonal(m: Tensor) -> Tensor:
    """The orthogonal factor of the polar decomposition of each ``m`` (batched, float64 inside)."""
    u, _, vh = torch.linalg.svd(m.double())
    return (u @ vh).to(m.dtype)


def _leading_left(m: Tensor, r: int) -> Tensor:
    """Orthonormal basis of the leading ``r``-dimensional left singular subspace of (a batch of) ``m (n, N)``.

    Computed from the eigenvectors of the smaller Gram matrix (``m m^T`` or ``m^T m``) instead of
    an SVD: LAPACK's SVD of the tall and wide unfoldings here cost 10-60x an ``eigh`` of their Gram
    on this project's CPUs, and far more with threads oversubscribed. Squaring the singular values
    only loses accuracy in directions below ``sqrt(eps)`` of the largest, which the fits never
    rely on (ALS refines the start). Returns ``(..., n, min(r, n))``.
    """
    n, big = m.shape[-2:]
    r = min(r, n)
    if n <= big:
        return torch.linalg.eigh(m @ m.transpose(-2, -1))[1].flip(-1)[..., :r]
    vecs = torch.linalg.eigh(m.transpose(-2, -1) @ m)[1].flip(-1)[..., :r]
    # m v_j = s_j u_j: orthonormalise rather than divide, which also covers s_j = 0.
    return _orthonormalise_columns(m @ vecs)[0]


def _block_sq_norms(p: Tensor, q: Tensor, x: Tensor, g: int) -> float:
    """``sum_r ||W_r||_F^2`` from ``P (D, I)``, ``Q (O, D)``, ``X (K, G, g, g)``.

    ``||Q_r X_rk P_r||^2 = tr(A_rr X_rk C_rr X_rk^T)`` with the blocks' own Grams
    ``A_rr = Q_r^T Q_r`` and ``C_rr = P_r P_r^T``.
    """
    n_groups = x.shape[1]
    qb = q.reshape(q.shape[0], n_groups, g).transpose(0, 1)  # (G, O, g)
    pb = p.reshape(n_groups, g, p.shape[1])  # (G, g, I)
    a = qb.transpose(1, 2) @ qb
    c = pb @ pb.transpose(1, 2)
    return float(((a @ x @ c) * x).sum())


def _scale_diagonal_blocks(gram: Tensor, n_groups: int, factor: float) -> Tensor:
    """``gram`` of shape ``(n, n)``, ``n = n_groups * b``, with its ``n_groups`` diagonal ``b x b`` blocks times ``factor``."""
    if factor == 1.0:
        return gram
    n = gram.shape[0]
    blocks = gram.reshape(n_groups, n // n_groups, n_groups, n // n_groups).clone()
    idx = torch.arange(n_groups, device=gram.device)
    blocks[idx, :, idx, :] *= factor
    return blocks.reshape(n, n)


def _balance(first: Tensor, core: Tensor, last: Tensor, g: int) -> tuple[Tensor, Tensor, Tensor]:
    """Rescale each block so that its ``first`` rows, core and ``last`` columns have equal norms.

    The product is unchanged, but ALS leaves the blocks of ``first`` and ``last`` orthonormal and
    the whole scale in the core; trained with SGD, such factors take relative steps that grow
    with the core's norm, and response reconstruction at the paper's learning rate diverged on a
    trained CIFAR-10 layer. Balanced factors take equal relative steps.
    """
    n_groups = first.shape[0] // g
    a = first.reshape(n_groups, -1).norm(dim=1)
    b = core.reshape(n_groups, -1).norm(dim=1)
    c = last.reshape(last.shape[0], n_groups, g).norm(dim=(0, 2))
    alive = (a > 0) & (b > 0) & (c > 0)
    target = (a * b * c).clamp_min(0).pow(1 / 3)
    one = torch.ones_like(a)
    sa = torch.where(alive, target / a.where(alive, one), one)
    sb = torch.where(alive, target / b.where(alive, one), one)
    sc = torch.where(alive, target / c.where(alive, one), one)
    first = (first.reshape(n_groups, g, -1) * sa[:, None, None]).reshape(first.shape)
    core = (core.reshape(n_groups, -1) * sb[:, None]).reshape(core.shape)
    last = (last.reshape(last.shape[0], n_groups, g) * sc[None, :, None]).reshape(last.shape)
    return first, core, last


def _describe(obj: object) -> str:
    return f"shape {tuple(obj.shape)}" if isinstance(obj, Tensor) else type(obj).__name__


def _core_to_blocks(core: Tensor) -> Tensor:
    """``(D, g, kh, kw)`` grouped weight -> ``(K, G, g, g)`` blocks indexed ``[tap, group, out, in]``."""
    d, g, kh, kw = core.shape
    return core.reshape(d // g, g, g, kh * kw).permute(3, 0, 1, 2)


def _blocks_to_core(x: Tensor, kh: int, kw: int) -> Tensor:
    """Inverse of :func:`_core_to_blocks`."""
    _, n_groups, g, _ = x.shape
    return x.permute(1, 2, 3, 0).reshape(n_groups * g, g, kh, kw).contiguous()


def _solve_psd(gram: Tensor, rhs: Tensor) -> Tensor:
    """Solve ``gram @ x = rhs`` for a symmetric positive semi-definite (batch of) ``gram``.

    A ridge relative to the mean diagonal makes singular Grams solvable; it is raised only if the
    Cholesky factorisation still fails.
    """
    n = gram.shape[-1]
    scale = gram.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(torch.finfo(gram.dtype).tiny)
    eye = torch.eye(n, dtype=gram.dtype, device=gram.device)
    ridge = _RIDGE
    while True:
        chol, info = torch.linalg.cholesky_ex(gram + (ridge * scale)[..., None, None] * eye)
        if not bool(info.any()) or ridge > 1e-2:
            return torch.cholesky_solve(rhs, chol)
        ridge *= 1e3


def _group_eigenvectors(affinity: Tensor, eigval: Tensor, g: int) -> list[list[tuple[int, str]]]:
    """Partition eigenvectors into groups spanning ``g`` real dimensions each.

    A real eigenvector gives one real direction, a complex-conjugate pair two (real and imaginary
    part of one member), and a pair stays in one group unless only one slot is left (always when
    ``g = 1``; the data then has no exact real block of that size anyway). Groups grow greedily by
    affinity, which is exactly zero between blocks of an exact BTD.

    Returns
    -------
    list of groups, each a list of ``(eigenvector index, "re" | "im")``.
    """
    n = eigval.shape[0]
    scale = float(eigval.abs().max()) or 1.0
    taken = torch.zeros(n, dtype=torch.bool)
    units: list[list[tuple[int, str]]] = []
    for j in range(n):
        if taken[j]:
            continue
        taken[j] = True
        if abs(float(eigval[j].imag)) <= 1e-10 * scale:
            units.append([(j, "re")])
            continue
        dist = (eigval - eigval[j].conj()).abs()
        dist[taken] = float("inf")
        partner = int(dist.argmin())
        taken[partner] = True
        units.append([(j, "re"), (j, "im")])
    members = [[j for j, _ in u] for u in units]
    unit_aff = torch.stack([affinity[m].sum(0) for m in members])  # (units, n)
    unit_aff = torch.stack([unit_aff[:, m].sum(1) for m in members], dim=1)  # (units, units)
    open_units = list(range(len(units)))
    groups = []
    while open_units:
        current = open_units.pop(0)
        group, gain = [], torch.zeros(len(units), dtype=unit_aff.dtype)
        while True:
            room = g - len(group)
            parts = units[current]
            if len(parts) > room:  # split the pair: the imaginary part becomes its own unit
                units[current] = parts[room:]
                open_units.insert(0, current)
                parts = parts[:room]
            group += parts
            gain += unit_aff[current]
            if len(group) == g:
                break
            current = max(open_units, key=lambda u: (len(units[u]) <= g - len(group), float(gain[u])))
            open_units.remove(current)
        groups.append(group)
    return groups


def _orthonormalise_columns(a: Tensor) -> tuple[Tensor, Tensor]:
    """Batched QR ``a = q @ r`` with ``r``'s diagonal made non-negative.

    The sign convention makes the factorisation continuous in ``a``, so consecutive ALS iterates
    stay comparable and extrapolating along their difference is meaningful.
    """
    q, r = torch.linalg.qr(a)
    sign = torch.where(r.diagonal(dim1=-2, dim2=-1) < 0, -1.0, 1.0).to(a.dtype)
    return q * sign[..., None, :], r * sign[..., :, None]


class _Fit:
    """ALS for ``W_k ~= Q @ blockdiag(X_k) @ P`` for every kernel tap ``k``.

    Shapes: ``W (K, O, I)``, ``P (D, I)`` (``first``), ``Q (O, D)`` (``last``), ``X (K, G, g, g)``.
    """

    def __init__(self, w: Tensor, g: int, d: int, seed: int, penalty: float, work_dtype: torch.dtype = torch.float64) -> None:
        self.k, self.o, self.i = w.shape
        self.g, self.d, self.n_groups = g, d, d // g
        self.seed = seed
        self.mu = penalty if self.n_groups > 1 else 0.0
        # A fit of a float32 (or lower precision) weight runs in float32 while its error is above
        # _FLOAT32_MIN_ERROR: float32 rounds the Gram-form squared error by ~1e-7 of |W|^2, far
        # below any tol in use at such errors, and a step costs 1.5-1.8x less at 512 channels (both
        # the matrix products and the memory-bound batched block products), at the same errors and
        # kappa (module notes). A nearly exact fit would stop on that rounding, so it continues in
        # float64 (:meth:`promote`), and so does a fit that would stop: float64 decides the stop
        # (with C_out < D, float32 alone stopped 2-4% higher on fits that creep at errors of a few
        # percent). Float64 weights keep float64 throughout.
        self._w64 = w
        self._use(w.to(torch.float64 if work_dtype == torch.float64 else torch.float32))

    def _use(self, w: Tensor) -> None:
        """Make ``w (K, O, I)`` the data, in the precision the fit runs in."""
        self.w = w
        self.norm = w.norm().clamp_min(torch.finfo(w.dtype).tiny)
        self.norm_sq = self.norm**2
        self.w_out = w.permute(1, 0, 2).reshape(self.o, -1)  # (O, K*I): out-mode unfolding
        self.w_in = w.reshape(-1, self.i)  # (K*O, I): in-mode unfolding (transposed)

    def promote(self, *tensors: Tensor) -> list[Tensor]:
        """Continue the fit in float64: the data and ``tensors``, converted."""
        self._use(self._w64)
        return [t.to(torch.float64) for t in tensors]

    # --- basic pieces ---------------------------------------------------------------------------

    def _generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed)

    def zeros(self) -> tuple[Tensor, Tensor, Tensor]:
        dt, dev = self.w.dtype, self.w.device
        return (
            torch.zeros(self.d, self.i, dtype=dt, device=dev),
            torch.zeros(self.o, self.d, dtype=dt, device=dev),
            torch.zeros(self.k, self.n_groups, self.g, self.g, dtype=dt, device=dev),
        )

    def _randn(self, *shape: int, gen: torch.Generator) -> Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(self.w.device, self.w.dtype)

    def _inner(self, p: Tensor, x: Tensor) -> Tensor:
        """``blockdiag(X_k) @ P`` for every tap: ``(K, D, I)``."""
        return (x @ p.reshape(self.n_groups, self.g, self.i)).reshape(self.k, self.d, self.i)

    def _qtw(self, q: Tensor) -> Tensor:
        """``Q^T W`` as ``(D, K * I)``: row ``d``, then tap and input channel (one GEMM)."""
        return q.T @ self.w_out

    def error(self, p: Tensor, q: Tensor, x: Tensor) -> float:
        return float((self.w - q @ self._inner(p, x)).norm() / self.norm)

    def _normalise_last(self, q: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        """Orthonormal columns for each block of ``Q``; ``W_hat`` is unchanged."""
        if self.o < self.g:
            return q, x
        qb, r = _orthonormalise_columns(q.reshape(self.o, self.n_groups, self.g).transpose(0, 1))
        return qb.transpose(0, 1).reshape(self.o, self.d), r @ x

    def _normalise_with_qtw(self, p: Tensor, q: Tensor, x: Tensor, qtw: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """:meth:`_normalise`, also carrying ``qtw = Q^T W`` over to the new ``Q`` without touching ``W``.

        Block ``r`` of ``Q`` becomes ``Q_r R_r^{-1}``, so its rows of ``Q^T W`` become
        ``R_r^{-T} Q_r^T W``: ``O(K D I g)`` instead of the ``O(K O I D)`` product with the data.
        A singular ``R_r`` gives non-finite entries, which the caller's comparison rejects.
        """
        if self.o >= self.g:
            n_groups, g = self.n_groups, self.g
            qb, r = _orthonormalise_columns(q.reshape(self.o, n_groups, g).transpose(0, 1))
            q, x = qb.transpose(0, 1).reshape(self.o, self.d), r @ x
            blocks = torch.linalg.solve_triangular(r.transpose(1, 2), qtw.reshape(n_groups, g, -1), upper=False)
            qtw = blocks.reshape(self.d, -1)
        p, x = self._normalise_first(p, x)
        return p, q, x, qtw

    def _normalise_first(self, p: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        """Orthonormal rows for each block of ``P``; ``W_hat`` is unchanged."""
        if self.i < self.g:
            return p, x
        pb, r = _orthonormalise_columns(p.reshape(self.n_groups, self.g, self.i).transpose(1, 2))
        return pb.transpose(1, 2).reshape(self.d, self.i), x @ r.transpose(1, 2)

    def _normalise(self, p: Tensor, q: Tensor, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, x = self._normalise_last(q, x)
        p, x = self._normalise_first(p, x)
        return p, q, x

    # --- the three least-squares steps ----------------------------------------------------------
    #
    # Only two products per step touch the data: ``Q^T W`` and ``W (B P)^T`` (``O(K O I D)``
    # each, one GEMM on the out-mode unfolding each), laid out so that every product with the
    # block-diagonal cores is a batched matmul over the G groups of contiguous views, taps folded
    # in. The Gram-side products (``O(K D^2 g)``) run over chunks of taps whose ``D x D``
    # intermediates stay in cache: on 512-channel layers the former single pass over
    # ``K x D x D`` tensors was bound by memory copies, not arithmetic.

    def _tap_chunks(self) -> range:
        """Start indices of chunks of taps, each chunk's ``(taps, D, D)`` intermediate about _CHUNK_ELEMENTS."""
        return range(0, self.k, max(1, min(self.k, _CHUNK_ELEMENTS // (self.d * self.d))))

    def _sandwich(self, x: Tensor, m: Tensor, transpose: bool = False) -> Tensor:
        """``sum_k B_k M B_k^T`` (or ``sum_k B_k^T M B_k``): ``(D, D)``; ``B_k = blockdiag(X_k)``, ``M (D, D)``."""
        n_groups, g, d = self.n_groups, self.g, self.d
        xs = x.transpose(2, 3) if transpose else x  # (K, G, g, g): B_k's blocks [out, in]
        acc = torch.zeros(n_groups, d, g, dtype=m.dtype, device=m.device)  # [s, (r, a), b]
        step = self._tap_chunks().step
        for k0 in self._tap_chunks():
            xc = xs[k0 : k0 + step]
            left = (xc @ m.reshape(1, n_groups, g, d)).reshape(-1, d, n_groups, g)  # B_k M: [k, (r,a), s, b']
            acc += (left.transpose(1, 2) @ xc.transpose(2, 3)).sum(0)  # (B_k M)[:, s] X_sk^T
        return acc.transpose(0, 1).reshape(d, d)

    def _last_step(self, p: Tensor, x: Tensor, c: Tensor, lam: float) -> Tensor:
        """Least-squares ``Q`` for ``W_k ~= Q B_k P``, ``B_k = blockdiag(X_k)``; ``C = P P^T``.

        The right-hand side ``sum_k W_k (B_k P)^T`` is one GEMM of the out-mode unfolding with
        ``M = [B_k P]_k`` laid out ``(D, K * I)``. The penalty ``lam * sum_r ||W_r||^2`` is
        ``lam`` times the diagonal blocks of the normal matrix, which are block ``r``'s own terms
        ``sum_k X_rk C_rr X_rk^T``.
        """
        n_groups, g, k, i = self.n_groups, self.g, self.k, self.i
        xs = x.permute(1, 2, 0, 3).reshape(n_groups, g * k, g)  # [r, (a, k), b]
        bp = (xs @ p.reshape(n_groups, g, i)).reshape(self.d, k * i)  # (B_k P)[(r, a), (k, i)]
        rhs = self.w_out @ bp.T  # (O, D)
        gram = _scale_diagonal_blocks(self._sandwich(x, c), n_groups, 1 + lam)
        return _solve_psd(gram, rhs.T).T

    def _first_step(self, x: Tensor, a: Tensor, qtw: Tensor, lam: float) -> tuple[Tensor, Tensor, Tensor]:
        """Least-squares ``P`` for ``W_k ~= Q B_k P``; ``A = Q^T Q``, ``qtw = Q^T W``; penalised as ``Q``.

        Also returns the (unpenalised) normal matrix and right-hand side, which give the error and,
        through the matrix's diagonal blocks, the blocks' norms.
        """
        n_groups, g, k, i = self.n_groups, self.g, self.k, self.i
        xs = x.permute(1, 3, 2, 0).reshape(n_groups, g, g * k)  # [r, b, (a, k)]: B_k^T
        rhs = (xs @ qtw.reshape(n_groups, g * k, i)).reshape(self.d, i)  # sum_k B_k^T Q^T W_k
        gram = self._sandwich(x, a, transpose=True)  # sum_k B_k^T A B_k
        return _solve_psd(_scale_diagonal_blocks(gram, n_groups, 1 + lam), rhs), gram, rhs

    def _core_rhs(self, p: Tensor, qtw: Tensor) -> Tensor:
        """``mask(Q^T W_k P^T)``, the core step's right-hand side: ``(K, G, g, g)``."""
        n_groups, g, k, i = self.n_groups, self.g, self.k, self.i
        out = qtw.reshape(n_groups, g * k, i) @ p.reshape(n_groups, g, i).transpose(1, 2)  # [r, (a, k), b]
        return out.reshape(n_groups, g, k, g).permute(2, 0, 1, 3)

    def _gram_op(self, a: Tensor, c: Tensor):
        """``X -> mask(A blockdiag(X_k) C)``, the core step's normal operator, ``O(K D^2 g)``."""
        n_groups, g, d = self.n_groups, self.g, self.d
        a_cols = a.reshape(d, n_groups, g).transpose(0, 1).contiguous()  # (G, D, g): A[:, block s]
        c_cols = c.reshape(d, n_groups, g).transpose(0, 1).contiguous()
        chunks = self._tap_chunks()

        def op(v: Tensor) -> Tensor:
            out = []
            for k0 in chunks:
                av = a_cols @ v[k0 : k0 + chunks.step]  # A[:, s] X_sk: [k, s, (r, a), b]
                av = av.reshape(-1, n_groups, n_groups, g, g).permute(0, 2, 3, 1, 4).reshape(-1, n_groups, g, d)
                out.append(av @ c_cols)  # [k, r, a, c]
            return torch.cat(out)

        return op

    def _core_step(self, a: Tensor, c: Tensor, rhs: Tensor, x: Tensor, lam: float = 0.0, op_x: Tensor | None = None) -> Tensor:
        """Least-squares block-diagonal core: ``mask(A X_k C) + lam A_rr X_rk C_rr = mask(Q^T W_k P^T)``.

        ``A = Q^T Q``, ``C = P P^T``; the penalty scales each block's own term by ``1 + lam``.
        ``op_x``: ``mask(A X_k C)`` at the current ``x`` where the caller has it (CG's first residual).
        """
        k, n_groups, g, d = self.k, self.n_groups, self.g, self.d
        if n_groups == 1:
            y = _solve_psd(a, rhs[:, 0])
            return _solve_psd(c, y.transpose(1, 2)).transpose(1, 2)[:, None]
        if d * g <= _DIRECT_MAX or (d * g <= 2 * _DIRECT_MAX and n_groups >= _DIRECT_MIN_GROUPS):
            blocks = (n_groups, g, n_groups, g)
            gram = torch.einsum("rasc,rbsd->rabscd", a.reshape(blocks), c.reshape(blocks))
            gram = _scale_diagonal_blocks(gram.reshape(d * g, d * g), n_groups, 1 + lam)
            sol = _solve_psd(gram, rhs.reshape(k, d * g).T)
            return sol.T.reshape(k, n_groups, g, g)
        return self._core_cg(a, c, rhs, x, lam, op_x)

    def _sq_error(self, p: Tensor, x: Tensor, a: Tensor, c: Tensor, qtw: Tensor) -> tuple[float, Tensor]:
        """``||W - W_hat||^2 / ||W||^2`` from ``Q^T W``: ``1 - 2 <b, X> / |W|^2 + <op(X), X> / |W|^2``, and ``op(X)``.

        ``a = Q^T Q`` and ``c = P P^T``, which the caller keeps for the next step; ``op(X)`` saves
        the next core step one application of its operator.
        """
        op_x = self._gram_op(a, c)(x)
        cross = (self._core_rhs(p, qtw) * x).sum()
        return float((self.norm_sq - 2 * cross + (op_x * x).sum()) / self.norm_sq), op_x

    def _core_cg(self, a: Tensor, c: Tensor, b: Tensor, x: Tensor, lam: float, op_x: Tensor | None = None) -> Tensor:
        """Conjugate gradients on the core normal equations, started at the current core.

        Blocks of ``Q`` and ``P`` are orthonormal after normalisation, so each block's own term
        ``(1 + lam) A_rr (x) C_rr`` is a multiple of the identity and needs no preconditioner;
        where a side has fewer than ``g`` channels its exact inverse is applied. CG decreases the
        quadratic monotonically from its start, so a truncated solve never raises the objective.
        """
        n_groups, g = self.n_groups, self.g
        idx = torch.arange(n_groups, device=a.device)
        a_own = a.reshape(n_groups, g, n_groups, g)[idx, :, idx]  # (G, g, g): A_rr
        c_own = c.reshape(n_groups, g, n_groups, g)[idx, :, idx]
        plain = self._gram_op(a, c)

        def op(v: Tensor, plain_v: Tensor | None = None) -> Tensor:
            plain_v = plain(v) if plain_v is None else plain_v
            return plain_v + lam * (a_own @ v @ c_own) if lam else plain_v

        if self.o >= g and self.i >= g:
            precondition = None
        else:
            eye = torch.eye(g, dtype=a.dtype, device=a.device)
            a_inv = _solve_psd(a_own, eye)
            c_inv = _solve_psd(c_own, eye) / (1 + lam)

            def precondition(v: Tensor) -> Tensor:
                return a_inv @ v @ c_inv

        res = b - op(x, op_x)
        z = res if precondition is None else precondition(res)
        direction = z
        rz = float((res * z).sum())
        stop = (_CG_REL_TOL * float(res.norm())) ** 2
        for _ in range(_CG_MAX_ITER):
            ad = op(direction)
            curvature = float((direction * ad).sum())
            if rz <= 0 or curvature <= 0:
                break
            step = rz / curvature
            x = x.add(direction, alpha=step)
            res = res.sub(ad, alpha=step)  # not in place: without a preconditioner z is res
            z = res if precondition is None else precondition(res)
            rz_new = float((res * z).sum())
            if float((res * res).sum()) <= stop:
                break
            direction = z.add(direction, alpha=rz_new / rz)
            rz = rz_new
        return x

    # --- initialisations --------------------------------------------------------------------------

    def _with_core(self, p: Tensor, q: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Normalise given ``P``, ``Q`` and fit the core to them."""
        x = torch.zeros(self.k, self.n_groups, self.g, self.g, dtype=p.dtype, device=p.device)
        p, q, x = self._normalise(p, q, x)
        rhs = self._core_rhs(p, self._qtw(q))
        return p, q, self._core_step(q.T @ q, p @ p.T, rhs, x)

    def _pad_rows(self, rows: Tensor, n: int, gen: torch.Generator) -> Tensor:
        """Complete ``rows (m, c)`` to ``(n, c)`` with small random rows (the data has no more)."""
        if rows.shape[0] >= n:
            return rows[:n]
        extra = self._randn(n - rows.shape[0], rows.shape[1], gen=gen) / math.sqrt(rows.shape[1])
        return torch.cat([rows, extra])

    def random_init(self) -> tuple[Tensor, Tensor, Tensor]:
        gen = self._generator()
        p = self._randn(self.d, self.i, gen=gen)
        q = self._randn(self.o, self.d, gen=gen)
        return self._with_core(p, q)

    def svd_init(self) -> tuple[Tensor, Tensor, Tensor]:
        """Leading singular vectors of the out- and in-mode unfoldings (Tucker/HOSVD)."""
        gen = self._generator()
        u_out = _leading_left(self.w_out, self.d)  # (O, min(O, D))
        v_in = _leading_left(self.w_in.T, self.d).T  # (min(I, D), I)
        p = self._pad_rows(v_in, self.d, gen)
        q = self._pad_rows(u_out.T, self.d, gen).T
        return self._with_core(p, q)

    def data_init(self) -> tuple[Tensor, Tensor, Tensor]:
        """The better (lower objective) of the deflation and the algebraic start; SVD for one group."""
        if self.n_groups == 1:
            return self.svd_init()
        starts = [self.deflation_init()]
        if self.k >= 2 and self.o >= self.d and self.i >= self.d:
            try:
                starts.append(self.algebraic_init())
            except torch.linalg.LinAlgError:  # a singular pencil: the data is far from a BTD
                pass
        scores = [self._objective(self.error(*s), *s)[0] for s in starts]
        return starts[min(range(len(starts)), key=lambda j: (not math.isfinite(scores[j]), scores[j]))]

    def deflation_init(self, hooi_iter: int = 5) -> tuple[Tensor, Tensor, Tensor]:
        """Fit block after block, each a rank-(g, g) Tucker term of what the previous ones left.

        This is the authors' first sweep, made cheap: each term is a few HOOI iterations from a
        randomised range finder instead of a full SVD of the residual, ``O(K O I g)`` per block.
        (More sweeps of such block refits, before ALS, did not lower the final error: measured
        over 16 He-initialised 32x32 layers at g = 4 and 10 at g = 1.)
        """
        gen = self._generator()
        k, o, i, g = self.k, self.o, self.i, self.g
        # The start only needs to be near a good minimum (ALS refines it), and the passes over
        # the residual are memory-bound: float32 halves their cost.
        res = self.w.to(torch.float32)
        ps, qs = [], []
        for _ in range(self.n_groups):
            probe = self._randn(k * o, g, gen=gen).to(res.dtype)
            v = torch.linalg.qr(res.reshape(k * o, i).T @ probe)[0]  # (I, min(I, g))
            for _ in range(hooi_iter):
                u = _leading_left((res @ v).transpose(0, 1).reshape(o, -1), g)
                utr = u.T @ res  # (K, g, I)
                v = _leading_left(utr.reshape(-1, i).T, g)
            res = res - u @ (utr @ v) @ v.T
            ps.append(self._pad_rows(v.T.to(self.w.dtype), g, gen))
            qs.append(self._pad_rows(u.T.to(self.w.dtype), g, gen).T)
        return self._with_core(torch.cat(ps), torch.cat(qs, dim=1))

    def algebraic_init(self) -> tuple[Tensor, Tensor, Tensor]:
        """Simultaneous block diagonalisation of the kernel slices (needs ``O, I >= D``, ``K >= 2``).

        In bases of the leading ``D`` singular vectors, ``T_k = Q' X_k P'`` with ``Q'``, ``P'``
        square, so ``T_a T_b^{-1} = Q' (X_a X_b^{-1}) Q'^{-1}``: its eigenvectors are ``Q'`` times
        block-local vectors. Eigenvectors of one block are coupled by the other slices
        (``V^{-1} T_k T_b^{-1} V`` is block diagonal up to a permutation), which groups them; the
        real span of each group is a block of ``Q'``. Each block of ``P'`` is then the row space of
        that block's rows of ``Q'^{-1} T_k``, over all ``k``.
        """
        k, d, g, n_groups = self.k, self.d, self.g, self.n_groups
        u_out = _leading_left(self.w_out, d)
        v_in = _leading_left(self.w_in.T, d).T
        t = u_out.T @ self.w @ v_in.T  # (K, D, D)
        # The two leading combinations of the slices make the best-conditioned pencil.
        mix = _leading_left(t.reshape(k, d * d), 2)
        t_b = torch.einsum("k,kab->ab", mix[:, 0], t)
        t_a = torch.einsum("k,kab->ab", mix[:, 1], t)
        slices = torch.linalg.solve(t_b, t, left=False)  # T_k T_b^{-1}
        eigval, vec = torch.linalg.eig(torch.linalg.solve(t_b, t_a, left=False))
        vec = vec / vec.norm(dim=0)
        coupled = torch.linalg.solve(vec, slices.to(vec.dtype) @ vec).abs()
        # |E_ij E_ji| is invariant to the eigenvectors' scales.
        affinity = (coupled * coupled.transpose(1, 2)).sum(0)
        diag = affinity.diagonal().sqrt().clamp_min(torch.finfo(affinity.dtype).tiny)
        affinity = (affinity / diag[:, None] / diag[None, :]).cpu()
        cols = []
        for group in _group_eigenvectors(affinity, eigval.cpu(), g):
            for j, part in group:
                cols.append(vec[:, j].real if part == "re" else vec[:, j].imag)
        q_blocks = torch.stack(cols, dim=1)  # (D, D), block-wise real spans
        q_blocks = _orthonormalise_columns(q_blocks.reshape(d, n_groups, g).transpose(0, 1))[0]
        q_blocks = q_blocks.transpose(0, 1).reshape(d, d)
        rows = torch.linalg.solve(q_blocks, t).reshape(k, n_groups, g, d)
        rows = rows.transpose(0, 1).reshape(n_groups, k * g, d)
        p_blocks = _leading_left(rows.transpose(1, 2), g).transpose(1, 2).reshape(d, d)
        return self._with_core(p_blocks @ v_in, u_out @ q_blocks)

    def from_btd(self, init: BTD, kh: int, kw: int) -> tuple[Tensor, Tensor, Tensor]:
        first, core, last = init.first, init.core, init.last
        expected = {"first": (self.d, self.i, 1, 1), "last": (self.o, self.d, 1, 1)}
        for name, t in (("first", first), ("last", last)):
            if not isinstance(t, Tensor) or tuple(t.shape) != expected[name]:
                raise ValueError(f"init.{name} must have shape {expected[name]}, got {_describe(t)}")
        shape_ok = isinstance(core, Tensor) and core.dim() == 4 and core.shape[0] == self.d
        if not shape_ok or tuple(core.shape[2:]) != (kh, kw):
            raise ValueError(f"init.core must have shape ({self.d}, g0, {kh}, {kw}), got {_describe(core)}")
        g0 = core.shape[1]
        if g0 <= 0 or self.g % g0:
            raise ValueError(f"init has group size {g0}, which does not divide group_size={self.g}")
        dev = self.w.device
        dt = self.w.dtype
        core = expand(core.detach().to(dev, dt), g0, self.g)
        p = first.detach().to(dev, dt).reshape(self.d, self.i)
        q = last.detach().to(dev, dt).reshape(self.o, self.d)
        return self._normalise(p, q, _core_to_blocks(core))

    # --- the iteration ------------------------------------------------------------------------------

    def _error(self, sq: float, p: Tensor, q: Tensor, x: Tensor) -> float:
        """The relative error from its Gram-form square ``sq``.

        The Gram form cancels for nearly exact fits (its rounding error is about 1e-16 of
        ``|W|^2``), so small errors are recomputed from the residual.
        """
        if sq < _GRAM_ERROR_MIN**2:
            return self.error(p, q, x)
        return math.sqrt(sq)

    def _objective(self, err: float, p: Tensor, q: Tensor, x: Tensor) -> tuple[float, float]:
        """``(sqrt(e (1 + mu k)), k)``: the penalised objective on the error's scale, and ``k``."""
        if not self.mu:
            return err, 0.0
        if self.o >= self.g and self.i >= self.g:
            # Every caller passes normalised factors: each block's own Grams are the identity,
            # so ||W_r||^2 = ||X_r||^2 (at 512 channels, g = 256: 1 ms instead of 80).
            k = float((x * x).sum() / self.norm_sq)
        else:
            k = _block_sq_norms(p, q, x, self.g) / float(self.norm_sq)
        return err * math.sqrt(1 + self.mu * k), k

    def _assess(
        self, p: Tensor, q: Tensor, x: Tensor, qtw: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, float, float, float]:
        """``(A, C, Q^T W, op(X), error, objective, k)`` of normalised factors (``qtw``: ``Q^T W`` where known)."""
        a, c = q.T @ q, p @ p.T
        qtw = self._qtw(q) if qtw is None else qtw
        sq, op_x = self._sq_error(p, x, a, c, qtw)
        err = self._error(sq, p, q, x)
        return a, c, qtw, op_x, err, *self._objective(err, p, q, x)

    def als(self, state: tuple[Tensor, Tensor, Tensor], tol: float, rtol: float, max_iter: int):
        """ALS steps from ``state``.

        Minimises ``F = e (1 + mu k)`` (``e``: squared relative error, ``k``: the blocks' squared
        norms over ``|W|^2``) by majorisation: every update solves the least-squares problem with
        the penalty ``lam * sum_r ||W_r||^2``, ``lam = mu e_t / (1 + mu k_t)`` at the step's
        start, and because ``log`` is concave, whatever lowers ``e + lam k`` lowers ``F``. The
        fixed points are those of ``F``; an exact fit has ``lam = 0``.

        Returns the last factors and the error after every kept step. ``F`` strictly decreases: a
        step that does not lower it (possible only through rounding or a truncated core solve) is dropped and ends the fit, so the result is never
        worse than the start. With ``mu = 0`` the errors themselves strictly decrease.
        """
        p, q, x = state
        # Grams of the current factors, Q^T W and the core operator's product, carried from step to step.
        a, c, qtw, op_x, err, obj, k = self._assess(p, q, x)
        if err < _FLOAT32_MIN_ERROR and self.w.dtype != torch.float64:
            p, q, x = self.promote(p, q, x)
            a, c, qtw, op_x, err, obj, k = self._assess(p, q, x)
        errors, objectives = [err], [obj]
        if err <= _EXACT:  # exact to rounding (e.g. the Tucker case): nothing left to fit
            return p, q, x, errors
        kept, kept_qtw = (p, q, x), qtw
        beta = _EXTRAP_INIT
        hand_over = False  # a float32 fit that would stop continues in float64, which decides
        for step in range(max_iter):
            if self.w.dtype != torch.float64 and (hand_over or err < _FLOAT32_MIN_ERROR):
                p, q, x = self.promote(*kept)
                a, c, qtw, op_x, err, obj, k = self._assess(p, q, x)
                kept, kept_qtw = (p, q, x), qtw
                errors[-1], objectives[-1] = err, obj
            lam = self.mu * err**2 / (1 + self.mu * k)
            x = self._core_step(a, c, self._core_rhs(p, qtw), x, lam, op_x)
            op_x = None
            q = self._last_step(p, x, c, lam)
            q, x = self._normalise_last(q, x)
            qtw, a = self._qtw(q), q.T @ q
            p, gram, rhs = self._first_step(x, a, qtw, lam)
            sq = (self.norm_sq - 2 * (p * rhs).sum() + (p * (gram @ p)).sum()) / self.norm_sq
            err = self._error(float(sq), p, q, x)
            p, x = self._normalise_first(p, x)  # Q is unchanged, so Q^T W and A stay valid
            c = p @ p.T
            obj, k = self._objective(err, p, q, x)
            if step > 0:
                # Extrapolate along the step's change ("line search" out of ALS swamps). Q^T W
                # is linear in Q, so the extrapolated point's is extrapolated too.
                moved = (new + beta * (new - old) for new, old in zip((p, q, x, qtw), (*kept, kept_qtw)))
                pe, qe, xe, qtw_e = self._normalise_with_qtw(*moved)
                a_e, c_e, qtw_e, op_e, err_e, obj_e, k_e = self._assess(pe, qe, xe, qtw_e)
                if obj_e < obj:
                    p, q, x, qtw, a, c, err, obj, k, op_x = pe, qe, xe, qtw_e, a_e, c_e, err_e, obj_e, k_e, op_e
                    beta = min(beta * 1.5, _EXTRAP_MAX)
                else:
                    beta = max(beta / 2, _EXTRAP_MIN)
            decrease = objectives[-1] - obj
            stop = decrease <= 0
            if not stop:
                kept, kept_qtw = (p, q, x), qtw
                errors.append(err)
                objectives.append(obj)
                # The relative clause only matters for (nearly) exact fits, which converge linearly
                # towards zero and would otherwise stop at an objective of about tol.
                stop = (decrease < tol and decrease < _MIN_RELATIVE_DECREASE * obj) or (
                    len(objectives) > _RTOL_WINDOW and objectives[-1 - _RTOL_WINDOW] - obj < rtol * obj
                )
            if stop:
                # float32's rounding of the objective (~1e-6 at errors of a few percent) can
                # mimic a stall, so the decision to stop is float64's.
                if self.w.dtype == torch.float64:
                    break
                hand_over = True
        return *kept, errors
