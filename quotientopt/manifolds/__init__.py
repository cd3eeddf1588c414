"""Quotient manifolds of attention-head factorizations, as ``geoopt.manifolds.Manifold`` subclasses."""

import quotientopt.sector_registry  # noqa: F401  (records sector parameters per module)
from quotientopt.manifolds.factor_quotient import FactorQuotient, balance, charge, product
from quotientopt.manifolds.fixed_rank import (
    FixedRank,
    PymanoptPoint,
    factor_pair_from_pymanopt,
    factor_pair_to_pymanopt,
)
from quotientopt.manifolds.grassmann import Grassmann
from quotientopt.manifolds.orthogonal_quotient import OrthogonalFactorQuotient
from quotientopt.manifolds.projected_rank import ProjectedRank
from quotientopt.manifolds.subgroup_quotient import (
    SubgroupFactorQuotient,
    full_generators,
    orthogonal_generators,
    rope_generators,
)

__all__ = [
    "FactorQuotient",
    "FixedRank",
    "Grassmann",
    "OrthogonalFactorQuotient",
    "ProjectedRank",
    "PymanoptPoint",
    "SubgroupFactorQuotient",
    "balance",
    "charge",
    "factor_pair_from_pymanopt",
    "factor_pair_to_pymanopt",
    "full_generators",
    "orthogonal_generators",
    "product",
    "rope_generators",
]
