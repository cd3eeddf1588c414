"""The optimizer of docs/architecture.md's "Adding an optimizer" (one kernel on the step loop),
run from the page itself: its trajectory of products does not depend on the representative, one
step is the formula, the kernel writes nothing, and a NaN gradient leaves every head put."""

from __future__ import annotations

import re
from pathlib import Path

import geoopt
import pytest
import torch

from quotientopt.manifolds import FactorQuotient
from tests.helpers import matrix_with_condition, relative_error, rng

PAGE = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"
HEADS, N, M, K = 3, 6, 5, 2


@pytest.fixture(scope="module")
def descent() -> type:
    """The class defined by the page's code block under 'Adding an optimizer'."""
    section = PAGE.read_text().split("## Adding an optimizer", 1)[1]
    (code,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    namespace: dict = {}
    exec(compile(code, str(PAGE), "exec"), namespace)
    return namespace["QuotientNormalizedDescent"]


def _problem(g: torch.Tensor | None = None):
    gen = rng(0)
    manifold = FactorQuotient(N, M)
    a = torch.randn(HEADS, N, K, generator=gen, dtype=torch.float64)
    b = torch.randn(HEADS, M, K, generator=gen, dtype=torch.float64)
    target = torch.randn(HEADS, N, M, generator=gen, dtype=torch.float64)
    z = torch.cat((a, b), dim=-2)
    if g is not None:
        z = manifold.right_multiply(z, g, torch.linalg.inv(g).mT)
    return manifold, geoopt.ManifoldParameter(z, manifold=manifold), target


def _loss(manifold, point, target):
    a, b = manifold.factors(point)
    return 0.5 * (a @ b.mT - target).square().sum()


def _run(descent, point, manifold, target, steps, lr=0.05):
    optimizer = descent([point], lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        _loss(manifold, point, target).backward()
        optimizer.step()
    return optimizer


def test_products_do_not_depend_on_the_representative(descent):
    g = matrix_with_condition((HEADS,), K, K, 100.0, rng(1), torch.float64)
    manifold, point, target = _problem()
    _, moved, _ = _problem(g)
    _run(descent, point, manifold, target, 6)
    _run(descent, moved, manifold, target, 6)
    products = [manifold.product(p.detach()) for p in (point, moved)]
    assert relative_error(products[1], products[0]) < 1e-10
    assert relative_error(point.detach(), moved.detach()) > 1e-3  # the factors do differ


def test_one_step_is_the_formula(descent):
    manifold, point, target = _problem()
    z = point.detach().clone()
    _run(descent, point, manifold, target, 1, lr=0.1)
    a, b = manifold.factors(z)
    e = a @ b.mT - target  # dL/dW
    xi = torch.cat((e @ b @ torch.linalg.inv(b.mT @ b), e.mT @ a @ torch.linalg.inv(a.mT @ a)), -2)
    xa, xb = manifold.factors(xi)
    norm = ((xa.mT @ xa) @ (b.mT @ b)).diagonal(dim1=-2, dim2=-1).sum(-1)
    norm = (norm + ((xb.mT @ xb) @ (a.mT @ a)).diagonal(dim1=-2, dim2=-1).sum(-1)).sqrt()
    expected = z - 0.1 * xi / norm[:, None, None]
    assert torch.allclose(point.detach(), expected, rtol=0, atol=1e-12)


def test_the_kernel_writes_nothing_and_a_nan_gradient_moves_nothing(descent):
    manifold, point, target = _problem()
    optimizer = _run(descent, point, manifold, target, 1)
    before = point.detach().clone()
    optimizer.zero_grad()
    _loss(manifold, point, target).backward()
    group = optimizer.param_groups[0]
    keep = torch.ones((), dtype=torch.bool)
    update = optimizer._head_update(point, manifold, group, keep)
    assert torch.equal(point.detach(), before) and update.ok.shape == (HEADS,)
    point.grad[1, 0, 0] = float("nan")
    optimizer.step()
    assert torch.equal(point.detach(), before)
    assert optimizer.nonfinite_steps() == 1


def test_plain_parameters_are_refused_with_the_fix(descent):
    with pytest.raises(ValueError, match="HybridOptimizer"):
        descent([torch.nn.Parameter(torch.zeros(3))])
