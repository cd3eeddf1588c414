r"""The O(k) quotient of factor pairs: :math:`(A, B) \sim (A O, B O)`, :math:`O \in O(k)`.

This is the QK sector under QK-norm: normalizing queries and keys leaves only rotations of the
head space as a symmetry (a general :math:`G \in GL(k)` would change the norms), so the product
:math:`W = A B^\top` is invariant under the smaller group :math:`O(k)` acting on both factors
alike.

Shape convention: a point is one tensor :math:`Z = [A; B]` stacked along rows, shape
``(..., n + m, k)``, ``A = Z[..., :n, :]``, ``B = Z[..., n:, :]``; leading dims batch heads and
layers. The action is :math:`Z \mapsto Z O`, free on the open set of :math:`Z` with full column rank
(:math:`M = Z^\top Z = A^\top A + B^\top B` positive definite), so ``k <= n + m``.

Geometry. The metric is Euclidean, :math:`\langle \xi, \eta \rangle = \mathrm{tr}(\xi^\top \eta)`,
which is :math:`O(k)`-invariant. The vertical space (tangent to the orbit) is
:math:`\{Z \Omega : \Omega^\top = -\Omega\}`, and the horizontal space, its Euclidean orthogonal
complement, is :math:`\{\xi : Z^\top \xi \text{ symmetric}\}`. The total space is flat, so
:math:`t \mapsto Z + t\xi` is a geodesic, and a geodesic that starts horizontal stays horizontal
(:math:`Z^\top \xi` stays symmetric and :math:`\xi^\top \xi` is symmetric): it projects to a
geodesic of the quotient, so ``expmap`` is exact, not a fallback.

Deprecated: this class implements none of the head-geometry protocol
(:mod:`quotientopt.manifolds.protocol`), so QuotientSGD and QuotientAdam could only step it on
geoopt's generic path and QuotientMuon, QuotientHamiltonian and QuotientECD refuse it. The same
group, :math:`O(k)` acting as :math:`(A O, B O) = (A G, B G^{-\top})`, is
``SubgroupFactorQuotient(n, m, orthogonal_generators(k))``, which every quotient optimizer steps;
the sector geometry ``"orthogonal"`` of :class:`~quotientopt.nn.QuotientMultiheadAttention` is
that. Constructing this class warns (``DeprecationWarning``); it still works as before.
"""

from __future__ import annotations

import warnings

import torch

from quotientopt.linalg import compute_dtype, gram, skew, solve_sylvester_sym
from quotientopt.manifolds._common import (
    CheckResult,
    EuclideanMetric,
    check_row_counts,
    check_stacked_rows,
    stack_factor_pair,
)

__all__ = ["OrthogonalFactorQuotient"]


class OrthogonalFactorQuotient(EuclideanMetric):
    r"""Factor pairs :math:`Z = [A; B]` modulo :math:`(A, B) \mapsto (A O, B O)`, :math:`O \in O(k)`.

    Parameters
    ----------
    n, m : int
        Rows of :math:`A` and of :math:`B`; a point has shape ``(..., n + m, k)`` with
        ``k <= n + m``.

    Notes
    -----
    ``egrad2rgrad`` returns the Euclidean gradient unchanged: for an :math:`O(k)`-invariant loss
    it is already horizontal (:math:`Z^\top \nabla f` is symmetric), and equivariant,
    :math:`\nabla f(ZO) = \nabla f(Z)\, O`. For a loss that is not invariant it is the total-space
    gradient; ``proju`` of it is the gradient on the quotient. ``projx`` is the identity: the total
    space is an open set (full column rank). The metric is the inherited Euclidean ``inner``,
    :math:`\mathrm{tr}(\xi^\top \eta)`: one :math:`O(k)`-invariant value per point.
    """

    name = "OrthogonalFactorQuotient"
    reversible = False
    _nonfinite_point_hint = "re-initialize it (e.g. with random())"
    _tangent_space = "horizontal (Z^T u symmetric)"

    def __init__(self, n: int, m: int) -> None:
        warnings.warn(
            "OrthogonalFactorQuotient is deprecated: it implements none of the head-geometry "
            "protocol (QuotientSGD and QuotientAdam step it on geoopt's generic path, QuotientMuon, "
            "QuotientHamiltonian and QuotientECD refuse it); use "
            "SubgroupFactorQuotient(n, m, orthogonal_generators(k)) from "
            "quotientopt.manifolds.subgroup_quotient, the same group O(k), which every quotient "
            "optimizer steps",
            DeprecationWarning,
            stacklevel=2,
        )
        super().__init__()
        check_row_counts("OrthogonalFactorQuotient", n, m)
        self.n, self.m = n, m

    def extra_repr(self) -> str:
        return f"n={self.n}, m={self.m}"

    # ----------------------------------------------------------------------------- factors
    def factors(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r"""Views :math:`A = Z_{:n}` (``(..., n, k)``) and :math:`B = Z_{n:}` (``(..., m, k)``)."""
        return z[..., : self.n, :], z[..., self.n :, :]

    def from_factors(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        r"""Stack :math:`Z = [A; B]`, shape ``(..., n + m, k)``; checks the shapes and broadcasts
        the leading dims."""
        return stack_factor_pair("OrthogonalFactorQuotient", self.n, self.m, a, b)

    def product(self, z: torch.Tensor) -> torch.Tensor:
        r"""The invariant composite :math:`W = A B^\top`, shape ``(..., n, m)``."""
        a, b = self.factors(z)
        return a @ b.transpose(-1, -2)

    def vertical(self, z: torch.Tensor, omega: torch.Tensor) -> torch.Tensor:
        r"""The orbit direction :math:`Z \Omega_s = (A \Omega_s, B \Omega_s)` with
        :math:`\Omega_s = \tfrac12 (\Omega - \Omega^\top)` the skew part of the ``k x k``
        generator ``omega`` (broadcast over the leading dims): :math:`\frac{d}{dt} Z e^{t\Omega_s}`
        at :math:`t = 0`. It changes :math:`A B^\top` by exactly zero to first order."""
        return z @ skew(omega).to(z.dtype)

    # ---------------------------------------------------------------------- the geometry
    def _vertical_generator(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        r"""The skew :math:`\Omega` solving :math:`M \Omega + \Omega M = Z^\top \xi - \xi^\top Z`,
        in :func:`compute_dtype`."""
        dtype = compute_dtype(x.dtype)
        xc, uc = x.to(dtype), u.to(dtype)
        ztu = xc.transpose(-1, -2) @ uc
        m = gram(xc)
        return solve_sylvester_sym(m, m, ztu - ztu.transpose(-1, -2))

    def proju(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        r"""Horizontal projection :math:`\xi \mapsto \xi - Z \Omega`, shape ``(..., n + m, k)``.

        :math:`\Omega` is the skew solution of the Lyapunov equation

        .. math:: M \Omega + \Omega M = Z^\top \xi - \xi^\top Z, \qquad M = Z^\top Z,

        which is the condition that :math:`Z^\top (\xi - Z \Omega)` be symmetric, i.e. that
        :math:`\xi - Z\Omega` be Euclidean-orthogonal to every vertical :math:`Z \Omega'`. Unique
        for SPD :math:`M` (solved by :func:`quotientopt.linalg.solve_sylvester_sym` in float32 or
        better). Idempotent, equivariant, and it leaves
        :math:`d(A B^\top) = \xi_A B^\top + A \xi_B^\top` unchanged.
        """
        omega = self._vertical_generator(x, u)
        return u - (x.to(omega.dtype) @ omega).to(u.dtype)

    def horizontal_part(self, z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Alias of :meth:`proju`: the horizontal component of ``u`` at ``z``."""
        return self.proju(z, u)

    def egrad2rgrad(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        r"""The Euclidean gradient itself (Euclidean metric), not projected.

        For an :math:`O(k)`-invariant loss :math:`f(ZO) = f(Z)`,
        :math:`\frac{d}{dt} f(Z e^{t\Omega})|_0 = \mathrm{tr}(\nabla f^\top Z \Omega) = 0` for every
        skew :math:`\Omega`, so :math:`Z^\top \nabla f` is symmetric: the gradient is horizontal
        already. Apply :meth:`proju` yourself for a loss that is not invariant."""
        return u

    def projx(self, x: torch.Tensor) -> torch.Tensor:
        """Identity: full-column-rank points form an open set of the total space."""
        return x

    def retr(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        r""":math:`R_Z(\xi) = Z + \xi`; equivariant (:math:`R_{ZO}(\xi O) = R_Z(\xi) O`). Valid
        while :math:`Z + \xi` keeps full column rank."""
        return x + u

    def expmap(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        r""":math:`\mathrm{Exp}_Z(\xi) = Z + \xi`: the exact geodesic of the flat total space, and
        for horizontal :math:`\xi` it stays horizontal (:math:`(Z + t\xi)^\top \xi =
        Z^\top \xi + t\, \xi^\top \xi` is symmetric), so it is the quotient geodesic as long as
        :math:`Z + t\xi` keeps full rank and stays minimizing."""
        return x + u

    def logmap(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        r"""Total-space logarithm :math:`Y - Z` (the inverse of :meth:`expmap` for the given
        representatives; not aligned over the orbit of :math:`Y`)."""
        return y - x

    def transp(self, x: torch.Tensor, y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        r"""Vector transport by projection onto the horizontal space at :math:`Y`."""
        return self.proju(y, v)

    # retr_transp and expmap_transp: geoopt's defaults (retr or expmap, then transp)

    # --------------------------------------------------------------------- checks, samples
    def _check_shape(self, shape: tuple[int, ...], name: str) -> CheckResult:
        ok, reason = super()._check_shape(shape, name)
        if not ok:
            return (
                False,
                f"{reason}; a point has shape (..., n + m, k) = (..., {self.n + self.m}, k)",
            )
        ok, reason = check_stacked_rows("OrthogonalFactorQuotient", self.n, self.m, shape, name)
        if not ok:
            return ok, reason
        rows, k = shape[-2], shape[-1]
        if k < 1 or k > rows:
            return False, (
                f"`{name}` has k = {k} columns; need 1 <= k <= n + m = {rows} so that Z = [A; B] "
                "can have full column rank (the O(k) action is free only there)."
            )
        return True, None

    def _check_finite_point(self, x: torch.Tensor, *, atol: float, rtol: float) -> CheckResult:
        rank = torch.linalg.matrix_rank(x.to(compute_dtype(x.dtype)))
        k = x.shape[-1]
        if bool((rank < k).any()):
            bad = int((rank < k).sum())
            return False, (
                f"Z = [A; B] is column-rank-deficient (rank < k = {k}, M = Z^T Z singular) in "
                f"{bad} of {rank.numel()} batch entries; the O(k) action is not free there. "
                "Perturb or re-initialize those heads."
            )
        return True, None

    def random(self, *size, dtype=None, device=None, **kwargs) -> torch.Tensor:
        r"""Gaussian :math:`Z` with entries :math:`\mathcal{N}(0, 1/k)`; full column rank with
        probability 1. ``size`` is the full point shape ``(..., n + m, k)``."""
        shape = self._sample_shape(size, "random")
        return torch.randn(shape, dtype=dtype, device=device) / shape[-1] ** 0.5

    random_normal = random

    def origin(self, *size, dtype=None, device=None, seed: int | None = 42) -> torch.Tensor:
        r"""A deterministic full-rank point, broadcast over the leading dims of ``size``.

        For ``k <= min(n, m)``: :math:`A = B = [I_k; 0]` (product: the rank-k identity block,
        :math:`M = 2I`). Otherwise the first ``k`` columns of :math:`I_{n+m}`. ``seed`` is ignored.
        """
        shape = self._sample_shape(size, "origin")
        k = shape[-1]
        if k <= min(self.n, self.m):
            eye_a = torch.eye(self.n, k, dtype=dtype, device=device)
            eye_b = torch.eye(self.m, k, dtype=dtype, device=device)
            z = torch.cat((eye_a, eye_b), dim=-2)
        else:
            z = torch.eye(self.n + self.m, k, dtype=dtype, device=device)
        return z.expand(shape).clone()
