"""Random points and group elements with controlled conditioning, for the property tests."""

from __future__ import annotations

import torch


def rng(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def orthogonal(batch: tuple[int, ...], k: int, gen: torch.Generator, dtype=torch.float64):
    """Haar-like random orthogonal k x k matrices (QR of a Gaussian with the sign fixed)."""
    q, r = torch.linalg.qr(torch.randn(*batch, k, k, generator=gen, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[..., None, :]).to(dtype)


def matrix_with_condition(
    batch: tuple[int, ...], rows: int, k: int, cond: float, gen: torch.Generator, dtype
) -> torch.Tensor:
    """A random rows x k matrix whose singular values are log-spaced in [1, cond]."""
    q, _ = torch.linalg.qr(torch.randn(*batch, rows, k, generator=gen, dtype=torch.float64))
    s = torch.logspace(0, torch.log10(torch.tensor(float(cond))).item(), k, dtype=torch.float64)
    o = orthogonal(batch, k, gen)
    return ((q * s) @ o).to(dtype)


def relative_error(x: torch.Tensor, y: torch.Tensor) -> float:
    """max over the batch of ||x - y|| / max(||y||, tiny), Frobenius norms over the last two dims."""
    num = torch.linalg.matrix_norm((x - y).double())
    den = torch.linalg.matrix_norm(y.double()).clamp_min(1e-300)
    return float((num / den).max())
