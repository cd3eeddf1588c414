r"""Paper 003's rival idea: break the head symmetry with unlearned biases (arXiv 2601.22257).

As its public code does: a query bias :math:`b_Q` drawn per component from
:math:`\mathcal{N}(0.5, \sigma_i)` with :math:`\sigma = \mathrm{linspace}(0.05, 0.15, d_h)`, one
vector per layer shared by all its heads, and a value bias :math:`b_V \sim \mathcal{N}(0.5, 0.05)`,
added after the q and v projections; the key bias cancels in the softmax and is omitted. The
biases are resampled at every training forward pass and fixed at their means for evaluation.
"""

from __future__ import annotations

import torch
from torch import nn


class SymmetryBreakingBiases(nn.Module):
    """Samples ``(b_Q, b_V)``, each of shape ``(head_dim,)``, per forward pass."""

    def __init__(
        self,
        head_dim: int,
        mean: float = 0.5,
        query_std: tuple[float, float] = (0.05, 0.15),
        value_std: float = 0.05,
    ) -> None:
        super().__init__()
        self.mean, self.value_std = mean, value_std
        self.register_buffer(
            "query_std", torch.linspace(query_std[0], query_std[1], head_dim), persistent=False
        )

    def forward(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        std = self.query_std.to(device=like.device, dtype=like.dtype)
        mean = torch.full_like(std, self.mean)
        if not self.training:
            return mean, mean
        b_q = mean + std * torch.randn_like(std)
        b_v = mean + self.value_std * torch.randn_like(std)
        return b_q, b_v
