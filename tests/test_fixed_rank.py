"""Property tests of the three-factor fixed-rank quotient ``FixedRank`` (St x SPD x St / O(k))."""

from __future__ import annotations

import geoopt
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quotientopt.manifolds.fixed_rank import (
    FixedRank,
    factor_pair_from_pymanopt,
    factor_pair_to_pymanopt,
)
from tests.helpers import orthogonal, relative_error, rng

BATCHES = [(), (3,), (2, 2)]
DTYPES = [torch.float32, torch.float64]
FAST = settings(max_examples=30, deadline=None)


@st.composite
def cases(draw, dtypes=DTYPES):
    n = draw(st.integers(1, 7))
    m = draw(st.integers(1, 7))
    k = draw(st.integers(1, min(n, m)))
    batch = draw(st.sampled_from(BATCHES))
    dtype = draw(st.sampled_from(dtypes))
    seed = draw(st.integers(0, 2**31 - 1))
    return n, m, k, batch, dtype, seed


def setup(case):
    n, m, k, batch, dtype, seed = case
    man = FixedRank(n, m)
    gen = rng(seed)
    z = man.random(*batch, n + k + m, k, dtype=dtype, generator=gen)
    return man, z.data, gen


def tol(dtype: torch.dtype) -> float:
    return 1e-4 if dtype == torch.float32 else 1e-10


def randn_like(z: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(z.shape, generator=gen, dtype=torch.float64).to(z.dtype)


def random_skew(z: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    a = torch.randn(*z.shape[:-2], z.shape[-1], z.shape[-1], generator=gen, dtype=torch.float64)
    return (a - a.transpose(-1, -2)).to(z.dtype)


def rotation(z: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return orthogonal(tuple(z.shape[:-2]), z.shape[-1], gen, z.dtype)


# ------------------------------------------------------------------------------------ points
@FAST
@given(cases())
def test_points_on_manifold(case):
    man, z, gen = setup(case)
    atol = 1e-4 if z.dtype == torch.float32 else 1e-8
    assert man.check_point_on_manifold(z, atol=atol)
    origin = man.origin(*z.shape, dtype=z.dtype)
    assert man.check_point_on_manifold(origin, atol=atol)
    xi = man.proju(z, randn_like(z, gen))
    assert man.check_point_on_manifold(man.retr(z, xi), atol=atol)
    assert man.check_point_on_manifold(man.projx(z + 0.1 * randn_like(z, gen)), atol=atol)
    # projx leaves valid points unchanged
    assert relative_error(man.projx(z), z) < 10 * tol(z.dtype)


@FAST
@given(cases())
def test_product_and_metric_invariance(case):
    man, z, gen = setup(case)
    o = rotation(z, gen)
    zo = man.act(z, o)
    assert relative_error(man.product(zo), man.product(z)) < tol(z.dtype)
    xi = man.proju(z, randn_like(z, gen))
    eta = man.proju(z, randn_like(z, gen))
    g = man.inner(z, xi, eta)
    g_rot = man.inner(zo, man.act(xi, o), man.act(eta, o))
    assert torch.allclose(g_rot, g, atol=10 * tol(z.dtype), rtol=10 * tol(z.dtype))
    assert man.inner(z, xi, keepdim=True).shape == (*z.shape[:-2], 1, 1)
    assert torch.allclose(man.norm(z, xi) ** 2, man.inner(z, xi), rtol=1e-4)


# ------------------------------------------------------------------------- horizontal space
@FAST
@given(cases())
def test_horizontal_projection(case):
    man, z, gen = setup(case)
    t = tol(z.dtype)
    xi = man.proju(z, randn_like(z, gen))
    assert relative_error(man.proju(z, xi), xi) < 10 * t
    assert man.horizontal_part(z, xi).shape == z.shape
    assert man.check_vector_on_tangent(z, xi, atol=100 * t)
    ver = man.vertical(z, random_skew(z, gen))
    scale = man.norm(z, xi) * man.norm(z, ver) + 1e-30
    assert (man.inner(z, xi, ver).abs() / scale).max() < 100 * t
    assert (man.norm(z, man.proju(z, ver)) / (man.norm(z, ver) + 1e-30)).max() < 100 * t


@FAST
@given(cases())
def test_retraction_equivariance(case):
    man, z, gen = setup(case)
    o = rotation(z, gen)
    xi = man.proju(z, randn_like(z, gen))
    lhs = man.retr(man.act(z, o), man.act(xi, o))
    rhs = man.act(man.retr(z, xi), o)
    assert relative_error(lhs, rhs) < 100 * tol(z.dtype)
    assert relative_error(man.expmap(z, xi), man.retr(z, xi)) == 0.0


@FAST
@given(cases())
def test_transport_is_horizontal(case):
    man, z, gen = setup(case)
    t = tol(z.dtype)
    xi = man.proju(z, randn_like(z, gen))
    eta = man.proju(z, randn_like(z, gen))
    y, eta_y = man.retr_transp(z, 0.5 * xi, eta)
    assert man.check_vector_on_tangent(y, eta_y, atol=100 * t)
    assert relative_error(man.transp(z, y, eta), eta_y) < t
    assert relative_error(man.transp(z, z, eta), eta) < 10 * t
    # equivariant, and an isometry when the frames do not move (only S changes)
    o = rotation(z, gen)
    rot = man.transp(man.act(z, o), man.act(y, o), man.act(eta, o))
    assert relative_error(rot, man.act(eta_y, o)) < 100 * t
    # isometric on the SPD factor: with S, xi_S, eta_S diagonal (commuting, so S-only vectors are
    # horizontal) and frames fixed, the metric norm of eta survives the move of S
    u, s, v = man.factors(z)
    diag = torch.diag_embed
    zd = man.from_factors(u, diag(torch.diagonal(s, dim1=-2, dim2=-1)), v)

    def s_only(w: torch.Tensor) -> torch.Tensor:
        return man.from_factors(0 * u, diag(torch.diagonal(w, dim1=-2, dim2=-1)), 0 * v)

    y_s = man.retr(zd, s_only(man.factors(xi)[1]))
    eta_s = s_only(man.factors(eta)[1])
    moved = man.transp(zd, y_s, eta_s)
    assert torch.allclose(man.norm(y_s, moved), man.norm(zd, eta_s), rtol=100 * t, atol=100 * t)
    # plain projection leaves eta_S as it is, so its metric norm would change with S
    assert relative_error(man.proju(y_s, eta_s), eta_s) < 10 * t


# ------------------------------------------------------------------------------- gradient
def loss(man: FixedRank, z: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((man.product(z) - target) ** 2).sum()


def rgrad(man: FixedRank, z: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    zz = z.detach().clone().requires_grad_(True)
    loss(man, zz, target).backward()
    return man.egrad2rgrad(z, zz.grad)


@FAST
@given(cases(dtypes=[torch.float64]))
def test_rgrad_matches_finite_differences(case):
    man, z, gen = setup(case)
    target = torch.randn(*z.shape[:-2], man.n, man.m, generator=gen, dtype=z.dtype)
    g = rgrad(man, z, target)
    assert man.check_vector_on_tangent(z, g, atol=1e-10)
    xi = man.proju(z, randn_like(z, gen))
    h = 1e-5
    fd = (loss(man, man.retr(z, h * xi), target) - loss(man, man.retr(z, -h * xi), target)) / (
        2 * h
    )
    exact = man.inner(z, g, xi).sum()
    scale = float(man.norm(z, g).sum() * man.norm(z, xi).max()) + 1e-300
    assert abs(float(fd - exact)) / scale < 1e-6


@FAST
@given(cases())
def test_rgrad_equivariance(case):
    man, z, gen = setup(case)
    o = rotation(z, gen)
    target = torch.randn(*z.shape[:-2], man.n, man.m, generator=gen, dtype=z.dtype)
    g = rgrad(man, z, target)
    g_rot = rgrad(man, man.act(z, o), target)
    assert relative_error(g_rot, man.act(g, o)) < 1000 * tol(z.dtype)


# ------------------------------------------------------------------------------- pymanopt
@FAST
@given(cases(dtypes=[torch.float64]))
def test_pymanopt_round_trip(case):
    man, z, _ = setup(case)
    u, s, vt = man.to_pymanopt(z)
    k = z.shape[-1]
    eye = np.eye(k)
    assert np.allclose(np.swapaxes(u, -1, -2) @ u, eye, atol=1e-10)
    assert np.allclose(vt @ np.swapaxes(vt, -1, -2), eye, atol=1e-10)
    assert (s > 0).all() and (np.diff(s, axis=-1) <= 0).all()
    w = (u * s[..., None, :]) @ vt
    assert np.allclose(w, man.product(z).numpy(), atol=1e-10)
    back = man.from_pymanopt((u, s, vt), dtype=z.dtype)
    assert man.check_point_on_manifold(back, atol=1e-10)
    assert relative_error(man.product(back), man.product(z)) < 1e-10


@FAST
@given(cases(dtypes=[torch.float64]))
def test_factor_pair_round_trip(case):
    n, m, k, batch, dtype, seed = case
    gen = rng(seed)
    a = torch.randn(*batch, n, k, generator=gen, dtype=dtype)
    b = torch.randn(*batch, m, k, generator=gen, dtype=dtype)
    point = factor_pair_to_pymanopt(a, b)
    u, s, vt = point
    assert np.allclose(np.swapaxes(u, -1, -2) @ u, np.eye(k), atol=1e-10)
    assert np.allclose(vt @ np.swapaxes(vt, -1, -2), np.eye(k), atol=1e-10)
    assert (np.diff(s, axis=-1) <= 0).all()
    w = (a @ b.transpose(-1, -2)).numpy()
    assert np.allclose((u * s[..., None, :]) @ vt, w, atol=1e-10)
    a2, b2 = factor_pair_from_pymanopt(point, dtype=dtype)
    assert relative_error(a2 @ b2.transpose(-1, -2), torch.from_numpy(w)) < 1e-10
    assert relative_error(a2.transpose(-1, -2) @ a2, b2.transpose(-1, -2) @ b2) < 1e-10


def test_pymanopt_manifold_accepts_point():
    pymanopt = pytest.importorskip("pymanopt")
    n, m, k = 7, 5, 3
    man = FixedRank(n, m)
    z = man.random(n + k + m, k, dtype=torch.float64, generator=rng(0))
    point = man.to_pymanopt(z)
    pm = pymanopt.manifolds.FixedRankEmbedded(n, m, k)
    egrad = pm.projection(point, np.ones((n, m)))
    assert np.isfinite(pm.norm(point, egrad))
    assert man.check_point_on_manifold(man.from_pymanopt(pm.random_point(), dtype=torch.float64))


# ---------------------------------------------------------------------------- bad input
def test_bad_input_raises():
    man = FixedRank(4, 3)
    with pytest.raises(ValueError, match="n \\+ k \\+ m"):
        man.factors(torch.zeros(5, 2))
    with pytest.raises(ValueError, match="k <= min"):
        man.random(4 + 4 + 3, 4)
    with pytest.raises(ValueError, match="positive int"):
        FixedRank(0, 3)
    z = man.random(4 + 2 + 3, 2, dtype=torch.float64)
    u, s, v = man.factors(z)
    bad = man.from_factors(u, -s, v)
    with pytest.raises(ValueError, match="positive definite"):
        man.assert_check_point_on_manifold(bad)
    nan = z.clone()
    nan[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        man.assert_check_point_on_manifold(nan)
    asym = man.from_factors(u, s + torch.tensor([[0.0, 1.0], [0.0, 0.0]], dtype=z.dtype), v)
    with pytest.raises(ValueError, match="symmetric"):
        man.assert_check_point_on_manifold(asym)
    with pytest.raises(ValueError, match="orthonormal"):
        man.assert_check_point_on_manifold(man.from_factors(2 * u, s, v))
    with pytest.raises(ValueError, match="non-positive"):
        man.from_pymanopt((np.eye(4, 2), np.array([1.0, -1.0]), np.eye(2, 3)))
    with pytest.raises(ValueError, match="from_factors"):
        man.from_factors(u, s, v[..., :1])
    with pytest.raises(ValueError, match="not horizontal"):
        man.assert_check_vector_on_tangent(z, man.vertical(z, torch.tensor([[0.0, 1.0], [0, 0]])))


# ----------------------------------------------------------------------------- optimizers
@pytest.mark.parametrize(
    "make_opt",
    [
        lambda p: geoopt.optim.RiemannianSGD([p], lr=0.05, momentum=0.9),
        lambda p: geoopt.optim.RiemannianAdam([p], lr=0.1),
    ],
    ids=["sgd-momentum", "adam"],
)
def test_optimizers_fit_low_rank_target(make_opt):
    n, m, k = 8, 6, 2
    man = FixedRank(n, m)
    gen = rng(1)
    target = man.product(man.random(3, n + k + m, k, dtype=torch.float64, generator=gen))
    p = geoopt.ManifoldParameter(
        man.random(3, n + k + m, k, dtype=torch.float64, generator=gen), manifold=man
    )
    opt = make_opt(p)
    first = None
    for _ in range(100):
        opt.zero_grad()
        value = loss(man, p, target)
        value.backward()
        opt.step()
        first = value.item() if first is None else first
        assert torch.isfinite(p).all()
    final = loss(man, p, target).item()
    assert final < 0.25 * first
    assert man.check_point_on_manifold(p.data, atol=1e-8)
