"""The temperature distribution over a layer's group sizes (METHOD.md section 4).

For ``N`` group sizes ``s_1 < ... < s_N`` the size ``s_i`` is drawn with probability
``exp(-alpha * i) / sum_j exp(-alpha * j)``: ``alpha = 0`` is uniform and a larger ``alpha``
trains the small group sizes (the cheap, hard-to-fit end of the space) more often.
"""

from __future__ import annotations

import torch

__all__ = ["group_size_probs", "sample_index"]


def group_size_probs(n: int, alpha: float) -> torch.Tensor:
    """Probabilities of the ``n`` group sizes of one layer, smallest first.

    Returns
    -------
    Tensor, shape (n,), float64, summing to one.
    """
    if n < 1:
        raise ValueError(f"a layer needs at least one group size, got n={n}")
    if not torch.isfinite(torch.tensor(float(alpha))):
        raise ValueError(f"alpha must be finite, got {alpha}")
    logits = -float(alpha) * torch.arange(1, n + 1, dtype=torch.float64)
    return torch.softmax(logits, dim=0)


def sample_index(n: int, alpha: float, generator: torch.Generator | None = None) -> int:
    """Draw the index (0-based, smallest size first) of one layer's group size."""
    return int(torch.multinomial(group_size_probs(n, alpha), 1, generator=generator))
