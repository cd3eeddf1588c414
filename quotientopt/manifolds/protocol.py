r"""The geometry protocol: a core every head manifold implements, and opt-in capabilities.

A *head geometry* is a manifold of factor pairs :math:`Z = [A; B]` (shape ``(..., n + m, k)``,
product :math:`W = A B^\top`) modulo a group :math:`H \subseteq GL(k)` acting as
:math:`(A G, B G^{-\top})`, with an :math:`H`-invariant metric. The optimizers in
:mod:`quotientopt.optim` use the core (:class:`HeadGeometry`) and the capabilities below and
nothing else (no concrete class, no private method, no string attribute), so a new geometry that
implements the core for its own group works with every optimizer, and an optimizer that uses
only them never moves a head along a direction its group does not contain.

The core, :class:`HeadGeometry`:

===========* :class:`Balancing` (``balancing_element(z)``): asked for by QuotientSGD's ``rebalance_every``
  and the Hamiltonian's implicit integrator;
* :class:`KineticEnergy` (``kinetic_force(z, v)``): QuotientHamiltonian;
* :class:`RowSharded` (``row_reduce(t)``): QuotientMuon, QuotientAdam, the Hamiltonian's flows
  and the step loop, for FSDP2 row shards;
* :class:`ProductDecay` (``decay_rgrad(z, mode, grams)``): QuotientSGD's and QuotientAdam's
  product and nuclear weight decay.

:func:`require` raises the one error for a missing capability. Deprecated, kept working: the
booleans ``is_row_sharded`` (use ``isinstance(g, RowSharded)``) and ``supports_kinetic_energy``
(``isinstance(g, KineticEnergy)``), and ``balancing_transform(z)`` (``None`` where the group has
no move; use ``balancing_element`` under ``isinstance(g, Balancing)``).

:class:`~quotientopt.manifolds.FactorQuotient` implements the protocol for :math:`GL(k)` and
:class:`~quotientopt.manifolds.SubgroupFactorQuotient` for a Lie subgroup :math:`H` given by a
basis of its algebra (RoPE's scaled rotations, QK-norm's conformal group, :math:`O(k)`): the
subgroup holds its own vertical space, momentum map and balancing instead of inheriting
:math:`GL(k)`'s.
"""

from __future__ import annotations

from functools import cache
from typing import NamedTuple, Protocol, runtime_checkable

import torch

__all__ = [
    "CAPABILITIES",
    "Balancing",
    "Grams",
    "HeadGeometry",
    "KineticEnergy",
    "ProductDecay",
    "RowSharded",
    "is_head_geometry",
    "require",
]


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
    """The core of the interface between the quotient optimizers and a head manifold: what every
    optimizer may ask of every head geometry (see the module docs; the capabilities are
    :class:`Balancing`, :class:`KineticEnergy`, :class:`RowSharded`, :class:`ProductDecay`).

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
    def row_sum(self, t: T) -> T: ...
    @property
    def sector_rows(self) -> tuple[int, int]: ...
    def quotient_dimension(self, k: int) -> int: ...


class _CapabilityMeta(type(Protocol)):
    """``isinstance(geometry, Capability)``: every member of the capability is an attribute of
    ``geometry`` that is not ``None`` (typing's rule that a method set to ``None`` is absent,
    read on the instance, so that a capability that depends on how the geometry was built, e.g.
    its metric or its row sharding, is absent on the instances that lack it)."""

    def __instancecheck__(cls, instance: object) -> bool:
        return all(getattr(instance, name, None) is not None for name in cls._members)


def _capability(cls: type) -> type:
    cls._members = tuple(
        name for name, value in vars(cls).items() if callable(value) and not name.startswith("_")
    )
    return runtime_checkable(cls)


@_capability
class Balancing(Protocol, metaclass=_CapabilityMeta):
    r"""Capability: a move within the group to the most balanced representative.

    ``balancing_element(z)`` returns :math:`(M_A, M_B = M_A^{-\top})`, ``(..., k, k)`` each, an
    element of :math:`H` with :math:`Z \mapsto (A M_A, B M_B)` reaching the representative of
    least factor norm :math:`\|A M_A\|_F^2 + \|B M_B\|_F^2` among those the move can reach
    (:math:`GL(k)`: the balanced :math:`A'^\top A' = B'^\top B'`; block scalings: equal factor
    norms per block); rank-deficient heads get non-finite matrices. Absent where :math:`H` has no
    such move (:math:`O(k)` preserves both norms) and where the rows are sharded (it needs whole
    factors). Asked for by QuotientSGD's ``rebalance_every`` and QuotientHamiltonian's implicit
    integrator (balanced frame)."""

    def balancing_element(self, z: T) -> tuple[T, T]: ...


@_capability
class KineticEnergy(Protocol, metaclass=_CapabilityMeta):
    r"""Capability: the kinetic energy :math:`T(Z, p) = \tfrac12 \langle p, p\, G(Z)^{-1}\rangle`
    of the metric as a function of the point at fixed momentum.

    ``kinetic_force(z, v)`` returns :math:`\partial_Z T` at velocity :math:`v = p\,G^{-1}`
    (shape of ``z``); for :math:`GL(k)`'s undamped preconditioned metric
    :math:`(-A\, V_B^\top V_B,\; -B\, V_A^\top V_A)`; ``factor_gram(z, which)`` the Gram
    :math:`X^\top X` (``(..., k, k)``, summed over row shards) of the one factor
    (0: :math:`A`, 1: :math:`B`) that a kinetic flow moves. Absent for damped or ``"inv"``
    metrics. Asked for by QuotientHamiltonian."""

    def kinetic_force(self, z: T, v: T) -> T: ...
    def factor_gram(self, z: T, which: int) -> T: ...


@_capability
class RowSharded(Protocol, metaclass=_CapabilityMeta):
    r"""Capability (of a geometry whose factor rows are split over processes): ``row_reduce(t)``
    sums ``t`` over the row shards in place and returns it, so that a contraction over rows is
    :math:`\sum_{\text{shards } s} \sum_{i \in s} x_i^\top y_i`; ``n``, ``m`` are then the local
    shard's rows and ``sector_rows`` the whole sector's. Absent on a geometry holding whole
    factors. Asked for by QuotientMuon (its route and health flag), QuotientAdam (no Householder
    frame of a split factor), QuotientHamiltonian's flows and the step loop's zero-start check."""

    def row_reduce(self, t: T) -> T: ...


@_capability
class ProductDecay(Protocol, metaclass=_CapabilityMeta):
    r"""Capability: weight decay of the product :math:`W = A B^\top`, a penalty invariant under
    every subgroup of :math:`GL(k)`.

    ``decay_rgrad(z, mode, grams)`` is the Riemannian gradient of :math:`\tfrac12\|W\|_F^2`
    (``"product"``) or :math:`\|W\|_*` (``"nuclear"``); heads ``grams`` flags unhealthy give 0.
    Asked for by QuotientSGD (``weight_decay_mode="product"`` / ``"nuclear"``) and QuotientAdam
    (``"nuclear"``)."""

    def decay_rgrad(self, z: T, mode: str, grams: G) -> T: ...


CAPABILITIES: tuple[type, ...] = (Balancing, KineticEnergy, RowSharded, ProductDecay)


def require(geometry: object, capability: type, who: str, fix: str) -> None:
    """Raise one ``ValueError`` naming ``who`` (the optimizer or option), the geometry and the
    missing ``capability`` when ``geometry`` lacks it; ``fix`` says what to use instead."""
    if not isinstance(geometry, capability):
        raise ValueError(
            f"{who} needs a head geometry with the {capability.__name__} capability "
            f"(quotientopt.manifolds.protocol.{capability.__name__}), which {geometry!r} does not "
            f"have; {fix}"
        )


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
    "row_sum",
    "sector_rows",
    "quotient_dimension",
)


@cache
def _implements(cls: type) -> bool:
    return all(hasattr(cls, name) for name in _METHODS)


def is_head_geometry(manifold: object) -> bool:
    """Whether ``manifold`` implements the core :class:`HeadGeometry` (checked once per class)."""
    return manifold is not None and _implements(type(manifold))
