"""Show that QuotientSGD does not care how the heads are factorized, and torch's SGD does.

Two copies of a low-rank regression start from the same products A B^T but different factors
(A G, B G^{-T}) with cond(G) = 100; after training, compare their products.

    python examples/refactorization_invariance.py [--steps 200]
"""

from __future__ import annotations

import argparse

import geoopt
import torch

from quotientopt.manifolds import FactorQuotient
from quotientopt.optim import QuotientSGD


def train(z0, manifold, x, y, make, steps):
    z = geoopt.ManifoldParameter(z0.clone(), manifold=manifold)
    optimizer = make([z])
    for _ in range(steps):
        optimizer.zero_grad()
        loss = ((x @ manifold.product(z) - y) ** 2).mean()
        loss.backward()
        optimizer.step()
    return manifold.product(z.detach()), loss.item()


def main(steps: int = 200) -> dict[str, float]:
    gen = torch.Generator().manual_seed(0)
    n, m, k = 16, 12, 3
    manifold = FactorQuotient(n, m)
    x = torch.randn(128, n, generator=gen, dtype=torch.float64)
    y = (
        x
        @ torch.randn(n, k, generator=gen, dtype=torch.float64)
        @ torch.randn(k, m, generator=gen, dtype=torch.float64)
    )
    z0 = torch.randn(n + m, k, generator=gen, dtype=torch.float64)
    u, _ = torch.linalg.qr(torch.randn(k, k, generator=gen, dtype=torch.float64))
    g = u * torch.logspace(0, 2, k, dtype=torch.float64)  # condition number 100
    results = {}
    for name, make in {
        "QuotientSGD": lambda ps: QuotientSGD(ps, lr=0.3, momentum=0.5),
        "torch.optim.SGD": lambda ps: torch.optim.SGD(ps, lr=1e-4, momentum=0.5),
    }.items():
        w1, loss1 = train(z0, manifold, x, y, make, steps)
        w2, loss2 = train(manifold.act(z0, g), manifold, x, y, make, steps)
        gap = float((w1 - w2).norm() / w1.norm())
        results[name] = gap
        print(
            f"{name:16s} loss {loss1:.3e} / {loss2:.3e}   products differ by {gap:.1e} (relative)"
        )
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    main(parser.parse_args().steps)
