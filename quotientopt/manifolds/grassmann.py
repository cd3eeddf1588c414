r"""The Grassmann manifold :math:`\mathrm{Gr}(n, k)` of k-dimensional subspaces of
:math:`\mathbb{R}^n`, as the quotient :math:`\mathrm{St}(n, k) / O(k)`.

A point is an orthonormal frame :math:`X` (shape ``(..., n, k)``, :math:`X^\top X = I_k`) standing
for its column space; :math:`X` and :math:`X O` (:math:`O \in O(k)`) are the same point. Leading
dims batch heads and layers. The metric is the Euclidean one of the ambient space restricted to the
horizontal space

.. math:: \mathcal{H}_X = \{\xi \in \mathbb{R}^{n \times k} : X^\top \xi = 0\},

which represents the tangent space of the quotient at :math:`[X]`. Every map below is
:math:`O(k)`-equivariant (:math:`F(XO, \xi O) = F(X, \xi)\, O`), so it is well defined on the
quotient. All ``k x k`` algebra runs in :func:`quotientopt.linalg.compute_dtype` (float32 or
better) and the results are cast back to the input dtype.
"""

from __future__ import annotations

import torch

from quotientopt.linalg import compute_dtype, gram, sym_funm
from quotientopt.manifolds._common import CheckResult, EuclideanMetric

__all__ = ["Grassmann"]


def _inv_sqrt(g: torch.Tensor) -> torch.Tensor:
    r""":math:`G^{-1/2}` of a batch of SPD ``k x k`` matrices through ``eigh``."""
    return sym_funm(g, torch.rsqrt)


def _orthonormalize(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    r"""Polar factor :math:`Y (Y^\top Y)^{-1/2}` of a full-rank ``y`` (in ``y``'s dtype, which is
    the compute dtype), cast to ``dtype``. Equivariant: :math:`YO \mapsto Y (Y^\top Y)^{-1/2} O`."""
    return (y @ _inv_sqrt(y.transpose(-1, -2) @ y)).to(dtype)


class Grassmann(EuclideanMetric):
    r"""Grassmann manifold :math:`\mathrm{St}(n, k) / O(k)` with orthonormal-frame representatives.

    A point has shape ``(..., n, k)`` with ``k <= n`` and :math:`X^\top X = I`; tangent vectors are
    horizontal, :math:`X^\top \xi = 0`; the metric is :math:`\langle \xi, \eta \rangle =
    \mathrm{tr}(\xi^\top \eta)` (the inherited Euclidean ``inner``: one :math:`O(k)`-invariant
    value per frame). Sizes ``n`` and ``k`` are read from the tensors, so one instance serves every
    shape.
    """

    name = "Grassmann"
    reversible = False
    _nonfinite_point_hint = "re-initialize it (e.g. with projx or random)"

    # ---------------------------------------------------------------------- the geometry
    def proju(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        r"""Horizontal projection :math:`\xi \mapsto \xi - X (X^\top \xi)`, shape ``(..., n, k)``.

        Orthogonal (in the Euclidean metric) onto :math:`\{\xi : X^\top \xi = 0\}`; it kills both
        the vertical directions :math:`X \Omega` (:math:`\Omega` skew) and the normal ones
        :math:`X S` (:math:`S` symmetric) of the Stiefel manifold.
        """
        return u - x @ (x.transpose(-1, -2) @ u)

    def egrad2rgrad(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        r"""Riemannian gradient :math:`(I - X X^\top) \nabla f`, the horizontal projection of the
        Euclidean gradient. For an :math:`O(k)`-invariant :math:`f` it equals the Stiefel
        gradient :math:`\nabla f - X \operatorname{sym}(X^\top \nabla f)`, because
        :math:`X^\top \nabla f` is then symmetric."""
        return self.proju(x, u)

    def projx(self, x: torch.Tensor) -> torch.Tensor:
        r"""Nearest orthonormal frame: the polar factor :math:`U V^\top` of the thin SVD
        :math:`X = U \Sigma V^\top`. Same column space; equivariant; identity on the manifold."""
        u, _, vh = torch.linalg.svd(x.to(compute_dtype(x.dtype)), full_matrices=False)
        return (u @ vh).to(x.dtype)

    def retr(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        r"""Polar retraction :math:`R_X(\xi) = (X + \xi)\, G^{-1/2}`,
        :math:`G = (X + \xi)^\top (X + \xi)`.

        For horizontal :math:`\xi`, :math:`G = I + \xi^\top \xi` (eigenvalues :math:`\ge 1`, always
        invertible). :math:`G^{-1/2}` comes from a ``k x k`` ``eigh``, so
        :math:`R_{XO}(\xi O) = R_X(\xi)\, O` exactly (a QR-based retraction is not equivariant).
        Using the Gram of :math:`X + \xi` rather than :math:`I + \xi^\top \xi` also absorbs any
        drift of :math:`X` off the manifold. Shape ``(..., n, k)``.
        """
        y = (x + u).to(compute_dtype(x.dtype))
        return _orthonormalize(y, x.dtype)

    def expmap(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        r"""Exact geodesic :math:`\mathrm{Exp}_X(\xi) = X V \cos(\Sigma) V^\top + U \sin(\Sigma) V^\top`
        for the thin SVD :math:`\xi = U \Sigma V^\top` of a horizontal :math:`\xi`.

        Computed without the ``n x k`` SVD: with :math:`S = (\xi^\top \xi)^{1/2} = V \Sigma V^\top`
        (``k x k`` ``eigh``), :math:`\mathrm{Exp}_X(\xi) = X \cos(S) + \xi\, \mathrm{sinc}(S)`,
        :math:`\mathrm{sinc}(s) = \sin(s)/s` (1 at 0). This is smooth at zero singular values,
        where :math:`U` is undetermined, and equivariant. The result is re-orthonormalized (polar
        factor) against round-off. Shape ``(..., n, k)``.
        """
        dtype = compute_dtype(x.dtype)
        xc, uc = x.to(dtype), u.to(dtype)
        lam, v = torch.linalg.eigh(gram(uc))
        s = lam.clamp_min(0).sqrt()
        vt = v.transpose(-1, -2)
        cos_s = (v * torch.cos(s)[..., None, :]) @ vt
        sinc_s = (v * torch.sinc(s / torch.pi)[..., None, :]) @ vt
        return _orthonormalize(xc @ cos_s + uc @ sinc_s, x.dtype)

    def logmap(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        r"""Inverse of :meth:`expmap`: the horizontal :math:`\xi` with
        :math:`\mathrm{span}\,\mathrm{Exp}_X(\xi) = \mathrm{span}\, Y` and
        :math:`\|\xi\| = \mathrm{dist}(X, Y)`.

        1. Align :math:`Y` to :math:`X` (orthogonal Procrustes): with the SVD
           :math:`X^\top Y = P C_0 R^\top`, :math:`Y_* = Y R P^\top`, so that
           :math:`C = X^\top Y_* = P C_0 P^\top` is symmetric PSD (the cosines of the principal
           angles).
        2. :math:`H = Y_* - X C` (``(I - X X^\top) Y_*``) has :math:`H^\top H = I - C^2`; with the
           ``eigh`` :math:`H^\top H = V \operatorname{diag}(\sigma^2) V^\top` (which also
           diagonalizes :math:`C`), :math:`\theta = \operatorname{atan2}(\sigma,
           \operatorname{diag}(V^\top C V))`.
        3. :math:`\xi = H V \operatorname{diag}(\theta / \sigma) V^\top` (:math:`\theta/\sigma \to
           1/c` as :math:`\sigma \to 0`).

        ``atan2`` keeps both small and large angles accurate. Undefined at the cut locus (a
        principal angle of :math:`\pi/2`). Shape ``(..., n, k)``.
        """
        dtype = compute_dtype(x.dtype)
        xc, yc = x.to(dtype), y.to(dtype)
        p, _, rh = torch.linalg.svd(xc.transpose(-1, -2) @ yc)
        y_star = yc @ rh.transpose(-1, -2) @ p.transpose(-1, -2)
        c = xc.transpose(-1, -2) @ y_star
        h = y_star - xc @ c
        lam, v = torch.linalg.eigh(gram(h))
        sigma = lam.clamp_min(0).sqrt()
        cos = torch.diagonal(v.transpose(-1, -2) @ c @ v, dim1=-2, dim2=-1).clamp_min(0)
        theta = torch.atan2(sigma, cos)
        tiny = torch.finfo(dtype).eps
        ratio = torch.where(sigma > tiny, theta / sigma.clamp_min(tiny), 1.0 / cos.clamp_min(tiny))
        return ((h @ v * ratio[..., None, :]) @ v.transpose(-1, -2)).to(x.dtype)

    def principal_angles(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        r"""Principal angles :math:`\theta_1 \le \dots \le \theta_k` between the column spaces,
        shape ``(..., k)``.

        :math:`\theta_i = \operatorname{atan2}(\sin\theta_i, \cos\theta_i)` with the cosines the
        singular values of :math:`X^\top Y` (descending) and the sines those of
        :math:`(I - X X^\top) Y` (reversed to ascending). Plain :math:`\arccos` of the cosines loses
        half the digits for small angles (:math:`\arccos(1 - \epsilon) \approx \sqrt{2\epsilon}`).
        """
        dtype = compute_dtype(x.dtype)
        xc, yc = x.to(dtype), y.to(dtype)
        xty = xc.transpose(-1, -2) @ yc
        cos = torch.linalg.svdvals(xty)
        sin = torch.linalg.svdvals(yc - xc @ xty).flip(-1)
        return torch.atan2(sin, cos)

    def dist(self, x: torch.Tensor, y: torch.Tensor, *, keepdim: bool = False) -> torch.Tensor:
        r"""Geodesic distance :math:`\sqrt{\sum_i \theta_i^2}` over the principal angles
        (:meth:`principal_angles`); :math:`O(k)`-invariant in both arguments. Shape ``(...)`` or
        ``(..., 1, 1)``."""
        theta = self.principal_angles(x, y)
        d = theta.pow(2).sum(-1).sqrt().to(torch.promote_types(x.dtype, y.dtype))
        return d[..., None, None] if keepdim else d

    def transp(self, x: torch.Tensor, y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        r"""Vector transport by projection: :math:`\mathcal{T}_{X \to Y}(\xi) = (I - Y Y^\top)\xi`.
        Equivariant, so it is a transport on the quotient."""
        return self.proju(y, v)

    # --------------------------------------------------------------------- checks, samples
    def _check_shape(self, shape: tuple[int, ...], name: str) -> CheckResult:
        ok, reason = super()._check_shape(shape, name)
        if not ok:
            return False, f"{reason}; a Grassmann point has shape (..., n, k)"
        n, k = shape[-2], shape[-1]
        if k < 1:
            return False, f"`{name}` has k = {k} columns; a Grassmann point needs k >= 1."
        if k > n:
            return False, (
                f"`{name}` has shape[-1] = k = {k} > shape[-2] = n = {n}: k orthonormal columns "
                "need k <= n; pass the frame as (..., n, k) (transpose it?)."
            )
        return True, None

    def _check_finite_point(self, x: torch.Tensor, *, atol: float, rtol: float) -> CheckResult:
        xtx = gram(x)
        eye = torch.eye(x.shape[-1], dtype=xtx.dtype, device=x.device)
        if not torch.allclose(xtx, eye.expand_as(xtx), atol=atol, rtol=rtol):
            err = float((xtx - eye).abs().max())
            return False, (
                f"`X^T X != I` (max deviation {err:.3g}, atol={atol}, rtol={rtol}); "
                "orthonormalize with Grassmann.projx"
            )
        return True, None

    def _check_finite_vector(
        self, x: torch.Tensor, u: torch.Tensor, *, atol: float, rtol: float
    ) -> CheckResult:
        xtu = x.transpose(-1, -2) @ u
        if not torch.allclose(xtu, torch.zeros_like(xtu), atol=atol, rtol=rtol):
            err = float(xtu.abs().max())
            return False, (
                f"`X^T u != 0` (max {err:.3g}, atol={atol}, rtol={rtol}): not horizontal; "
                "project with Grassmann.proju"
            )
        return True, None

    def random(self, *size, dtype=None, device=None, **kwargs) -> torch.Tensor:
        r"""Random frame: the Q factor of a Gaussian ``(..., n, k)`` matrix, sign-fixed so that
        :math:`R` has a positive diagonal (then uniform on the Stiefel manifold, hence its span
        uniform on the Grassmannian). ``size`` is the full point shape ``(..., n, k)``."""
        shape = self._sample_shape(size, "random")
        dtype = dtype if dtype is not None else torch.get_default_dtype()
        g = torch.randn(shape, dtype=compute_dtype(dtype), device=device)
        q, r = torch.linalg.qr(g)
        sign = torch.diagonal(r, dim1=-2, dim2=-1).sign().add(0.5).sign()
        return (q * sign[..., None, :]).to(dtype)

    random_naive = random

    def origin(self, *size, dtype=None, device=None, seed: int | None = 42) -> torch.Tensor:
        r"""The span of the first ``k`` basis vectors: :math:`X = [I_k; 0]`, broadcast over the
        leading dims of ``size`` (the full shape ``(..., n, k)``); ``seed`` is ignored."""
        shape = self._sample_shape(size, "origin")
        n, k = shape[-2], shape[-1]
        eye = torch.eye(n, k, dtype=dtype, device=device)
        return eye.expand(shape).clone()
