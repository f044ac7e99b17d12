"""The GroSS series layer: every group size of one convolution in one set of weights.

A convolution ``W`` of shape ``(C_out, C_in, kh, kw)`` is decomposed at group sizes
``s_1 < ... < s_N`` into bottlenecks ``(P_i, R_i, Q_i)`` (see :mod:`gross.btd`). The layer stores
the first bottleneck and then only differences (METHOD.md section 3)::

    p_1 = P_1,  r_1 = R_1,  q_1 = Q_1
    p_i = P_i - P_{i-1},  r_i = R_i - expand(R_{i-1}, s_{i-1}, s_i),  q_i = Q_i - Q_{i-1}

and at the active group size ``s_k`` runs the real bottleneck ``P = sum p_i``,
``R = sum expand(r_i, s_i, s_k)``, ``Q = sum q_i`` (``i <= k``) with ``D / s_k`` groups, so a
small group size costs what the small network costs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from .btd import BTD, align, btd
from .expand import expand

__all__ = ["GroSSConv2d", "default_group_sizes"]


def default_group_sizes(width: int) -> tuple[int, ...]:
    """Every power of two that divides ``width``, smallest first, then ``width`` itself.

    ``width`` (one group: the full-rank Tucker member, what the layer could at most keep) is
    added when it is no power of two only if some power above 1 divides it, so that a 3-channel
    input conv keeps its single choice and stays out of the search.
    """
    sizes = []
    s = 1
    while width % s == 0 and s <= width:
        sizes.append(s)
        s *= 2
    if len(sizes) > 1 and sizes[-1] != width:
        sizes.append(width)
    return tuple(sizes)


def fit_series(
    weight: Tensor,
    group_sizes: Sequence[int],
    width: int,
    nested: bool = False,
    progress: Callable[[int], None] | None = None,
    **btd_options,
) -> list[BTD]:
    """One :func:`gross.btd` fit of ``weight (C_out, C_in, kh, kw)`` per group size, in the given order.

    ``nested``: each fit warm-started from the previous one (see :meth:`GroSSConv2d.from_conv`).
    ``progress(group_size)`` is called before each fit.
    """
    fits: list[BTD] = []
    for s in group_sizes:
        if progress is not None:
            progress(s)
        fits.append(btd(weight, s, width=width, init=fits[-1] if nested and fits else None, **btd_options))
    return fits


class GroSSConv2d(nn.Module):
    """A convolution stored as a series of grouped-conv bottlenecks, one per group size.

    Arguments follow :class:`torch.nn.Conv2d`; ``stride``, ``padding``, ``dilation`` and
    ``padding_mode`` act on the grouped conv, the bias on the last pointwise conv.

    Parameters
    ----------
    in_channels, out_channels : int
        ``C_in`` and ``C_out``.
    kernel_size, stride, padding, dilation, bias, padding_mode
        As in :class:`torch.nn.Conv2d` (``groups`` is always 1 for the original conv).
    group_sizes : sequence of int, optional
        Candidate group sizes; each must divide ``width``. Default: :func:`default_group_sizes`
        (the powers of two dividing ``width``, and ``width``).
    width : int, optional
        Bottleneck width ``D``; default ``in_channels``.

    Attributes
    ----------
    first : ParameterList of (D, C_in, 1, 1)
        Difference terms ``p_i`` of the first pointwise conv.
    core : ParameterList of (D, s_i, kh, kw)
        Difference terms ``r_i`` of the grouped conv, each at its own group size.
    last : ParameterList of (C_out, D, 1, 1)
        Difference terms ``q_i`` of the last pointwise conv.
    bias : Parameter of (C_out,) or None
    group_size : int
        The active group size; setting it to a size not in ``group_sizes`` raises ValueError.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        group_sizes: Sequence[int] | None = None,
        width: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        width = in_channels if width is None else int(width)
        if in_channels < 1 or out_channels < 1 or width < 1:
            raise ValueError(
                f"channels must be positive, got in={in_channels}, out={out_channels}, width={width}"
            )
        sizes = default_group_sizes(width) if group_sizes is None else tuple(sorted(set(int(s) for s in group_sizes)))
        bad = [s for s in sizes if s < 1 or width % s]
        if not sizes or bad:
            raise ValueError(f"group sizes must be positive divisors of the width {width}, got {list(sizes)}")
        if padding_mode not in ("zeros", "reflect", "replicate", "circular"):
            raise ValueError(f"unknown padding_mode {padding_mode!r}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.padding = padding if isinstance(padding, str) else _pair(padding)
        self.dilation = _pair(dilation)
        self.padding_mode = padding_mode
        self.width = width
        self.group_sizes = sizes
        kh, kw = self.kernel_size
        factory = {"device": device, "dtype": dtype}
        self.first = nn.ParameterList(
            [nn.Parameter(torch.zeros(width, in_channels, 1, 1, **factory)) for _ in sizes]
        )
        self.core = nn.ParameterList([nn.Parameter(torch.zeros(width, s, kh, kw, **factory)) for s in sizes])
        self.last = nn.ParameterList(
            [nn.Parameter(torch.zeros(out_channels, width, 1, 1, **factory)) for _ in sizes]
        )
        self.bias = nn.Parameter(torch.zeros(out_channels, **factory)) if bias else None
        self._group_size = sizes[-1]

    @classmethod
    def from_conv(
        cls,
        conv: nn.Conv2d,
        group_sizes: Sequence[int] | None = None,
        nested: bool = False,
        width: int | None = None,
        progress: Callable[[int], None] | None = None,
        fits: Sequence[BTD] | None = None,
        **btd_options,
    ) -> GroSSConv2d:
        """Decompose a trained ``nn.Conv2d`` at every group size and store the series.

        Parameters
        ----------
        conv : nn.Conv2d
            A convolution with ``groups == 1``.
        group_sizes : sequence of int, optional
            Default: :func:`default_group_sizes` of the width.
        nested : bool
            Fit each size warm-started from the previous (expanded) one, so each difference
            term only adds what the smaller sizes missed. ``False`` (the default, as the paper)
            decomposes every size independently; the nested series was not better after
            training (README, "Conditioning and learning rates").
        width : int, optional
            Bottleneck width ``D``; default ``conv.in_channels``.
        progress : callable(group_size), optional
            Called before each group size is fitted.
        fits : sequence of BTD, optional
            Decompositions of ``conv.weight`` made elsewhere, one per group size, smallest first
            (:func:`gross.decompose` with ``workers`` makes them in other processes); nothing is
            fitted here then.
        **btd_options
            Passed to :func:`gross.btd` (``tol``, ``max_iter``, ``seed``, ...).
        """
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"expected nn.Conv2d, got {type(conv).__name__}")
        if conv.groups != 1:
            raise ValueError(f"only convolutions with groups=1 can be decomposed, got groups={conv.groups}")
        if "init" in btd_options:
            raise ValueError("init is chosen by the series (nested or not); do not pass it")
        weight = conv.weight.detach()
        layer = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
            group_sizes=group_sizes,
            width=width,
            device=weight.device,
            dtype=weight.dtype,
        )
        if fits is None:
            fits = fit_series(weight, layer.group_sizes, layer.width, nested, progress, **btd_options)
        layer.load_decompositions(fits)
        if conv.bias is not None:
            with torch.no_grad():
                layer.bias.copy_(conv.bias.detach())
        return layer

    def load_decompositions(self, fits: Sequence[BTD]) -> None:
        """Set the difference terms from one decomposition per group size (smallest first).

        Each fit is first rotated block by block towards the previous one (:func:`gross.btd.align`):
        its weight is unchanged, but the difference terms no longer hold the arbitrary change of
        basis inside each block that two separate fits differ by.
        """
        if len(fits) != len(self.group_sizes):
            raise ValueError(f"need {len(self.group_sizes)} decompositions, got {len(fits)}")
        prev: BTD | None = None
        prev_size = 0
        with torch.no_grad():
            for i, (s, fit) in enumerate(zip(self.group_sizes, fits)):
                if tuple(fit.core.shape) != tuple(self.core[i].shape):
                    raise ValueError(
                        f"decomposition {i} has core shape {tuple(fit.core.shape)}, "
                        f"expected {tuple(self.core[i].shape)} for group size {s}"
                    )
                if prev is None:
                    p, r, q = fit.first, fit.core, fit.last
                else:
                    fit = align(fit, prev)
                    p = fit.first - prev.first
                    r = fit.core - expand(prev.core, prev_size, s)
                    q = fit.last - prev.last
                self.first[i].copy_(p)
                self.core[i].copy_(r)
                self.last[i].copy_(q)
                prev, prev_size = fit, s

    @property
    def group_size(self) -> int:
        return self._group_size

    @group_size.setter
    def group_size(self, size: int) -> None:
        if size not in self.group_sizes:
            raise ValueError(f"group size {size} is not one of this layer's sizes {list(self.group_sizes)}")
        self._group_size = int(size)

    def factors(self, group_size: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """The bottleneck ``(P, R, Q)`` at a group size (default: the active one).

        Returns
        -------
        P : Tensor, shape (D, C_in, 1, 1)
        R : Tensor, shape (D, s_k, kh, kw)
        Q : Tensor, shape (C_out, D, 1, 1)
        """
        s = self._group_size if group_size is None else group_size
        if s not in self.group_sizes:
            raise ValueError(f"group size {s} is not one of this layer's sizes {list(self.group_sizes)}")
        k = self.group_sizes.index(s) + 1
        first = self.first[0]
        last = self.last[0]
        core = expand(self.core[0], self.group_sizes[0], s)
        for i in range(1, k):
            first = first + self.first[i]
            last = last + self.last[i]
            core = core + expand(self.core[i], self.group_sizes[i], s)
        return first, core, last

    def decomposition(self, group_size: int | None = None) -> BTD:
        """The bottleneck at a group size as a :class:`gross.BTD` (detached; no error history).

        ``gross.conditioning(layer.decomposition(s))`` is its ``kappa``.
        """
        return BTD(*(t.detach() for t in self.factors(group_size)), [])

    def forward(self, x: Tensor) -> Tensor:
        first, core, last = self.factors()
        y = F.conv2d(x, first)
        if self.padding_mode != "zeros":
            y = F.pad(y, self._reversed_padding(), mode=self.padding_mode)
            y = F.conv2d(y, core, None, self.stride, 0, self.dilation, self.width // self._group_size)
        else:
            y = F.conv2d(y, core, None, self.stride, self.padding, self.dilation, self.width // self._group_size)
        return F.conv2d(y, last, self.bias)

    def _reversed_padding(self) -> list[int]:
        if isinstance(self.padding, str):
            raise ValueError("string padding is only supported with padding_mode='zeros'")
        ph, pw = self.padding
        return [pw, pw, ph, ph]

    def bottleneck(self, group_size: int | None = None) -> nn.Sequential:
        """The bottleneck at a group size as three standard ``nn.Conv2d`` (detached copies)."""
        s = self._group_size if group_size is None else group_size
        first, core, last = (t.detach().clone() for t in self.factors(s))
        factory = {"device": core.device, "dtype": core.dtype}
        p = nn.Conv2d(self.in_channels, self.width, 1, bias=False, **factory)
        r = self._spatial_conv(self.width, self.width, self.width // s, bias=False, **factory)
        q = nn.Conv2d(self.width, self.out_channels, 1, bias=self.bias is not None, **factory)
        with torch.no_grad():
            p.weight.copy_(first)
            r.weight.copy_(core)
            q.weight.copy_(last)
            if self.bias is not None:
                q.bias.copy_(self.bias.detach())
        return nn.Sequential(p, r, q)

    def dense_conv(self, group_size: int | None = None) -> nn.Conv2d:
        """The single ``nn.Conv2d`` equal to the bottleneck at a group size (a detached copy).

        Its weight, of shape ``(C_out, C_in, kh, kw)``, is :meth:`dense_weight`.
        """
        with torch.no_grad():
            weight = self.dense_weight(group_size).detach()
            conv = self._spatial_conv(
                self.in_channels, self.out_channels, 1, bias=self.bias is not None, device=weight.device, dtype=weight.dtype
            )
            conv.weight.copy_(weight)
            if self.bias is not None:
                conv.bias.copy_(self.bias.detach())
        return conv

    def _spatial_conv(self, in_channels: int, out_channels: int, groups: int, **kwargs) -> nn.Conv2d:
        """An ``nn.Conv2d`` with this layer's kernel, stride, padding, dilation and padding mode."""
        return nn.Conv2d(
            in_channels,
            out_channels,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=groups,
            padding_mode=self.padding_mode,
            **kwargs,
        )

    def dense_weight(self, group_size: int | None = None) -> Tensor:
        """The single conv weight ``Q . blockdiag(R) . P`` that the bottleneck equals.

        Returns
        -------
        Tensor, shape (C_out, C_in, kh, kw)
        """
        s = self._group_size if group_size is None else group_size
        first, core, last = self.factors(s)
        full = expand(core, s, self.width)
        return torch.einsum("od,dekl,ei->oikl", last[:, :, 0, 0], full, first[:, :, 0, 0])

    def __repr__(self) -> str:
        # The parameter lists would print one line per difference term; the sizes say it all.
        return f"{type(self).__name__}({self.extra_repr()})"

    def extra_repr(self) -> str:
        text = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        if self.padding != (0, 0):
            text += f", padding={self.padding}"
        if self.dilation != (1, 1):
            text += f", dilation={self.dilation}"
        if self.bias is None:
            text += ", bias=False"
        if self.padding_mode != "zeros":
            text += f", padding_mode={self.padding_mode}"
        return text + f", width={self.width}, group_sizes={self.group_sizes}, group_size={self._group_size}"
