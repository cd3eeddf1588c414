"""Cross-check against pymanopt: one low-rank approximation problem, two libraries, one optimum."""

from __future__ import annotations

import geoopt
import numpy as np
import pymanopt
import torch

from quotientopt.manifolds import FactorQuotient
from tests.helpers import rng


def test_same_optimal_cost_as_pymanopt_fixed_rank_embedded():
    n, m, k = 12, 9, 3
    gen = rng(11)
    # a target with a clear gap after the k-th singular value
    u, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(m, m, generator=gen, dtype=torch.float64))
    spectrum = torch.tensor([5.0, 3.0, 2.0, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05], dtype=torch.float64)
    target = (u[:, :m] * spectrum) @ v.T
    eckart_young = 0.5 * float((spectrum[k:] ** 2).sum())

    # pymanopt: FixedRankEmbedded, points (u, s, vt), gradients with respect to the factors
    manifold = pymanopt.manifolds.FixedRankEmbedded(n, m, k)
    target_np = target.numpy()

    @pymanopt.function.numpy(manifold)
    def cost(u, s, vt):
        return 0.5 * np.sum((u @ np.diag(s) @ vt - target_np) ** 2)

    @pymanopt.function.numpy(manifold)
    def euclidean_gradient(u, s, vt):
        residual = u @ np.diag(s) @ vt - target_np
        return residual @ vt.T * s, np.diag(u.T @ residual @ vt.T), s[:, None] * (u.T @ residual)

    problem = pymanopt.Problem(manifold, cost, euclidean_gradient=euclidean_gradient)
    optimizer = pymanopt.optimizers.ConjugateGradient(
        verbosity=0, min_gradient_norm=1e-12, max_iterations=2000
    )
    np.random.seed(0)
    result = optimizer.run(problem)
    pymanopt_cost = float(result.cost)

    # quotientopt: geoopt's own RiemannianSGD on FactorQuotient (preconditioned metric)
    quotient = FactorQuotient(n, m)
    z = geoopt.ManifoldParameter(
        torch.randn(n + m, k, generator=gen, dtype=torch.float64), manifold=quotient
    )
    sgd = geoopt.optim.RiemannianSGD([z], lr=0.5)
    for _ in range(200):
        sgd.zero_grad()
        loss = 0.5 * ((quotient.product(z) - target) ** 2).sum()
        loss.backward()
        sgd.step()
    with torch.no_grad():
        ours = float(0.5 * ((quotient.product(z) - target) ** 2).sum())

    assert abs(ours - pymanopt_cost) / pymanopt_cost < 1e-6
    assert abs(ours - eckart_young) / eckart_young < 1e-6
