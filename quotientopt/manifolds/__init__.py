"""Quotient manifolds of attention-head factorizations, as ``geoopt.manifolds.Manifold`` subclasses."""
