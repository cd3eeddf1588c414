"""A reference GPT (nanoGPT-sized, causal, weight-tied) whose attention heads live on quotients.

``GPT(GPTConfig(quotient=True))`` builds every layer's attention as a
:class:`QuotientCausalSelfAttention` (two ``ManifoldParameter`` sectors per layer, all heads in
each); ``quotient=False`` builds the standard layout (``c_attn``, ``c_proj``, as in nanoGPT).
Both start from the same initialization, and :func:`quotientopt.nn.convert` /
:func:`quotientopt.nn.export` move a model between them, computing the same function.

Importing this module registers both attention types in the attention registry
(:mod:`quotientopt.nn.adapters`): conversion, sectors (named by the attention module's path,
``"h.0.attn.QK"``, in both layouts), audit specs and attention patterns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from quotientopt.nn.adapters import (
    AttentionSpec,
    PatternRecipe,
    Sector,
    quotient_patterns,
    quotient_sectors,
    quotient_spec,
    register_attention,
    standard_sectors,
)
from quotientopt.nn.attention import QuotientMultiheadAttention
from quotientopt.nn.rope import apply_rope, rms_normalize
from quotientopt.nn.symmetry_breaking import SymmetryBreakingBiases


@dataclass
class GPTConfig:
    block_size: int = 128  # longest context
    vocab_size: int = 256  # bytes by default
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int | None = None  # grouped-query attention: key/value heads (None: n_head)
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True  # biases in the linear layers and LayerNorms
    rope: bool = False  # rotary positions on q and k instead of learned position embeddings
    qk_norm: bool = False  # RMS-normalize q and k per head (no gain)
    symmetry_breaking: bool = False  # paper 003's unlearned query/value biases
    quotient: bool = True  # heads as quotient ManifoldParameters

    def __post_init__(self) -> None:
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(
                f"GPTConfig: n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
            )
        if self.n_kv_head is not None and (
            not isinstance(self.n_kv_head, int)
            or self.n_kv_head < 1
            or self.n_head % self.n_kv_head
        ):
            raise ValueError(
                f"GPTConfig: n_kv_head ({self.n_kv_head!r}) must be a positive int dividing n_head ({self.n_head})"
            )
        if self.rope and (self.n_embd // self.n_head) % 2:
            raise ValueError("GPTConfig: rope needs an even head dimension n_embd // n_head")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}")


class CausalSelfAttention(nn.Module):
    """Standard layout: ``c_attn`` projects to q, k, v at once, ``c_proj`` merges the heads."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.n_head, self.n_embd = config.n_head, config.n_embd
        self.n_kv_head = config.n_kv_head or config.n_head
        self.kv_width = self.n_kv_head * (config.n_embd // config.n_head)
        self.c_attn = nn.Linear(config.n_embd, config.n_embd + 2 * self.kv_width, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.breaking = (
            SymmetryBreakingBiases(config.n_embd // config.n_head)
            if config.symmetry_breaking
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.c_attn(x).split((width, self.kv_width, self.kv_width), dim=2)
        q = q.view(batch, length, self.n_head, -1).transpose(1, 2)
        k, v = (t.view(batch, length, self.n_kv_head, -1).transpose(1, 2) for t in (k, v))
        if self.config.qk_norm:
            q, k = rms_normalize(q), rms_normalize(k)
        if self.config.rope:
            q, k = apply_rope(q), apply_rope(k)
        if self.breaking is not None:
            bias_q, bias_v = self.breaking(q)
            q, v = q + bias_q, v + bias_v
        dropout = self.config.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout, is_causal=True, enable_gqa=self.n_kv_head != self.n_head
        )
        y = y.transpose(1, 2).contiguous().view(batch, length, width)
        return self.resid_dropout(self.c_proj(y))


class QuotientCausalSelfAttention(nn.Module):
    """The same attention with its QK and VO sectors on quotient manifolds (for the group that
    acts: GL(k), RoPE's scaled rotations, or O(k) with QK-norm)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.attn = QuotientMultiheadAttention(
            config.n_embd,
            config.n_head,
            dropout=config.dropout,
            bias=config.bias,
            batch_first=True,
            rope=config.rope,
            qk_norm=config.qk_norm,
            symmetry_breaking=config.symmetry_breaking,
            num_kv_heads=config.n_kv_head,
        )
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.attn(x, x, x, need_weights=False, is_causal=True)
        return self.resid_dropout(y)

    @classmethod
    def from_standard(cls, module: CausalSelfAttention) -> QuotientCausalSelfAttention:
        new = cls(module.config).to(module.c_attn.weight.device, module.c_attn.weight.dtype)
        w_q, w_k, w_v = module.c_attn.weight.split(
            (module.n_embd, module.kv_width, module.kv_width), dim=0
        )
        new.attn.load_weights(
            w_q, w_k, w_v, module.c_attn.bias, module.c_proj.weight, module.c_proj.bias
        )
        return new.train(module.training)

    @torch.no_grad()
    def to_standard(self) -> CausalSelfAttention:
        old = CausalSelfAttention(self.config).to(self.attn.qk.device, self.attn.qk.dtype)
        w_q, w_k, w_v, in_bias, w_out, out_bias = self.attn.to_weights()
        old.c_attn.weight.copy_(torch.cat((w_q, w_k, w_v), dim=0))
        old.c_proj.weight.copy_(w_out)
        if self.config.bias:
            old.c_attn.bias.copy_(in_bias)
            old.c_proj.bias.copy_(out_bias)
        return old.train(self.training)


def _standard_sectors(path: str, module: CausalSelfAttention) -> list[Sector]:
    e, heads, kv = module.n_embd, module.n_head, module.n_kv_head
    has_bias = module.c_attn.bias is not None

    def layout(values: tuple) -> tuple:
        w_q, w_k, w_v = values[0].split((e, module.kv_width, module.kv_width))
        return w_q, w_k, w_v, values[1] if has_bias else None, values[-1]

    params = (
        (module.c_attn.weight,)
        + ((module.c_attn.bias,) if has_bias else ())
        + (module.c_proj.weight,)
    )
    return standard_sectors(path, params, layout, heads, kv, e // heads)


def _standard_spec(module: CausalSelfAttention) -> AttentionSpec:
    config = module.config
    e, h = module.n_embd, module.n_head
    return AttentionSpec(
        module_type=type(module).__name__,
        embed_dim=e,
        kdim=e,
        vdim=e,
        heads=h,
        kv_heads=module.n_kv_head,
        head_dim=e // h,
        in_bias=module.c_attn.bias is not None,
        out_bias=module.c_proj.bias is not None,
        rope=bool(config.rope),
        qk_norm=bool(config.qk_norm),
        breaking=module.breaking is not None,
    )


def _standard_patterns(module: CausalSelfAttention) -> PatternRecipe:
    config = module.config
    return PatternRecipe(
        causal=True, rope=config.rope, qk_norm=config.qk_norm, breaking=module.breaking
    )


# The reference GPT registers its two attention types when this module is imported (quotientopt.nn
# never imports quotientopt.models): sectors at the attention module's own path ("h.0.attn.QK"
# for both layouts), audit specs, causal attention patterns, and conversion both ways.
register_attention(
    CausalSelfAttention,
    sectors=_standard_sectors,
    spec=_standard_spec,
    patterns=_standard_patterns,
    to_quotient=lambda module, **_: QuotientCausalSelfAttention.from_standard(module),
)
register_attention(
    QuotientCausalSelfAttention,
    sectors=lambda path, module: quotient_sectors(path, module.attn),
    spec=lambda module: quotient_spec(module.attn, type(module).__name__),
    patterns=lambda module: quotient_patterns(module.attn, causal=True),
    to_standard=lambda module: module.to_standard(),
)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Token and (unless RoPE) position embeddings, ``n_layer`` pre-LayerNorm blocks, a final
    LayerNorm and a language-model head tied to the token embedding."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = None if config.rope else nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # scaled residual projections, as GPT-2
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        if config.quotient:  # same initialization, heads moved onto the quotient
            for block in self.h:
                block.attn = QuotientCausalSelfAttention.from_standard(block.attn)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``idx`` (batch, length) token ids -> logits (batch, length, vocab) and, with
        ``targets``, the mean cross-entropy."""
        length = idx.shape[1]
        if length > self.config.block_size:
            raise ValueError(
                f"sequence of length {length} is longer than block_size {self.config.block_size}"
            )
        x = self.wte(idx)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(length, device=idx.device))
        x = self.drop(x)
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss
