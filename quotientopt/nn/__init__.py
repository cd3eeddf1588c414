"""Attention modules whose heads live on quotient manifolds, and model conversion."""

from quotientopt.nn.attention import QuotientMultiheadAttention
from quotientopt.nn.convert import convert, export, register_conversion

__all__ = ["QuotientMultiheadAttention", "convert", "export", "register_conversion"]
