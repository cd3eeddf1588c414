"""Property tests of :class:`quotientopt.manifolds.orthogonal_quotient.OrthogonalFactorQuotient`."""

from __future__ import annotations

import geoopt
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quotientopt.manifolds.orthogonal_quotient import OrthogonalFactorQuotient

# the class is deprecated (issue 26, point 3) and still works: its properties are tested here
pytestmark = pytest.mark.filterwarnings("ignore:OrthogonalFactorQuotient is deprecated")

SETTINGS = settings(max_examples=25, deadline=None)
BATCHES = [(), (3,), (2, 3)]


def tol(dtype: torch.dtype) -> float:
    return 1e-4 if dtype == torch.float32 else 1e-10


@st.composite
def cases(draw, fixed_dtype: torch.dtype | None = None):
    """(manifold, batch, k, dtype, generator) with 1 <= k <= n + m."""
    n, m = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    k = draw(st.integers(1, n + m))
    batch = draw(st.sampled_from(BATCHES))
    dtype = fixed_dtype or draw(st.sampled_from([torch.float32, torch.float64]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    return OrthogonalFactorQuotient(n, m), batch, k, dtype, gen


def randn(shape, dtype, gen) -> torch.Tensor:
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)


def orthogonal(batch, k, dtype, gen) -> torch.Tensor:
    q, _ = torch.linalg.qr(randn((*batch, k, k), torch.float64, gen))
    return q.to(dtype)


def point(man, batch, k, dtype, gen) -> torch.Tensor:
    """A generic full-rank point with singular values in [0.5, 1.5] (condition number <= 3)."""
    rows = man.n + man.m
    q, _ = torch.linalg.qr(randn((*batch, rows, k), torch.float64, gen))
    s = 0.5 + torch.rand((*batch, 1, k), generator=gen, dtype=torch.float64)
    return (q * s @ orthogonal(batch, k, torch.float64, gen)).to(dtype)


def close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> None:
    torch.testing.assert_close(a, b, atol=scale * tol(dtype), rtol=scale * tol(dtype))


def is_sym(x: torch.Tensor, dtype: torch.dtype, scale: float = 10.0) -> None:
    close(x, x.transpose(-1, -2), dtype, scale)


def loss(man: OrthogonalFactorQuotient, z: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """||A B^T - T||^2 + ||A||^4: O(k)-invariant (not GL(k)-invariant)."""
    a, _ = man.factors(z)
    return (man.product(z) - target).pow(2).sum((-1, -2)) + a.pow(2).sum((-1, -2)).pow(2)


def egrad(f, z: torch.Tensor) -> torch.Tensor:
    z = z.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(f(z).sum(), z)
    return g


# ------------------------------------------------------------------------------ points
@SETTINGS
@given(cases(), st.floats(0.0, 0.3))
def test_points_stay_on_manifold(case, scale):
    man, batch, k, dtype, gen = case
    shape = (*batch, man.n + man.m, k)
    for z in (man.random(shape, dtype=dtype), man.origin(*shape, dtype=dtype)):
        assert z.shape == shape and z.dtype == dtype
        ok, reason = man.check_point_on_manifold(z, explain=True)
        assert ok, reason
    z = point(man, batch, k, dtype, gen)
    u = scale * man.proju(z, randn(shape, dtype, gen)) / (1 + man.norm(z, z, keepdim=True))
    for y in (man.retr(z, u), man.expmap(z, u), man.projx(z)):
        ok, reason = man.check_point_on_manifold(y, explain=True)
        assert ok, reason
    torch.testing.assert_close(man.projx(z), z)


@SETTINGS
@given(cases())
def test_factors_roundtrip_and_product(case):
    man, batch, k, dtype, gen = case
    z = point(man, batch, k, dtype, gen)
    a, b = man.factors(z)
    assert a.shape == (*batch, man.n, k) and b.shape == (*batch, man.m, k)
    torch.testing.assert_close(man.from_factors(a, b), z)
    torch.testing.assert_close(man.product(z), a @ b.transpose(-1, -2))
    o = orthogonal(batch, k, dtype, gen)
    close(man.product(z @ o), man.product(z), dtype, scale=10)


# ------------------------------------------------------------------ horizontal geometry
@SETTINGS
@given(cases())
def test_projection_properties(case):
    man, batch, k, dtype, gen = case
    z = point(man, batch, k, dtype, gen)
    u = randn(z.shape, dtype, gen)
    h = man.proju(z, u)
    close(man.proju(z, h), h, dtype, scale=10)  # idempotent
    is_sym(z.transpose(-1, -2) @ h, dtype)  # horizontal: Z^T h symmetric
    assert man.check_vector_on_tangent(z, h, atol=10 * tol(dtype), rtol=10 * tol(dtype))
    torch.testing.assert_close(man.horizontal_part(z, u), h)
    omega = randn((*batch, k, k), dtype, gen)
    vert = man.vertical(z, omega)
    zero = torch.zeros(batch, dtype=dtype)
    close(man.inner(z, h, vert), zero, dtype, scale=10)  # Euclidean-orthogonal to the orbit
    close(man.proju(z, vert), torch.zeros_like(vert), dtype, scale=10)  # vertical projects to 0
    close(man.inner(z, u - h, u - h), man.inner(z, u, u - h), dtype, scale=10)  # orthogonal proj
    # the symmetric part of a generator does not act
    close(man.vertical(z, omega + omega.transpose(-1, -2)), torch.zeros_like(z), dtype)
    # projection keeps the first-order change of the product, d(A B^T) = u_A B^T + A u_B^T
    a, b = man.factors(z)

    def dw(v: torch.Tensor) -> torch.Tensor:
        va, vb = man.factors(v)
        return va @ b.transpose(-1, -2) + a @ vb.transpose(-1, -2)

    close(dw(h), dw(u), dtype, scale=10)
    close(dw(vert), torch.zeros_like(dw(vert)), dtype, scale=10)


@SETTINGS
@given(cases())
def test_equivariance_and_metric_invariance(case):
    man, batch, k, dtype, gen = case
    z = point(man, batch, k, dtype, gen)
    o = orthogonal(batch, k, dtype, gen)
    u, v = randn(z.shape, dtype, gen), randn(z.shape, dtype, gen)
    close(man.inner(z @ o, u @ o, v @ o), man.inner(z, u, v), dtype, scale=10)
    close(man.proju(z @ o, u @ o), man.proju(z, u) @ o, dtype, scale=10)
    close(man.retr(z @ o, u @ o), man.retr(z, u) @ o, dtype, scale=10)
    h = man.proju(z, u)
    y0, w0 = man.retr_transp(z, 0.1 * h, v)
    y1, w1 = man.retr_transp(z @ o, 0.1 * h @ o, v @ o)
    close(y1, y0 @ o, dtype, scale=10)
    close(w1, w0 @ o, dtype, scale=10)


@SETTINGS
@given(cases(), st.floats(0.0, 0.3))
def test_transport_lands_horizontal_and_geodesics_stay_horizontal(case, t):
    man, batch, k, dtype, gen = case
    z = point(man, batch, k, dtype, gen)
    h = man.proju(z, randn(z.shape, dtype, gen))
    h = h / (1 + man.norm(z, h, keepdim=True))
    v = randn(z.shape, dtype, gen)
    for y, w in (man.retr_transp(z, t * h, v), man.expmap_transp(z, t * h, v)):
        is_sym(y.transpose(-1, -2) @ w, dtype)
        close(man.transp(z, y, w), w, dtype, scale=10)
    # Z + t h is a horizontal geodesic: h stays horizontal along it
    y = man.expmap(z, t * h)
    close(man.proju(y, h), h, dtype, scale=10)


# ------------------------------------------------------------------------- gradients
@SETTINGS
@given(cases(fixed_dtype=torch.float64))
def test_invariant_loss_gradient_horizontal_and_equivariant(case):
    man, batch, k, _, gen = case
    z = point(man, batch, k, torch.float64, gen)
    target = randn((*batch, man.n, man.m), torch.float64, gen)
    o = orthogonal(batch, k, torch.float64, gen)
    close(loss(man, z @ o, target), loss(man, z, target), torch.float64, scale=1e3)
    g = egrad(lambda x: loss(man, x, target), z)
    rgrad = man.egrad2rgrad(z, g)
    torch.testing.assert_close(rgrad, g)  # Euclidean metric: no projection
    is_sym(z.transpose(-1, -2) @ rgrad, torch.float64, scale=1e3)
    close(man.proju(z, rgrad), rgrad, torch.float64, scale=1e3)
    g_o = egrad(lambda x: loss(man, x, target), z @ o)
    close(man.egrad2rgrad(z @ o, g_o), rgrad @ o, torch.float64, scale=1e3)
    # the loss is flat along vertical directions to first order
    vert = man.vertical(z, randn((*batch, k, k), torch.float64, gen))
    s = 1e-5
    slope = (loss(man, z + s * vert, target) - loss(man, z - s * vert, target)) / (2 * s)
    scale = 1 + loss(man, z, target).abs()
    assert float((slope.abs() / scale).max()) < 1e-6


@SETTINGS
@given(cases(fixed_dtype=torch.float64))
def test_rgrad_finite_differences(case):
    man, batch, k, dtype, gen = case
    z = point(man, batch, k, dtype, gen)
    target = randn((*batch, man.n, man.m), dtype, gen)
    rgrad = man.egrad2rgrad(z, egrad(lambda x: loss(man, x, target), z))
    u = man.proju(z, randn(z.shape, dtype, gen))
    t = 1e-5
    fd = (loss(man, man.retr(z, t * u), target) - loss(man, man.retr(z, -t * u), target)) / (2 * t)
    exact = man.inner(z, rgrad, u)
    scale = man.norm(z, rgrad) * man.norm(z, u) + 1e-300
    assert float(((fd - exact).abs() / scale).max()) < 1e-6


@SETTINGS
@given(cases())
def test_inner_norm_shapes(case):
    man, batch, k, dtype, gen = case
    z = point(man, batch, k, dtype, gen)
    u = randn(z.shape, dtype, gen)
    assert man.inner(z, u).shape == batch
    assert man.inner(z, u, keepdim=True).shape == (*batch, 1, 1)
    assert man.component_inner(z, u).shape == (*batch, 1, 1)
    close(man.norm(z, u) ** 2, (u * u).sum((-1, -2)), dtype)


# ------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("n, m", [(0, 3), (3, -1), (2.5, 3), (True, 2), ("4", 2)])
def test_constructor_validates(n, m):
    with pytest.raises(ValueError, match="must be a positive int"):
        OrthogonalFactorQuotient(n, m)


def test_bad_shapes_raise():
    man = OrthogonalFactorQuotient(3, 2)
    with pytest.raises(ValueError, match="n \\+ m = 5 rows"):
        man.random(4, 2)
    with pytest.raises(ValueError, match="k = 6 columns"):
        man.origin(2, 5, 6)
    with pytest.raises(ValueError, match="requires more than 2 dim"):
        man.random(5)
    with pytest.raises(ValueError, match="non-negative ints"):
        man.random(-2, 5, 2)
    with pytest.raises(ValueError, match="from_factors"):
        man.from_factors(torch.zeros(3, 2), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="n \\+ m = 5 rows"):
        man.assert_check_point(torch.zeros(6, 2))


def test_bad_points_and_vectors_explained():
    man = OrthogonalFactorQuotient(3, 2)
    z = man.random(4, 5, 2, dtype=torch.float64)
    bad = z.clone()
    bad[1, 0, 0] = float("nan")
    ok, reason = man.check_point_on_manifold(bad, explain=True)
    assert not ok and "NaN" in reason
    with pytest.raises(ValueError, match="NaN"):
        man.assert_check_point_on_manifold(bad)
    deficient = z.clone()
    deficient[2, :, 1] = 2 * deficient[2, :, 0]
    ok, reason = man.check_point_on_manifold(deficient, explain=True)
    assert not ok and "rank-deficient" in reason and "1 of 4" in reason
    ok, reason = man.check_vector_on_tangent(z, man.vertical(z, torch.randn(2, 2)), explain=True)
    assert not ok and "not horizontal" in reason


def test_origin_is_balanced_or_full_rank():
    man = OrthogonalFactorQuotient(4, 3)
    z = man.origin(2, 7, 3, dtype=torch.float64)
    a, b = man.factors(z)
    torch.testing.assert_close(
        a.transpose(-1, -2) @ a, torch.eye(3, dtype=torch.float64).expand(2, 3, 3)
    )
    torch.testing.assert_close(
        b.transpose(-1, -2) @ b, torch.eye(3, dtype=torch.float64).expand(2, 3, 3)
    )
    assert man.check_point_on_manifold(man.origin(7, 7))


# ------------------------------------------------------------------------ optimizers
@pytest.mark.parametrize(
    "make_opt",
    [
        lambda p: geoopt.optim.RiemannianSGD([p], lr=0.01, momentum=0.9),
        lambda p: geoopt.optim.RiemannianAdam([p], lr=0.02),
    ],
    ids=["sgd-momentum", "adam"],
)
def test_geoopt_optimizers_drive_quotient(make_opt):
    gen = torch.Generator().manual_seed(0)
    man = OrthogonalFactorQuotient(6, 5)
    batch, k = (2, 3), 3
    target = randn((*batch, 6, 5), torch.float64, gen)
    z = geoopt.ManifoldParameter(man.random(*batch, 11, k, dtype=torch.float64), manifold=man)
    opt = make_opt(z)
    start = float(loss(man, z.detach(), target).sum())
    for _ in range(50):
        opt.zero_grad()
        loss(man, z, target).sum().backward()
        opt.step()
    end = float(loss(man, z.detach(), target).sum())
    assert end < 0.9 * start
    ok, reason = man.check_point_on_manifold(z.detach(), explain=True)
    assert ok, reason
