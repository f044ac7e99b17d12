"""Weight expansion ``Psi_{g->h}``: a grouped-conv weight rewritten at a larger group size.

A grouped convolution with ``D`` output channels and group size ``g`` has a weight of shape
``(D, g, kh, kw)``: output channel ``o`` reads the input channels ``[o // g * g, o // g * g + g)``.
The same convolution written with group size ``h`` (``g`` divides ``h``, ``h`` divides ``D``)
has a ``(D, h, kh, kw)`` weight in which channel ``o`` keeps its ``g`` weights at offset
``(o // g * g) % h`` of its row and zeros elsewhere. Both give identical outputs.
"""

from __future__ import annotations

import torch

__all__ = ["expand"]


def expand(weight: torch.Tensor, g: int, h: int) -> torch.Tensor:
    """Rewrite a grouped-conv weight of group size ``g`` at group size ``h``.

    Parameters
    ----------
    weight : Tensor, shape (D, g, kh, kw)
        Weight of a grouped convolution with ``D // g`` groups.
    g : int
        Group size of ``weight`` (must equal ``weight.shape[1]``).
    h : int
        Target group size; a multiple of ``g`` that divides ``D``.

    Returns
    -------
    Tensor, shape (D, h, kh, kw)
        Block-diagonal expansion; linear (and differentiable) in ``weight``.
    """
    if weight.dim() != 4:
        raise ValueError(f"expected a 4-d conv weight (D, g, kh, kw), got shape {tuple(weight.shape)}")
    d, g_in, kh, kw = weight.shape
    if g_in != g:
        raise ValueError(f"weight has group size {g_in} (its dim 1) but g={g} was given")
    if g <= 0 or h <= 0 or h % g or d % h:
        raise ValueError(f"cannot expand group size {g} to {h} with {d} channels: need g | h and h | D")
    if h == g:
        return weight
    # Row j of an h-group holds the g-group j // g, whose weights start at column (j // g) * g.
    rows = torch.arange(h, device=weight.device)
    onehot = (rows[:, None] // g == torch.arange(h // g, device=weight.device)).to(weight.dtype)
    blocks = weight.reshape(d // h, h, 1, g, kh, kw) * onehot.reshape(1, h, h // g, 1, 1, 1)
    return blocks.reshape(d, h, kh, kw)
