"""QuotientMuon's invariant variants (quotientopt.optim.muon_variants): each keeps the products
independent of the factorization (float64, cond-100 G, 10 steps, 1e-10), the naive elementwise
moment of the whitened update does not, damping 0 is QuotientMuon, and the options are checked."""

from __future__ import annotations

import geoopt
import pytest
import torch

from quotientopt.manifolds import FactorQuotient
from quotientopt.models import GPT, GPTConfig
from quotientopt.optim import QuotientMuon
from quotientopt.optim.muon_variants import (
    VARIANTS,
    QuotientMuonVariant,
    row_norm_directions,
    variant_muon_and_adamw,
)
from tests.helpers import matrix_with_condition, rng

N, M, K, HEADS = 10, 8, 3, 3


def act(z: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """(A G, B G^{-T}) on the stacked tensor."""
    return torch.cat((z[..., :N, :] @ g, z[..., N:, :] @ torch.linalg.inv(g).mT), dim=-2)


def problem(seed: int = 0):
    gen = rng(seed)
    z0 = torch.randn(HEADS, N + M, K, generator=gen, dtype=torch.float64)
    target = torch.randn(HEADS, N, M, generator=gen, dtype=torch.float64)

    def loss(z: torch.Tensor) -> torch.Tensor:
        return ((z[..., :N, :] @ z[..., N:, :].mT - target) ** 2).sum()

    return z0, loss


def products(z0, loss, make, steps: int = 10) -> torch.Tensor:
    point = geoopt.ManifoldParameter(z0.clone(), manifold=FactorQuotient(N, M))
    optimizer = make([point])
    for _ in range(steps):
        optimizer.zero_grad()
        loss(point).backward()
        optimizer.step()
    z = point.detach()
    return z[..., :N, :] @ z[..., N:, :].mT


def relative_gap(w0: torch.Tensor, w1: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(w0 - w1).max() / torch.linalg.matrix_norm(w0).max())


@pytest.mark.parametrize("variant", VARIANTS)
def test_products_do_not_depend_on_the_factorization(variant):
    """10 float64 steps from Z and from Z G (one G per head, cond 100): products agree to
    1e-10, and the variant moved them (it is not QuotientMuon itself)."""
    z0, loss = problem()
    g = matrix_with_condition((HEADS,), K, K, 100.0, rng(1), torch.float64)

    def make(ps):
        return QuotientMuonVariant(ps, lr=0.01, variant=variant, damping=0.1)

    w0, w1 = products(z0, loss, make), products(act(z0, g), loss, make)
    assert relative_gap(w0, w1) < 1e-10
    plain = products(z0, loss, lambda ps: QuotientMuon(ps, lr=0.01))
    assert relative_gap(w0, plain) > 1e-4  # the variant changes the step
    assert torch.isfinite(w0).all()


def test_an_elementwise_moment_of_the_whitened_update_breaks_the_invariance():
    """The naive invariant-looking AdaMuon (Y / sqrt(Y*Y) elementwise, on Y = polar(X)) differs
    between Z and Z G: the coordinates of Y are moved by an orthogonal O_h, so the module's
    variants use rows of Y or product coordinates instead."""
    z0, loss = problem()
    g = matrix_with_condition((HEADS,), K, K, 100.0, rng(1), torch.float64)

    def whitened_sign_step(z: torch.Tensor) -> torch.Tensor:
        z = z.clone().requires_grad_(True)
        loss(z).backward()
        a, b, grad_a = z[..., :N, :].detach(), z[..., N:, :].detach(), z.grad[..., :N, :]
        chol = torch.linalg.cholesky(b.mT @ b)
        x = torch.linalg.solve_triangular(chol.mT, grad_a, upper=True, left=False)
        u, _, vh = torch.linalg.svd(x, full_matrices=False)
        y = u @ vh
        y = y / (y.abs() + 1e-12)  # elementwise second moment at its first step
        d = torch.linalg.solve_triangular(chol, y, upper=False, left=False)
        return (a - 0.01 * d) @ b.mT

    gap = relative_gap(whitened_sign_step(z0), whitened_sign_step(act(z0, g)))
    assert gap > 1e-3


def test_row_norm_is_a_row_scaling_with_the_frobenius_norm_kept():
    """D' = c diag(rho + eps)^{-1/2} D with ||D' L||_F = ||D L||_F, rows of Y equalized on the
    first step (rho_i = (1 - beta2) ||y_i||^2 / (Hk))."""
    gen = rng(3)
    d = torch.randn(2, 5, 3, generator=gen, dtype=torch.float64)
    f = matrix_with_condition((2,), 3, 3, 10.0, gen, torch.float64)
    chol = torch.linalg.cholesky(f.mT @ f)
    out, moment = row_norm_directions(d, chol, torch.zeros(2, 5, dtype=torch.float64), 0.9, 1e-30)
    y, y_out = d @ chol, out @ chol
    assert torch.allclose(y_out.square().sum(), y.square().sum(), rtol=1e-12)
    row_norms = y_out.square().sum((0, 2))  # the all-heads row norms of Y'
    assert torch.allclose(row_norms, row_norms.mean().expand(5), rtol=1e-10)
    assert torch.allclose(moment, 0.1 * y.square().mean(-1), rtol=1e-12)


def test_zero_damping_is_quotient_muon():
    z0, loss = problem()

    def variant(ps):
        return QuotientMuonVariant(ps, lr=0.01, variant="invariant-damping", damping=0.0)

    w0 = products(z0, loss, variant)
    w1 = products(z0, loss, lambda ps: QuotientMuon(ps, lr=0.01))
    assert relative_gap(w0, w1) < 1e-13


def test_options_are_checked_with_the_fix_named():
    z = geoopt.ManifoldParameter(torch.randn(HEADS, N + M, K), manifold=FactorQuotient(N, M))
    with pytest.raises(ValueError, match="variant"):
        QuotientMuonVariant([z], variant="adamuon")
    with pytest.raises(ValueError, match="head_norm"):
        QuotientMuonVariant([z], variant="row-norm", head_norm="per-head")
    with pytest.raises(ValueError, match="beta2"):
        QuotientMuonVariant([z], beta2=1.0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_muon_and_adamw_trains_the_benchmark_gpt(variant):
    torch.manual_seed(0)
    config = GPTConfig(block_size=8, vocab_size=32, n_layer=1, n_head=2, n_embd=16)
    model = GPT(config)
    optimizer = variant_muon_and_adamw(model, 0.02, variant=variant)
    x = torch.randint(0, 32, (4, 8))
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        _, loss = model(x, x)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    assert all(torch.isfinite(p).all() for p in model.parameters())
