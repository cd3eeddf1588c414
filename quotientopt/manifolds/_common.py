"""What the manifolds share: small checks and constructors of factor pairs, the base
:class:`MatrixManifold` (per-point ``component_inner`` and ``norm``, geoopt's checks behind one
NaN/Inf guard, the checked shape of ``random`` and ``origin``) and :class:`EuclideanMetric`."""

from __future__ import annotations

import geoopt
import torch
from geoopt.utils import size2shape

CheckResult = tuple[bool, str | None]
"""What geoopt's ``_check_*`` methods return: whether the check passed, and why not."""


def check_row_counts(owner: str, n: object, m: object, names: tuple[str, str] = ("A", "B")) -> None:
    """Raise a ``ValueError`` unless ``n`` and ``m`` (rows of the two factors) are positive ints."""
    for label, value, factor in (("n", n, names[0]), ("m", m, names[1])):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(
                f"{owner}: {label} must be a positive int (rows of factor {factor}), got {value!r}."
            )


def check_stacked_rows(
    owner: str, n: int, m: int, shape: tuple[int, ...], name: str
) -> CheckResult:
    """Whether the point shape ``shape`` has the ``n + m`` rows of ``Z = [A; B]``, and why not."""
    rows = shape[-2]
    if rows != n + m:
        return False, (
            f"`{name}` has {rows} rows but {owner}(n={n}, m={m}) stacks [A; B] into n + m = "
            f"{n + m} rows; reshape to (..., {n + m}, k)."
        )
    return True, None


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


class MatrixManifold(geoopt.manifolds.Manifold):
    r"""A geoopt manifold of batched matrices with one metric value per matrix (per head).

    What the manifolds of this package share around their geometry:

    * :meth:`component_inner` and :meth:`norm` from the manifold's :meth:`inner`;
    * geoopt's point and tangent checks: a NaN/Inf guard, then the manifold's own condition,
      :meth:`_check_finite_point` and :meth:`_check_finite_vector` (by default: :meth:`proju`
      leaves the vector unchanged). A subclass may add a hint to the NaN/Inf message of a point
      (``_nonfinite_point_hint``) and name its tangent space (``_tangent_space``);
    * :meth:`_sample_shape`, the checked point shape of ``random`` and ``origin``.
    """

    ndim = 2
    _nonfinite_point_hint: str | None = None
    _tangent_space = "horizontal"

    def component_inner(
        self, x: torch.Tensor, u: torch.Tensor, v: torch.Tensor | None = None
    ) -> torch.Tensor:
        r"""One metric value per point (per head), :math:`g_x(\xi, \eta)` of shape ``(..., 1, 1)``:
        RiemannianAdam's second moment. A single scalar per point is invariant under the group
        whenever the metric is, and keeps Adam's step horizontal and equivariant; an elementwise
        square would do neither."""
        return self.inner(x, u, v, keepdim=True)

    def norm(self, x: torch.Tensor, u: torch.Tensor, *, keepdim: bool = False) -> torch.Tensor:
        r""":math:`\|\xi\|_x = \sqrt{g_x(\xi, \xi)}`, shape ``(...)`` or ``(..., 1, 1)`` with
        ``keepdim`` (round-off below zero is clamped)."""
        return self.inner(x, u, keepdim=keepdim).clamp_min(0).sqrt()

    def _check_point_on_manifold(
        self, x: torch.Tensor, *, atol: float = 1e-5, rtol: float = 1e-5
    ) -> CheckResult:
        if not bool(torch.isfinite(x).all()):
            hint = self._nonfinite_point_hint
            return False, "the point holds NaN or Inf" + ("" if hint is None else f"; {hint}")
        return self._check_finite_point(x, atol=atol, rtol=rtol)

    def _check_vector_on_tangent(
        self, x: torch.Tensor, u: torch.Tensor, *, atol: float = 1e-5, rtol: float = 1e-5
    ) -> CheckResult:
        if not bool(torch.isfinite(u).all()):
            return False, "the vector holds NaN or Inf"
        return self._check_finite_vector(x, u, atol=atol, rtol=rtol)

    def _check_finite_point(self, x: torch.Tensor, *, atol: float, rtol: float) -> CheckResult:
        """Whether the finite ``x`` lies on the manifold, and why not."""
        raise NotImplementedError

    def _check_finite_vector(
        self, x: torch.Tensor, u: torch.Tensor, *, atol: float, rtol: float
    ) -> CheckResult:
        """Whether the finite ``u`` is a tangent (horizontal) vector at ``x``, and why not: by
        default, whether :meth:`proju` (the projection onto that space) leaves it unchanged."""
        if not torch.allclose(self.proju(x, u), u, atol=atol, rtol=rtol):
            return False, (
                f"the vector is not {self._tangent_space}: proju(x, u) != u; project it with proju"
            )
        return True, None

    def _sample_shape(self, size: tuple, what: str) -> tuple[int, ...]:
        """The full point shape ``size`` given to ``random`` or ``origin`` (ints, or one tuple),
        checked against the manifold."""
        try:
            shape = tuple(size2shape(*size))
        except TypeError as err:  # pragma: no cover - defensive
            raise ValueError(f"{self.name}.{what}: size must be ints, got {size!r}") from err
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise ValueError(
                f"{self.name}.{what}: size must be non-negative ints (the full shape of a point), "
                f"got {size!r}"
            )
        self._assert_check_shape(torch.Size(shape), "size")
        return shape


class EuclideanMetric(MatrixManifold):
    r"""A :class:`MatrixManifold` with the ambient Euclidean (Frobenius) metric restricted to its
    tangent (horizontal) spaces."""

    def inner(
        self,
        x: torch.Tensor,
        u: torch.Tensor,
        v: torch.Tensor | None = None,
        *,
        keepdim: bool = False,
    ) -> torch.Tensor:
        r""":math:`\langle \xi, \eta \rangle = \mathrm{tr}(\xi^\top \eta)` summed over the last two
        dims, one value per matrix: shape ``(...)`` or ``(..., 1, 1)`` with ``keepdim``. Invariant
        under :math:`(\xi, \eta) \mapsto (\xi O, \eta O)` for orthogonal :math:`O`."""
        if v is None:
            v = u
        return (u * v).sum((-1, -2), keepdim=keepdim)
