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

import geoopt
import torch

from quotientopt.linalg import compute_dtype

__all__ = ["ProjectedRank"]


def _truncated_svd(w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    u, s, vh = torch.linalg.svd(w.to(compute_dtype(w.dtype)), full_matrices=False)
    return u[..., :rank], s[..., :rank], vh[..., :rank, :].transpose(-1, -2)


class ProjectedRank(geoopt.manifolds.Manifold):
    """Dense matrices of rank at most ``rank`` with the embedded geometry (see the module)."""

    name = "ProjectedRank"
    ndim = 2
    reversible = False

    def __init__(self, rank: int) -> None:
        super().__init__()
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise ValueError(f"ProjectedRank: rank must be a positive int, got {rank!r}")
        self.rank = rank

    def extra_repr(self) -> str:
        return f"rank={self.rank}"

    def _check_shape(self, shape: tuple[int, ...], name: str) -> tuple[bool, str | None]:
        ok, reason = super()._check_shape(shape, name)
        if ok and self.rank > min(shape[-2], shape[-1]):
            return (
                False,
                f"`{name}` is {shape[-2]} x {shape[-1]}, smaller than rank {self.rank}; use rank <= min(n, m)",
            )
        return ok, reason

    def _check_point_on_manifold(
        self, x: torch.Tensor, *, atol: float = 1e-5, rtol: float = 1e-5
    ) -> tuple[bool, str | None]:
        if not bool(torch.isfinite(x).all()):
            return False, "the point holds NaN or Inf"
        s = torch.linalg.svdvals(x.to(compute_dtype(x.dtype)))
        tail = (
            s[..., self.rank :].amax(-1) if s.shape[-1] > self.rank else torch.zeros(s.shape[:-1])
        )
        if bool((tail > atol + rtol * s[..., 0]).any()):
            return False, f"rank exceeds {self.rank}"
        return True, None

    def _check_vector_on_tangent(
        self, x: torch.Tensor, u: torch.Tensor, *, atol: float = 1e-5, rtol: float = 1e-5
    ) -> tuple[bool, str | None]:
        if not torch.allclose(self.proju(x, u), u, atol=atol, rtol=rtol):
            return False, "the vector is not tangent to the rank manifold at x"
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

    def inner(
        self,
        x: torch.Tensor,
        u: torch.Tensor,
        v: torch.Tensor | None = None,
        *,
        keepdim: bool = False,
    ) -> torch.Tensor:
        """Euclidean (Frobenius) inner product, one value per matrix."""
        v = u if v is None else v
        return (u * v).sum((-1, -2), keepdim=keepdim)

    def component_inner(
        self, x: torch.Tensor, u: torch.Tensor, v: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.inner(x, u, v, keepdim=True)

    def norm(self, x: torch.Tensor, u: torch.Tensor, *, keepdim: bool = False) -> torch.Tensor:
        return self.inner(x, u, keepdim=keepdim).sqrt()

    def random(self, *size, dtype=None, device=None, **kwargs) -> torch.Tensor:
        """A product of two Gaussian factors, rank ``rank`` with probability 1."""
        shape = tuple(size[0]) if len(size) == 1 and isinstance(size[0], (tuple, list)) else size
        self._assert_check_shape(torch.Size(shape), "size")
        *batch, n, m = shape
        a = torch.randn(*batch, n, self.rank, dtype=dtype, device=device)
        b = torch.randn(*batch, m, self.rank, dtype=dtype, device=device)
        return a @ b.transpose(-1, -2) / self.rank
