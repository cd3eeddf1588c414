"""ProjectedRank: the composite reparameterization with a truncated-SVD projection after each step."""

from __future__ import annotations

import geoopt
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quotientopt.manifolds.projected_rank import ProjectedRank
from tests.helpers import relative_error, rng


@given(
    n=st.integers(2, 7),
    m=st.integers(2, 7),
    rank=st.integers(1, 2),
    batch=st.sampled_from(((), (3,))),
    seed=st.integers(0, 2**31 - 1),
)
@settings(max_examples=25)
def test_projection_retraction_and_points(n, m, rank, batch, seed):
    gen = rng(seed)
    manifold = ProjectedRank(rank)
    x = torch.randn(*batch, n, rank, generator=gen, dtype=torch.float64) @ torch.randn(
        *batch, rank, m, generator=gen, dtype=torch.float64
    )
    manifold.assert_check_point_on_manifold(x)
    u = torch.randn(*batch, n, m, generator=gen, dtype=torch.float64)
    h = manifold.proju(x, u)
    assert relative_error(manifold.proju(x, h), h) < 1e-10  # idempotent
    assert float(manifold.inner(x, u - h, h).abs().max()) < 1e-10 * float(
        manifold.norm(x, u).max() ** 2
    )
    assert relative_error(manifold.projx(x), x) < 1e-10  # points are fixed by the projection
    y = manifold.retr(x, 0.1 * h)
    manifold.assert_check_point_on_manifold(y)
    # the retraction is first-order: R(x, t h) = x + t h + O(t^2)
    t = 1e-4
    assert relative_error(manifold.retr(x, t * h) - x, t * h) < 1e-3


def test_truncated_svd_step_fits_a_low_rank_target():
    gen = rng(0)
    manifold = ProjectedRank(2)
    target = torch.randn(3, 8, 2, generator=gen, dtype=torch.float64) @ torch.randn(
        3, 2, 6, generator=gen, dtype=torch.float64
    )
    point = geoopt.ManifoldParameter(
        manifold.projx(torch.randn(3, 8, 6, generator=gen, dtype=torch.float64)), manifold=manifold
    )
    optimizer = geoopt.optim.RiemannianSGD([point], lr=0.5, momentum=0.5)
    for _ in range(100):
        optimizer.zero_grad()
        loss = 0.5 * ((point - target) ** 2).sum()
        loss.backward()
        optimizer.step()
    assert loss.item() < 1e-8
    manifold.assert_check_point_on_manifold(point.detach())


def test_bad_input():
    with pytest.raises(ValueError, match="rank must be a positive int"):
        ProjectedRank(0)
    with pytest.raises(ValueError, match="smaller than rank 3"):
        ProjectedRank(3).random(2, 5)
    ok, reason = ProjectedRank(1).check_point_on_manifold(torch.eye(3), explain=True)
    assert not ok and "rank exceeds 1" in reason
