"""Architecture-aware head symmetries: factor pairs modulo a Lie subgroup of GL(k) (RoPE, QK-norm)."""

from __future__ import annotations

import itertools

import geoopt
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quotientopt.manifolds import FactorQuotient
from quotientopt.manifolds.subgroup_quotient import (
    SubgroupFactorQuotient,
    full_generators,
    orthogonal_generators,
    rope_generators,
    rope_pairs,
)
from tests.helpers import matrix_with_condition, relative_error, rng

BATCHES = ((), (3,), (2, 2))
GROUPS = ("rope", "rope-half", "orthogonal", "full", "conjugated-rope")
PROPERTY = settings(max_examples=20, deadline=None)


# ----------------------------------------------------------------------------------- helpers
def generators_for(group: str, k: int, gen: torch.Generator) -> torch.Tensor:
    if group == "rope":
        return rope_generators(k)
    if group == "rope-half":
        return rope_generators(k, "half")
    if group == "orthogonal":
        return orthogonal_generators(k)
    if group == "full":
        return full_generators(k)
    # a subalgebra in a generic basis: S h S^{-1} for the RoPE algebra h and a random S
    s = matrix_with_condition((), k, k, 3.0, gen, torch.float64)
    return s @ rope_generators(k) @ torch.linalg.inv(s)


def rope_rotations(
    positions: torch.Tensor, freqs: torch.Tensor, k: int, pairing: str = "interleaved"
) -> torch.Tensor:
    """RoPE rotation matrices, shape (len(positions), k, k): rotation by ``pos * freqs[p]`` on
    each pair of head dims (in the layout of ``rope_pairs``)."""
    angles = positions.to(torch.float64)[:, None] * freqs[None, :]
    rot = torch.zeros(positions.numel(), k, k, dtype=torch.float64)
    for p, (i, j) in enumerate(rope_pairs(k, pairing)):
        c, s = torch.cos(angles[:, p]), torch.sin(angles[:, p])
        rot[:, i, i], rot[:, i, j], rot[:, j, i], rot[:, j, j] = c, -s, s, c
    return rot


def distinct_frequencies(k: int, gen: torch.Generator) -> torch.Tensor:
    """k/2 distinct frequencies in (0, 1): the usual 10000^(-2p/k) ladder, randomly jittered."""
    base = 10000.0 ** (-2 * torch.arange(k // 2, dtype=torch.float64) / k)
    return base * (0.6 + 0.3 * torch.rand(k // 2, generator=gen, dtype=torch.float64))


def random_group_element(gens: torch.Tensor, batch: tuple[int, ...], gen: torch.Generator):
    """exp of a random element of the Lie algebra spanned by ``gens``."""
    coeffs = 0.7 * torch.randn(*batch, gens.shape[0], generator=gen, dtype=torch.float64)
    return torch.linalg.matrix_exp(torch.einsum("...r,rij->...ij", coeffs, gens))


def rope_scores(manifold, z, x, y, rotations):
    """RoPE'd attention scores (x A R_t)(y B R_s)^T, shape (..., T, T)."""
    a, b = manifold.factors(z)
    q = torch.einsum("tn,...nk,tkl->...tl", x.to(z.dtype), a, rotations.to(z.dtype))
    key = torch.einsum("tm,...mk,tkl->...tl", y.to(z.dtype), b, rotations.to(z.dtype))
    return q @ key.transpose(-1, -2)


def rope_loss(manifold, z, x, y, rotations, target):
    scores = rope_scores(manifold, z, x, y, rotations)
    return 0.5 * ((scores - target.to(z.dtype)) ** 2).sum() + 0.1 * torch.tanh(scores).sum()


def euclidean_grad(manifold, z, *args):
    z = z.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(rope_loss(manifold, z, *args), z)
    return grad


def randn_like(z: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(z.shape, generator=gen, dtype=torch.float64).to(z.dtype)


def tol(dtype: torch.dtype) -> float:
    return 1e-9 if dtype == torch.float64 else 2e-4


def tol_through(g: torch.Tensor, dtype: torch.dtype) -> float:
    """Relative tolerance for a computation passing through group elements ``g``."""
    cond = float(torch.linalg.cond(g).max())
    return 1e3 * torch.finfo(dtype).eps * max(cond, 10.0) ** 2


@st.composite
def setups(draw, groups=GROUPS, dtypes=(torch.float64, torch.float32)):
    group = draw(st.sampled_from(groups))
    k = draw(st.sampled_from((2, 4))) if "rope" in group else draw(st.integers(2, 4))
    n, m = draw(st.integers(k, 7)), draw(st.integers(k, 7))
    batch = draw(st.sampled_from(BATCHES))
    dtype = draw(st.sampled_from(dtypes))
    gen = rng(draw(st.integers(0, 2**31 - 1)))
    fast = draw(st.booleans())
    manifold = SubgroupFactorQuotient(
        n, m, generators_for(group, k, gen), name=group, fast_paths=fast
    )
    a = matrix_with_condition(batch, n, k, 3.0, gen, dtype)
    b = matrix_with_condition(batch, m, k, 3.0, gen, dtype)
    return manifold, manifold.from_factors(a, b), gen, dtype


# ------------------------------------------------------------------------- the RoPE symmetry
@given(
    k=st.sampled_from((2, 4, 6, 8)),
    pairing=st.sampled_from(("interleaved", "half")),
    seed=st.integers(0, 2**31 - 1),
)
@PROPERTY
def test_rope_group_commutes_with_rope_rotations(k, pairing, seed):
    gen = rng(seed)
    g = random_group_element(rope_generators(k, pairing), (), gen)
    g_inv_t = torch.linalg.inv(g).mT
    positions = torch.randint(-50, 50, (6,), generator=gen)
    rot = rope_rotations(positions, distinct_frequencies(k, gen), k, pairing)
    assert relative_error(g @ rot, rot @ g) < 1e-12
    assert relative_error(g_inv_t @ rot, rot @ g_inv_t) < 1e-12
    # the inverse transpose of a scaled rotation is again one: G = exp(X) with X = sum c_i E_i
    # gives G^{-T} = exp(-X^T), and -X^T = sum c_i (-E_i^T) stays in the algebra (J^T = -J)
    gens = rope_generators(k, pairing)
    basis = torch.linalg.qr(gens.flatten(-2).T).Q
    minus_t = (-gens.mT).flatten(-2).T
    assert relative_error(basis @ (basis.T @ minus_t), minus_t) < 1e-12
    # a generic invertible G does not commute with the rotations
    generic = matrix_with_condition((), k, k, 5.0, gen, torch.float64)
    assert relative_error(generic @ rot, rot @ generic) > 1e-3


@given(
    k=st.sampled_from((2, 4, 6)),
    pairing=st.sampled_from(("interleaved", "half")),
    batch=st.sampled_from(BATCHES),
    seed=st.integers(0, 2**31 - 1),
)
@PROPERTY
def test_rope_scores_are_invariant_under_the_subgroup_only(k, pairing, batch, seed):
    gen = rng(seed)
    n, m, tokens = k + 2, k + 1, 5
    manifold = SubgroupFactorQuotient(n, m, rope_generators(k, pairing))
    z = manifold.from_factors(
        matrix_with_condition(batch, n, k, 3.0, gen, torch.float64),
        matrix_with_condition(batch, m, k, 3.0, gen, torch.float64),
    )
    x = torch.randn(tokens, n, generator=gen, dtype=torch.float64)
    y = torch.randn(tokens, m, generator=gen, dtype=torch.float64)
    rot = rope_rotations(torch.arange(tokens) * 3 + 1, distinct_frequencies(k, gen), k, pairing)
    scores = rope_scores(manifold, z, x, y, rot)
    g = random_group_element(rope_generators(k, pairing), batch, gen)
    assert relative_error(rope_scores(manifold, manifold.act(z, g), x, y, rot), scores) < 1e-11
    # the full GL(k) is not a symmetry of RoPE'd scores (it is one of the plain product x A B^T y^T)
    generic = matrix_with_condition(batch, k, k, 5.0, gen, torch.float64)
    moved = manifold.act(z, generic)
    assert relative_error(rope_scores(manifold, moved, x, y, rot), scores) > 1e-3
    assert relative_error(manifold.product(moved), manifold.product(z)) < 1e-11


# -------------------------------------------------------------------------------- projection
@given(setups())
@PROPERTY
def test_horizontal_projection(setup):
    manifold, z, gen, dtype = setup
    u = randn_like(z, gen)
    h = manifold.proju(z, u)
    eps = tol(dtype)
    assert relative_error(manifold.proju(z, h), h) < eps
    for e in manifold.generators:
        vertical = manifold.vertical(z, e.to(dtype))
        # metric-orthogonal to every generator's orbit direction
        pairing = manifold.inner(z, h, vertical).double().abs()
        scale = (manifold.norm(z, h) * manifold.norm(z, vertical)).double()
        assert float((pairing / scale).max()) < eps
        # vertical directions project to zero
        residual = manifold.norm(z, manifold.proju(z, vertical)).double()
        assert float((residual / manifold.norm(z, vertical).double()).max()) < eps
    # only a vertical (GL) direction was removed: d(A B^T) = u_A B^T + A u_B^T is unchanged
    a, b = manifold.factors(z)
    (ua, ub), (ha, hb) = manifold.factors(u), manifold.factors(h)
    assert relative_error(ha @ b.mT + a @ hb.mT, ua @ b.mT + a @ ub.mT) < eps
    # in-place variant agrees
    assert relative_error(manifold.proju_(z, u.clone()), h) < eps


@given(setups(dtypes=(torch.float64,)))
@PROPERTY
def test_projection_is_equivariant_under_the_subgroup(setup):
    manifold, z, gen, _ = setup
    batch = z.shape[:-2]
    g = random_group_element(manifold.generators, batch, gen)
    u = randn_like(z, gen)
    moved = manifold.proju(manifold.act(z, g), manifold.push(u, g))
    assert relative_error(moved, manifold.push(manifold.proju(z, u), g)) < tol_through(g, z.dtype)


@given(setups(groups=("full",)))
@PROPERTY
def test_full_basis_agrees_with_factor_quotient(setup):
    manifold, z, gen, dtype = setup
    reference = FactorQuotient(manifold.n, manifold.m)
    generic = SubgroupFactorQuotient(manifold.n, manifold.m, manifold.generators, fast_paths=False)
    # a scrambled basis of the same span: only the span matters
    k = z.shape[-1]
    mix = matrix_with_condition((), k * k, k * k, 10.0, gen, torch.float64)
    scrambled = (mix @ full_generators(k).flatten(-2)).reshape(k * k, k, k)
    generic_scrambled = SubgroupFactorQuotient(manifold.n, manifold.m, scrambled, fast_paths=False)
    u = randn_like(z, gen)
    assert manifold.group_dimension == k**2
    assert generic.structure == "generic"
    expected = reference.proju(z, u)
    for candidate in (manifold, generic, generic_scrambled):
        assert relative_error(candidate.proju(z, u), expected) < tol(dtype)


@given(setups(groups=("orthogonal",)))
@PROPERTY
def test_orthogonal_case_is_orthogonal_to_rotations_of_both_factors(setup):
    manifold, z, gen, dtype = setup
    k = z.shape[-1]
    h = manifold.proju(z, randn_like(z, gen))
    w = torch.randn(*z.shape[:-2], k, k, generator=gen, dtype=torch.float64)
    w = (w - w.mT).to(dtype)
    rotation = torch.cat((z[..., : manifold.n, :] @ w, z[..., manifold.n :, :] @ w), dim=-2)
    pairing = manifold.inner(z, h, rotation).double().abs()
    scale = (manifold.norm(z, h) * manifold.norm(z, rotation)).double()
    assert float((pairing / scale).max()) < tol(dtype)
    # the closed form (generalized Lyapunov equation) agrees with the generic r x r solve
    fast = SubgroupFactorQuotient(manifold.n, manifold.m, manifold.generators, fast_paths=True)
    generic = SubgroupFactorQuotient(manifold.n, manifold.m, manifold.generators, fast_paths=False)
    assert (fast.structure, generic.structure) == ("orthogonal", "generic")
    u = randn_like(z, gen)
    assert relative_error(fast.proju(z, u), generic.proju(z, u)) < tol(dtype)


@given(setups(groups=("rope", "rope-half", "orthogonal", "conjugated-rope")))
@PROPERTY
def test_subgroup_vertical_space_is_strictly_smaller(setup):
    manifold, z, gen, dtype = setup
    k = z.shape[-1]
    w = torch.randn(*z.shape[:-2], k, k, generator=gen, dtype=torch.float64)
    # remove the component in the Lie algebra (Frobenius): W is not in h
    basis = manifold.basis.flatten(-2)
    flat = w.flatten(-2)
    w = (flat - (flat @ basis.T) @ basis).reshape(w.shape).to(dtype)
    vertical = manifold.vertical(z, w)
    residual = manifold.norm(z, manifold.proju(z, vertical)).double()
    assert float((residual / manifold.norm(z, vertical).double()).min()) > 1e-2
    # ... while the GL(k) quotient removes it entirely
    full = FactorQuotient(manifold.n, manifold.m)
    assert float(full.norm(z, full.proju(z, vertical)).max()) < tol(dtype) * float(
        full.norm(z, vertical).max()
    )


def test_batched_call_matches_per_head_calls_and_trivial_group():
    gen = rng(0)
    manifold = SubgroupFactorQuotient(6, 6, rope_generators(4, "half"))
    z = manifold.from_factors(
        matrix_with_condition((2, 2), 6, 4, 3.0, gen, torch.float64),
        matrix_with_condition((2, 2), 6, 4, 3.0, gen, torch.float64),
    )
    u = randn_like(z, gen)
    whole = manifold.proju(z, u)
    for i in range(2):
        for j in range(2):
            assert relative_error(manifold.proju(z[i, j], u[i, j]), whole[i, j]) < 1e-13
    # check=False: a rank-deficient head neither raises nor spoils the other heads
    for gens in (rope_generators(4, "half"), orthogonal_generators(4)):
        unchecked = SubgroupFactorQuotient(6, 6, gens, check=False)
        bad = z.clone()
        bad[0, 1] = 0.0
        out = unchecked.proju(bad, u)
        reference = SubgroupFactorQuotient(6, 6, gens).proju(z, u)
        assert relative_error(out[1], reference[1]) < 1e-13
        assert relative_error(out[0, 0], reference[0, 0]) < 1e-13
    # k = 1: O(1) = {+-1} is discrete, its Lie algebra is zero and the projection is the identity
    trivial = SubgroupFactorQuotient(3, 2, orthogonal_generators(1))
    z1 = torch.randn(5, 1, dtype=torch.float64)
    u1 = torch.randn(5, 1, dtype=torch.float64)
    assert trivial.group_dimension == 0
    assert torch.equal(trivial.proju(z1, u1), u1)


# --------------------------------------------------------------------------------- gradients
@given(
    k=st.sampled_from((2, 4)),
    pairing=st.sampled_from(("interleaved", "half")),
    batch=st.sampled_from(BATCHES),
    dtype=st.sampled_from((torch.float64, torch.float32)),
    seed=st.integers(0, 2**31 - 1),
)
@PROPERTY
def test_gradient_of_rope_loss_is_horizontal_and_equivariant(k, pairing, batch, dtype, seed):
    gen = rng(seed)
    n, m, tokens = k + 2, k + 1, 4
    manifold = SubgroupFactorQuotient(n, m, rope_generators(k, pairing), name="rope")
    z = manifold.from_factors(
        matrix_with_condition(batch, n, k, 3.0, gen, dtype),
        matrix_with_condition(batch, m, k, 3.0, gen, dtype),
    )
    x = torch.randn(tokens, n, generator=gen, dtype=torch.float64)
    y = torch.randn(tokens, m, generator=gen, dtype=torch.float64)
    rot = rope_rotations(torch.arange(tokens) * 2, distinct_frequencies(k, gen), k, pairing)
    target = torch.randn(*batch, tokens, tokens, generator=gen, dtype=torch.float64)
    args = (x, y, rot, target)
    rgrad = manifold.egrad2rgrad(z, euclidean_grad(manifold, z, *args))
    eps = tol(dtype)
    assert relative_error(manifold.proju(z, rgrad), rgrad) < eps
    # not GL(k)-horizontal: the loss is not invariant under the full group
    full = FactorQuotient(n, m)
    assert relative_error(full.proju(z, rgrad), rgrad) > 1e-3
    # equivariant under the subgroup
    g = random_group_element(manifold.generators, batch, gen)
    zg = manifold.act(z, g)
    rgrad_g = manifold.egrad2rgrad(zg, euclidean_grad(manifold, zg, *args))
    assert relative_error(rgrad_g, manifold.push(rgrad, g)) < tol_through(g, dtype)


def test_geoopt_riemannian_sgd_decreases_rope_loss():
    gen = rng(1)
    k, n, m, tokens = 4, 6, 6, 5
    manifold = SubgroupFactorQuotient(n, m, rope_generators(k), name="rope")
    z0 = manifold.from_factors(
        matrix_with_condition((2,), n, k, 2.0, gen, torch.float64),
        matrix_with_condition((2,), m, k, 2.0, gen, torch.float64),
    )
    x = torch.randn(tokens, n, generator=gen, dtype=torch.float64)
    y = torch.randn(tokens, m, generator=gen, dtype=torch.float64)
    rot = rope_rotations(torch.arange(tokens), distinct_frequencies(k, gen), k)
    target = torch.randn(2, tokens, tokens, generator=gen, dtype=torch.float64)
    param = geoopt.ManifoldParameter(z0.clone(), manifold=manifold)
    optimizer = geoopt.optim.RiemannianSGD([param], lr=2e-3)
    losses = []
    for _ in range(60):
        optimizer.zero_grad()
        loss = rope_loss(manifold, param, x, y, rot, target)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0]
    assert all(b <= a + 1e-12 for a, b in itertools.pairwise(losses))
    manifold.assert_check_point_on_manifold(param.detach())


# --------------------------------------------------------------------------------- bad inputs
def test_group_dimensions_and_layouts():
    assert SubgroupFactorQuotient(8, 8, rope_generators(6)).group_dimension == 6
    assert SubgroupFactorQuotient(8, 8, orthogonal_generators(5)).group_dimension == 10
    assert SubgroupFactorQuotient(8, 8, full_generators(3)).group_dimension == 9
    assert rope_pairs(6) == [(0, 1), (2, 3), (4, 5)]
    assert rope_pairs(6, "half") == [(0, 3), (1, 4), (2, 5)]
    gens = rope_generators(4, "half")
    assert torch.equal(
        gens[3],
        torch.tensor(
            [[0, 0, 0, 0], [0, 0, 0, -1], [0, 0, 0, 0], [0, 1, 0, 0.0]], dtype=torch.float64
        ),
    )
    assert "rope" in repr(SubgroupFactorQuotient(4, 4, gens, name="rope"))


def test_bad_inputs_raise_clear_errors():
    gens = rope_generators(4)
    with pytest.raises(ValueError, match="preconditioned"):
        SubgroupFactorQuotient(5, 5, gens, metric="inv")
    with pytest.raises(ValueError, match=r"shape \(r, k, k\)"):
        SubgroupFactorQuotient(5, 5, gens[0])
    with pytest.raises(ValueError, match=r"shape \(r, k, k\)"):
        SubgroupFactorQuotient(5, 5, torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="NaN or Inf"):
        SubgroupFactorQuotient(5, 5, gens * float("nan"))
    with pytest.raises(ValueError, match="linearly dependent"):
        SubgroupFactorQuotient(5, 5, torch.cat((gens, gens[:1] * 2.0)))
    with pytest.raises(ValueError, match="cannot be linearly independent"):
        SubgroupFactorQuotient(5, 5, torch.randn(5, 2, 2))
    with pytest.raises(ValueError, match="real"):
        SubgroupFactorQuotient(5, 5, gens.to(torch.complex128))
    with pytest.raises(ValueError, match="must be a tensor"):
        SubgroupFactorQuotient(5, 5, "rope")
    upper, lower = full_generators(2)[1], full_generators(2)[2]  # E_01, E_10: not closed
    with pytest.raises(ValueError, match="commutator"):
        SubgroupFactorQuotient(5, 5, torch.stack((upper, lower)))
    SubgroupFactorQuotient(5, 5, torch.stack((upper, lower)), check=False)  # opt-out
    with pytest.raises(ValueError, match="k must be a positive even int"):
        rope_generators(5)
    with pytest.raises(ValueError, match="unknown pairing"):
        rope_generators(4, pairing="neox")
    with pytest.raises(ValueError, match="positive int"):
        orthogonal_generators(0)
    manifold = SubgroupFactorQuotient(5, 5, gens)
    with pytest.raises(ValueError, match="k = 2 columns"):
        manifold.proju(torch.randn(10, 2), torch.randn(10, 2))
    with pytest.raises(ValueError, match="k = 3 columns"):
        manifold.egrad2rgrad(torch.randn(3, 10, 3), torch.randn(3, 10, 3))
    with pytest.raises(ValueError, match="rank-deficient"):
        manifold.proju(torch.zeros(10, 4), torch.randn(10, 4))
