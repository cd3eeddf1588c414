"""Small checks and constructors shared by the factor-pair manifolds."""

from __future__ import annotations

import torch


def check_row_counts(owner: str, n: object, m: object, names: tuple[str, str] = ("A", "B")) -> None:
    """Raise a ``ValueError`` unless ``n`` and ``m`` (rows of the two factors) are positive ints."""
    for label, value, factor in (("n", n, names[0]), ("m", m, names[1])):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(
                f"{owner}: {label} must be a positive int (rows of factor {factor}), got {value!r}."
            )


def stack_factor_pair(owner: str, n: int, m: int, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``Z = [A; B]`` with broadcast batch dims, after checking ``A`` is ``(..., n, k)`` and ``B``
    is ``(..., m, k)``."""
    if (
        a.ndim < 2
        or b.ndim < 2
        or a.shape[-2] != n
        or b.shape[-2] != m
        or a.shape[-1] != b.shape[-1]
    ):
        raise ValueError(
            f"{owner}(n={n}, m={m}).from_factors: expected A of shape (..., {n}, k) and B of shape "
            f"(..., {m}, k), got {tuple(a.shape)} and {tuple(b.shape)}."
        )
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    return torch.cat((a.expand(*batch, *a.shape[-2:]), b.expand(*batch, *b.shape[-2:])), dim=-2)
