"""Attention modules whose heads live on quotient manifolds, model conversion, and paper 002's
relational attention."""

from quotientopt.nn.attention import QuotientMultiheadAttention
from quotientopt.nn.convert import convert, export, register_conversion
from quotientopt.nn.relational import Dressing, RelationalAttention, SVDDressing, svd_dressing
from quotientopt.nn.symmetry_breaking import SymmetryBreakingBiases

__all__ = [
    "Dressing",
    "QuotientMultiheadAttention",
    "RelationalAttention",
    "SVDDressing",
    "SymmetryBreakingBiases",
    "convert",
    "export",
    "register_conversion",
    "svd_dressing",
]
