r"""The GL(k) quotient of factor pairs: rank-k matrices :math:`W = A B^\top` seen as pairs
:math:`(A, B)` modulo :math:`(A, B) \sim (A G, B G^{-\top})`, :math:`G \in GL(k)`.

Shape convention: a point is one tensor :math:`Z = [A; B]` stacked along rows, shape
``(..., n + m, k)``, ``A = Z[..., :n, :]`` (``n x k``), ``B = Z[..., n:, :]`` (``m x k``). Leading
dims batch heads and layers; every method is one batched call. For an attention head the QK sector
is ``A = W_Q``, ``B = W_K`` and the VO sector ``A = W_V``, ``B = W_O^T``.

Two GL(k)-invariant metrics are offered, with :math:`P = B^\top B` and :math:`Q = A^\top A`:

* ``"preconditioned"`` (default; Mishra & Sepulchre's Riemannian preconditioning, Manopt's
  ``fixedrankfactory_2factors_preconditioned``):
  :math:`g_Z(\xi, \eta) = \mathrm{tr}(P \xi_A^\top \eta_A) + \mathrm{tr}(Q \xi_B^\top \eta_B)`;
* ``"inv"`` (Manopt's ``fixedrankfactory_2factors``):
  :math:`g_Z(\xi, \eta) = \mathrm{tr}(Q^{-1} \xi_A^\top \eta_A) + \mathrm{tr}(P^{-1} \xi_B^\top \eta_B)`.

The tangent space of the quotient at :math:`[Z]` is represented by the horizontal space at
:math:`Z`: the metric-orthogonal complement of the vertical space (tangent to the orbit)
:math:`\{(A \Omega, -B \Omega^\top) : \Omega \in \mathbb{R}^{k \times k}\}`. geoopt's "tangent
vectors" of this manifold are horizontal vectors, and ``proju`` is the horizontal projection.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

from quotientopt.linalg import (
    compute_dtype,
    damp,
    gram,
    raise_if_not_ok,
    solve_sylvester_sym,
    spd_cholesky_flagged,
    sym_funm,
    tril_inverse,
)
from quotientopt.manifolds._common import (
    CheckResult,
    MatrixManifold,
    check_row_counts,
    check_stacked_rows,
    stack_factor_pair,
)
from quotientopt.manifolds.protocol import Grams  # defined beside the protocol; re-exported

__all__ = [
    "FactorQuotient",
    "Grams",
    "balance",
    "balancing_transform",
    "charge",
    "product",
    "product_decay_egrad",
]

Metric = Literal["preconditioned", "inv"]

_RANK_FIX = (
    "give every head full-rank factors (k <= n and k <= m, no zero or repeated columns), "
    "re-balance with FactorQuotient.balance(), or build FactorQuotient(..., damping=1e-6) to "
    "floor the Gram matrices."
)


def product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    r"""The composite :math:`W = A B^\top`, shape ``(..., n, m)``."""
    return a @ b.transpose(-1, -2)


def charge(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    r"""The Noether charge :math:`C = A^\top A - B^\top B` (``k x k``, symmetric) in float32 or better.

    Euclidean gradient flow of any GL(k)-invariant loss conserves it; the balanced representative
    (:func:`balance`) has :math:`C = 0`.
    """
    return gram(a) - gram(b)


def balance(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Dressing map to the balanced representative of the orbit of :math:`(A, B)`.

    With thin QR factorizations :math:`A = Q_A R_A`, :math:`B = Q_B R_B` and the SVD
    :math:`R_A R_B^\top = U \Sigma V^\top` (all ``k x k`` work after the QRs):

    .. math:: A' = Q_A U \Sigma^{1/2}, \qquad B' = Q_B V \Sigma^{1/2},

    so :math:`A' B'^\top = A B^\top` (the function is preserved) and
    :math:`A'^\top A' = B'^\top B' = \Sigma`: the charge vanishes, the two Grams are equal and as
    well conditioned as the product allows (:math:`\kappa(\Sigma) = \kappa(A B^\top)`), and the
    factor norm :math:`\|A'\|_F^2 + \|B'\|_F^2 = 2 \|A B^\top\|_*` is the smallest on the orbit. The
    representative is unique up to the residual :math:`O(k)` of repeated singular values and signs.
    Runs in float32 or better; returns the input dtype.
    """
    dtype = compute_dtype(a.dtype)
    q_a, r_a = torch.linalg.qr(a.to(dtype))
    q_b, r_b = torch.linalg.qr(b.to(dtype))
    u, s, vh = torch.linalg.svd(r_a @ r_b.transpose(-1, -2))
    root = s.sqrt()[..., None, :]
    return (q_a @ u * root).to(a.dtype), (q_b @ vh.transpose(-1, -2) * root).to(b.dtype)


def balancing_transform(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The ``k x k`` matrices :math:`(M_A, M_B)` that carry :math:`(A, B)` to its balanced
    representative :math:`(A M_A, B M_B)` (see :func:`balance`), in float32 or better.

    With :math:`A = Q_A R_A`, :math:`B = Q_B R_B` and :math:`R_A R_B^\top = U \Sigma V^\top`:
    :math:`M_A = R_A^{-1} U \Sigma^{1/2}` and :math:`M_B = R_B^{-1} V \Sigma^{1/2}`, so
    :math:`M_A^\top M_B = \Sigma^{1/2} U^\top (R_A R_B^\top)^{-\top} V \Sigma^{1/2} = I`: the
    pair is one group element, :math:`M_B = M_A^{-\top}`, and its inverse action is
    :math:`(A' M_B^\top, B' M_A^\top)`. Rank-deficient heads get non-finite matrices.
    """
    dtype = compute_dtype(a.dtype)
    r_a = torch.linalg.qr(a.to(dtype), mode="r").R
    r_b = torch.linalg.qr(b.to(dtype), mode="r").R
    u, s, vh = torch.linalg.svd(r_a @ r_b.transpose(-1, -2))
    root = s.sqrt()[..., None, :]
    m_a = torch.linalg.solve_triangular(r_a, u * root, upper=True)
    m_b = torch.linalg.solve_triangular(r_b, vh.transpose(-1, -2) * root, upper=True)
    return m_a, m_b


def product_decay_egrad(manifold: FactorQuotient, z: torch.Tensor, mode: str) -> torch.Tensor:
    r"""Euclidean gradient of a weight-decay penalty that depends on the product only.

    * ``"product"``: :math:`\tfrac12 \|A B^\top\|_F^2`, gradient :math:`(A\, B^\top B,\; B\, A^\top A)`;
    * ``"nuclear"``: :math:`\|A B^\top\|_*`, the factor norm
      :math:`\tfrac12(\|A'\|_F^2 + \|B'\|_F^2)` of the balanced representative :math:`(A', B')`;
      with :math:`S = A'^\top A'` its gradient is :math:`(A' S^{-1} B'^\top B,\; B' S^{-1} A'^\top A)`.

    Neither is the representative-dependent factor decay :math:`\tfrac12(\|A\|^2 + \|B\|^2)`, so
    both are invariant under every subgroup of :math:`GL(k)`.
    """
    if mode not in ("product", "nuclear"):
        raise ValueError(f"unknown weight-decay mode {mode!r}; use 'product' or 'nuclear'")
    a, b = manifold.factors(z)
    if mode == "product":  # the Grams through cross(), which sums them over row shards
        q, p = (g.to(z.dtype) for g in manifold.cross(z, z))
        return torch.cat((a @ p, b @ q), dim=-2)
    if manifold.is_row_sharded:
        raise ValueError(
            "the nuclear-norm weight decay needs whole factors (a balanced representative), but "
            "this sector's rows are sharded; use weight_decay_mode='product' for row-sharded sectors"
        )
    a_bal, b_bal = balance(a, b)
    s_inv = 1.0 / (a_bal * a_bal).sum(-2)  # S is diagonal: the singular values of A B^T
    grad_a = (a_bal * s_inv[..., None, :]) @ (b_bal.mT @ b)
    grad_b = (b_bal * s_inv[..., None, :]) @ (a_bal.mT @ a)
    return torch.cat((grad_a, grad_b), dim=-2)


class FactorQuotient(MatrixManifold):
    r"""Rank-k matrices :math:`A B^\top` as factor pairs modulo :math:`GL(k)`.

    Parameters
    ----------
    n, m : int
        Rows of :math:`A` and of :math:`B`; a point has shape ``(..., n + m, k)`` with
        ``k <= min(n, m)``.
    metric : ``"preconditioned"`` | ``"inv"``
        The GL(k)-invariant metric (see the module docstring).
    damping : float
        Scale-aware floor :math:`\epsilon` for the Gram matrices:
        :math:`P \to P + \epsilon\, \mathrm{tr}(P)/k \; I` (and likewise :math:`Q`) wherever they
        are inverted or used as metric weights. ``0`` (default) is the exact geometry: every
        method is exactly GL(k)-equivariant, and a rank-deficient factor raises ``ValueError``.
        ``eps > 0`` keeps near-singular heads finite at the price of the exact invariance: only
        rotations and scalings (:math:`\mathbb{R}_{>0} \times O(k)`) remain exact symmetries, the
        rest of GL(k) is broken at order :math:`\epsilon \kappa`.
    row_reduce : callable, optional
        For factors whose rows are sharded across processes (FSDP-style): a function that sums a
        tensor over the shards in place and returns it, e.g.
        :func:`quotientopt.distributed.all_reduce_sum`. Then ``n``, ``m`` are this shard's row
        counts, and every ``k x k`` contraction over rows (Grams, cross products, metric values)
        is reduced; everything else is row-local. :meth:`balance` needs whole factors.
    sector_rows : (int, int), optional
        With ``row_reduce``: the row counts :math:`(n, m)` of the whole sector, which
        :attr:`sector_rows` reports (QuotientMuon scales its step by them). FSDP2 row placements
        set it by themselves (:func:`quotientopt.distributed.local_geometry`).
    check : bool
        Validate the Grams (positive definite, finite) and raise a clear ``ValueError`` otherwise.
        Costs one host synchronisation per call; optimizers that check asynchronously turn it off.

    Notes
    -----
    ``projx`` is the identity: the total space is the open set of full-rank pairs, and moving to
    another representative is :meth:`balance`'s job, not ``projx``'s (geoopt requires
    ``projx(x) == x`` on the manifold). ``expmap`` falls back to the retraction
    :math:`Z + \xi`: the quotient geodesics have no closed form; the retraction is a first-order
    approximation of the exponential map, and every optimizer here only needs a retraction.
    ``component_inner`` (what geoopt's RiemannianAdam uses as its second moment) and ``norm`` are
    the inherited per-point ones: one GL(k)-invariant metric value per head.
    """

    name = "FactorQuotient"
    reversible = False

    def __init__(
        self,
        n: int,
        m: int,
        *,
        metric: Metric = "preconditioned",
        damping: float = 0.0,
        check: bool = True,
        row_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
        sector_rows: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        check_row_counts("FactorQuotient", n, m)
        if metric not in ("preconditioned", "inv"):
            raise ValueError(
                f"FactorQuotient: unknown metric {metric!r}; use 'preconditioned' (cross-Gram, "
                "default) or 'inv' (inverse Grams)."
            )
        if not (isinstance(damping, (int, float)) and 0.0 <= damping < 1.0):
            raise ValueError(
                f"FactorQuotient: damping must be a float in [0, 1), got {damping!r}; use 0 for "
                "the exact geometry or a small value such as 1e-6."
            )
        self.n, self.m = n, m
        self.metric = metric
        self.damping = float(damping)
        self.check = check
        self.row_reduce = row_reduce
        self.sector_rows = sector_rows

    def extra_repr(self) -> str:
        return f"n={self.n}, m={self.m}, metric={self.metric!r}, damping={self.damping}"

    # ----------------------------------------------------------------------------- factors
    def factors(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r"""Views :math:`A = Z_{:n}` (``(..., n, k)``) and :math:`B = Z_{n:}` (``(..., m, k)``).

        Raises ``ValueError`` when ``z`` does not have the shape ``(..., n + m, k)``, k <= min(n, m).
        """
        self._assert_check_shape(z.shape, "z")
        return z[..., : self.n, :], z[..., self.n :, :]

    def from_factors(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        r"""Stack :math:`Z = [A; B]`; checks the shapes against ``n``, ``m``."""
        return stack_factor_pair("FactorQuotient", self.n, self.m, a, b)

    def product(self, z: torch.Tensor) -> torch.Tensor:
        r"""The composite :math:`W = A B^\top`, shape ``(..., n, m)``."""
        return product(*self.factors(z))

    def charge(self, z: torch.Tensor) -> torch.Tensor:
        r""":math:`C = A^\top A - B^\top B`, see :func:`charge`."""
        return charge(*self.factors(z))

    def balance(self, z: torch.Tensor) -> torch.Tensor:
        r"""The balanced representative of :math:`[Z]`, see :func:`balance`."""
        if self.row_reduce is not None:
            raise ValueError(
                "FactorQuotient.balance needs whole factors, but this manifold's rows are sharded "
                "(row_reduce is set); gather the shards first, or do not rebalance sharded sectors"
            )
        return torch.cat(balance(*self.factors(z)), dim=-2)

    @property
    def balancing_element(
        self,
    ) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None:
        r"""The :class:`~quotientopt.manifolds.protocol.Balancing` capability: ``z`` ->
        :math:`(M_A, M_B = M_A^{-\top})` with :math:`(A M_A, B M_B)` balanced (see
        :func:`balancing_transform`); ``None`` (absent) when the rows are sharded."""
        return None if self.row_reduce is not None else self._balancing_element

    def _balancing_element(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return balancing_transform(*self.factors(z))

    def balancing_transform(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r"""The ``k x k`` pair :math:`(M_A, M_B = M_A^{-\top})` with :math:`(A M_A, B M_B)` balanced,
        see :func:`balancing_transform`. Deprecated: ask ``isinstance(manifold, Balancing)`` and
        call :attr:`balancing_element`."""
        if self.row_reduce is not None:
            raise ValueError(
                "FactorQuotient.balancing_transform needs whole factors, but this manifold's rows "
                "are sharded (row_reduce is set); gather the shards first"
            )
        return self._balancing_element(z)

    def act(self, z: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        r"""The group action :math:`(A, B) \mapsto (A G, B G^{-\top})` for ``g`` of shape ``(..., k, k)``."""
        g = g.to(compute_dtype(z.dtype))
        return self.right_multiply(z, g, torch.linalg.inv(g).transpose(-1, -2))

    def push(self, u: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        r"""Differential of the action on a tangent vector: :math:`(\xi_A G, \xi_B G^{-\top})`."""
        return self.act(u, g)

    def vertical(self, z: torch.Tensor, omega: torch.Tensor) -> torch.Tensor:
        r"""The orbit direction :math:`(A \Omega, -B \Omega^\top)` generated by a ``k x k`` matrix
        :math:`\Omega` (broadcast over the leading dims): :math:`\frac{d}{dt}` of the action of
        :math:`G = e^{t\Omega}` at :math:`t = 0`. It changes :math:`A B^\top` by zero to first order.
        """
        omega = omega.to(compute_dtype(z.dtype))
        return self.right_multiply(z, omega, -omega.transpose(-1, -2))

    def momentum_map(
        self, z: torch.Tensor, v: torch.Tensor, *, grams: Grams | None = None
    ) -> torch.Tensor:
        r"""The momentum map of a tangent vector ``v``: the ``k x k`` matrix :math:`J` with
        :math:`g_Z(v, V(\Omega)) = \langle J, \Omega \rangle_F` for every orbit direction
        :math:`V(\Omega) = (A \Omega, -B \Omega^\top)` (see :meth:`vertical`).

        * preconditioned: :math:`J = A^\top v_A P - Q v_B^\top B`;
        * inv: :math:`J = A^\top v_A Q^{-1} - P^{-1} v_B^\top B`.

        :math:`J = 0` exactly when ``v`` is horizontal. Under :math:`Z \mapsto Z G` with
        :math:`v \mapsto v G` it transforms as :math:`J \mapsto G^{-1} J G`, so its invariants
        (eigenvalues, and the norm relative to :math:`g(v, v)`) do not depend on the
        representative. Float32 or better, shape ``(..., k, k)``.
        """
        grams = self.grams(z, check=False) if grams is None else grams
        at_va, bt_vb = self.cross(z, v)
        if self.metric == "preconditioned":
            return at_va @ grams.p - grams.q @ bt_vb.transpose(-1, -2)
        left = torch.cholesky_solve(at_va.transpose(-1, -2), grams.chol_q).transpose(-1, -2)
        return left - torch.cholesky_solve(bt_vb.transpose(-1, -2), grams.chol_p)

    # ------------------------------------------------------------------------ k x k pieces
    def right_multiply(
        self,
        u: torch.Tensor,
        left: torch.Tensor,
        right: torch.Tensor,
        *,
        add_to: torch.Tensor | None = None,
        beta: float = 1.0,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        r""":math:`[u_A L;\; u_B R]` for ``k x k`` matrices ``L``, ``R`` (broadcast over the leading
        dims), computed in their dtype and returned in ``u``'s; with ``add_to`` (shaped like
        ``u``), :math:`\beta\,\mathrm{add\_to} + [u_A L;\; u_B R]`. With
        :math:`(L, R) = (G, G^{-\top})` this is the group action on points and tangent vectors;
        with :math:`(G^{-\top}, G)` its action on gradients (covectors). When ``n == m`` (square
        sectors) this is one batched matmul (``baddbmm`` with ``add_to``) on the view
        ``(..., 2, n, k)``: no slicing, no concatenation; then ``out`` (a contiguous tensor
        shaped like ``u``, all of one dtype) receives the result without a new allocation."""
        dtype = left.dtype
        if self.n == self.m:
            self._assert_check_shape(u.shape, "u")
            mats = torch.stack(torch.broadcast_tensors(left, right), dim=-3)
            u2 = u.unflatten(-2, (2, self.n)).to(dtype)
            dtypes = {u.dtype, dtype} | ({add_to.dtype} if add_to is not None else set())
            if out is not None and out.is_contiguous() and dtypes == {out.dtype}:
                if add_to is None:
                    return torch.matmul(u2, mats, out=out.view(u2.shape)).view(u.shape)
                batch, (rows, k) = u2.shape[:-2].numel(), u2.shape[-2:]
                mats = mats.expand(*u2.shape[:-2], k, k).reshape(batch, k, k)
                flat = (add_to.reshape(batch, rows, k), u2.reshape(batch, rows, k), mats)
                return torch.baddbmm(*flat, beta=beta, out=out.view(batch, rows, k)).view(u.shape)
            result = (u2 @ mats).flatten(-3, -2)
        else:
            ua, ub = self.factors(u)
            result = torch.cat((ua.to(dtype) @ left, ub.to(dtype) @ right), dim=-2)
        if add_to is not None:
            result = result.add_(add_to.to(dtype), alpha=beta)
        return result.to(u.dtype)

    def _right_solve(
        self,
        u: torch.Tensor,
        grams: Grams,
        left: str,
        right: str,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        r""":math:`[u_A G_1^{-1};\; u_B G_2^{-1}]` for the Grams named ``left``, ``right``
        (``"p"`` or ``"q"``), through their Cholesky factors :math:`G = L L^\top`: two right-sided
        triangular solves (backward stable), or one matmul when ``grams`` carries the inverses.
        One batched call each when ``n == m``; then ``out`` (a contiguous tensor shaped like
        ``u``, of ``u``'s dtype) receives the result without a new allocation."""
        chols = [getattr(grams, f"chol_{name}") for name in (left, right)]
        inverses = [getattr(grams, f"{name}_inv") for name in (left, right)]

        def solve(
            x: torch.Tensor, chol: torch.Tensor, inverse: torch.Tensor | None
        ) -> torch.Tensor:
            if inverse is not None:
                return x @ inverse
            x = torch.linalg.solve_triangular(chol.transpose(-1, -2), x, upper=True, left=False)
            return torch.linalg.solve_triangular(chol, x, upper=False, left=False)

        def stacked(mats: list[torch.Tensor | None]) -> torch.Tensor | None:
            return None if mats[0] is None else torch.stack(torch.broadcast_tensors(*mats), dim=-3)

        dtype = grams.p.dtype
        if self.n == self.m:
            self._assert_check_shape(u.shape, "u")
            u2 = u.unflatten(-2, (2, self.n))
            fast = inverses[0] is not None and u.dtype == dtype
            if out is not None and fast and out.is_contiguous():
                torch.matmul(u2, stacked(inverses), out=out.view(u2.shape))
                return out
            x = solve(u2.to(dtype), stacked(chols), stacked(inverses))
            return x.flatten(-3, -2).to(u.dtype)
        parts = [
            solve(part.to(dtype), chol, inverse)
            for part, chol, inverse in zip(self.factors(u), chols, inverses, strict=True)
        ]
        return torch.cat(parts, dim=-2).to(u.dtype)

    def cross(self, z: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r""":math:`(A^\top u_A,\; B^\top u_B)` (``k x k`` each) in float32 or better (one batched
        matmul if ``n == m``), summed over the row shards when ``row_reduce`` is set."""
        c = self._stacked_cross(z, u)
        return c[..., 0, :, :], c[..., 1, :, :]

    def _stacked_cross(self, z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """:meth:`cross` as one stacked ``(..., 2, k, k)`` tensor."""
        dtype = compute_dtype(z.dtype)
        if self.n == self.m:
            self._assert_check_shape(z.shape, "z")
            z2, u2 = z.unflatten(-2, (2, self.n)), u.unflatten(-2, (2, self.n))
            c = z2.to(dtype).transpose(-1, -2) @ u2.to(dtype)
        else:
            (a, b), (ua, ub) = self.factors(z), self.factors(u)
            c = torch.stack((a.to(dtype).mT @ ua.to(dtype), b.to(dtype).mT @ ub.to(dtype)), dim=-3)
        if self.row_reduce is not None:  # rows sharded across processes: sum the partial products
            c = self.row_reduce(c.contiguous())
        return c

    def grams(
        self,
        z: torch.Tensor,
        *,
        check: bool | None = None,
        reference: Grams | None = None,
        inverses: bool = False,
        regularize: bool = False,
    ) -> Grams:
        r"""The (damped) Grams :math:`P = B^\top B`, :math:`Q = A^\top A` of the point, their
        inverses and a per-head health flag, in float32 or better.

        Every metric operation below accepts them as ``grams=`` so that a caller (an optimizer)
        computes them once per step. ``check`` (default: the manifold's ``check``) raises a
        ``ValueError`` for rank-deficient or non-finite heads, at the cost of one host
        synchronisation; without it the flag ``ok`` reports them, their Cholesky factors are
        replaced by the identity (so that nothing downstream turns NaN; callers must discard the
        results for those heads), and nothing synchronises.
        ``reference``: the Grams of the previous iterate; a factor whose Gram collapsed relative
        to them counts as rank-deficient (see :func:`quotientopt.linalg.spd_cholesky_flagged`).
        ``inverses``: also form :math:`P^{-1}`, :math:`Q^{-1}` (``k x k``), so that solves become
        single matmuls (the optimizers' fast path).
        ``regularize``: for the heads that are not ok but finite (rank-deficient, e.g. a
        zero-initialized factor), regularized Grams instead of the identity, flagged in
        ``regularized`` (see :meth:`_regularize`): what the optimizers use to move such a head
        onto the full-rank set, where the exact geometry takes over.
        """
        # both Grams of every head as one stack [Q, P] (..., 2, k, k): one call per k x k step
        grams = damp(self._stacked_cross(z, z), self.damping)
        previous = None if reference is None else torch.stack((reference.q, reference.p), dim=-3)
        chol, ok_both = spd_cholesky_flagged(grams, previous)
        if self.check if check is None else check:
            raise_if_not_ok(
                ok_both[..., 1], "FactorQuotient: the Gram P = B^T B of the point", _RANK_FIX
            )
            raise_if_not_ok(
                ok_both[..., 0], "FactorQuotient: the Gram Q = A^T A of the point", _RANK_FIX
            )
        ok = ok_both.all(-1)
        usable = ok
        regularized = None
        if regularize:
            grams, chol, regularized = self._regularize(grams, chol, ok_both)
            usable = ok | regularized
        eye = torch.eye(grams.shape[-1], dtype=grams.dtype, device=grams.device)
        chol = torch.where(usable[..., None, None, None], chol, eye)
        q, p = grams.unbind(-3)
        chol_q, chol_p = chol.unbind(-3)
        p_inv = q_inv = None
        if inverses:  # G^{-1} = L^{-T} L^{-1}, the triangular inverse by batched matmuls
            lower_inv = tril_inverse(chol)
            q_inv, p_inv = (lower_inv.mT @ lower_inv).unbind(-3)
        return Grams(p, q, chol_p, chol_q, ok, p_inv, q_inv, regularized)

    #: relative size of the floor that :meth:`grams` adds for ``regularize=True``
    regularization = 0.1

    def _regularize(
        self, grams: torch.Tensor, chol: torch.Tensor, ok_both: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        r"""Regularized Grams for the heads that are not ok: :math:`P + \delta I` where ``P`` is
        rank-deficient, :math:`Q + \delta I` where ``Q`` is, with
        :math:`\delta = 0.1\,(\mathrm{tr} P + \mathrm{tr} Q) / 2k` (1 where both vanish); a
        full-rank Gram stays exact, so at a zero factor the other factor's step is the exact one. The Euclidean gradient of a factor lies in the range of the
        other factor's Gram (:math:`\nabla_A f = E B`), so the regularized step is close to the
        pseudo-inverse step: it never divides by a vanishing direction, and it moves a
        zero-initialized factor off zero in one step. Where one factor is zero and the other has
        full rank it is GL(k)-equivariant; elsewhere it is not."""
        k = grams.shape[-1]
        scale = grams.diagonal(dim1=-2, dim2=-1).sum((-2, -1)) / (2 * k)
        delta = torch.where(scale > 0, self.regularization * scale, torch.ones_like(scale))
        eye = torch.eye(k, dtype=grams.dtype, device=grams.device)
        ok = ok_both.all(-1)
        # only the rank-deficient Gram is floored: at a zero factor the other factor's step then
        # uses its exact Gram, which makes that (first) step GL(k)-equivariant
        floor = (~ok_both * delta[..., None])[..., None, None]
        grams = grams + floor * eye  # (..., 2, k, k), [Q, P]
        floored, info = torch.linalg.cholesky_ex(grams)
        finite = torch.isfinite(grams).flatten(-3).all(-1)
        regularized = ~ok & (info == 0).all(-1) & finite
        return grams, torch.where(ok[..., None, None, None], chol, floored), regularized

    # ---------------------------------------------------------------------- the geometry
    def egrad2rgrad(
        self,
        x: torch.Tensor,
        u: torch.Tensor,
        *,
        grams: Grams | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        r"""Riemannian gradient from the Euclidean one :math:`(\nabla_A f, \nabla_B f)`.

        * preconditioned: :math:`(\nabla_A f\, P^{-1},\; \nabla_B f\, Q^{-1})`;
        * inv: :math:`(\nabla_A f\, Q,\; \nabla_B f\, P)`.

        For a GL(k)-invariant :math:`f` (one that depends on :math:`A B^\top` only) the result is
        horizontal and equivariant, :math:`\mathrm{grad} f(ZG) = \mathrm{grad} f(Z) \cdot G`, so a
        step from any representative lands on the same orbit. For a non-invariant :math:`f` it is
        the total-space gradient; ``proju`` of it is the gradient of the quotient.
        """
        grams = self.grams(x) if grams is None else grams
        if self.metric == "preconditioned":
            return self._right_solve(u, grams, "p", "q", out=out)
        return self.right_multiply(u, grams.q, grams.p)

    def _vertical_generator(self, x: torch.Tensor, u: torch.Tensor, grams: Grams) -> torch.Tensor:
        r"""The :math:`W` with ``u - vertical(x, W)`` horizontal (metric-orthogonal to the orbit)."""
        at_ua, bt_ub = self.cross(x, u)
        p, q = grams.p, grams.q
        if self.metric == "preconditioned":
            # W = 1/2 (Q^{-1} A^T u_A - u_B^T B P^{-1})
            if grams.p_inv is not None and grams.q_inv is not None:
                # the inverses the Riemannian gradient uses: two k x k matmuls instead of four
                # triangular solves per head (batched small solves are slow on a CPU)
                return 0.5 * (grams.q_inv @ at_ua - bt_ub.transpose(-1, -2) @ grams.p_inv)
            left = torch.cholesky_solve(at_ua, grams.chol_q)
            right = torch.cholesky_solve(bt_ub, grams.chol_p)
            return 0.5 * (left - right.transpose(-1, -2))
        # inv metric: X = W^T solves the Sylvester equation (QP) X + X (QP) = R with
        # R = u_A^T A P - Q B^T u_B. QP is similar to the SPD S = Q^{1/2} P Q^{1/2}; with
        # X = Q^{1/2} Y Q^{-1/2} it becomes the Lyapunov equation S Y + Y S = Q^{-1/2} R Q^{1/2}.
        q_root = sym_funm(q, torch.sqrt)
        q_root_inv = sym_funm(q, torch.rsqrt)
        rhs = at_ua.transpose(-1, -2) @ p - q @ bt_ub
        s = q_root @ p @ q_root
        y = solve_sylvester_sym(s, s, q_root_inv @ rhs @ q_root)
        return (q_root @ y @ q_root_inv).transpose(-1, -2)

    def proju(
        self, x: torch.Tensor, u: torch.Tensor, *, grams: Grams | None = None
    ) -> torch.Tensor:
        r"""Horizontal projection :math:`\xi \mapsto \xi - (A W, -B W^\top)`.

        * preconditioned (closed form):
          :math:`W = \tfrac12 (Q^{-1} A^\top \xi_A - \xi_B^\top B P^{-1})`;
        * inv: :math:`X = W^\top` solves the Sylvester equation
          :math:`(QP) X + X (QP) = \xi_A^\top A P - Q B^\top \xi_B`; :math:`QP` is similar to the
          SPD :math:`S = Q^{1/2} P Q^{1/2}`, which turns it into a Lyapunov equation in :math:`S`
          (batched symmetric solve, :func:`quotientopt.linalg.solve_sylvester_sym`).

        Idempotent, metric-orthogonal to the vertical space, and it leaves
        :math:`d(A B^\top) = \xi_A B^\top + A \xi_B^\top` unchanged.
        """
        grams = self.grams(x) if grams is None else grams
        return u - self.vertical(x, self._vertical_generator(x, u, grams))

    horizontal_part = proju

    def proju_(
        self, x: torch.Tensor, u: torch.Tensor, *, grams: Grams | None = None
    ) -> torch.Tensor:
        """In-place :meth:`proju` of ``u`` (returns ``u``): with ``n == m`` and matching dtypes the
        vertical part is subtracted by one fused batched multiply-add, without a temporary."""
        grams = self.grams(x) if grams is None else grams
        w = self._vertical_generator(x, u, grams)
        if (
            self.n == self.m
            and x.dtype == u.dtype == w.dtype
            and x.is_contiguous()
            and u.is_contiguous()
        ):
            k = x.shape[-1]
            mats = torch.stack((w, -w.transpose(-1, -2)), dim=-3)
            x3 = x.reshape(-1, self.n, k)
            mats = mats.expand(*x.shape[:-2], 2, k, k).reshape(-1, k, k)
            u.view(-1, self.n, k).baddbmm_(x3, mats, alpha=-1)
            return u
        return u.sub_(self.vertical(x, w))

    def decay_rgrad(self, z: torch.Tensor, mode: str, grams: Grams) -> torch.Tensor:
        r"""Riemannian gradient of a weight-decay penalty that depends on the product only
        (see :func:`product_decay_egrad`), in ``z``'s dtype.

        For ``"product"`` in the undamped preconditioned metric it is exactly :math:`Z` itself:
        :math:`(A\,P)\,P^{-1} = A`, so a step scales the product by :math:`(1 - \eta\lambda)^2`.
        Otherwise the Euclidean gradient is raised with ``grams``; heads that ``grams`` flags as
        unhealthy (and the nuclear norm at a rank-deficient head, which has no gradient) give 0.
        """
        if mode == "product" and self.metric == "preconditioned" and self.damping == 0:
            return z
        penalty = self.egrad2rgrad(z, product_decay_egrad(self, z, mode), grams=grams)
        healthy = grams.ok & torch.isfinite(penalty).flatten(-2).all(-1)
        return torch.where(healthy[..., None, None], penalty, torch.zeros((), dtype=z.dtype))

    @property
    def supports_kinetic_energy(self) -> bool:
        """Whether :attr:`kinetic_force` is available: the undamped preconditioned metric.
        Deprecated: ask ``isinstance(manifold, KineticEnergy)``."""
        return self.metric == "preconditioned" and self.damping == 0

    @property
    def kinetic_force(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
        r"""The :class:`~quotientopt.manifolds.protocol.KineticEnergy` capability: ``(z, v)`` ->
        :math:`\partial_Z T` of the kinetic energy
        :math:`T = \tfrac12 \mathrm{tr}(p_A P^{-1} p_A^\top) + \tfrac12 \mathrm{tr}(p_B Q^{-1} p_B^\top)`
        at fixed momentum, written with the velocity :math:`V = (p_A P^{-1}, p_B Q^{-1})`:
        :math:`(-A\, V_B^\top V_B,\; -B\, V_A^\top V_A)`. ``None`` (absent) unless the metric is
        the undamped preconditioned one."""
        return self._kinetic_force if self.supports_kinetic_energy else None

    def factor_gram(self, z: torch.Tensor, which: int) -> torch.Tensor:
        r"""The Gram :math:`X^\top X` of one factor (``which`` 0: :math:`X = A`, 1: :math:`B`),
        ``(..., k, k)``, summed over the row shards: one ``(rows x k)^T (rows x k)`` product where
        :meth:`grams` forms two (a kinetic flow of the Hamiltonian moves one factor at a time;
        part of the :class:`~quotientopt.manifolds.protocol.KineticEnergy` capability)."""
        if self.row_reduce is not None:
            return self.cross(z, z)[which]
        f = self.factors(z)[which]
        return f.mT @ f

    def _kinetic_force(self, z: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        va_va, vb_vb = self.cross(v, v)
        return self.right_multiply(z, -vb_vb, -va_va)

    def quotient_dimension(self, k: int) -> int:
        r"""Dimension of one head's quotient by :math:`GL(k)`: :math:`(n + m) k - k^2 =
        (n + m - k) k`, with the whole sector's rows :math:`(n, m)` (:attr:`sector_rows`)."""
        n, m = self.sector_rows
        return (n + m - k) * k

    @property
    def is_row_sharded(self) -> bool:
        """Whether the rows are sharded across processes (``row_reduce`` is set: the
        :class:`~quotientopt.manifolds.protocol.RowSharded` capability). Deprecated: ask
        ``isinstance(manifold, RowSharded)``."""
        return self.row_reduce is not None

    def row_sum(self, t: torch.Tensor) -> torch.Tensor:
        r"""The sum over the row shards of a per-shard partial sum over rows.

        ``t`` (any shape, typically ``(..., k, k)`` such as :math:`\sum_{i \in \text{shard}}
        x_i^\top y_i` over this shard's rows :math:`i`, or a per-head count ``(...)``) is this
        process's part of a sum over all rows of the sector; the result (same shape and dtype) is
        :math:`\sum_{\text{shards } s} t_s`, identical on every shard. Without ``row_reduce``
        it is ``t`` itself (no copy, no communication); with it, one all-reduce of a contiguous
        copy (``t`` is not modified). :meth:`cross` and :meth:`grams` already reduce their
        results; this is for the other contractions an optimizer forms from local rows."""
        if self.row_reduce is None:
            return t
        return self.row_reduce(t.clone(memory_format=torch.contiguous_format))

    @property
    def sector_rows(self) -> tuple[int, int]:
        """The row counts :math:`(n, m)` of the whole sector: ``(self.n, self.m)`` unless the
        rows are sharded, then the counts given as ``sector_rows=`` (or set by an FSDP2 row
        placement); raises a ``ValueError`` for a sector sharded by hand without them."""
        rows = self.__dict__.get("_sector_rows")  # absent on manifolds pickled before it
        if rows is not None:
            return rows
        if self.row_reduce is not None:
            raise ValueError(
                f"{self.name}: this sector's rows are sharded by hand (row_reduce is set), so "
                f"n={self.n}, m={self.m} are this shard's rows and the whole sector's are unknown; "
                "build it with FactorQuotient(n_local, m_local, row_reduce=..., sector_rows=(n, m))"
            )
        return (self.n, self.m)

    @sector_rows.setter
    def sector_rows(self, rows: tuple[int, int] | None) -> None:
        if rows is not None:
            rows = tuple(rows)
            if len(rows) != 2:
                raise ValueError(f"{self.name}: sector_rows must be a pair (n, m), got {rows!r}")
            check_row_counts(self.name, *rows)
        self._sector_rows = rows

    def projx(self, x: torch.Tensor) -> torch.Tensor:
        """Identity: full-rank pairs form an open set (see the class notes; use :meth:`balance`)."""
        return x

    def inner(
        self,
        x: torch.Tensor,
        u: torch.Tensor,
        v: torch.Tensor | None = None,
        *,
        keepdim: bool = False,
        grams: Grams | None = None,
    ) -> torch.Tensor:
        r""":math:`g_Z(\xi, \eta)`, one value per point (``(...)``, or ``(..., 1, 1)`` with keepdim).

        preconditioned: :math:`\mathrm{tr}(P \xi_A^\top \eta_A) + \mathrm{tr}(Q \xi_B^\top \eta_B)`;
        inv: :math:`\mathrm{tr}(Q^{-1} \xi_A^\top \eta_A) + \mathrm{tr}(P^{-1} \xi_B^\top \eta_B)`.
        """
        if v is None:
            v = u
        grams = self.grams(x) if grams is None else grams
        dtype = grams.p.dtype
        if self.metric == "preconditioned":
            weighted = self.right_multiply(u.to(dtype), grams.p, grams.q)
        else:
            weighted = self._right_solve(u.to(dtype), grams, "q", "p")
        value = (weighted * v.to(dtype)).sum((-1, -2))
        if self.row_reduce is not None:
            value = self.row_reduce(value.contiguous())
        value = value.to(torch.promote_types(u.dtype, v.dtype))
        return value[..., None, None] if keepdim else value

    def retr(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        r"""Retraction :math:`R_Z(\xi) = Z + \xi`, valid while the factors keep full rank.

        It commutes with the action (:math:`R_{ZG}(\xi G) = R_Z(\xi) G`), so it is a retraction on
        the quotient. A step that loses rank is caught where the Grams are next factorized.
        """
        return x + u

    def expmap(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        r"""Documented fallback to :meth:`retr` (first-order approximation of the exponential map)."""
        return self.retr(x, u)

    def transp(self, x: torch.Tensor, y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        r"""Vector transport by projection: :math:`\mathcal{T}_{Z \to Y}(\xi) = \mathrm{proj}^h_Y(\xi)`."""
        return self.proju(y, v)

    # retr_transp and expmap_transp: geoopt's defaults (retr or expmap, then transp)

    # --------------------------------------------------------------------- checks, samples
    def _check_shape(self, shape: tuple[int, ...], name: str) -> CheckResult:
        ok, reason = super()._check_shape(shape, name)
        if ok:
            ok, reason = check_stacked_rows("FactorQuotient", self.n, self.m, shape, name)
        if not ok:
            return ok, reason
        k = shape[-1]
        if k > min(self.n, self.m) and self.row_reduce is None:
            return False, (
                f"`{name}` has k = {k} columns, more than min(n, m) = {min(self.n, self.m)}: the "
                "factors cannot have full column rank; use k <= min(n, m)."
            )
        return True, None

    def _check_finite_point(self, x: torch.Tensor, *, atol: float, rtol: float) -> CheckResult:
        for label, factor in zip(("A", "B"), self.factors(x), strict=True):
            rank = torch.linalg.matrix_rank(factor.to(compute_dtype(x.dtype)))
            if bool((rank < x.shape[-1]).any()):
                return False, f"factor {label} is rank-deficient (rank < k = {x.shape[-1]})"
        return True, None

    def random(self, *size, dtype=None, device=None, **kwargs) -> torch.Tensor:
        r"""Gaussian factors with entries :math:`\mathcal{N}(0, 1/k)`; full rank with probability 1.
        ``size`` is the full point shape ``(..., n + m, k)``."""
        shape = self._sample_shape(size, "random")
        return torch.randn(shape, dtype=dtype, device=device) / shape[-1] ** 0.5

    random_normal = random

    def origin(self, *size, dtype=None, device=None, seed: int | None = 42) -> torch.Tensor:
        r"""The balanced point :math:`A = [I_k; 0]`, :math:`B = [I_k; 0]` (product: the rank-k
        identity block, charge 0), broadcast over the leading dims."""
        shape = self._sample_shape(size, "origin")
        k = shape[-1]
        eye = torch.eye(k, dtype=dtype, device=device)
        a = torch.zeros(self.n, k, dtype=dtype, device=device)
        b = torch.zeros(self.m, k, dtype=dtype, device=device)
        a[:k], b[:k] = eye, eye
        return torch.cat((a, b), dim=-2).expand(shape).clone()
