"""Issue 27: the geometry protocol is a core every head geometry implements plus opt-in
capabilities that an optimizer asks for by ``isinstance`` on a protocol (never on a class)."""

from __future__ import annotations

import geoopt
import pytest
import torch

from quotientopt.manifolds import FactorQuotient
from quotientopt.manifolds.protocol import (
    CAPABILITIES,
    Balancing,
    HeadGeometry,
    KineticEnergy,
    ProductDecay,
    RowSharded,
    is_head_geometry,
)
from quotientopt.nn import QuotientMultiheadAttention
from quotientopt.nn.attention import GEOMETRIES as SECTOR_GEOMETRIES
from quotientopt.optim import QuotientHamiltonian, geometry_of
from quotientopt.optim.hamiltonian import kinetic_force
from tests.helpers import rng

# every head geometry the attention module builds: its sector geometries and the QK groups that
# RoPE and QK-norm fix; the capabilities each group has (the VO sector stays GL(k) with rope/qk-norm)
GL = {Balancing, KineticEnergy, ProductDecay}
EXPECTED = {
    "gl": (GL, GL),
    "orthogonal": ({KineticEnergy, ProductDecay}, {KineticEnergy, ProductDecay}),  # O(k): no move
    "rope": (GL, GL),  # scaled rotations: one scaling per frequency pair
    "qk-norm": (GL, GL),  # conformal group: one global scaling
    "rope-qk-norm": (GL, GL),
}
OPTIONS = {
    "gl": {},
    "orthogonal": {"qk_geometry": "orthogonal", "vo_geometry": "orthogonal"},
    "rope": {"rope": True},
    "qk-norm": {"qk_norm": True},
    "rope-qk-norm": {"rope": True, "qk_norm": True},
}


def sectors(options: dict) -> list[torch.Tensor]:
    torch.manual_seed(0)
    module = QuotientMultiheadAttention(16, 2, batch_first=True, dtype=torch.float64, **options)
    return [module.qk, module.vo]


def capabilities(geometry: object) -> set[type]:
    return {c for c in CAPABILITIES if isinstance(geometry, c)}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_every_head_geometry_has_the_core_and_exactly_its_groups_capabilities(name):
    for p, expected in zip(sectors(OPTIONS[name]), EXPECTED[name], strict=True):
        geometry = geometry_of(p)
        assert is_head_geometry(geometry) and isinstance(geometry, HeadGeometry)
        assert capabilities(geometry) == expected, (name, geometry)
        # the deprecated booleans and balancing_transform agree with the capabilities
        assert geometry.is_row_sharded == isinstance(geometry, RowSharded)
        assert geometry.supports_kinetic_energy == isinstance(geometry, KineticEnergy)
        z = p.detach() * torch.tensor([1.0, 3.0], dtype=p.dtype)[:, None, None]
        old = geometry.balancing_transform(z)
        if Balancing in expected:
            new = geometry.balancing_element(z)
            assert all(torch.equal(o, n) for o, n in zip(old, new, strict=True))
        else:
            assert old is None and geometry.balancing_element is None


def test_sector_geometries_without_factor_pairs_are_not_head_geometries():
    """``fixed-rank`` (U S V^T) and ``composite`` (W itself) lack the core: no optimizer that
    needs it takes them as heads."""
    for name in set(SECTOR_GEOMETRIES) - set(OPTIONS):
        manifold = sectors({"qk_geometry": name, "bias": False})[0].manifold
        assert not is_head_geometry(manifold) and not isinstance(manifold, HeadGeometry), name
    assert not is_head_geometry(geoopt.Euclidean())


def test_capabilities_follow_how_the_geometry_was_built():
    """Kinetic energy needs the undamped preconditioned metric; row shards have RowSharded and
    lose Balancing (it needs whole factors); ProductDecay stays."""
    assert capabilities(FactorQuotient(6, 5, damping=1e-6)) == {Balancing, ProductDecay}
    assert capabilities(FactorQuotient(6, 5, metric="inv")) == {Balancing, ProductDecay}
    sharded = FactorQuotient(3, 2, row_reduce=lambda t: t, sector_rows=(6, 4))
    assert capabilities(sharded) == {KineticEnergy, RowSharded, ProductDecay}
    assert is_head_geometry(sharded)


class CoreOnly:
    """A geometry that implements the core and nothing else (what "adding a geometry" takes)."""

    n, m, sector_rows = 3, 2, (3, 2)

    def __init__(self) -> None:
        base = FactorQuotient(3, 2)
        for name in ("factors", "grams", "egrad2rgrad", "proju", "proju_", "retr", "transp"):
            setattr(self, name, getattr(base, name))
        for name in ("inner", "cross", "right_multiply", "momentum_map", "row_sum"):
            setattr(self, name, getattr(base, name))
        self.quotient_dimension = base.quotient_dimension


def test_the_core_alone_is_a_head_geometry_without_capabilities():
    geometry = CoreOnly()
    assert isinstance(geometry, HeadGeometry) and capabilities(geometry) == set()


def test_an_optimizer_needing_a_missing_capability_names_the_geometry_and_the_capability():
    damped = FactorQuotient(6, 5, damping=1e-6)
    point = geoopt.ManifoldParameter(damped.random(2, 11, 2, dtype=torch.float64), manifold=damped)
    with pytest.raises(ValueError, match=r"QuotientHamiltonian needs .* KineticEnergy") as error:
        QuotientHamiltonian([point], lr=0.1)
    assert repr(damped) in str(error.value) and "damping=0" in str(error.value)
    z = point.detach()
    with pytest.raises(ValueError, match="KineticEnergy"):
        kinetic_force(damped, z, torch.randn(z.shape, generator=rng(0), dtype=z.dtype))
