"""quotientopt: attention heads trained on the quotient of their factor space by the head symmetry group."""

from quotientopt import linalg, manifolds

__version__ = "0.1.0"

__all__ = ["__version__", "linalg", "manifolds"]
