r"""Paper 002's invariant reparameterization: train the composite :math:`W = A B^\top` itself.

Points are dense matrices of rank at most ``rank``, shape ``(..., n, m)`` (heads batched). There
is no factorization, hence nothing to divide out: the parameterization is invariant by
construction. The geometry is the embedded one of the fixed-rank manifold (the Euclidean metric
restricted to its tangent spaces), with the truncated SVD as retraction — the "projection after
each step" of the scheme:

* tangent projection at :math:`W = U \Sigma V^\top`:
  :math:`P_W(\xi) = U U^\top \xi + \xi V V^\top - U U^\top \xi V V^\top`;
* retraction: :math:`R_W(\xi) = \mathrm{SVD}_k(W + \xi)`, the best rank-``k`` approximation.

Every step costs a batched SVD of the ``n x m`` composites, far more than the factored sectors'
``k x k`` algebra: this manifold is there to compare the schemes, not for speed.
"""

from __future__ import annotations

import torch

from quotientopt.linalg import compute_dtype
from quotientopt.manifolds._common import CheckResult, EuclideanMetric

__all__ = ["ProjectedRank"]


def _truncated_svd(w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    u, s, vh = torch.linalg.svd(w.to(compute_dtype(w.dtype)), full_matrices=False)
    return u[..., :rank], s[..., :rank], vh[..., :rank, :].transpose(-1, -2)


class ProjectedRank(EuclideanMetric):
    """Dense matrices of rank at most ``rank`` with the embedded geometry (see the module): the
    inherited Euclidean (Frobenius) ``inner``, one value per matrix."""

    name = "ProjectedRank"
    reversible = False
    _tangent_space = "tangent to the rank manifold at x"

    def __init__(self, rank: int) -> None:
        super().__init__()
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise ValueError(f"ProjectedRank: rank must be a positive int, got {rank!r}")
        self.rank = rank

    def extra_repr(self) -> str:
        return f"rank={self.rank}"

    def _check_shape(self, shape: tuple[int, ...], name: str) -> CheckResult:
        ok, reason = super()._check_shape(shape, name)
        if ok and self.rank > min(shape[-2], shape[-1]):
            return (
                False,
                f"`{name}` is {shape[-2]} x {shape[-1]}, smaller than rank {self.rank}; use rank <= min(n, m)",
            )
        return ok, reason

    def _check_finite_point(self, x: torch.Tensor, *, atol: float, rtol: float) -> CheckResult:
        s = torch.linalg.svdvals(x.to(compute_dtype(x.dtype)))
        tail = (
            s[..., self.rank :].amax(-1) if s.shape[-1] > self.rank else torch.zeros(s.shape[:-1])
        )
        if bool((tail > atol + rtol * s[..., 0]).any()):
            return False, f"rank exceeds {self.rank}"
        return True, None

    def proju(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        r""":math:`U U^\top \xi + \xi V V^\top - U U^\top \xi V V^\top` for :math:`x = U \Sigma V^\top`."""
        left, _, right = _truncated_svd(x, self.rank)
        u_c = u.to(left.dtype)
        left_part = left @ (left.transpose(-1, -2) @ u_c)
        return (left_part + (u_c - left_part) @ right @ right.transpose(-1, -2)).to(u.dtype)

    egrad2rgrad = proju

    def projx(self, x: torch.Tensor) -> torch.Tensor:
        """The best rank-``rank`` approximation (truncated SVD)."""
        left, s, right = _truncated_svd(x, self.rank)
        return ((left * s[..., None, :]) @ right.transpose(-1, -2)).to(x.dtype)

    def retr(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        r""":math:`\mathrm{SVD}_k(x + u)`: the truncated-SVD projection after the step."""
        return self.projx(x + u)

    def expmap(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Documented fallback to :meth:`retr` (a second-order retraction of the fixed-rank manifold)."""
        return self.retr(x, u)

    def transp(self, x: torch.Tensor, y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Transport by projection onto the tangent space at ``y``."""
        return self.proju(y, v)

    def random(self, *size, dtype=None, device=None, **kwargs) -> torch.Tensor:
        """A product of two Gaussian factors, rank ``rank`` with probability 1."""
        shape = self._sample_shape(size, "random")
        *batch, n, m = shape
        a = torch.randn(*batch, n, self.rank, dtype=dtype, device=device)
        b = torch.randn(*batch, m, self.rank, dtype=dtype, device=device)
        return a @ b.transpose(-1, -2) / self.rank
