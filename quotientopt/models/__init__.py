"""Reference models built on the quotient attention."""

from quotientopt.models.gpt import GPT, CausalSelfAttention, GPTConfig, QuotientCausalSelfAttention

__all__ = ["GPT", "CausalSelfAttention", "GPTConfig", "QuotientCausalSelfAttention"]
