r"""Conserved quantities and symmetry diagnostics of attention sectors, batched over heads.

All functions take factor pairs ``a`` (groups, n, k), ``b`` (groups, m, k) (see
:mod:`quotientopt.symmetry.sectors`) and work in float64 whatever the parameter dtype: these are
measurements, not training arithmetic.

* :func:`charge`: the Noether charge :math:`C = A^\top A - B^\top B` of Euclidean gradient flow.
* :func:`momentum_map`: :math:`J = A^\top p_A - p_B^\top B` for a Euclidean momentum ``p`` (torch
  SGD's buffer, Adam's first moment); :func:`velocity_momentum_map` the same pairing for a
  velocity of the preconditioned metric (quotientopt's optimizers): :math:`A^\top v_A P - Q v_B^\top B`.
  Both vanish exactly when the motion is horizontal in their metric.
* :func:`vertical_fraction`: the share of an update :math:`\xi` that moved along the orbit,
  :math:`\|\xi_v\|^2 / \|\xi\|^2`, in the Euclidean metric (``xi_v`` the Euclidean-orthogonal
  projection onto the vertical space, a Sylvester solve) or in the preconditioned metric (the
  complement of :meth:`FactorQuotient.proju`). The vertical space is canonical, its complement is
  not: the two numbers differ, and each says which metric it used.
* :func:`conditioning`: condition numbers and effective ranks of the products and Grams.
"""

from __future__ import annotations

import torch

from quotientopt.linalg import gram, solve_sylvester_sym, sym
from quotientopt.manifolds import FactorQuotient

__all__ = [
    "charge",
    "conditioning",
    "effective_rank",
    "momentum_map",
    "velocity_momentum_map",
    "vertical_fraction",
]


def _f64(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.detach().double() for t in tensors]


def charge(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    r""":math:`C = A^\top A - B^\top B`, shape (groups, k, k)."""
    a, b = _f64(a, b)
    return gram(a) - gram(b)


def momentum_map(
    a: torch.Tensor, b: torch.Tensor, p_a: torch.Tensor, p_b: torch.Tensor
) -> torch.Tensor:
    r""":math:`J = A^\top p_A - p_B^\top B` (groups, k, k) of a Euclidean momentum; for SGD with
    momentum :math:`\mathrm{skew}(J)` obeys :math:`\mathrm{skew}(J') = \beta\, \mathrm{skew}(J)`."""
    a, b, p_a, p_b = _f64(a, b, p_a, p_b)
    return a.mT @ p_a - p_b.mT @ b


def velocity_momentum_map(
    a: torch.Tensor, b: torch.Tensor, v_a: torch.Tensor, v_b: torch.Tensor
) -> torch.Tensor:
    r""":math:`A^\top v_A P - Q v_B^\top B`: the metric pairing of a velocity of the preconditioned
    metric with the orbit directions (zero exactly for horizontal velocities)."""
    a, b, v_a, v_b = _f64(a, b, v_a, v_b)
    return a.mT @ v_a @ gram(b) - gram(a) @ v_b.mT @ b


def vertical_fraction(
    a: torch.Tensor,
    b: torch.Tensor,
    d_a: torch.Tensor,
    d_b: torch.Tensor,
    metric: str = "euclidean",
) -> torch.Tensor:
    r"""Share of the update ``(d_a, d_b)`` along the orbit, per group, in ``[0, 1]``.

    ``metric="euclidean"``: :math:`\xi_v = (A W, -B W^\top)` with :math:`Q W + W P = A^\top \xi_A
    - \xi_B^\top B` (the least-squares vertical part); ``"preconditioned"``: :math:`\xi_v = \xi -
    \mathrm{proj}^h(\xi)` and norms of the preconditioned metric. Groups with a zero update give 0.
    """
    a, b, d_a, d_b = _f64(a, b, d_a, d_b)
    if metric == "euclidean":
        rhs = a.mT @ d_a - d_b.mT @ b
        w = solve_sylvester_sym(gram(a), gram(b), rhs)
        vertical = (a @ w).pow(2).sum((-1, -2)) + (b @ w.mT).pow(2).sum((-1, -2))
        total = d_a.pow(2).sum((-1, -2)) + d_b.pow(2).sum((-1, -2))
    elif metric == "preconditioned":
        manifold = FactorQuotient(a.shape[-2], b.shape[-2], check=False)
        z, xi = torch.cat((a, b), dim=-2), torch.cat((d_a, d_b), dim=-2)
        grams = manifold.grams(z)
        v = xi - manifold.proju(z, xi, grams=grams)
        vertical, total = manifold.inner(z, v, grams=grams), manifold.inner(z, xi, grams=grams)
    else:
        raise ValueError(f"unknown metric {metric!r}; use 'euclidean' or 'preconditioned'")
    return torch.where(total > 0, vertical / total.clamp_min(1e-300), torch.zeros_like(total))


def effective_rank(singular_values: torch.Tensor) -> torch.Tensor:
    r"""Roy and Vetterli's effective rank :math:`\exp(-\sum_i p_i \log p_i)`, :math:`p = s / \sum s`."""
    p = singular_values / singular_values.sum(-1, keepdim=True).clamp_min(1e-300)
    return torch.exp(-(p * torch.log(p.clamp_min(1e-300))).sum(-1))


def conditioning(a: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per group: condition numbers of the product ``A B^T`` (on its rank-k part) and of the two
    Grams, and the effective rank of the product; NaN for a group whose factors hold NaN/Inf."""
    a, b = _f64(a, b)
    finite = torch.isfinite(a).flatten(-2).all(-1) & torch.isfinite(b).flatten(-2).all(-1)
    a = torch.where(finite[..., None, None], a, torch.eye(*a.shape[-2:], dtype=a.dtype))
    b = torch.where(finite[..., None, None], b, torch.eye(*b.shape[-2:], dtype=b.dtype))
    q, p = sym(gram(a)), sym(gram(b))
    eig_a, eig_b = torch.linalg.eigvalsh(q), torch.linalg.eigvalsh(p)
    # squared singular values of A B^T: the eigenvalues of L^T P L with Q = L L^T (k x k work only)
    chol, _ = torch.linalg.cholesky_ex(q)
    s = torch.linalg.eigvalsh(sym(chol.mT @ p @ chol)).clamp_min(0).sqrt().flip(-1)
    values = {
        "cond_product": s[..., 0] / s[..., -1].clamp_min(1e-300),
        "effective_rank": effective_rank(s),
        "cond_gram_a": eig_a[..., -1] / eig_a[..., 0].clamp_min(1e-300),
        "cond_gram_b": eig_b[..., -1] / eig_b[..., 0].clamp_min(1e-300),
    }
    return {name: torch.where(finite, v, torch.nan) for name, v in values.items()}
