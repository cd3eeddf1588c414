r"""The geometry protocol: everything an optimizer may ask of a head manifold.

A *head geometry* is a manifold of factor pairs :math:`Z = [A; B]` (shape ``(..., n + m, k)``,
product :math:`W = A B^\top`) modulo a group :math:`H \subseteq GL(k)` acting as
:math:`(A G, B G^{-\top})`, with an :math:`H`-invariant metric. The optimizers in
:mod:`quotientopt.optim` use these methods and nothing else (no concrete class, no private
method, no string attribute), so a new geometry that implements them for its own group works with
every optimizer, and an optimizer that uses only them never moves a head along a direction its
group does not contain.

=============================  ========================================================================
method                         meaning (shapes: ``z``, ``u``, ``v`` ``(..., n + m, k)``; ``k x k`` data
                               in float32 or better)
=============================  ========================================================================
``factors(z)``                 the views :math:`(A, B)`
``grams(z, ...)``              the metric data of the point (:class:`Grams`: the Grams, their
                               Cholesky factors, optional inverses and a per-head health flag)
``egrad2rgrad(z, g, grams=)``  the Riemannian gradient of a Euclidean gradient
``proju(z, u, grams=)``        the horizontal projection (``proju_`` in place)
``retr(z, u)``, ``transp``     retraction and vector transport
``inner(z, u, v, grams=)``     the metric, one value per head
``cross(z, u)``                :math:`(A^\top u_A, B^\top u_B)`, reduced over row shards
``right_multiply(u, L, R)``    :math:`[u_A L;\, u_B R]` (``k x k`` per head; ``add_to=X``:
                               :math:`\beta X +` that, ``out=``: into a buffer); with
                               :math:`(L, R) = (G, G^{-\top})`, :math:`G \in H`, the action
``momentum_map(z, v, grams=)`` the ``k x k`` :math:`J` with :math:`g(v, V(E)) = \langle J, E\rangle_F`
                               for every :math:`E` in the Lie algebra of :math:`H`; zero exactly when
                               ``v`` is horizontal
``balancing_transform(z)``     a group element :math:`(M_A, M_B = M_A^{-\top})` of :math:`H` that
                               carries ``z`` to its most balanced representative, or ``None``
                               where :math:`H` has no such move
``decay_rgrad(z, mode, grams)``the Riemannian gradient of a weight-decay penalty of the product
                               (``"product"``: :math:`\tfrac12\|W\|_F^2`; ``"nuclear"``: :math:`\|W\|_*`)
``kinetic_force(z, v)``        :math:`\partial_Z T` of the metric's kinetic energy at velocity ``v``
                               (needed by the Hamiltonian optimizer only; ``supports_kinetic_energy``
                               says whether the geometry has it)
``is_row_sharded``             whether contractions over rows are summed across processes
``row_sum(t)``                 a per-shard partial sum over rows (e.g. ``k x k``
                               :math:`\sum_{i \in \text{shard}} x_i^\top y_i`) summed over the row
                               shards; ``t`` itself when not row-sharded
``sector_rows``                the row counts ``(n, m)`` of the whole sector (``n``, ``m`` are the
                               local shard's under row sharding)
``quotient_dimension(k)``      one head's quotient dimension, :math:`(n + m) k - \dim H` (whole
                               sector)
=============================  ========================================================================

:class:`~quotientopt.manifolds.FactorQuotient` implements the protocol for :math:`GL(k)` and
:class:`~quotientopt.manifolds.SubgroupFactorQuotient` for a Lie subgroup :math:`H` given by a
basis of its algebra (RoPE's scaled rotations, QK-norm's conformal group): the subgroup holds
its own vertical space, momentum map and balancing instead of inheriting :math:`GL(k)`'s.
"""

from __future__ import annotations

from functools import cache
from typing import NamedTuple, Protocol, runtime_checkable

import torch

__all__ = ["Grams", "HeadGeometry", "is_head_geometry"]


class Grams(NamedTuple):
    """The k x k data of a point that every metric operation needs (see
    :meth:`~quotientopt.manifolds.FactorQuotient.grams`; defined beside the protocol that
    returns it, re-exported by ``quotientopt.manifolds.factor_quotient``)."""

    p: torch.Tensor  # damped B^T B, (..., k, k), float32 or better
    q: torch.Tensor  # damped A^T A
    chol_p: torch.Tensor  # lower Cholesky factor of p; the identity for heads that are not ok
    chol_q: torch.Tensor  # lower Cholesky factor of q; the identity for heads that are not ok
    ok: torch.Tensor  # (...,) bool: both Grams positive definite, finite and regular
    # optional inverses P^{-1}, Q^{-1} (from the Cholesky factors): with them X P^{-1} is one
    # matmul instead of two triangular solves (faster, slightly less accurate at high condition)
    p_inv: torch.Tensor | None = None
    q_inv: torch.Tensor | None = None
    # with grams(..., regularize=True): (...,) bool, heads that are not ok but finite, whose
    # p, q and Cholesky factors are the regularized P + delta I, Q + delta I (see grams())
    regularized: torch.Tensor | None = None


T = torch.Tensor
G = Grams


@runtime_checkable
class HeadGeometry(Protocol):
    """The interface between the quotient optimizers and a head manifold (see the module docs).

    ``T`` is ``torch.Tensor``; ``G`` is :class:`Grams`."""

    n: int
    m: int

    def factors(self, z: T) -> tuple[T, T]: ...
    def grams(self, z: T, *, check=None, reference=None, inverses=False, regularize=False) -> G: ...
    def egrad2rgrad(self, x: T, u: T, *, grams: G | None = None, out: T | None = None) -> T: ...
    def proju(self, x: T, u: T, *, grams: G | None = None) -> T: ...
    def proju_(self, x: T, u: T, *, grams: G | None = None) -> T: ...
    def retr(self, x: T, u: T) -> T: ...
    def transp(self, x: T, y: T, v: T) -> T: ...
    def inner(self, x: T, u: T, v: T | None = None, *, keepdim=False, grams=None) -> T: ...
    def cross(self, z: T, u: T) -> tuple[T, T]: ...
    def right_multiply(self, u: T, left: T, right: T, *, add_to=None, beta=1.0, out=None) -> T: ...
    def momentum_map(self, z: T, v: T, *, grams: G | None = None) -> T: ...
    def balancing_transform(self, z: T) -> tuple[T, T] | None: ...
    def decay_rgrad(self, z: T, mode: str, grams: G) -> T: ...
    def kinetic_force(self, z: T, v: T) -> T: ...
    @property
    def supports_kinetic_energy(self) -> bool: ...
    @property
    def is_row_sharded(self) -> bool: ...
    def row_sum(self, t: T) -> T: ...
    @property
    def sector_rows(self) -> tuple[int, int]: ...
    def quotient_dimension(self, k: int) -> int: ...


_METHODS = (
    "factors",
    "grams",
    "egrad2rgrad",
    "proju",
    "proju_",
    "retr",
    "transp",
    "inner",
    "cross",
    "right_multiply",
    "momentum_map",
    "balancing_transform",
    "decay_rgrad",
    "kinetic_force",
    "supports_kinetic_energy",
    "is_row_sharded",
    "row_sum",
    "sector_rows",
    "quotient_dimension",
)


@cache
def _implements(cls: type) -> bool:
    return all(hasattr(cls, name) for name in _METHODS)


def is_head_geometry(manifold: object) -> bool:
    """Whether ``manifold`` implements :class:`HeadGeometry` (checked once per class)."""
    return manifold is not None and _implements(type(manifold))
