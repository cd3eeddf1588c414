"""Quotient manifolds of attention-head factorizations, as ``geoopt.manifolds.Manifold`` subclasses."""

from quotientopt.manifolds.factor_quotient import FactorQuotient, balance, charge, product
from quotientopt.manifolds.grassmann import Grassmann
from quotientopt.manifolds.orthogonal_quotient import OrthogonalFactorQuotient

__all__ = [
    "FactorQuotient",
    "Grassmann",
    "OrthogonalFactorQuotient",
    "balance",
    "charge",
    "product",
]
