"""Issue 27.3: QuotientMuon's tangent step applies the non-finite policy to a NaN gradient
(before: ``torch.linalg.eigh`` raised LinAlgError on the NaN Gram)."""

from __future__ import annotations

import geoopt
import pytest
import torch

from quotientopt.manifolds import FactorQuotient
from quotientopt.optim import QuotientMuon


@pytest.mark.parametrize("polar", ["newton-schulz", "eigh"])
def test_tangent_step_skips_a_nan_gradient(polar):
    gen = torch.Generator().manual_seed(0)
    z0 = torch.randn(3, 10, 2, generator=gen, dtype=torch.float64)
    p = geoopt.ManifoldParameter(z0.clone(), manifold=FactorQuotient(5, 5))
    opt = QuotientMuon([p], lr=0.01, step="tangent", head_norm="per-head", polar=polar)
    p.grad = torch.randn(z0.shape, generator=gen, dtype=torch.float64)
    p.grad[1, 2, 0] = float("nan")
    opt.step()
    assert torch.equal(p.detach(), z0)
    assert opt.nonfinite_steps() == 1
    p.grad = torch.randn(z0.shape, generator=gen, dtype=torch.float64)
    opt.step()  # a finite gradient then steps every head
    assert torch.isfinite(p).all() and not torch.equal(p.detach(), z0)
