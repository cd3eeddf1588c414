"""Quotient manifolds of attention-head factorizations, as ``geoopt.manifolds.Manifold`` subclasses."""

from quotientopt.manifolds.factor_quotient import FactorQuotient, balance, charge, product

__all__ = ["FactorQuotient", "balance", "charge", "product"]
