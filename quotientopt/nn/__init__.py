"""Attention modules whose heads live on quotient manifolds, model conversion, the registry of
attention adapters, and paper 002's relational attention."""

import sys

from quotientopt.nn.adapters import (
    AttentionAdapter,
    AttentionSpec,
    PatternRecipe,
    Sector,
    adapter_of,
    add_deferred_registration,
    attention_modules,
    register_attention,
    registered_types,
)
from quotientopt.nn.attention import QuotientMultiheadAttention
from quotientopt.nn.convert import convert, export, register_conversion
from quotientopt.nn.relational import Dressing, RelationalAttention, SVDDressing, svd_dressing
from quotientopt.nn.symmetry_breaking import SymmetryBreakingBiases


def _register_huggingface() -> bool:
    """Register the Hugging Face adapters once ``transformers`` has been imported (a model with
    its modules cannot exist before); True when done (registered, or not possible)."""
    if "transformers" not in sys.modules:
        return False
    import quotientopt.nn.huggingface  # noqa: F401  (registers on import with transformers>=5)

    return True


add_deferred_registration(_register_huggingface)

__all__ = [
    "AttentionAdapter",
    "AttentionSpec",
    "Dressing",
    "PatternRecipe",
    "QuotientMultiheadAttention",
    "RelationalAttention",
    "SVDDressing",
    "Sector",
    "SymmetryBreakingBiases",
    "adapter_of",
    "attention_modules",
    "convert",
    "export",
    "register_attention",
    "register_conversion",
    "registered_types",
    "svd_dressing",
]
