"""QuotientMuon: the step against its closed form, exact invariance under each geometry's own
group (where torch Muon and per-head Muon fail), plain matrices as torch Muon, and the contract
(non-finite gradients, rank loss, bf16, state_dict, schedulers, no host synchronisation)."""

from __future__ import annotations

import copy
import math

import geoopt
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.optim import _muon

from quotientopt.manifolds import FactorQuotient, SubgroupFactorQuotient
from quotientopt.manifolds.subgroup_quotient import orthogonal_generators, rope_generators
from quotientopt.models import GPT, GPTConfig
from quotientopt.optim import HybridOptimizer, QuotientMuon, muon_and_adamw
from quotientopt.optim.muon import polar_right_factor
from tests.helpers import matrix_with_condition, orthogonal, rng

N, M, K, HEADS = 10, 8, 4, 3


# ----------------------------------------------------------------------------- problems
def rope_rotation(k: int, angle: float = 0.7) -> torch.Tensor:
    """A RoPE rotation (one angle per interleaved pair, distinct frequencies), float64."""
    r = torch.zeros(k, k, dtype=torch.float64)
    for p in range(k // 2):
        c, s = math.cos(angle / (p + 1)), math.sin(angle / (p + 1))
        r[2 * p : 2 * p + 2, 2 * p : 2 * p + 2] = torch.tensor([[c, -s], [s, c]])
    return r


def geometry(kind: str):
    if kind == "gl":
        return FactorQuotient(N, M)
    if kind == "rope":
        return SubgroupFactorQuotient(N, M, rope_generators(K), name="rope")
    return SubgroupFactorQuotient(N, M, orthogonal_generators(K), name="qk-norm")


def group_element(kind: str, cond: float, gen: torch.Generator) -> torch.Tensor:
    """An element of the geometry's own group, with condition number ``cond`` where the group
    allows it (O(k) only has cond 1)."""
    if kind == "gl":
        return matrix_with_condition((HEADS,), K, K, cond, gen, torch.float64)
    if kind == "rope":  # one scaled rotation a I + b J per pair, scales log-spaced up to cond
        scales = torch.logspace(0, math.log10(cond), K // 2, dtype=torch.float64)
        angles = torch.rand(HEADS, K // 2, generator=gen, dtype=torch.float64) * 6.28
        g = torch.zeros(HEADS, K, K, dtype=torch.float64)
        for p in range(K // 2):
            c, s = scales[p] * torch.cos(angles[:, p]), scales[p] * torch.sin(angles[:, p])
            g[:, 2 * p, 2 * p], g[:, 2 * p, 2 * p + 1] = c, -s
            g[:, 2 * p + 1, 2 * p], g[:, 2 * p + 1, 2 * p + 1] = s, c
        return g
    return orthogonal((HEADS,), K, gen)


def act(z: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """(A G, B G^{-T}) on the stacked tensor."""
    a, b = z[..., :N, :], z[..., N:, :]
    return torch.cat((a @ g, b @ torch.linalg.inv(g).mT), dim=-2)


def problem(kind: str, seed: int = 0):
    """A loss invariant under exactly the geometry's group: the product fit for GL(k); for RoPE
    also a rotated product A R B^T (R commutes with the scaled rotations only); for QK-norm also
    a fit of A A^T (invariant under O(k) only)."""
    gen = rng(seed)
    z0 = torch.randn(HEADS, N + M, K, generator=gen, dtype=torch.float64)
    t1 = torch.randn(HEADS, N, M, generator=gen, dtype=torch.float64)
    t2 = torch.randn(HEADS, N, N if kind == "qk-norm" else M, generator=gen, dtype=torch.float64)
    rot = rope_rotation(K)

    def loss(z: torch.Tensor) -> torch.Tensor:
        a, b = z[..., :N, :], z[..., N:, :]
        value = ((a @ b.mT - t1) ** 2).sum()
        if kind == "rope":
            value = value + ((a @ rot @ b.mT - t2) ** 2).sum()
        elif kind == "qk-norm":
            value = value + 0.1 * ((a @ a.mT - t2 @ t2.mT / N) ** 2).sum()
        return value

    return z0, loss


def train(z0, loss, make_optimizer, steps: int, manifold=None) -> torch.Tensor:
    """The products A B^T after ``steps`` steps from ``z0``."""
    if manifold is None:
        point = torch.nn.Parameter(z0.clone())
    else:
        point = geoopt.ManifoldParameter(z0.clone(), manifold=manifold)
    optimizer = make_optimizer([point])
    for _ in range(steps):
        optimizer.zero_grad()
        loss(point).backward()
        optimizer.step()
    z = point.detach()
    return z[..., :N, :] @ z[..., N:, :].mT


class ConcatenatedMuon(torch.optim.Optimizer):
    """torch.optim.Muon on the nanoGPT layout: all heads' A as one n x (heads k) matrix, B too."""

    def __init__(self, params, lr):
        (z,) = params
        self.z = z
        self.a = torch.nn.Parameter(z.detach()[..., :N, :].transpose(0, 1).reshape(N, -1))
        self.b = torch.nn.Parameter(z.detach()[..., N:, :].transpose(0, 1).reshape(M, -1))
        self.inner = torch.optim.Muon([self.a, self.b], lr=lr, adjust_lr_fn="match_rms_adamw")
        super().__init__(params, {})

    @torch.no_grad()
    def step(self, closure=None):
        g = self.z.grad
        self.a.grad = g[..., :N, :].transpose(0, 1).reshape(N, -1)
        self.b.grad = g[..., N:, :].transpose(0, 1).reshape(M, -1)
        self.inner.step()
        a = self.a.reshape(N, HEADS, K).transpose(0, 1)
        b = self.b.reshape(M, HEADS, K).transpose(0, 1)
        self.z.copy_(torch.cat((a, b), dim=-2))


class PerHeadMuon(torch.optim.Optimizer):
    """torch Muon's functional step on each head's A and B separately (views)."""

    def __init__(self, params, lr):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        (z,) = self.param_groups[0]["params"]
        state = self.state[z]
        buf = state.setdefault("buf", torch.zeros_like(z))
        views = [
            (x[h, rows], grad[h, rows], bb[h, rows])
            for x, grad, bb in [(z, z.grad, buf)]
            for h in range(HEADS)
            for rows in (slice(None, N), slice(N, None))
        ]
        _muon.muon(
            [v[0] for v in views],
            [v[1] for v in views],
            [v[2] for v in views],
            lr=self.param_groups[0]["lr"],
            weight_decay=0.1,
            momentum=0.95,
            nesterov=True,
            ns_coefficients=(_muon.DEFAULT_A, _muon.DEFAULT_B, _muon.DEFAULT_C),
            ns_steps=5,
            eps=_muon.EPS,
            adjust_lr_fn="match_rms_adamw",
            has_complex=False,
        )


# ------------------------------------------------------------------------------ invariance
@pytest.mark.parametrize("kind", ["gl", "rope", "qk-norm"])
@pytest.mark.parametrize(
    "polar, step, head_norm",
    [
        ("newton-schulz", "block", "per-head"),
        ("eigh", "block", "per-head"),
        ("newton-schulz", "tangent", "per-head"),
        ("newton-schulz", "block", "all-heads"),
        ("eigh", "block", "all-heads"),
    ],
)
def test_products_do_not_depend_on_the_factorization(kind, polar, step, head_norm):
    """200 float64 steps from Z and from Z G (G in the geometry's group, one element per head,
    cond(G) = 1000 where the group has such elements): the products agree to 1e-10."""
    z0, loss = problem(kind)
    g = group_element(kind, 1000.0, rng(1))
    manifold = geometry(kind)

    def make(ps):
        return QuotientMuon(ps, lr=0.003, polar=polar, step=step, head_norm=head_norm)

    w0 = train(z0, loss, make, 200, manifold)
    w1 = train(act(z0, g), loss, make, 200, manifold)
    # the tangent step subtracts Grams (S_A = X^T X - C^T C), which costs it one digit: 1e-9;
    # so does eigh on the all-heads Gram, singular here (N < HEADS K: rank 10 of 12), whose
    # regularized inverse root scales the rounding in its null space by eps^(-1/2)
    exact = step == "block" and (polar, head_norm) != ("eigh", "all-heads")
    tol = 1e-10 if exact else 1e-9
    assert torch.linalg.matrix_norm(w0 - w1).max() < tol * torch.linalg.matrix_norm(w0).max()
    assert torch.isfinite(w0).all() and float(loss(torch.cat((z0,), 0))) > 0


@pytest.mark.parametrize("kind", ["gl", "rope"])
@pytest.mark.parametrize("baseline", [ConcatenatedMuon, PerHeadMuon])
def test_torch_muon_and_per_head_muon_depend_on_the_factorization(kind, baseline):
    z0, loss = problem(kind)
    g = group_element(kind, 1000.0, rng(1))

    def make(ps):
        return baseline(ps, lr=0.003)

    w0 = train(z0, loss, make, 200)
    w1 = train(act(z0, g), loss, make, 200)
    assert torch.linalg.matrix_norm(w0 - w1).max() > 1e-3


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    kind=st.sampled_from(["gl", "rope", "qk-norm"]),
    head_norm=st.sampled_from(["per-head", "all-heads"]),
)
def test_one_step_is_equivariant_under_the_group(seed, kind, head_norm):
    """step(Z G) = step(Z) G for any start and any group element (here: random ones)."""
    z0, loss = problem(kind, seed % 1000)
    g = group_element(kind, 30.0, rng(seed))
    manifold = geometry(kind)
    points = []
    for start in (z0, act(z0, g)):
        p = geoopt.ManifoldParameter(start.clone(), manifold=manifold)
        opt = QuotientMuon([p], lr=0.01, weight_decay=0.05, head_norm=head_norm)
        loss(p).backward()
        opt.step()
        points.append(p.detach())
    assert torch.allclose(act(points[0], g), points[1], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("head_norm", ["per-head", "all-heads"])
@pytest.mark.parametrize("kind", ["gl", "rope", "qk-norm"])
def test_no_move_without_a_gradient(kind, head_norm):
    """Nothing but the gradient moves a head: a zero gradient (no weight decay) or lr 0 leaves
    an unbalanced point bitwise in place, so no GL(k) move outside the group can happen."""
    manifold = geometry(kind)
    z0 = act(torch.randn(HEADS, N + M, K, dtype=torch.float64), group_element(kind, 100.0, rng(2)))
    for lr, grad in ((0.01, torch.zeros_like(z0)), (0.0, torch.randn_like(z0))):
        p = geoopt.ManifoldParameter(z0.clone(), manifold=manifold)
        opt = QuotientMuon([p], lr=lr, weight_decay=0.0, head_norm=head_norm)
        for _ in range(3):
            p.grad = grad.clone()
            opt.step()
        assert torch.equal(p.detach(), z0)


# -------------------------------------------------------------------------- the step itself
def polar_svd(x: torch.Tensor) -> torch.Tensor:
    u, _, vh = torch.linalg.svd(x, full_matrices=False)
    return u @ vh


def plain_eigh_step(rows: int, seed: int, lr: float, **options):
    """One step with eigh and no momentum or decay from a random (HEADS, rows + M, K) start:
    the start, the gradient and the parameter after the step."""
    gen = rng(seed)
    z0 = torch.randn(HEADS, rows + M, K, generator=gen, dtype=torch.float64)
    grad = torch.randn(HEADS, rows + M, K, generator=gen, dtype=torch.float64)
    p = geoopt.ManifoldParameter(z0.clone(), manifold=FactorQuotient(rows, M))
    opt = QuotientMuon(
        [p], lr=lr, momentum=0.0, nesterov=False, weight_decay=0.0, polar="eigh", **options
    )
    p.grad = grad.clone()
    opt.step()
    return z0, grad, p


@pytest.mark.parametrize("head_scale", ["balanced", "rms"])
def test_first_step_is_the_spectral_steepest_descent_of_the_product(head_scale):
    """With eigh and no momentum: dA = -c_A polar(G_A L_P^{-T}) L_P^{-1}; the product change
    dA B^T has every nonzero singular value equal to c_A (spectral norm c_A, rank k)."""
    lr = 0.01
    z0, grad, p = plain_eigh_step(N, 3, lr, eps=1e-30, head_scale=head_scale, head_norm="per-head")
    a, b = z0[..., :N, :], z0[..., N:, :]
    w = a @ b.mT
    if head_scale == "rms":
        c_a = c_b = 0.2 * math.sqrt(N * M / K)
    else:
        root = (torch.linalg.matrix_norm(w) ** 2 / K) ** 0.25
        c_a, c_b = (
            0.2 * math.sqrt(N) * root[:, None, None],
            0.2 * math.sqrt(M) * root[:, None, None],
        )
    for rows, partner, side_grad, c in (
        (slice(None, N), b, grad[..., :N, :], c_a),
        (slice(N, None), a, grad[..., N:, :], c_b),
    ):
        chol = torch.linalg.cholesky(partner.mT @ partner)
        x = torch.linalg.solve_triangular(chol.mT, side_grad, upper=True, left=False)
        expected = (
            -lr * c * torch.linalg.solve_triangular(chol, polar_svd(x), upper=False, left=False)
        )
        moved = p.detach()[..., rows, :] - z0[..., rows, :]
        assert torch.allclose(moved, expected, rtol=1e-9, atol=1e-12)
        sv = torch.linalg.svdvals(moved @ partner.mT)[..., :K]
        assert torch.allclose(
            sv,
            lr * c * torch.ones_like(sv)
            if isinstance(c, float)
            else (lr * c[..., 0]).expand_as(sv),
            rtol=1e-8,
        )


def test_tangent_step_is_the_polar_of_the_tangent_projection():
    """step="tangent": the product change is -c polar(P_T E) with its normal block removed
    (P_T: projection onto the tangent space of the rank-k matrices at A B^T), lifted horizontally
    (zero momentum map), to first order in lr."""
    gen = rng(6)
    manifold = FactorQuotient(N, M)
    z0 = torch.randn(HEADS, N + M, K, generator=gen, dtype=torch.float64)
    a, b = z0[..., :N, :], z0[..., N:, :]
    e = torch.randn(HEADS, N, M, generator=gen, dtype=torch.float64)
    p = geoopt.ManifoldParameter(z0.clone(), manifold=manifold)
    lr = 1e-7
    opt = QuotientMuon(
        [p],
        lr=lr,
        momentum=0.0,
        nesterov=False,
        weight_decay=0.0,
        polar="eigh",
        eps=1e-14,
        step="tangent",
        head_norm="per-head",
    )
    p.grad = torch.cat((e @ b, e.mT @ a), dim=-2)
    opt.step()
    dz = p.detach() - z0
    dw = dz[..., :N, :] @ b.mT + a @ dz[..., N:, :].mT
    u, v = torch.linalg.qr(a).Q, torch.linalg.qr(b).Q
    pu, pv = u @ u.mT, v @ v.mT
    tangent = pu @ e + e @ pv - pu @ e @ pv
    pol = polar_svd(tangent)
    eye_n, eye_m = torch.eye(N, dtype=torch.float64), torch.eye(M, dtype=torch.float64)
    expected = -(pol - (eye_n - pu) @ pol @ (eye_m - pv)) * lr * 0.2 * math.sqrt(N * M / K)
    assert torch.allclose(dw, expected, rtol=1e-7, atol=1e-8 * float(expected.abs().max()))
    generic = manifold.momentum_map(z0, torch.randn(dz.shape, generator=gen, dtype=dz.dtype))
    relative = manifold.momentum_map(z0, dz).abs().max() / dz.abs().max()
    assert relative < 1e-6 * generic.abs().max()  # rounding of z0 + dz only


def whitened_concatenation(grad_side, partner):
    """X = [G_1 L_1^{-T}, ..., G_H L_H^{-T}] (rows x H k) and the Cholesky factors L_h of the
    partners' Grams."""
    chol = torch.linalg.cholesky(partner.mT @ partner)
    x = torch.linalg.solve_triangular(chol.mT, grad_side, upper=True, left=False)
    return x.transpose(0, 1).flatten(1), chol


@pytest.mark.parametrize("rows", [N, 3 * K + 1])
def test_all_heads_step_is_the_spectral_steepest_descent_of_the_heads_side_by_side(rows):
    """head_norm="all-heads", eigh, no momentum: [dA_h L_h]_h = -c polar(X) with X the whitened
    gradients of all heads side by side, so the concatenated product change
    [dA_1 B_1^T, ..., dA_H B_H^T] has min(n, H k) singular values, all equal to c (rows = N < H k:
    wide X; rows = H k + 1: tall X)."""
    lr = 0.01
    # eps: X X^T is singular when X is wide; eps = 0 would scale the rounding without bound
    z0, grad, p = plain_eigh_step(rows, 7, lr, eps=1e-12, head_norm="all-heads")
    a, b = z0[..., :rows, :], z0[..., rows:, :]
    for side, partner, side_grad, n_side in (
        (slice(None, rows), b, grad[..., :rows, :], rows),
        (slice(rows, None), a, grad[..., rows:, :], M),
    ):
        c = 0.2 * math.sqrt(HEADS * rows * M / min(n_side, HEADS * K))
        x, chol = whitened_concatenation(side_grad, partner)
        y = polar_svd(x).unflatten(1, (HEADS, K)).transpose(0, 1)  # (H, n_side, K)
        expected = -lr * c * torch.linalg.solve_triangular(chol, y, upper=False, left=False)
        moved = p.detach()[..., side, :] - z0[..., side, :]
        assert torch.allclose(moved, expected, rtol=1e-8, atol=1e-11)
        side_by_side = (moved @ partner.mT).transpose(0, 1).flatten(1)  # (n_side, H x rows)
        sv = torch.linalg.svdvals(side_by_side)
        count = min(n_side, HEADS * K)
        assert torch.allclose(sv[:count], torch.full((count,), lr * c, dtype=sv.dtype), rtol=1e-8)
        assert torch.cat((sv[count:], sv.new_zeros(1))).max() < 1e-9 * lr * c  # rank min(n, Hk)


def test_all_heads_step_is_split_muon_where_the_partners_are_orthonormal():
    """Where every B_h has orthonormal columns (L_P = I), the all-heads step of A is Muon's
    polar of the concatenated W_Q gradient [G_1, ..., G_H] (torch Muon on the d x d query
    matrix, modded-nanogpt's split layout), with Muon's Newton-Schulz iteration."""
    gen = rng(8)
    rows = HEADS * K + 2
    b = torch.linalg.qr(torch.randn(HEADS, M, K, generator=gen, dtype=torch.float64))[0]
    a = torch.randn(HEADS, rows, K, generator=gen, dtype=torch.float64)
    grad = torch.randn(HEADS, rows + M, K, generator=gen, dtype=torch.float64)
    p = geoopt.ManifoldParameter(torch.cat((a, b), -2), manifold=FactorQuotient(rows, M))
    opt = QuotientMuon(
        [p], lr=0.01, momentum=0.0, nesterov=False, weight_decay=0.0, head_norm="all-heads"
    )
    p.grad = grad
    opt.step()
    concatenated = grad[..., :rows, :].transpose(0, 1).flatten(1)  # (rows, H K)
    direction = newton_schulz_reference(concatenated)
    c = 0.2 * math.sqrt(HEADS * rows * M / min(rows, HEADS * K))
    expected = -0.01 * c * direction.unflatten(1, (HEADS, K)).transpose(0, 1)
    assert torch.allclose(p.detach()[..., :rows, :] - a, expected, rtol=1e-7, atol=1e-10)


def newton_schulz_reference(x: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Muon's quintic iteration on X itself (float64), the reference for the k x k version."""
    a, b, c = _muon.DEFAULT_A, _muon.DEFAULT_B, _muon.DEFAULT_C
    y = x / (torch.linalg.matrix_norm(x)[..., None, None] + 1e-7)
    for _ in range(steps):
        s = y.mT @ y
        y = a * y + y @ (b * s + c * s @ s)
    return y


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    rows=st.integers(1, 12),
    k=st.integers(1, 6),
    log_cond=st.floats(0, 4),
)
def test_k_by_k_newton_schulz_equals_muons_iteration(seed, rows, k, log_cond):
    x = matrix_with_condition((2,), max(rows, k), k, 10**log_cond, rng(seed), torch.float64)
    got = x @ polar_right_factor(x.mT @ x, "newton-schulz")
    assert torch.allclose(got, newton_schulz_reference(x), atol=1e-10)
    exact = x @ polar_right_factor(x.mT @ x, "eigh", eps=1e-30)
    assert torch.allclose(exact, polar_svd(x), atol=1e-8)
    assert torch.equal(
        polar_right_factor(torch.zeros(k, k, dtype=torch.float64)).isfinite(),
        torch.ones(k, k, dtype=torch.bool),
    )


@pytest.mark.parametrize("head_norm", ["per-head", "all-heads"])
def test_one_heads_gradient_moves_only_that_head(head_norm):
    """Batching over heads couples nothing, and the all-heads polar of [0, X_h, 0] is
    [0, polar(X_h), 0]: either way one head's gradient moves only that head."""
    manifold = FactorQuotient(N, M)
    z0 = torch.randn(HEADS, N + M, K, dtype=torch.float64)
    p = geoopt.ManifoldParameter(z0.clone(), manifold=manifold)
    opt = QuotientMuon([p], lr=0.01, weight_decay=0.0, head_norm=head_norm)
    grad = torch.zeros_like(z0)
    grad[1] = torch.randn(N + M, K, dtype=torch.float64)
    p.grad = grad
    opt.step()
    moved = (p.detach() - z0).flatten(1).abs().amax(1)
    assert moved[1] > 1e-4 and moved[0] == 0 and moved[2] == 0


# -------------------------------------------------------------------- plain matrices, model
def test_plain_matrices_step_bitwise_as_torch_muon():
    gen = rng(4)
    weights = [torch.randn(6, 9, generator=gen), torch.randn(7, 5, generator=gen)]
    ours = [torch.nn.Parameter(w.clone()) for w in weights]
    theirs = [torch.nn.Parameter(w.clone()) for w in weights]
    options = dict(
        lr=0.02, weight_decay=0.1, momentum=0.9, nesterov=True, adjust_lr_fn="match_rms_adamw"
    )
    a, b = QuotientMuon(ours, **options), torch.optim.Muon(theirs, **options)
    for step in range(5):
        grads = [torch.randn(w.shape, generator=rng(10 + step)) for w in weights]
        for params, opt in ((ours, a), (theirs, b)):
            for q, g in zip(params, grads, strict=True):
                q.grad = g.clone()
            opt.step()
    for x, y in zip(ours, theirs, strict=True):
        assert torch.equal(x, y)
    assert torch.equal(a.state[ours[0]]["momentum_buffer"], b.state[theirs[0]]["momentum_buffer"])


def tiny_gpt(seed: int = 0, dtype=torch.float32) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=8, vocab_size=17, n_layer=1, n_head=2, n_embd=8)).to(dtype)


def gpt_step(model: GPT, opt: torch.optim.Optimizer, seed: int) -> float:
    gen = rng(seed)
    x = torch.randint(0, 17, (4, 8), generator=gen)
    y = torch.randint(0, 17, (4, 8), generator=gen)
    opt.zero_grad()
    _, loss = model(x, y)
    loss.backward()
    opt.step()
    return float(loss.detach())


def test_muon_and_adamw_splits_a_model_and_trains_it():
    model = tiny_gpt()
    opt = muon_and_adamw(model, lr=0.01, head_lr=0.005)
    assert isinstance(opt, HybridOptimizer) and isinstance(opt.heads, QuotientMuon)
    names = {id(p): n for n, p in model.named_parameters()}
    head_group, matrix_group = opt.heads.param_groups
    assert head_group["lr"] == 0.005 and matrix_group["lr"] == 0.01
    assert all(".attn.attn." in names[id(p)] for p in head_group["params"])
    assert {names[id(p)] for p in matrix_group["params"]} == {
        "h.0.mlp.c_fc.weight",
        "h.0.mlp.c_proj.weight",
    }
    rest = {names[id(p)] for g in opt.rest.param_groups for p in g["params"]}
    assert {"wte.weight", "wpe.weight", "ln_f.weight"} <= rest
    losses = [gpt_step(model, opt, 0) for _ in range(30)]
    assert losses[-1] < losses[0] - 0.5
    assert all(opt.momentum(p).kind == "covector" for p in head_group["params"])


@pytest.mark.parametrize("head_weight_decay", [None, 2.0])
def test_muon_and_adamw_decays_heads_and_matrices_at_their_own_rates(head_weight_decay):
    """With zero gradients a step only decays: each head's product by 1 - head_lr * head decay
    (``head_weight_decay``, default ``weight_decay``), each hidden matrix by 1 - lr *
    weight_decay."""
    model = tiny_gpt().double()
    opt = muon_and_adamw(
        model, lr=0.01, head_lr=0.005, weight_decay=0.1, head_weight_decay=head_weight_decay
    )
    head_group, matrix_group = opt.heads.param_groups
    before = [p.detach().clone() for g in (head_group, matrix_group) for p in g["params"]]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    head_decay = 1 - 0.005 * (0.1 if head_weight_decay is None else head_weight_decay)
    heads = len(head_group["params"])
    for i, p in enumerate(head_group["params"]):
        product = p.manifold.product
        assert torch.allclose(product(p.detach()), head_decay * product(before[i]), rtol=1e-12)
    for w, w0 in zip(matrix_group["params"], before[heads:], strict=True):
        assert torch.allclose(w.detach(), (1 - 0.01 * 0.1) * w0, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="invalid head_weight_decay"):
        muon_and_adamw(tiny_gpt(), head_weight_decay=-1.0)


def test_unsupported_parameters_and_options_name_the_fix():
    with pytest.raises(ValueError, match="give embeddings, gains and biases to AdamW"):
        QuotientMuon([torch.nn.Parameter(torch.zeros(3))])
    sphere = geoopt.ManifoldParameter(torch.ones(3) / 3**0.5, manifold=geoopt.Sphere())
    with pytest.raises(ValueError, match="not a head geometry"):
        QuotientMuon([sphere])
    w = [torch.nn.Parameter(torch.zeros(2, 2))]
    for options, message in (
        ({"lr": -1.0}, "invalid lr"),
        ({"momentum": 1.0}, "invalid momentum"),
        ({"polar": "svd"}, "invalid polar"),
        ({"head_scale": "x"}, "invalid head_scale"),
        ({"head_norm": "x"}, "invalid head_norm"),
        ({"step": "tangent"}, "pass head_norm='per-head' with them"),
        ({"head_norm": "all-heads", "head_scale": "balanced"}, "pass head_norm='per-head'"),
        ({"adjust_lr_fn": "x"}, "invalid adjust_lr_fn"),
        ({"ns_steps": 0}, "invalid ns_steps"),
        ({"on_nonfinite": "x"}, "invalid on_nonfinite"),
    ):
        with pytest.raises(ValueError, match=message):
            QuotientMuon(w, **options)
    sharded = geoopt.ManifoldParameter(  # rows sharded by hand, whole sector's rows not given
        torch.randn(1, N + M, K), manifold=FactorQuotient(N, M, row_reduce=lambda t: t)
    )
    sharded.grad = torch.randn_like(sharded)
    with pytest.raises(ValueError, match=r"sector_rows=\(n, m\)"):
        QuotientMuon([sharded]).step()
    opt = QuotientMuon(w)
    with pytest.raises(ValueError, match="2-D matrices"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(4))]})
    with pytest.raises(ValueError, match="no head parameters and no hidden"):
        muon_and_adamw(torch.nn.Embedding(3, 2))


@pytest.mark.parametrize(
    "step, head_scale, head_norm",
    [
        ("block", "rms", "per-head"),
        ("block", "balanced", "per-head"),
        ("tangent", "rms", "per-head"),
        ("tangent", "balanced", "per-head"),
        ("block", "rms", "all-heads"),
    ],
)
def test_a_sector_of_one_row_shard_steps_like_the_whole_sector(step, head_scale, head_norm):
    """A row-sharded geometry (one shard: ``row_reduce`` the identity, the sector's rows given as
    ``sector_rows``) takes the whole sector's step; 2 processes: tests/test_fsdp.py."""
    z = torch.randn(HEADS, N + M, K, generator=rng(3), dtype=torch.float64)
    grads = [
        torch.randn(HEADS, N + M, K, generator=rng(10 + i), dtype=torch.float64) for i in range(3)
    ]
    manifolds = (
        FactorQuotient(N, M),
        FactorQuotient(N, M, row_reduce=lambda t: t, sector_rows=(N, M)),
    )
    points = []
    for manifold in manifolds:
        point = geoopt.ManifoldParameter(z.clone(), manifold=manifold)
        optimizer = QuotientMuon(
            [point], lr=0.05, step=step, head_scale=head_scale, head_norm=head_norm
        )
        for grad in grads:
            point.grad = grad.clone()
            optimizer.step()
        points.append(point.detach())
    assert float((points[0] - z).abs().max()) > 0.01
    assert torch.equal(points[1], points[0])


# ------------------------------------------------------------------------------ contract
def head_and_matrix(dtype=torch.float32, seed: int = 5):
    gen = rng(seed)
    manifold = FactorQuotient(N, M)
    z = geoopt.ManifoldParameter(
        torch.randn(HEADS, N + M, K, generator=gen).to(dtype), manifold=manifold
    )
    w = torch.nn.Parameter(torch.randn(6, 4, generator=gen).to(dtype))
    return z, w


def quadratic(z, w, seed: int) -> torch.Tensor:
    gen = rng(seed)
    t = torch.randn(HEADS, N, M, generator=gen)
    a, b = z[..., :N, :], z[..., N:, :]
    return ((a @ b.mT - t.to(z.dtype)) ** 2).sum() + (w**2).sum() * w.sum()


@pytest.mark.parametrize("policy", ["skip", "warn", "raise"])
def test_nonfinite_gradients_never_reach_the_weights(policy):
    z, w = head_and_matrix()
    opt = QuotientMuon([z, w], lr=0.01, on_nonfinite=policy)
    quadratic(z, w, 0).backward()
    opt.step()
    before = [z.detach().clone(), w.detach().clone()]
    bufs = [opt.state[p]["momentum_buffer"].clone() for p in (z, w)]
    opt.zero_grad()
    quadratic(z, w, 1).backward()
    z.grad[0, 0, 0] = float("nan")
    if policy == "raise":
        with pytest.raises(ValueError, match="NaN or Inf"):
            opt.step()
    elif policy == "warn":
        with pytest.warns(RuntimeWarning, match="NaN or Inf"):
            opt.step()
    else:
        opt.step()
    assert torch.equal(z.detach(), before[0]) and torch.equal(w.detach(), before[1])
    for p, buf in zip((z, w), bufs, strict=True):
        assert torch.equal(opt.state[p]["momentum_buffer"], buf)
    if policy != "raise":
        assert opt.nonfinite_steps() == 1 and opt.rank_skips() == 0


def test_a_rank_deficient_start_takes_the_regularized_step():
    """A head whose B lost a column (P singular) takes the regularized step onto the full-rank
    set (issue 16, fault 4), with one warning; the healthy heads step as usual."""
    z, w = head_and_matrix(torch.float64)
    with torch.no_grad():
        z[1, N:, 0] = 0.0  # head 1's B loses a column: P is singular
    before = z.detach().clone()
    opt = QuotientMuon([z], lr=0.01)
    quadratic(z, w, 0).backward()
    with pytest.warns(RuntimeWarning, match="start rank-deficient"):
        opt.step()
    assert not torch.equal(z.detach()[1], before[1]) and torch.isfinite(z).all()
    assert not torch.equal(z.detach()[0], before[0])
    assert opt.rank_skips() == 0


def test_bfloat16_parameters_train_like_float32():
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        z, w = head_and_matrix(dtype)
        opt = QuotientMuon([z], lr=0.05, weight_decay=0.0)
        losses = []
        for _ in range(30):
            opt.zero_grad()
            loss = quadratic(z, w.detach(), 0)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        assert z.dtype == dtype and opt.state[z]["momentum_buffer"].dtype == dtype
        assert all(math.isfinite(v) for v in losses) and losses[-1] < 0.7 * losses[0]
        results.append(losses[-1])
    assert abs(results[1] - results[0]) < 0.05 * results[0]


def run(opt, z, w, steps, start=0):
    for step in range(start, start + steps):
        opt.zero_grad()
        quadratic(z, w, step).backward()
        opt.step()


def test_state_dict_resume_is_bitwise_identical():
    z, w = head_and_matrix()
    opt = QuotientMuon([z, w], lr=0.01)
    run(opt, z, w, 3)
    saved = copy.deepcopy(opt.state_dict())
    params = [z.detach().clone(), w.detach().clone()]
    run(opt, z, w, 4, start=3)
    z2, w2 = head_and_matrix()
    with torch.no_grad():
        z2.copy_(params[0])
        w2.copy_(params[1])
    opt2 = QuotientMuon([z2, w2], lr=0.01)
    opt2.load_state_dict(saved)
    run(opt2, z2, w2, 4, start=3)
    assert torch.equal(z.detach(), z2.detach()) and torch.equal(w.detach(), w2.detach())


def test_schedulers_closures_and_param_groups():
    z, w = head_and_matrix(torch.float64)
    opt = QuotientMuon([{"params": [z]}, {"params": [w], "lr": 0.0}], lr=0.01, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.0)
    w0 = w.detach().clone()
    for _ in range(2):
        opt.step(lambda: (opt.zero_grad(), quadratic(z, w, 0))[1].backward() or torch.zeros(()))
        scheduler.step()
    assert torch.equal(w.detach(), w0)  # its group's lr is 0
    frozen = z.detach().clone()
    assert opt.param_groups[0]["lr"] == 0.0
    opt.zero_grad()
    quadratic(z, w, 0).backward()
    opt.step()
    assert torch.equal(z.detach(), frozen)  # the scheduler's lr 0 reached the head step
    closure_loss = opt.step(lambda: torch.tensor(3.0))
    assert float(closure_loss) == 3.0


def test_a_step_does_not_synchronise_with_the_host(monkeypatch):
    """No .item(), bool(), float() or int() of a tensor inside step (with the default skip
    policy and the Newton-Schulz polar): every decision stays on the device."""
    z, w = head_and_matrix()
    opt = QuotientMuon([z, w], lr=0.01)
    run(opt, z, w, 1)
    quadratic(z, w, 1).backward()

    def forbidden(*args, **kwargs):
        raise AssertionError("host synchronisation inside QuotientMuon.step")

    for name in ("item", "__bool__", "__float__", "__int__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    opt.step()
    monkeypatch.undo()
    assert opt.nonfinite_steps() == 0


# --------------------------------------------------------------------- benchmark contenders
@pytest.mark.parametrize("name", ["quotient-muon", "muon-per-head", "muon"])
def test_benchmark_muon_contenders_train(name, monkeypatch):
    """The language-model benchmark's Muon family builds and trains (loss falls, finite)."""
    import importlib
    import sys
    from pathlib import Path

    from quotientopt.compare import split_corpus
    from quotientopt.data import stdlib_text

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    language_model = importlib.import_module("language_model")
    try:
        train_tokens, val = split_corpus(stdlib_text(100_000), 16, 4)
        setup = language_model.Setup(
            n_layer=1, n_embd=16, n_head=2, block_size=16, batch_size=4, eval_batches=2
        )
        job = language_model.Job(name, 0.02, 0, 30, curve=True)
        result = language_model.run_job(job, setup, train_tokens, val)
    finally:
        sys.modules.pop("language_model", None)
    assert math.isfinite(result["val_loss"])
    assert result["curve"][-1][1] < result["curve"][0][1] - 0.3
    assert result["optimizer_state_bytes"] > 0


def test_a_healthy_head_that_would_lose_rank_is_left_where_it_is():
    """Head 1 is built so that one step would collapse a column of A: with P = B^T B = R R^T,
    A = U S R^{-1} (U orthonormal columns, S = diag(2, ..., 2, 1)) and the factor gradient
    G_A = U R^T (G_B = 0), the exact polar gives dA = -c polar(U) R^{-1} = -c U R^{-1}, so at
    c = lr * 0.2 sqrt(nm/k) = 1 the new A R = U (S - I) has rank k - 1. That head keeps its point
    and momentum-free state (counted in rank_skips), the healthy heads step, and
    on_nonfinite="raise" refuses the whole step with a message that says why."""
    z, _ = head_and_matrix(torch.float64)
    a, b = z.manifold.factors(z.detach())
    gen = rng(11)
    root = torch.linalg.cholesky(b[1].mT @ b[1])
    frame = torch.linalg.qr(torch.randn(N, K, generator=gen, dtype=torch.float64)).Q
    spectrum = torch.full((K,), 2.0, dtype=torch.float64)
    spectrum[-1] = 1.0
    with torch.no_grad():  # A = U S R^{-1}
        a[1] = torch.linalg.solve_triangular(root, frame * spectrum, upper=False, left=False)
    grad = 0.1 * torch.randn(z.shape, generator=gen, dtype=torch.float64)
    grad[1] = 0.0
    grad[1, :N] = frame @ root.mT  # G_A = U R^T, G_B = 0
    before = z.detach().clone()
    options = dict(
        lr=1.0 / (0.2 * math.sqrt(N * M / K)),
        polar="eigh",
        eps=1e-30,
        weight_decay=0,
        head_norm="per-head",  # the construction is per head; the guard is the same for both
    )
    opt = QuotientMuon([z], **options)
    z.grad = grad.clone()
    opt.step()
    assert torch.equal(z.detach()[1], before[1])
    assert not torch.equal(z.detach()[0], before[0])
    assert not torch.equal(z.detach()[2], before[2])
    assert opt.rank_skips() == 1
    # the step that was refused really loses rank: taken by hand, A R = U (S - I)
    step = -torch.linalg.solve_triangular(root, frame, upper=False, left=False)
    collapsed = torch.linalg.svdvals(before[1, :N] + step)
    assert float(collapsed[-1] / collapsed[0]) < 1e-12
    with torch.no_grad():
        z.copy_(before)
    strict = QuotientMuon([z], **options, on_nonfinite="raise")
    z.grad = grad.clone()
    with pytest.raises(ValueError, match="lose rank"):
        strict.step()
    assert torch.equal(z.detach(), before)


def test_a_head_without_a_head_axis_takes_the_per_head_step():
    """A single (n + m, k) sector: side by side with no other head, the all-heads step is the
    per-head one."""
    gen = rng(12)
    z0 = torch.randn(N + M, K, generator=gen, dtype=torch.float64)
    grad = torch.randn(N + M, K, generator=gen, dtype=torch.float64)
    points = []
    for head_norm in ("all-heads", "per-head"):
        p = geoopt.ManifoldParameter(z0.clone(), manifold=FactorQuotient(N, M))
        opt = QuotientMuon([p], lr=0.05, head_norm=head_norm)
        p.grad = grad.clone()
        opt.step()
        points.append(p.detach())
    assert torch.equal(points[0], points[1]) and not torch.equal(points[0], z0)


@pytest.mark.parametrize("head_norm", ["per-head", "all-heads"])
def test_a_head_with_non_finite_factors_is_skipped_alone(head_norm):
    """A NaN in one head's factors (its gradient finite) skips that head only: the all-heads
    polar takes the others without it (as beside a finite head with no gradient)."""
    gen = rng(13)
    z0 = torch.randn(HEADS, N + M, K, generator=gen, dtype=torch.float64)
    grad = torch.randn(HEADS, N + M, K, generator=gen, dtype=torch.float64)
    z0[1, 2, 0] = float("nan")
    p = geoopt.ManifoldParameter(z0.clone(), manifold=FactorQuotient(N, M))
    opt = QuotientMuon([p], lr=0.05, head_norm=head_norm)
    p.grad = grad.clone()
    opt.step()
    moved = p.detach()
    assert torch.equal(moved[1].nan_to_num(), z0[1].nan_to_num()) and opt.rank_skips() == 1
    healthy = z0.clone()  # the same heads beside a finite head 1 that has no gradient
    healthy[1] = torch.randn(N + M, K, generator=gen, dtype=torch.float64)
    beside = geoopt.ManifoldParameter(healthy, manifold=FactorQuotient(N, M))
    reference = QuotientMuon([beside], lr=0.05, head_norm=head_norm)
    beside.grad = grad.clone()
    beside.grad[1] = 0.0
    reference.step()
    assert torch.allclose(moved[[0, 2]], beside.detach()[[0, 2]], rtol=1e-12, atol=1e-14)
    assert not torch.equal(moved[0], z0[0])


def test_all_heads_couples_the_heads_of_a_layer_and_nothing_else():
    """Leading dims before the head axis (layers stacked in one tensor) are a batch: stepping
    (2, HEADS, N + M, K) at once equals stepping each layer's (HEADS, N + M, K) alone."""
    gen = rng(14)
    z0 = torch.randn(2, HEADS, N + M, K, generator=gen, dtype=torch.float64)
    grad = torch.randn(2, HEADS, N + M, K, generator=gen, dtype=torch.float64)
    points = []
    for z, g in ((z0, grad), *zip(z0, grad, strict=True)):
        p = geoopt.ManifoldParameter(z.clone(), manifold=FactorQuotient(N, M))
        opt = QuotientMuon([p], lr=0.05, head_norm="all-heads")
        p.grad = g.clone()
        opt.step()
        points.append(p.detach())
    assert torch.allclose(points[0], torch.stack(points[1:]), rtol=1e-12, atol=1e-14)
    assert not torch.equal(points[0], z0)


def test_per_head_options_are_refused_with_all_heads_also_when_set_later():
    """step="tangent" or head_scale="balanced" written into a group of an all-heads optimizer
    after construction is refused at the next step, nothing moved."""
    p = geoopt.ManifoldParameter(
        torch.randn(HEADS, N + M, K, dtype=torch.float64), manifold=FactorQuotient(N, M)
    )
    before = p.detach().clone()
    opt = QuotientMuon([p], lr=0.05)
    opt.param_groups[0]["step"] = "tangent"
    p.grad = torch.randn_like(p)
    with pytest.raises(ValueError, match="pass head_norm='per-head'"):
        opt.step()
    assert torch.equal(p.detach(), before)


def test_head_step_variants_cannot_express_a_forbidden_combination():
    """The group's options become one head-step object: the all-heads step has no tangent or
    balanced field, and the per-head one is built from step and head_scale."""
    from quotientopt.optim.muon import AllHeads, PerHead, head_step

    group = dict(head_norm="all-heads", step="block", head_scale="rms", polar="eigh")
    assert head_step(group) == AllHeads("eigh")
    assert head_step(group | dict(head_norm="per-head", step="tangent")) == PerHead(tangent=True)
    assert head_step(group | dict(head_norm="per-head", head_scale="balanced")) == PerHead(
        balanced=True
    )
    with pytest.raises(TypeError):
        AllHeads(tangent=True)
    with pytest.raises(ValueError, match="pass head_norm='per-head'"):
        head_step(group | dict(step="tangent"))
