"""One definition each for facts that several optimizers rely on (issue 26, point 6)."""

from __future__ import annotations

import math

import geoopt
import pytest
import torch

from quotientopt.manifolds import FactorQuotient
from quotientopt.manifolds.protocol import HeadGeometry
from quotientopt.manifolds.subgroup_quotient import (
    SubgroupFactorQuotient,
    orthogonal_generators,
    rope_generators,
)
from quotientopt.nn import QuotientMultiheadAttention
from quotientopt.optim import QuotientECD, _base, geometry_of, hamiltonian, sgd


def test_one_fused_kernel_rule_for_every_optimizer() -> None:
    """QuotientSGD and QuotientHamiltonian send the same tensors to torch's fused SGD kernel."""
    assert sgd._fused_kernel_is_exact is _base._fused_kernel_is_exact
    assert hamiltonian._fused_kernel_is_exact is _base._fused_kernel_is_exact


def test_fused_kernel_only_where_it_is_known_exact() -> None:
    """float32/float64 take the fused kernel on every device; reduced precision only on CUDA
    (the CPU kernel is wrong for it, other devices' kernels are untested), so a bfloat16 tensor
    on any other device (here: meta) takes the exact single-tensor step."""
    exact = _base._fused_kernel_is_exact
    for device in ("cpu", "meta"):
        for dtype in (torch.float32, torch.float64):
            assert exact(torch.empty(2, dtype=dtype, device=device))
        for dtype in (torch.bfloat16, torch.float16):
            assert not exact(torch.empty(2, dtype=dtype, device=device))
    if torch.cuda.is_available():
        assert exact(torch.empty(2, dtype=torch.bfloat16, device="cuda"))


@pytest.mark.parametrize(
    "options", [{}, {"rope": True}, {"qk_norm": True}, {"rope": True, "qk_norm": True}]
)
def test_quotient_dimension_is_the_rank_of_the_horizontal_projection(options: dict) -> None:
    """QuotientECD's :math:`d` (``geometry.quotient_dimension``) is the dimension of the
    horizontal space: the rank of ``proju`` at a random full-rank point, measured per head. The
    old code used GL(k)'s :math:`(n + m - k) k` for every geometry, wrong for RoPE / QK-norm."""
    torch.manual_seed(0)
    module = QuotientMultiheadAttention(16, 2, batch_first=True, dtype=torch.float64, **options)
    sectors = [p for p in module.parameters() if geometry_of(p) is not None]
    assert sectors
    for p in sectors:
        geometry = geometry_of(p)
        z = p.detach()[(0,) * (p.dim() - 2)]  # one head, (n + m, k)
        rows, k = z.shape
        basis = torch.eye(rows * k, dtype=z.dtype).reshape(rows * k, rows, k)
        projected = torch.stack([geometry.proju(z, e) for e in basis]).reshape(rows * k, -1)
        rank = int(torch.linalg.matrix_rank(projected))
        assert geometry.quotient_dimension(k) == rank
    if options:
        # a proper subgroup: its quotient is larger than GL(k)'s (n + m - k) k
        geometry = geometry_of(sectors[0])
        rows, k = sectors[0].shape[-2:]
        assert geometry.quotient_dimension(k) > (rows - k) * k


def _subgroup(n: int, m: int, k: int, which: str) -> SubgroupFactorQuotient:
    gens = rope_generators(k) if which == "rope" else orthogonal_generators(k)
    if which == "conformal":  # QK-norm: rotations and one overall scaling
        gens = torch.cat([gens, torch.eye(k, dtype=gens.dtype)[None]])
    return SubgroupFactorQuotient(n, m, gens)


@pytest.mark.parametrize(
    ("which", "group_dim"), [("gl", 16), ("rope", 4), ("conformal", 7), ("orthogonal", 6)]
)
def test_quotient_dimension_is_the_factor_space_minus_the_group(which: str, group_dim: int) -> None:
    r""":math:`(n + m) k - \dim H` per head: GL(4) 16, RoPE's commutant k = 4, QK-norm's
    conformal group k(k-1)/2 + 1 = 7, O(4) 6."""
    n, m, k = 8, 6, 4
    geometry = FactorQuotient(n, m) if which == "gl" else _subgroup(n, m, k, which)
    assert geometry.quotient_dimension(k) == (n + m) * k - group_dim
    assert isinstance(geometry, HeadGeometry)


@pytest.mark.parametrize("which", ["gl", "rope", "conformal"])
def test_ecd_turns_with_the_geometrys_quotient_dimension(which: str) -> None:
    r"""The second QuotientECD step equals the formula of its module docs written out with
    :math:`d = \text{heads} \cdot ((n + m) k - \dim H)` (GL(k)'s :math:`(n + m - k) k` was used
    for every geometry before). The first step starts along :math:`-g`, where the turn
    :math:`g - v \langle v, g\rangle` vanishes and :math:`d` does not enter."""
    gen = torch.Generator().manual_seed(0)
    n, m, k, heads = 5, 3, 2, 3
    geometry = FactorQuotient(n, m) if which == "gl" else _subgroup(n, m, k, which)
    z0 = torch.randn(heads, n + m, k, generator=gen, dtype=torch.float64)
    target = torch.randn(heads, n, m, generator=gen, dtype=torch.float64)
    point = geoopt.ManifoldParameter(z0.clone(), manifold=geometry)
    lr, eta = 0.1, 2.0
    optimizer = QuotientECD([point], lr=lr, eta=eta)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = 0.5 * ((geometry.product(point) - target) ** 2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)  # the first step starts along -g: no turn, d does not enter
    z0 = point.detach().clone()
    v0 = optimizer.state[point]["velocity"].clone()
    loss = closure().detach()
    grad = point.grad.clone()
    optimizer.step(closure)

    d = heads * ((n + m) * k - {"gl": k * k, "rope": k, "conformal": 2}[which])
    dt = lr / math.sqrt(eta)
    delta = dt * eta * d / (2 * (d - 1)) / loss
    g = geometry.egrad2rgrad(z0, grad)
    v = v0 - delta * (g - v0 * geometry.inner(z0, v0, g).sum())
    v = v / geometry.inner(z0, v, v).sum().sqrt()
    expected = geometry.retr(z0, dt * v)
    torch.testing.assert_close(point.detach(), expected, rtol=1e-12, atol=1e-12)


def test_grams_is_defined_beside_the_protocol_and_still_importable_from_factor_quotient() -> None:
    """Issue 27: ``Grams`` lives in ``quotientopt.manifolds.protocol``; the old import path is the
    same class (checkpoints and user code that name ``factor_quotient.Grams`` keep working)."""
    from quotientopt.manifolds import factor_quotient, protocol

    assert protocol.Grams is factor_quotient.Grams
    assert protocol.Grams.__module__ == "quotientopt.manifolds.protocol"
