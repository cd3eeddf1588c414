r"""Fixed-rank matrices in the three-factor (polar) form :math:`W = U S V^\top` modulo :math:`O(k)`.

The total space is :math:`\mathrm{St}(n, k) \times \mathrm{S}_{++}(k) \times \mathrm{St}(m, k)`
(orthonormal frames :math:`U`, :math:`V` and a symmetric positive definite :math:`S`), and
:math:`O \in O(k)` acts by

.. math:: (U, S, V) \mapsto (U O,\; O^\top S O,\; V O),

which leaves :math:`W = U S V^\top` unchanged. Because :math:`S` is SPD the fibre over a rank-k
matrix is exactly one :math:`O(k)` orbit, so the quotient is the manifold of rank-k ``n x m``
matrices, of dimension :math:`(n + m - k) k` (Mishra, Meyer, Bonnabel & Sepulchre 2014, the
polar factorization). A general invertible middle factor would need :math:`O(k) \times O(k)`
acting as :math:`(U O_1, O_1^\top S O_2, V O_2)`; that is not this class.

A point is ONE tensor with the factors stacked by rows, :math:`Z = [U; S; V]` of shape
``(..., n + k + m, k)``, batched over any leading dims. The :math:`O(k)`-invariant metric is

.. math:: g(\xi, \eta) = \mathrm{tr}(\xi_U^\top \eta_U) + \mathrm{tr}(\xi_V^\top \eta_V)
          + \mathrm{tr}(S^{-1} \xi_S S^{-1} \eta_S)

(Euclidean on the frames, affine-invariant on the SPD factor). Vertical vectors, the tangents to
the orbit, are :math:`(U \Omega, S \Omega - \Omega S, V \Omega)` for skew :math:`\Omega`; the
horizontal space is their :math:`g`-orthogonal complement within the total tangent space and
represents the tangent space of the quotient. All ``k x k`` algebra runs in
:func:`quotientopt.linalg.compute_dtype` (float32 or better) and the results are cast back.

Interop with pymanopt's ``FixedRankEmbedded`` (points ``(u, s, vt)``) is provided by
:meth:`FixedRank.to_pymanopt` / :meth:`FixedRank.from_pymanopt`, and for the two-factor
:math:`GL(k)` representation :math:`W = A B^\top` by :func:`factor_pair_to_pymanopt` /
:func:`factor_pair_from_pymanopt`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import geoopt
import numpy as np
import torch

from quotientopt.linalg import compute_dtype, gram, skew, spd_cholesky_flagged, sym, sym_funm
from quotientopt.manifolds._common import CheckResult, MatrixManifold, check_row_counts

__all__ = [
    "FixedRank",
    "PymanoptPoint",
    "factor_pair_from_pymanopt",
    "factor_pair_to_pymanopt",
]


class PymanoptPoint(NamedTuple):
    """A point of pymanopt's ``FixedRankEmbedded``: ``u`` ``(..., n, k)`` orthonormal, ``s``
    ``(..., k)`` positive and descending, ``vt`` ``(..., k, m)`` with orthonormal rows; the matrix
    is ``u @ diag(s) @ vt``. Unpacks as the tuple ``(u, s, vt)`` pymanopt expects."""

    u: np.ndarray
    s: np.ndarray
    vt: np.ndarray


def _polar(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    r"""Polar factor :math:`Y (Y^\top Y)^{-1/2}` of a full-rank ``y`` (``(..., p, k)``) through a
    ``k x k`` ``eigh``, cast to ``dtype``. Equivariant: :math:`Y O \mapsto Y (Y^\top Y)^{-1/2} O`."""
    return (y @ sym_funm(gram(y), torch.rsqrt)).to(dtype)


def _to_numpy(x: torch.Tensor) -> np.ndarray:
    return x.detach().cpu().numpy()


def _unpack_pymanopt(point: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(u, s, vt)`` as numpy arrays from a pymanopt point (a namedtuple or a plain triple)."""
    if all(hasattr(point, name) for name in ("u", "s", "vt")):
        u, s, vt = point.u, point.s, point.vt
    else:
        try:
            u, s, vt = point
        except (TypeError, ValueError) as exc:
            raise ValueError(
                "expected a pymanopt FixedRankEmbedded point (u, s, vt), got "
                f"{type(point).__name__}"
            ) from exc
    u, s, vt = (np.ascontiguousarray(a) for a in (u, s, vt))
    k = s.shape[-1] if s.ndim else -1
    if u.ndim < 2 or vt.ndim < 2 or s.ndim < 1 or u.shape[-1] != k or vt.shape[-2] != k:
        raise ValueError(
            "pymanopt point has inconsistent shapes: expected u (..., n, k), s (..., k), "
            f"vt (..., k, m), got u {u.shape}, s {s.shape}, vt {vt.shape}"
        )
    if not (np.isfinite(u).all() and np.isfinite(s).all() and np.isfinite(vt).all()):
        raise ValueError("pymanopt point holds NaN or Inf")
    if not (s > 0).all():
        raise ValueError(
            "pymanopt point has non-positive singular values s; a rank-k point needs s > 0"
        )
    return u, s, vt


def factor_pair_to_pymanopt(a: torch.Tensor, b: torch.Tensor) -> PymanoptPoint:
    r"""The pymanopt point ``(u, s, vt)`` of :math:`W = A B^\top` (two-factor :math:`GL(k)` form).

    With thin QR factorizations :math:`A = Q_A R_A`, :math:`B = Q_B R_B` and the ``k x k`` SVD
    :math:`R_A R_B^\top = P \Sigma Q^\top`: :math:`u = Q_A P`, :math:`s = \mathrm{diag}(\Sigma)`
    (descending), :math:`v^\top = Q^\top Q_B^\top`. Cost :math:`O((n + m) k^2)`, the ``n x m``
    product is never formed. ``a`` ``(..., n, k)``, ``b`` ``(..., m, k)`` (torch tensors or
    arrays); returns numpy arrays, leading batch dims kept.
    """
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    if a.ndim < 2 or b.ndim < 2 or a.shape[-1] != b.shape[-1]:
        raise ValueError(
            f"factor_pair_to_pymanopt: expected A (..., n, k) and B (..., m, k), got "
            f"{tuple(a.shape)} and {tuple(b.shape)}"
        )
    k = a.shape[-1]
    if k > a.shape[-2] or k > b.shape[-2]:
        raise ValueError(
            f"factor_pair_to_pymanopt: rank k = {k} exceeds min(n, m) = "
            f"{min(a.shape[-2], b.shape[-2])}"
        )
    dtype = compute_dtype(torch.promote_types(a.dtype, b.dtype))
    qa, ra = torch.linalg.qr(a.to(dtype))
    qb, rb = torch.linalg.qr(b.to(dtype))
    p, s, qh = torch.linalg.svd(ra @ rb.transpose(-1, -2))
    return PymanoptPoint(_to_numpy(qa @ p), _to_numpy(s), _to_numpy(qh @ qb.transpose(-1, -2)))


def factor_pair_from_pymanopt(
    point: Any, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Balanced factor pair of a pymanopt point: :math:`A = u\, \mathrm{diag}(s)^{1/2}`,
    :math:`B = v\, \mathrm{diag}(s)^{1/2}`, so :math:`A B^\top = u\, \mathrm{diag}(s)\, v^\top`
    and :math:`A^\top A = B^\top B = \mathrm{diag}(s)`. Returns ``(A, B)`` of shapes
    ``(..., n, k)``, ``(..., m, k)``."""
    u, s, vt = _unpack_pymanopt(point)
    root = np.sqrt(s)[..., None, :]
    a = torch.as_tensor(u * root, dtype=dtype, device=device)
    b = torch.as_tensor(np.swapaxes(vt, -1, -2) * root, dtype=dtype, device=device)
    return a, b


class FixedRank(MatrixManifold):
    r"""Rank-k ``n x m`` matrices :math:`U S V^\top` as :math:`(\mathrm{St}(n,k) \times
    \mathrm{S}_{++}(k) \times \mathrm{St}(m,k)) / O(k)`.

    Parameters
    ----------
    n, m : int
        Rows of :math:`U` and of :math:`V`. A point has shape ``(..., n + k + m, k)``, rows
        stacked :math:`[U; S; V]`, with ``1 <= k <= min(n, m)``; ``k`` is read from the tensor.

    Notes
    -----
    :math:`U`, :math:`V` live on geoopt's :class:`~geoopt.manifolds.EuclideanStiefel` (its
    tangent projection and point check are reused). ``expmap`` falls back to :meth:`retr`: the
    quotient geodesics have no closed form and every optimizer only needs a retraction. Only
    :math:`S` SPD is supported; a general invertible :math:`S` has the larger symmetry
    :math:`O(k) \times O(k)` and needs a different horizontal space. ``component_inner``
    (RiemannianAdam's second moment) and ``norm`` are the inherited per-point ones: one
    :math:`O(k)`-invariant value :math:`g(\xi, \eta)` per point.
    """

    name = "FixedRank"
    reversible = False

    def __init__(self, n: int, m: int) -> None:
        super().__init__()
        check_row_counts("FixedRank", n, m, ("U", "V"))
        self.n, self.m = n, m
        self.stiefel = geoopt.manifolds.EuclideanStiefel()

    def extra_repr(self) -> str:
        return f"n={self.n}, m={self.m}"

    # ----------------------------------------------------------------------------- factors
    def _check_shape(self, shape: tuple[int, ...], name: str) -> CheckResult:
        ok, reason = super()._check_shape(shape, name)
        if not ok:
            return ok, reason
        rows, k = shape[-2], shape[-1]
        if k < 1:
            return False, f"`{name}` has k = shape[-1] = {k}; the rank k must be at least 1"
        if rows != self.n + k + self.m:
            return False, (
                f"`{name}` has shape {tuple(shape)}: FixedRank(n={self.n}, m={self.m}) with "
                f"k = shape[-1] = {k} needs shape[-2] == n + k + m = {self.n + k + self.m} "
                f"(rows [U; S; V]), got {rows}"
            )
        if k > min(self.n, self.m):
            return False, (
                f"`{name}` has rank k = shape[-1] = {k} > min(n, m) = {min(self.n, self.m)}; "
                "a rank-k n x m matrix needs k <= min(n, m)"
            )
        return True, None

    def factors(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        r"""Views :math:`U = Z_{:n}` ``(..., n, k)``, :math:`S = Z_{n:n+k}` ``(..., k, k)``,
        :math:`V = Z_{n+k:}` ``(..., m, k)``. Raises ``ValueError`` on a wrong shape."""
        self._assert_check_shape(z.shape, "z")
        n, k = self.n, z.shape[-1]
        return z[..., :n, :], z[..., n : n + k, :], z[..., n + k :, :]

    def from_factors(self, u: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        r"""Stack :math:`Z = [U; S; V]`, shape ``(..., n + k + m, k)`` (batch dims broadcast)."""
        k = u.shape[-1]
        if (
            u.ndim < 2
            or s.ndim < 2
            or v.ndim < 2
            or u.shape[-2] != self.n
            or v.shape[-2] != self.m
            or s.shape[-2:] != (k, k)
            or v.shape[-1] != k
        ):
            raise ValueError(
                f"FixedRank(n={self.n}, m={self.m}).from_factors: expected U (..., {self.n}, k), "
                f"S (..., k, k), V (..., {self.m}, k), got {tuple(u.shape)}, {tuple(s.shape)}, "
                f"{tuple(v.shape)}"
            )
        batch = torch.broadcast_shapes(u.shape[:-2], s.shape[:-2], v.shape[:-2])
        parts = [t.expand(*batch, *t.shape[-2:]) for t in (u, s, v)]
        z = torch.cat(parts, dim=-2)
        self._assert_check_shape(z.shape, "z")
        return z

    def product(self, z: torch.Tensor) -> torch.Tensor:
        r"""The matrix :math:`W = U S V^\top`, shape ``(..., n, m)``."""
        u, s, v = self.factors(z)
        return (u @ s) @ v.transpose(-1, -2)

    def act(self, z: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        r"""The group action :math:`(U, S, V) \mapsto (U O, O^\top S O, V O)` for ``o`` of shape
        ``(..., k, k)``; applied to a tangent vector it is the differential of the action."""
        u, s, v = self.factors(z)
        o = o.to(z.dtype)
        return self.from_factors(u @ o, o.transpose(-1, -2) @ s @ o, v @ o)

    def vertical(self, z: torch.Tensor, omega: torch.Tensor) -> torch.Tensor:
        r"""Vertical vector :math:`(U \Omega, S \Omega - \Omega S, V \Omega)` with
        :math:`\Omega = \mathrm{skew}(\omega)`, ``omega`` of shape ``(..., k, k)``; shape of ``z``.
        It is the velocity of :math:`t \mapsto (U e^{t\Omega}, e^{-t\Omega} S e^{t\Omega},
        V e^{t\Omega})` at 0, which keeps :math:`W` fixed."""
        u, s, v = self.factors(z)
        om = skew(omega).to(z.dtype)
        return self.from_factors(u @ om, s @ om - om @ s, v @ om)

    # -------------------------------------------------------------------- horizontal space
    def _vertical_coefficient(
        self,
        u: torch.Tensor,
        s: torch.Tensor,
        v: torch.Tensor,
        xi_u: torch.Tensor,
        xi_s: torch.Tensor,
        xi_v: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        r"""The skew :math:`\Omega` of the vertical part of a total tangent vector :math:`\xi`.

        :math:`g(\xi - \mathrm{ver}(\Omega), \mathrm{ver}(\Omega')) = 0` for all skew
        :math:`\Omega'` reads

        .. math:: S \Omega S^{-1} + S^{-1} \Omega S = R, \qquad
                  R = \mathrm{skew}(U^\top \xi_U) + \mathrm{skew}(V^\top \xi_V)
                      + \xi_S S^{-1} - S^{-1} \xi_S .

        In the eigenbasis :math:`S = E \operatorname{diag}(s) E^\top` (tildes: :math:`E^\top
        \cdot E`) with :math:`A = \mathrm{skew}(U^\top \xi_U) + \mathrm{skew}(V^\top \xi_V)`:

        .. math:: \tilde\Omega_{ij} = \frac{s_i s_j \tilde A_{ij} + (s_i - s_j)
                  \tilde\xi_{S,ij}}{s_i^2 + s_j^2},

        evaluated with :math:`s` scaled by :math:`\max s` against overflow. Returns
        ``(omega_tilde, s, E)`` in the compute dtype, shapes ``(..., k, k)``, ``(..., k)``,
        ``(..., k, k)``.
        """
        dtype = compute_dtype(s.dtype)
        lam, e = torch.linalg.eigh(sym(s.to(dtype)))
        a = skew(u.to(dtype).transpose(-1, -2) @ xi_u.to(dtype)) + skew(
            v.to(dtype).transpose(-1, -2) @ xi_v.to(dtype)
        )
        et = e.transpose(-1, -2)
        a_t = et @ a @ e
        x_t = et @ xi_s.to(dtype) @ e
        c = lam.amax(-1, keepdim=True)
        r = lam / c
        ri, rj = r[..., :, None], r[..., None, :]
        om_t = (ri * rj * a_t + (ri - rj) * x_t / c[..., None]) / (ri * ri + rj * rj)
        return om_t, lam, e

    def _horizontal(
        self, z: torch.Tensor, xi_u: torch.Tensor, xi_s: torch.Tensor, xi_v: torch.Tensor
    ) -> torch.Tensor:
        r""":math:`\xi - \mathrm{ver}(\Omega)` for a total tangent :math:`\xi` (see
        :meth:`_vertical_coefficient`), stacked, shape of ``z``."""
        u, s, v = self.factors(z)
        om_t, lam, e = self._vertical_coefficient(u, s, v, xi_u, xi_s, xi_v)
        et = e.transpose(-1, -2)
        om = (e @ om_t @ et).to(z.dtype)
        # S Om - Om S = E (Om~ * (s_i - s_j)) E^T
        comm = (e @ (om_t * (lam[..., :, None] - lam[..., None, :])) @ et).to(z.dtype)
        return self.from_factors(xi_u - u @ om, xi_s - comm, xi_v - v @ om)

    def proju(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        r"""Projection onto the horizontal space at :math:`x`, shape of ``x``.

        First onto the total tangent space, :math:`\xi_U \mapsto \xi_U - U
        \mathrm{sym}(U^\top \xi_U)` (likewise :math:`V`, geoopt's Stiefel projection) and
        :math:`\xi_S \mapsto \mathrm{sym}(\xi_S)`, then :math:`\xi \mapsto \xi -
        \mathrm{ver}(\Omega)` with :math:`\Omega` from :meth:`_vertical_coefficient`. Idempotent;
        equivariant under :math:`O(k)`.
        """
        xu, _, xv = self.factors(x)
        gu, gs, gv = self.factors(u)
        return self._horizontal(x, self.stiefel.proju(xu, gu), sym(gs), self.stiefel.proju(xv, gv))

    horizontal_part = proju

    def egrad2rgrad(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        r"""Riemannian gradient from the Euclidean one :math:`(G_U, G_S, G_V)`:

        .. math:: (G_U - U \mathrm{sym}(U^\top G_U),\; S \mathrm{sym}(G_S) S,\;
                  G_V - V \mathrm{sym}(V^\top G_V))

        (the total-space gradient for :math:`g`), then projected horizontally. For an
        :math:`O(k)`-invariant loss the total gradient is already horizontal and the projection
        only removes round-off. Shape of ``x``.
        """
        xu, xs, xv = self.factors(x)
        gu, gs, gv = self.factors(u)
        dtype = compute_dtype(x.dtype)
        sc = xs.to(dtype)
        rs = (sc @ sym(gs.to(dtype)) @ sc).to(x.dtype)
        return self._horizontal(x, self.stiefel.proju(xu, gu), sym(rs), self.stiefel.proju(xv, gv))

    # ------------------------------------------------------------------------------ metric
    def inner(
        self,
        x: torch.Tensor,
        u: torch.Tensor,
        v: torch.Tensor | None = None,
        *,
        keepdim: bool = False,
    ) -> torch.Tensor:
        r""":math:`g(\xi, \eta) = \mathrm{tr}(\xi_U^\top \eta_U) + \mathrm{tr}(\xi_V^\top \eta_V)
        + \mathrm{tr}(S^{-1} \xi_S S^{-1} \eta_S)`, shape ``(...)`` or ``(..., 1, 1)`` with
        ``keepdim``. The SPD term is :math:`\sum_{ij} (S^{-1}\xi_S)_{ij} (S^{-1}\eta_S)_{ji}`
        with Cholesky solves (no host synchronisation)."""
        _, xs, _ = self.factors(x)
        uu, us, uv = self.factors(u)
        dtype = compute_dtype(x.dtype)
        chol = torch.linalg.cholesky_ex(sym(xs.to(dtype)))[0]
        a = torch.cholesky_solve(us.to(dtype), chol)
        if v is None:
            vu, vv, b = uu, uv, a
        else:
            vu, vs, vv = self.factors(v)
            b = torch.cholesky_solve(vs.to(dtype), chol)
        spd = (a * b.transpose(-1, -2)).sum((-1, -2))
        frames = (uu.to(dtype) * vu.to(dtype)).sum((-1, -2)) + (uv.to(dtype) * vv.to(dtype)).sum(
            (-1, -2)
        )
        out = (frames + spd).to(torch.promote_types(x.dtype, u.dtype))
        return out[..., None, None] if keepdim else out

    # -------------------------------------------------------------------------- retraction
    def retr(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        r"""Retraction, factor by factor, shape of ``x``:

        .. math:: U_+ = (U + \xi_U) G^{-1/2},\quad G = (U + \xi_U)^\top (U + \xi_U)

        (polar, via a ``k x k`` ``eigh``; likewise :math:`V`) and

        .. math:: S_+ = S^{1/2} \exp(S^{-1/2} \xi_S S^{-1/2}) S^{1/2}

        (the affine-invariant exponential, stays SPD; :math:`\xi_S` is symmetrized). With
        :math:`S = E \operatorname{diag}(\lambda) E^\top`, :math:`D = \operatorname{diag}
        (\lambda^{1/2})` and :math:`D^{-1} E^\top \xi_S E D^{-1} = P \operatorname{diag}(\mu)
        P^\top`: :math:`S_+ = F \operatorname{diag}(e^\mu) F^\top`, :math:`F = E D P`. Every step
        is :math:`O(k)`-equivariant, :math:`R_{xO}(\xi O) = R_x(\xi) O` (QR would not be), so the
        retraction is well defined on the quotient.
        """
        xu, xs, xv = self.factors(x)
        gu, gs, gv = self.factors(u)
        dtype = compute_dtype(x.dtype)
        new_u = _polar((xu + gu).to(dtype), x.dtype)
        new_v = _polar((xv + gv).to(dtype), x.dtype)
        lam, e = torch.linalg.eigh(sym(xs.to(dtype)))
        root = lam.clamp_min(torch.finfo(dtype).tiny).sqrt()
        m_t = (e.transpose(-1, -2) @ sym(gs.to(dtype)) @ e) / (
            root[..., :, None] * root[..., None, :]
        )
        mu, p = torch.linalg.eigh(sym(m_t))
        f = (e * root[..., None, :]) @ p * torch.exp(0.5 * mu)[..., None, :]
        new_s = (f @ f.transpose(-1, -2)).to(x.dtype)
        return self.from_factors(new_u, new_s, new_v)

    def expmap(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        r"""Falls back to :meth:`retr`: the quotient geodesics have no closed form (the factor
        geodesics do, but their product is not a horizontal geodesic). Shape of ``x``."""
        return self.retr(x, u)

    def transp(self, x: torch.Tensor, y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        r"""Vector transport :math:`\mathcal{T}_{x \to y}(\xi) = \mathrm{proj}^h_y(\xi_U,
        E \xi_S E^\top, \xi_V)`, shape of ``x``.

        On the SPD factor it is the affine-invariant parallel transport (along the geodesic from
        :math:`S_x` to :math:`S_y`),

        .. math:: E = (S_y S_x^{-1})^{1/2} = S_x^{1/2} (S_x^{-1/2} S_y S_x^{-1/2})^{1/2}
                  S_x^{-1/2},

        an isometry of the SPD term of the metric (:math:`E^\top S_y^{-1} E = S_x^{-1}`); on the
        frames it is the identity; then :meth:`proju` at :math:`y`. Plain projection would keep
        :math:`\xi_S` fixed while :math:`S` shrinks, so that its metric size grows like
        :math:`1/\lambda_{\min}(S)^2` and momentum methods blow up when an eigenvalue of
        :math:`S` decays. Equivariant (:math:`E \mapsto O^\top E O`), so a transport on the
        quotient; :math:`x = y` gives :math:`E = I`, i.e. :meth:`proju`.
        """
        _, xs, _ = self.factors(x)
        _, ys, _ = self.factors(y)
        vu, vs, vv = self.factors(v)
        dtype = compute_dtype(x.dtype)
        lam, q = torch.linalg.eigh(sym(xs.to(dtype)))
        root = lam.clamp_min(torch.finfo(dtype).tiny).sqrt()
        qt = q.transpose(-1, -2)
        half = (q * root[..., None, :]) @ qt
        inv_half = (q / root[..., None, :]) @ qt
        c_half = sym_funm(sym(inv_half @ ys.to(dtype) @ inv_half), lambda s: s.clamp_min(0).sqrt())
        e = half @ c_half @ inv_half
        new_vs = (e @ sym(vs.to(dtype)) @ e.transpose(-1, -2)).to(v.dtype)
        return self.proju(y, self.from_factors(vu, new_vs, vv))

    def projx(self, x: torch.Tensor) -> torch.Tensor:
        r"""Nearest total-space point: :math:`U, V` replaced by their polar factors (thin SVD
        :math:`U = P \Sigma Q^\top \mapsto P Q^\top`), :math:`S` symmetrized and its eigenvalues
        clamped to at least :math:`k \varepsilon \max_i |\lambda_i|` (``tiny`` if all vanish).
        Leaves points on the manifold unchanged (up to round-off); equivariant."""
        xu, xs, xv = self.factors(x)
        dtype = compute_dtype(x.dtype)

        def polar_svd(y: torch.Tensor) -> torch.Tensor:
            p, _, qh = torch.linalg.svd(y.to(dtype), full_matrices=False)
            return (p @ qh).to(x.dtype)

        k = x.shape[-1]
        lam, e = torch.linalg.eigh(sym(xs.to(dtype)))
        floor = (k * torch.finfo(dtype).eps * lam.abs().amax(-1, keepdim=True)).clamp_min(
            torch.finfo(dtype).tiny
        )
        lam = torch.maximum(lam, floor)
        new_s = sym((e * lam[..., None, :]) @ e.transpose(-1, -2)).to(x.dtype)
        return self.from_factors(polar_svd(xu), new_s, polar_svd(xv))

    # ------------------------------------------------------------------------------ checks
    def _check_finite_point(self, x: torch.Tensor, *, atol: float, rtol: float) -> CheckResult:
        xu, xs, xv = self.factors(x)
        for label, frame in (("U", xu), ("V", xv)):
            ok, reason = self.stiefel._check_point_on_manifold(frame, atol=atol, rtol=rtol)
            if not ok:
                return False, f"{label} is not orthonormal (not on Stiefel): {reason}"
        if not torch.allclose(xs, xs.transpose(-1, -2), atol=atol, rtol=rtol):
            return False, f"S is not symmetric with atol={atol}, rtol={rtol}"
        s = sym(xs.to(compute_dtype(x.dtype)))
        _, ok = spd_cholesky_flagged(s)
        if not bool(ok.all()):
            lam_min = float(torch.linalg.eigvalsh(s).amin())
            return False, (
                f"S is not positive definite (smallest eigenvalue {lam_min:.3g}, or singular to "
                "working precision); use projx or a positive definite S"
            )
        return True, None

    def _check_finite_vector(
        self, x: torch.Tensor, u: torch.Tensor, *, atol: float, rtol: float
    ) -> CheckResult:
        xu, xs, xv = self.factors(x)
        gu, gs, gv = self.factors(u)
        for label, frame, vec in (("U", xu, gu), ("V", xv, gv)):
            ok, reason = self.stiefel._check_vector_on_tangent(frame, vec, atol=atol, rtol=rtol)
            if not ok:
                return False, f"xi_{label} is not tangent to Stiefel at {label}: {reason}"
        if not torch.allclose(gs, gs.transpose(-1, -2), atol=atol, rtol=rtol):
            return False, f"xi_S is not symmetric with atol={atol}, rtol={rtol}"
        om_t, _, _ = self._vertical_coefficient(xu, xs, xv, gu, gs, gv)
        if not torch.allclose(om_t, torch.zeros_like(om_t), atol=atol, rtol=rtol):
            return False, (
                f"the vector is not horizontal: vertical part Omega has max entry "
                f"{float(om_t.abs().amax()):.3g} > atol={atol}"
            )
        return True, None

    # ------------------------------------------------------------------------------ points
    def random(
        self,
        *size: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> geoopt.ManifoldTensor:
        r"""Random point of shape ``size`` = ``(..., n + k + m, k)``: :math:`U`, :math:`V` the
        sign-fixed QR factors of Gaussian matrices, :math:`S = O \operatorname{diag}(e^{g/2})
        O^\top` with Gaussian :math:`g` and a random orthogonal :math:`O`."""
        shape = self._sample_shape(size, "random")
        *batch, _, k = shape
        dtype = dtype or torch.get_default_dtype()
        cdt = compute_dtype(dtype)

        def frame(rows: int) -> torch.Tensor:
            g = torch.randn(*batch, rows, k, dtype=cdt, device=device, generator=generator)
            q, r = torch.linalg.qr(g)
            return q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[..., None, :]

        o = frame(k)
        lam = torch.exp(0.5 * torch.randn(*batch, k, dtype=cdt, device=device, generator=generator))
        s = sym((o * lam[..., None, :]) @ o.transpose(-1, -2))
        z = self.from_factors(frame(self.n), s, frame(self.m)).to(dtype)
        return geoopt.ManifoldTensor(z, manifold=self)

    def origin(
        self,
        *size: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        seed: int = 42,
    ) -> geoopt.ManifoldTensor:
        r"""The point :math:`U = I_{n,k}`, :math:`S = I_k`, :math:`V = I_{m,k}` (first k columns
        of the identity), shape ``size``. ``seed`` is ignored (geoopt's signature)."""
        shape = self._sample_shape(size, "origin")
        k = shape[-1]
        u = torch.eye(self.n, k, dtype=dtype, device=device)
        s = torch.eye(k, dtype=dtype, device=device)
        v = torch.eye(self.m, k, dtype=dtype, device=device)
        z = self.from_factors(u, s, v).expand(*shape).clone()
        return geoopt.ManifoldTensor(z, manifold=self)

    # ---------------------------------------------------------------------------- pymanopt
    def to_pymanopt(self, z: torch.Tensor) -> PymanoptPoint:
        r"""The pymanopt ``FixedRankEmbedded`` point of :math:`[Z]`: with the ``eigh``
        :math:`S = E \operatorname{diag}(s) E^\top` sorted descending, :math:`u = U E`,
        :math:`v^\top = (V E)^\top`. Numpy arrays ``u`` ``(..., n, k)``, ``s`` ``(..., k)``,
        ``vt`` ``(..., k, m)`` (leading batch dims kept); ``u diag(s) vt`` equals
        :meth:`product`."""
        xu, xs, xv = self.factors(z)
        dtype = compute_dtype(z.dtype)
        lam, e = torch.linalg.eigh(sym(xs.to(dtype)))
        lam, e = lam.flip(-1), e.flip(-1)
        u = xu.to(dtype) @ e
        vt = (xv.to(dtype) @ e).transpose(-1, -2)
        return PymanoptPoint(_to_numpy(u), _to_numpy(lam), _to_numpy(vt))

    def from_pymanopt(
        self,
        point: Any,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        r"""The point :math:`Z = [u; \operatorname{diag}(s); v]` of a pymanopt point
        ``(u, s, vt)`` (``s`` must be positive). Shape ``(..., n + k + m, k)``."""
        u, s, vt = _unpack_pymanopt(point)
        tu = torch.as_tensor(u, dtype=dtype, device=device)
        ts = torch.diag_embed(torch.as_tensor(s, dtype=tu.dtype, device=tu.device))
        tv = torch.as_tensor(np.swapaxes(vt, -1, -2), dtype=tu.dtype, device=tu.device)
        return self.from_factors(tu, ts, tv)
