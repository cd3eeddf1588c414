"""Properties of the GL(k) factor quotient: invariance, projections, gradients, equivariance."""

from __future__ import annotations

import geoopt
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quotientopt.linalg import solve_sylvester_sym
from quotientopt.manifolds import FactorQuotient
from quotientopt.manifolds.factor_quotient import balance, charge, product
from tests.helpers import matrix_with_condition, orthogonal, relative_error, rng

METRICS = ("preconditioned", "inv")
BATCHES = ((), (2,), (2, 3))


@st.composite
def setups(draw, max_cond64: float = 1e3, max_cond32: float = 10.0):
    """A manifold, a well-conditioned point, a random G with a drawn condition number, a dtype."""
    k = draw(st.integers(1, 4))
    n = draw(st.integers(k, 7))
    m = draw(st.integers(k, 7))
    batch = draw(st.sampled_from(BATCHES))
    dtype = draw(st.sampled_from((torch.float32, torch.float64)))
    metric = draw(st.sampled_from(METRICS))
    max_cond = max_cond64 if dtype == torch.float64 else max_cond32
    cond = draw(st.floats(1.0, max_cond))
    gen = rng(draw(st.integers(0, 2**31 - 1)))
    manifold = FactorQuotient(n, m, metric=metric)
    a = matrix_with_condition(batch, n, k, 3.0, gen, dtype)
    b = matrix_with_condition(batch, m, k, 3.0, gen, dtype)
    z = manifold.from_factors(a, b)
    g = matrix_with_condition(batch, k, k, cond, gen, torch.float64)
    return manifold, z, g, gen, dtype


def tol(dtype: torch.dtype, cond: float = 1.0) -> float:
    """Relative tolerance for a computation that passes through a G of condition number ``cond``."""
    eps = torch.finfo(dtype).eps
    return 1e3 * eps * cond**2


def cond_of(g: torch.Tensor) -> float:
    return float(torch.linalg.cond(g).max())


def randn_like(z: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(z.shape, generator=gen, dtype=torch.float64).to(z.dtype)


def smooth_loss(manifold: FactorQuotient, z: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A GL(k)-invariant loss: it depends on the product only."""
    w = manifold.product(z)
    return 0.5 * ((w - target) ** 2).sum() + 0.1 * torch.tanh(w).sum()


def euclidean_grad(manifold, z, target):
    z = z.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(smooth_loss(manifold, z, target), z)
    return grad


# ------------------------------------------------------------------------------- linear algebra
@given(
    p=st.integers(1, 6),
    q=st.integers(1, 6),
    batch=st.sampled_from(BATCHES),
    seed=st.integers(0, 2**31 - 1),
)
@settings(max_examples=30)
def test_symmetric_sylvester_solve(p, q, batch, seed):
    gen = rng(seed)
    ma = matrix_with_condition(batch, p, p, 100.0, gen, torch.float64)
    mb = matrix_with_condition(batch, q, q, 100.0, gen, torch.float64)
    a, b = ma.mT @ ma, mb.mT @ mb
    c = torch.randn(*batch, p, q, generator=gen, dtype=torch.float64)
    x = solve_sylvester_sym(a, b, c)
    assert relative_error(a @ x + x @ b, c) < 1e-10


# --------------------------------------------------------------------------- metric, projection
@given(setups())
@settings(max_examples=40)
def test_metric_is_gl_invariant(setup):
    manifold, z, g, gen, dtype = setup
    u, v = randn_like(z, gen), randn_like(z, gen)
    before = manifold.inner(z, u, v)
    after = manifold.inner(manifold.act(z, g), manifold.push(u, g), manifold.push(v, g))
    scale = (manifold.norm(z, u) * manifold.norm(z, v)).double()
    assert float(((after.double() - before.double()).abs() / scale).max()) < tol(dtype, cond_of(g))


@given(setups())
@settings(max_examples=40)
def test_horizontal_projection(setup):
    manifold, z, _, gen, dtype = setup
    u = randn_like(z, gen)
    h = manifold.proju(z, u)
    # idempotent
    assert relative_error(manifold.proju(z, h), h) < tol(dtype, 10.0)
    # metric-orthogonal to every vertical direction
    omega = torch.randn(z.shape[:-2] + (z.shape[-1],) * 2, generator=gen, dtype=torch.float64)
    vertical = manifold.vertical(z, omega.to(dtype))
    pairing = manifold.inner(z, h, vertical).double().abs()
    scale = (manifold.norm(z, h) * manifold.norm(z, vertical)).double()
    assert float((pairing / scale).max()) < tol(dtype, 10.0)
    # vertical directions project to zero
    assert float(manifold.norm(z, manifold.proju(z, vertical)).max()) < tol(dtype, 10.0) * float(
        manifold.norm(z, vertical).max()
    )
    # d(A B^T) = u_A B^T + A u_B^T is unchanged
    a, b = manifold.factors(z)
    ua, ub = manifold.factors(u)
    ha, hb = manifold.factors(h)
    assert relative_error(ha @ b.mT + a @ hb.mT, ua @ b.mT + a @ ub.mT) < tol(dtype, 10.0)


@given(setups())
@settings(max_examples=30)
def test_projection_is_equivariant(setup):
    manifold, z, g, gen, dtype = setup
    u = randn_like(z, gen)
    moved = manifold.proju(manifold.act(z, g), manifold.push(u, g))
    # the inv metric's projection solves a Lyapunov equation in Q^1/2 P Q^1/2, whose own
    # conditioning adds to G's (a random example at cond(G) = 246 measured 1.06x the plain bound)
    slack = 10.0 if manifold.metric == "inv" else 1.0
    error = relative_error(moved, manifold.push(manifold.proju(z, u), g))
    assert error < slack * tol(dtype, cond_of(g))


# ------------------------------------------------------------------------------------- gradients
@given(setups(), st.booleans())
@settings(max_examples=30)
def test_riemannian_gradient_matches_finite_differences(setup, horizontal):
    manifold, z, _, gen, _ = setup
    z = z.double()
    target = torch.randn(manifold.product(z).shape, generator=gen, dtype=torch.float64)
    rgrad = manifold.egrad2rgrad(z, euclidean_grad(manifold, z, target))
    direction = randn_like(z, gen)
    if horizontal:
        direction = manifold.proju(z, direction)
    t = 1e-5
    with torch.no_grad():
        plus = smooth_loss(manifold, manifold.retr(z, t * direction), target)
        minus = smooth_loss(manifold, manifold.retr(z, -t * direction), target)
    finite_difference = (plus - minus) / (2 * t)
    predicted = manifold.inner(z, rgrad, direction).sum()
    # relative to the Cauchy-Schwarz scale |grad| |direction|, so that a direction nearly
    # orthogonal to the gradient does not turn rounding into a large "relative" error
    scale = float((manifold.norm(z, rgrad) * manifold.norm(z, direction)).sum())
    assert abs(float(predicted - finite_difference)) <= 1e-6 * scale


@given(setups())
@settings(max_examples=30)
def test_gradient_of_invariant_loss_is_horizontal_and_equivariant(setup):
    manifold, z, g, gen, dtype = setup
    target = torch.randn(manifold.product(z).shape, generator=gen, dtype=torch.float64).to(dtype)
    rgrad = manifold.egrad2rgrad(z, euclidean_grad(manifold, z, target))
    assert relative_error(manifold.proju(z, rgrad), rgrad) < tol(dtype, 10.0)
    zg = manifold.act(z, g)
    rgrad_g = manifold.egrad2rgrad(zg, euclidean_grad(manifold, zg, target))
    assert relative_error(rgrad_g, manifold.push(rgrad, g)) < tol(dtype, cond_of(g))


# ---------------------------------------------------------------------- retraction, transport
@given(setups())
@settings(max_examples=30)
def test_retraction_and_transport(setup):
    manifold, z, g, gen, dtype = setup
    u = 0.1 * manifold.proju(z, randn_like(z, gen))
    u = u / manifold.norm(z, u, keepdim=True).clamp_min(1e-12) * 0.1
    v = manifold.proju(z, randn_like(z, gen))
    y, v_new = manifold.retr_transp(z, u, v)
    assert manifold.check_point_on_manifold(y)
    assert relative_error(manifold.proju(y, v_new), v_new) < tol(dtype, 10.0)
    assert torch.equal(manifold.expmap(z, u), y)
    # the retraction commutes with the action: a well-defined retraction on the quotient
    yg = manifold.retr(manifold.act(z, g), manifold.push(u, g))
    assert relative_error(manifold.product(yg), manifold.product(y)) < tol(dtype, cond_of(g))


def test_random_and_origin_are_points():
    manifold = FactorQuotient(6, 5)
    for point in (manifold.random(2, 3, 11, 4), manifold.origin(2, 3, 11, 4)):
        assert point.shape == (2, 3, 11, 4)
        manifold.assert_check_point_on_manifold(point)
    origin = manifold.origin(11, 4, dtype=torch.float64)
    assert torch.equal(manifold.charge(origin), torch.zeros(4, 4, dtype=torch.float64))
    assert torch.equal(manifold.projx(origin), origin)


# ----------------------------------------------------------------------- balance and charge
@given(setups())
@settings(max_examples=30)
def test_balancing_transform_is_one_group_element_reaching_the_balanced_point(setup):
    manifold, z, g, _, dtype = setup
    z = manifold.act(z, g)  # an unbalanced representative
    a, b = manifold.factors(z)
    m_a, m_b = manifold.balancing_transform(z)
    assert m_a.dtype == m_b.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    k = m_a.shape[-1]
    # M_B = M_A^{-T}: the pair is the action of one G, so the product is unchanged
    identity = torch.eye(k, dtype=m_a.dtype).expand_as(m_a)
    assert relative_error(m_a.mT @ m_b, identity) < tol(dtype, cond_of(g))
    a_bal, b_bal = balance(a, b)
    moved = manifold.right_multiply(z, m_a, m_b)
    assert relative_error(moved, manifold.from_factors(a_bal, b_bal)) < tol(dtype, cond_of(g))
    # and the inverse action (M_B^T, M_A^T) brings the balanced point back
    back = manifold.right_multiply(moved, m_b.mT, m_a.mT)
    assert relative_error(back, z) < tol(dtype, cond_of(g))


@given(setups())
@settings(max_examples=30)
def test_balance_preserves_the_function_and_zeroes_the_charge(setup):
    manifold, z, g, _, dtype = setup
    z = manifold.act(z, g)  # an unbalanced representative
    a, b = manifold.factors(z)
    a_bal, b_bal = balance(a, b)
    w = product(a, b)
    assert relative_error(product(a_bal, b_bal), w) < tol(dtype, 10.0)
    scale = float(torch.linalg.matrix_norm(w.double(), ord=2).max())
    assert float(charge(a_bal, b_bal).abs().max()) < tol(dtype, 10.0) * scale
    # the balanced factor norm is twice the nuclear norm of the product
    factor_norm = (a_bal.double() ** 2).sum((-1, -2)) + (b_bal.double() ** 2).sum((-1, -2))
    nuclear = torch.linalg.matrix_norm(w.double(), ord="nuc")
    assert float(((factor_norm - 2 * nuclear).abs() / nuclear).max()) < tol(dtype, 10.0)
    # the balanced Gram (the singular values of the product) does not depend on the representative
    a0_bal, _ = balance(*manifold.factors(manifold.act(z, torch.linalg.inv(g))))
    assert relative_error(a0_bal.mT @ a0_bal, a_bal.mT @ a_bal) < tol(dtype, cond_of(g))


def test_charge_is_invariant_only_under_orthogonal_maps():
    gen = rng(0)
    manifold = FactorQuotient(6, 5)
    z = manifold.random(11, 3, dtype=torch.float64)
    o = orthogonal((), 3, gen)
    c = manifold.charge(z)
    assert relative_error(manifold.charge(manifold.act(z, o)), o.mT @ c @ o) < 1e-12
    g = matrix_with_condition((), 3, 3, 10.0, gen, torch.float64)
    assert relative_error(manifold.charge(manifold.act(z, g)), g.mT @ c @ g) > 1e-3


# ------------------------------------------------------------------------------------ damping
def test_damping_keeps_rotations_and_scalings_but_breaks_gl():
    gen = rng(1)
    manifold = FactorQuotient(6, 5, damping=0.1)
    z = manifold.from_factors(
        matrix_with_condition((4,), 6, 3, 3.0, gen, torch.float64),
        matrix_with_condition((4,), 5, 3, 3.0, gen, torch.float64),
    )
    target = torch.randn(4, 6, 5, generator=gen, dtype=torch.float64)
    rgrad = manifold.egrad2rgrad(z, euclidean_grad(manifold, z, target))
    conformal = 2.5 * orthogonal((4,), 3, gen)
    zc = manifold.act(z, conformal)
    rgrad_c = manifold.egrad2rgrad(zc, euclidean_grad(manifold, zc, target))
    assert relative_error(rgrad_c, manifold.push(rgrad, conformal)) < 1e-12
    g = matrix_with_condition((4,), 3, 3, 100.0, gen, torch.float64)
    zg = manifold.act(z, g)
    rgrad_g = manifold.egrad2rgrad(zg, euclidean_grad(manifold, zg, target))
    assert relative_error(rgrad_g, manifold.push(rgrad, g)) > 1e-3


def test_damping_keeps_rank_deficient_points_finite():
    manifold = FactorQuotient(4, 4, damping=1e-3)
    z = torch.zeros(8, 2, dtype=torch.float64)
    z[0, 0] = z[1, 1] = z[4, 0] = 1.0  # B has rank 1
    out = manifold.egrad2rgrad(z, torch.ones_like(z))
    assert bool(torch.isfinite(out).all())


# --------------------------------------------------------------------------------- bad input
def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="n must be a positive int"):
        FactorQuotient(0, 3)
    with pytest.raises(ValueError, match="unknown metric"):
        FactorQuotient(3, 3, metric="euclid")
    with pytest.raises(ValueError, match="damping"):
        FactorQuotient(3, 3, damping=-1.0)


def test_row_sum_and_sector_rows():
    whole = FactorQuotient(6, 4)
    t = torch.ones(2, 3, 3)
    assert whole.row_sum(t) is t and whole.sector_rows == (6, 4) and not whole.is_row_sharded
    doubling = FactorQuotient(3, 2, row_reduce=lambda x: x.mul_(2))  # two equal shards
    assert torch.equal(doubling.row_sum(t), 2 * torch.ones(2, 3, 3))
    assert torch.equal(t, torch.ones(2, 3, 3)), "row_sum modified its argument"
    with pytest.raises(ValueError, match=r"sector_rows=\(n, m\)"):
        _ = doubling.sector_rows
    given = FactorQuotient(3, 2, row_reduce=lambda x: x, sector_rows=(6, 4))
    assert given.sector_rows == (6, 4) and (given.n, given.m) == (3, 2)
    with pytest.raises(ValueError, match="sector_rows must be a pair"):
        FactorQuotient(3, 2, sector_rows=(6, 4, 1))
    with pytest.raises(ValueError, match="positive int"):
        FactorQuotient(3, 2, sector_rows=(0, 4))


def test_wrong_shapes_are_named():
    manifold = FactorQuotient(5, 4)
    with pytest.raises(ValueError, match=r"n \+ m = 9 rows"):
        manifold.egrad2rgrad(torch.randn(8, 2), torch.randn(8, 2))
    with pytest.raises(ValueError, match=r"more than min\(n, m\) = 4"):
        manifold.proju(torch.randn(9, 5), torch.randn(9, 5))
    with pytest.raises(ValueError, match="from_factors"):
        manifold.from_factors(torch.randn(4, 2), torch.randn(4, 2))


@pytest.mark.parametrize("metric", METRICS)
def test_rank_deficient_and_non_finite_points_raise(metric):
    manifold = FactorQuotient(4, 4, metric=metric)
    z = torch.randn(3, 8, 2, generator=rng(5), dtype=torch.float64)
    z[1, 4:, 1] = z[1, 4:, 0]  # head 1: B has two equal columns
    with pytest.raises(ValueError, match=r"B\^T B.*1 of 3 batch entries.*damping"):
        manifold.egrad2rgrad(z, torch.randn_like(z))
    z = torch.randn(8, 2, generator=rng(6))
    z[0, 0] = float("nan")
    with pytest.raises(ValueError, match="not finite"):
        manifold.proju(z, torch.randn_like(z))
    ok, reason = manifold.check_point_on_manifold(z, explain=True)
    assert not ok and "NaN" in reason


# ---------------------------------------------------------------------- geoopt optimizers
def fit_low_rank(manifold, z0, target, optimizer_cls, steps, **options):
    point = geoopt.ManifoldParameter(z0.clone(), manifold=manifold)
    optimizer = optimizer_cls([point], **options)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = 0.5 * ((manifold.product(point) - target) ** 2).sum()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return point.detach(), losses


@pytest.mark.parametrize(
    ("metric", "optimizer_cls", "options"),
    [
        ("preconditioned", geoopt.optim.RiemannianSGD, {"lr": 0.3}),
        ("preconditioned", geoopt.optim.RiemannianSGD, {"lr": 0.1, "momentum": 0.5}),
        ("preconditioned", geoopt.optim.RiemannianAdam, {"lr": 0.1}),
        ("inv", geoopt.optim.RiemannianSGD, {"lr": 0.02}),
        ("inv", geoopt.optim.RiemannianSGD, {"lr": 0.01, "momentum": 0.5}),
        ("inv", geoopt.optim.RiemannianAdam, {"lr": 0.1}),
    ],
)
def test_geoopt_optimizers_drive_the_manifold(metric, optimizer_cls, options):
    gen = rng(3)
    manifold = FactorQuotient(8, 6, metric=metric)
    target = matrix_with_condition((3,), 8, 2, 4.0, gen, torch.float64) @ torch.randn(
        3, 2, 6, generator=gen, dtype=torch.float64
    )
    target = target / torch.linalg.matrix_norm(target, ord=2)[:, None, None]
    z0 = torch.randn(3, 14, 2, generator=gen, dtype=torch.float64) / 2**0.5
    point, losses = fit_low_rank(manifold, z0, target, optimizer_cls, 300, **options)
    manifold.assert_check_point_on_manifold(point)
    assert losses[-1] < 1e-2 * losses[0]


@pytest.mark.parametrize(
    ("optimizer_cls", "options"),
    [(geoopt.optim.RiemannianSGD, {"lr": 0.3}), (geoopt.optim.RiemannianAdam, {"lr": 0.05})],
)
def test_geoopt_trajectories_are_factorization_independent(optimizer_cls, options):
    """RiemannianSGD (no momentum) and RiemannianAdam see one metric value per head, so on the
    preconditioned quotient their trajectory of products does not depend on the start's factors."""
    gen = rng(4)
    manifold = FactorQuotient(8, 6)
    target = torch.randn(3, 8, 6, generator=gen, dtype=torch.float64)
    z0 = torch.randn(3, 14, 2, generator=gen, dtype=torch.float64) / 2**0.5
    g = matrix_with_condition((3,), 2, 2, 100.0, gen, torch.float64)
    z1, _ = fit_low_rank(manifold, z0, target, optimizer_cls, 100, **options)
    z2, _ = fit_low_rank(manifold, manifold.act(z0, g), target, optimizer_cls, 100, **options)
    assert relative_error(manifold.product(z2), manifold.product(z1)) < 1e-9
    # the contrast: the same optimizer on the Euclidean factor space depends on the factorization
    euclidean = geoopt.Euclidean(ndim=2)
    g = matrix_with_condition((3,), 2, 2, 3.0, gen, torch.float64)
    p1, p2 = (geoopt.ManifoldParameter(z, manifold=euclidean) for z in (z0, manifold.act(z0, g)))
    for p in (p1, p2):
        opt = optimizer_cls([p], lr=0.01)
        for _ in range(100):
            opt.zero_grad()
            (0.5 * ((manifold.product(p) - target) ** 2).sum()).backward()
            opt.step()
    assert relative_error(manifold.product(p2.detach()), manifold.product(p1.detach())) > 1e-3
