"""Property tests of :class:`quotientopt.manifolds.grassmann.Grassmann`."""

from __future__ import annotations

import math

import geoopt
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quotientopt.manifolds.grassmann import Grassmann

SETTINGS = settings(max_examples=25, deadline=None)
BATCHES = [(), (3,), (2, 3)]
MAN = Grassmann()


def tol(dtype: torch.dtype) -> float:
    return 1e-4 if dtype == torch.float32 else 1e-10


@st.composite
def cases(draw, strict: bool = False, fixed_dtype: torch.dtype | None = None):
    """(batch, n, k, dtype, generator); ``strict`` forces k < n (a nonzero horizontal space)."""
    n = draw(st.integers(2 if strict else 1, 7))
    k = draw(st.integers(1, n - 1 if strict else n))
    batch = draw(st.sampled_from(BATCHES))
    dtype = fixed_dtype or draw(st.sampled_from([torch.float32, torch.float64]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    return batch, n, k, dtype, gen


def randn(shape, dtype, gen) -> torch.Tensor:
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)


def point(batch, n, k, dtype, gen) -> torch.Tensor:
    q, r = torch.linalg.qr(randn((*batch, n, k), torch.float64, gen))
    return (q * torch.diagonal(r, dim1=-2, dim2=-1).sign()[..., None, :]).to(dtype)


def orthogonal(batch, k, dtype, gen) -> torch.Tensor:
    return point(batch, k, k, dtype, gen)


def tangent(x: torch.Tensor, gen) -> torch.Tensor:
    return MAN.proju(x, randn(x.shape, x.dtype, gen))


def close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> None:
    torch.testing.assert_close(a, b, atol=scale * tol(dtype), rtol=scale * tol(dtype))


# ------------------------------------------------------------------------------- points
@SETTINGS
@given(cases())
def test_random_origin_projx_are_points(case):
    batch, n, k, dtype, gen = case
    shape = (*batch, n, k)
    for x in (MAN.random(shape, dtype=dtype), MAN.origin(*shape, dtype=dtype)):
        assert x.shape == shape and x.dtype == dtype
        ok, reason = MAN.check_point_on_manifold(x, explain=True)
        assert ok, reason
    g = randn(shape, dtype, gen)
    p = MAN.projx(g)
    assert MAN.check_point_on_manifold(p)
    # same column space: g lies in span(p)
    close(MAN.proju(p, g), torch.zeros_like(g), dtype, scale=10)
    close(MAN.projx(p), p, dtype)


@SETTINGS
@given(cases())
def test_proju_horizontal_idempotent(case):
    batch, n, k, dtype, gen = case
    x = point(batch, n, k, dtype, gen)
    u = randn(x.shape, dtype, gen)
    h = MAN.proju(x, u)
    close(x.transpose(-1, -2) @ h, torch.zeros(*batch, k, k, dtype=dtype), dtype)
    close(MAN.proju(x, h), h, dtype)
    assert MAN.check_vector_on_tangent(x, h)
    assert not MAN.check_vector_on_tangent(x, x)  # X itself is never horizontal
    torch.testing.assert_close(MAN.egrad2rgrad(x, u), h)


@SETTINGS
@given(cases(), st.floats(0.0, 3.0))
def test_retr_expmap_stay_on_manifold(case, scale):
    batch, n, k, dtype, gen = case
    x = point(batch, n, k, dtype, gen)
    u = scale * tangent(x, gen)
    for y in (MAN.retr(x, u), MAN.expmap(x, u)):
        assert y.dtype == dtype
        ok, reason = MAN.check_point_on_manifold(y, explain=True)
        assert ok, reason
    zero = torch.zeros_like(x)
    close(MAN.expmap(x, zero), x, dtype)
    close(MAN.retr(x, zero), x, dtype)


@SETTINGS
@given(cases(strict=True), st.floats(0.01, 1.5))
def test_expmap_is_unit_speed_geodesic(case, t):
    batch, n, k, dtype, gen = case
    x = point(batch, n, k, dtype, gen)
    u = tangent(x, gen)
    u = u / torch.linalg.matrix_norm(u, ord=2)[..., None, None]  # spectral norm 1 < pi/2 / t
    d = MAN.dist(x, MAN.expmap(x, t * u))
    close(d, t * MAN.norm(x, u), dtype, scale=10)
    # the log map inverts it inside the injectivity radius
    close(MAN.logmap(x, MAN.expmap(x, t * u)), t * u, dtype, scale=100)


@SETTINGS
@given(cases())
def test_logmap_dist_consistent(case):
    batch, n, k, dtype, gen = case
    x = point(batch, n, k, dtype, gen)
    y = point(batch, n, k, dtype, gen)
    v = MAN.logmap(x, y)
    assert MAN.check_vector_on_tangent(x, v, atol=10 * tol(dtype), rtol=10 * tol(dtype))
    d = MAN.dist(x, y)
    assert bool((d >= 0).all()) and bool((d <= math.pi / 2 * math.sqrt(k) + 1e-6).all())
    close(MAN.norm(x, v), d, dtype, scale=100)
    close(MAN.dist(y, x), d, dtype, scale=10)
    close(MAN.dist(x, x), torch.zeros_like(d), dtype, scale=100)


@SETTINGS
@given(cases())
def test_equivariance_and_invariance(case):
    batch, n, k, dtype, gen = case
    x, y = point(batch, n, k, dtype, gen), point(batch, n, k, dtype, gen)
    o1, o2 = orthogonal(batch, k, dtype, gen), orthogonal(batch, k, dtype, gen)
    u, v = tangent(x, gen), tangent(x, gen)
    close(MAN.retr(x @ o1, u @ o1), MAN.retr(x, u) @ o1, dtype, scale=10)
    close(MAN.expmap(x @ o1, u @ o1), MAN.expmap(x, u) @ o1, dtype, scale=10)
    # the horizontal projector I - X X^T depends on span(X) only
    close(MAN.proju(x @ o1, v), MAN.proju(x, v), dtype)
    close(MAN.transp(x @ o1, y @ o1, u @ o1), MAN.transp(x, y, u) @ o1, dtype)
    y1, w1 = MAN.retr_transp(x @ o1, u @ o1, v @ o1)
    y0, w0 = MAN.retr_transp(x, u, v)
    close(y1, y0 @ o1, dtype, scale=10)
    close(w1, w0 @ o1, dtype, scale=10)
    close(MAN.dist(x @ o1, y @ o2), MAN.dist(x, y), dtype, scale=10)
    close(MAN.inner(x @ o1, u @ o1, v @ o1), MAN.inner(x, u, v), dtype, scale=10)
    # the log map depends on y only through its span
    close(MAN.logmap(x, y @ o2), MAN.logmap(x, y), dtype, scale=100)


@SETTINGS
@given(cases())
def test_transport_lands_horizontal(case):
    batch, n, k, dtype, gen = case
    x = point(batch, n, k, dtype, gen)
    u, v = tangent(x, gen), tangent(x, gen)
    for y, w in (MAN.retr_transp(x, u, v), MAN.expmap_transp(x, u, v)):
        assert MAN.check_point_on_manifold(y)
        close(y.transpose(-1, -2) @ w, torch.zeros(*batch, k, k, dtype=dtype), dtype)
        close(MAN.transp(x, y, w), w, dtype)
    close(MAN.transp_follow_retr(x, u, v), MAN.retr_transp(x, u, v)[1], dtype)


@SETTINGS
@given(cases())
def test_inner_norm_shapes(case):
    batch, n, k, dtype, gen = case
    x = point(batch, n, k, dtype, gen)
    u = tangent(x, gen)
    assert MAN.inner(x, u).shape == batch
    assert MAN.inner(x, u, keepdim=True).shape == (*batch, 1, 1)
    assert MAN.component_inner(x, u).shape == (*batch, 1, 1)
    close(MAN.norm(x, u) ** 2, (u * u).sum((-1, -2)), dtype)
    assert MAN.dist(x, x, keepdim=True).shape == (*batch, 1, 1)


# --------------------------------------------------------------------------- gradients
def trace_loss(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """f(X) = -tr(X^T C X), O(k)-invariant (a Rayleigh quotient)."""
    return -(x * (c @ x)).sum((-1, -2))


def sym_matrix(batch, n, dtype, gen) -> torch.Tensor:
    a = randn((*batch, n, n), dtype, gen)
    return a + a.transpose(-1, -2)


def egrad(f, x: torch.Tensor) -> torch.Tensor:
    x = x.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(f(x).sum(), x)
    return g


@SETTINGS
@given(cases(strict=True, fixed_dtype=torch.float64))
def test_rgrad_finite_differences(case):
    batch, n, k, dtype, gen = case
    x = point(batch, n, k, dtype, gen)
    c = sym_matrix(batch, n, dtype, gen)
    rgrad = MAN.egrad2rgrad(x, egrad(lambda z: trace_loss(z, c), x))
    u = tangent(x, gen)
    t = 1e-5
    fd = (trace_loss(MAN.retr(x, t * u), c) - trace_loss(MAN.retr(x, -t * u), c)) / (2 * t)
    exact = MAN.inner(x, rgrad, u)
    scale = MAN.norm(x, rgrad) * MAN.norm(x, u) + 1e-300
    assert float(((fd - exact).abs() / scale).max()) < 1e-6


@SETTINGS
@given(cases(fixed_dtype=torch.float64))
def test_rgrad_of_invariant_loss_horizontal_and_equivariant(case):
    batch, n, k, _, gen = case
    x = point(batch, n, k, torch.float64, gen)
    o = orthogonal(batch, k, torch.float64, gen)
    c = sym_matrix(batch, n, torch.float64, gen)
    close(trace_loss(x @ o, c), trace_loss(x, c), torch.float64, scale=1e3)
    g = egrad(lambda z: trace_loss(z, c), x)
    # O(k)-invariance makes X^T grad symmetric, so Stiefel and Grassmann gradients agree
    xtg = x.transpose(-1, -2) @ g
    close(xtg, xtg.transpose(-1, -2), torch.float64, scale=1e3)
    rgrad = MAN.egrad2rgrad(x, g)
    stiefel = g - x @ (0.5 * (xtg + xtg.transpose(-1, -2)))
    close(rgrad, stiefel, torch.float64, scale=1e3)
    assert MAN.check_vector_on_tangent(x, rgrad)
    rgrad_o = MAN.egrad2rgrad(x @ o, egrad(lambda z: trace_loss(z, c), x @ o))
    close(rgrad_o, rgrad @ o, torch.float64, scale=1e3)


# --------------------------------------------------------------------------- bad input
def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="k = 5 > shape"):
        MAN.random(2, 5)
    with pytest.raises(ValueError, match="k <= n"):
        MAN.origin(3, 2, 4)
    with pytest.raises(ValueError, match="requires more than 2 dim"):
        MAN.random(4)
    with pytest.raises(ValueError, match="non-negative ints"):
        MAN.random(-1, 3, 2)
    with pytest.raises(ValueError, match="k = 3 > shape"):
        MAN.assert_check_point(torch.zeros(2, 3))


def test_bad_points_and_vectors_explained():
    x = MAN.random(4, 2, dtype=torch.float64)
    bad = x.clone()
    bad[0, 0] = float("nan")
    ok, reason = MAN.check_point_on_manifold(bad, explain=True)
    assert not ok and "NaN" in reason
    with pytest.raises(ValueError, match="NaN"):
        MAN.assert_check_point_on_manifold(bad)
    ok, reason = MAN.check_point_on_manifold(2 * x, explain=True)
    assert not ok and "X^T X != I" in reason
    ok, reason = MAN.check_vector_on_tangent(x, x, explain=True)
    assert not ok and "not horizontal" in reason
    inf = torch.full_like(x, float("inf"))
    ok, reason = MAN.check_vector_on_tangent(x, inf, explain=True)
    assert not ok and "NaN or Inf" in reason


def test_k_equals_n_is_a_single_point():
    x, y = MAN.random(3, 3, dtype=torch.float64), MAN.random(3, 3, dtype=torch.float64)
    assert float(MAN.dist(x, y)) < 1e-7
    torch.testing.assert_close(MAN.proju(x, torch.randn(3, 3, dtype=torch.float64)), 0 * x)


# -------------------------------------------------------------------------- optimizers
@pytest.mark.parametrize(
    "make_opt",
    [
        lambda p: geoopt.optim.RiemannianSGD([p], lr=0.02, momentum=0.9),
        lambda p: geoopt.optim.RiemannianAdam([p], lr=0.05),
    ],
    ids=["sgd-momentum", "adam"],
)
def test_geoopt_optimizers_drive_grassmann(make_opt):
    gen = torch.Generator().manual_seed(0)
    batch, n, k = (2, 3), 8, 3
    c = sym_matrix(batch, n, torch.float64, gen)
    x = geoopt.ManifoldParameter(MAN.random(*batch, n, k, dtype=torch.float64), manifold=MAN)
    opt = make_opt(x)
    start = float(trace_loss(x.detach(), c).sum())
    for _ in range(50):
        opt.zero_grad()
        trace_loss(x, c).sum().backward()
        opt.step()
    end = float(trace_loss(x.detach(), c).sum())
    assert end < start - 1.0
    ok, reason = MAN.check_point_on_manifold(x.detach(), explain=True)
    assert ok, reason
    # the optimum -sum of the top-k eigenvalues bounds the loss from below
    top = torch.linalg.eigvalsh(c)[..., -k:].sum()
    assert end >= -float(top) - 1e-8
