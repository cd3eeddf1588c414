r"""Quotient twins of Hugging Face ``transformers`` attention modules.

Importing this module (with ``transformers>=5`` installed) registers two pairs of module types in
the attention registry (:mod:`quotientopt.nn.adapters`), so that :func:`quotientopt.nn.convert`,
:func:`quotientopt.nn.export`, the audit, :func:`quotientopt.symmetry.find_sectors` and the
monitor know them. :mod:`quotientopt.nn` does this by itself at the first lookup after
``transformers`` has been imported:

* ``GPT2Attention`` (self-attention) <-> :class:`QuotientGPT2Attention`. GPT-2's ``c_attn`` and
  ``c_proj`` are ``Conv1D`` layers whose weights are stored transposed relative to ``nn.Linear``
  (``(in, out)``); the conversion transposes them.
* ``BertAttention`` (self-attention) <-> :class:`QuotientBertAttention`. A BERT head's ``W_O``
  lives in ``BertSelfOutput.dense``, outside ``BertSelfAttention``, so the whole ``BertAttention``
  (self-attention plus output projection, dropout, residual and LayerNorm) is replaced; the output
  bias is ``dense.bias``.

Each twin keeps its heads in a :class:`~quotientopt.nn.QuotientMultiheadAttention` (``.attn``, the
``qk`` and ``vo`` ``ManifoldParameter`` sectors and ``out_bias``) and computes queries, keys and
values from the sectors' factors, in the ``(batch, heads, length, head_dim)`` layout that
``transformers`` uses. The attention itself runs in the kernel that ``config._attn_implementation``
selects (``"eager"``, ``"sdpa"``, ...), with the mask the model built and the layer's own
scaling, so the converted model computes what the original computed, masks and padding included.
Key/value caching works as in the originals (the projected keys and values go into the model's
``Cache``), so ``use_cache=True`` and ``generate`` work. Attention weights are returned, and
recorded for ``output_attentions=True``, where the original would (the eager kernel).

Not supported (``convert`` raises a ``ValueError`` naming the module, the model untouched):
cross-attention layers (GPT-2 with ``add_cross_attention``, BERT cross-attention) and GPT-2's
``reorder_and_upcast_attn``. A ``head_mask`` that is not None raises ``NotImplementedError``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
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

_MIN_VERSION = 5

try:
    import transformers
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.bert.modeling_bert import BertAttention
    from transformers.models.bert.modeling_bert import (
        eager_attention_forward as _bert_eager_attention,
    )
    from transformers.models.gpt2.modeling_gpt2 import GPT2Attention
    from transformers.models.gpt2.modeling_gpt2 import (
        eager_attention_forward as _gpt2_eager_attention,
    )
except ImportError as error:  # pragma: no cover - exercised only without transformers
    _IMPORT_ERROR: str | None = (
        "quotientopt.nn.huggingface needs Hugging Face transformers "
        f"(>={_MIN_VERSION}); install it with `pip install transformers` ({error})"
    )
else:
    _major = int(transformers.__version__.split(".")[0])
    _IMPORT_ERROR = (
        None
        if _major >= _MIN_VERSION
        else (
            f"quotientopt.nn.huggingface follows the attention API of transformers>={_MIN_VERSION}, "
            f"found {transformers.__version__}; upgrade with `pip install -U transformers`"
        )
    )

try:  # transformers records `output_attentions` with forward hooks on its own classes
    from transformers.utils.output_capturing import _active_collector
except ImportError:  # pragma: no cover
    _active_collector = None

GEOMETRY_OPTIONS = ("qk_geometry", "vo_geometry")


def _check_options(options: dict) -> dict:
    unknown = sorted(set(options) - set(GEOMETRY_OPTIONS))
    if unknown:
        raise ValueError(
            f"unsupported conversion options {unknown} for a Hugging Face attention module; only "
            f"{GEOMETRY_OPTIONS} are accepted (others would change the function)"
        )
    return options


def _attention_function(config, eager: Callable) -> Callable:
    """The attention kernel ``config._attn_implementation`` selects, ``eager`` by default."""
    implementation = getattr(config, "_attn_implementation", None) or "eager"
    if implementation == "eager":
        return eager
    get_interface = getattr(ALL_ATTENTION_FUNCTIONS, "get_interface", None)
    if get_interface is not None:
        return get_interface(implementation, eager)
    return ALL_ATTENTION_FUNCTIONS[implementation]


def _record_attentions(module: nn.Module, weights: torch.Tensor | None) -> None:
    """Hand ``weights`` to the collector of ``output_attentions=True``: the model's recording hooks
    target the original classes and so never fire on a twin."""
    if weights is None or _active_collector is None:
        return
    collected = _active_collector.get()
    if collected is not None and "attentions" in collected:
        collected["attentions"].append(weights)


def _self_attention_cache(past_key_values):
    """The self-attention part of a cache (an ``EncoderDecoderCache`` holds two)."""
    return getattr(past_key_values, "self_attention_cache", past_key_values)


class _QuotientHFAttention(nn.Module):
    """Shared machinery: projections from the sectors, cache, kernel dispatch, output."""

    attn: QuotientMultiheadAttention
    config: object
    layer_idx: int | None
    is_causal: bool
    scaling: float
    _eager: Callable

    def _require_transformers(self) -> None:
        if _IMPORT_ERROR is not None:
            raise ImportError(_IMPORT_ERROR)

    def _attend(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        past_key_values,
        dropout: float,
        kwargs: dict,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Multi-head self-attention of ``hidden_states`` (batch, length, E) through the sectors:
        the heads' output projected by ``W_O`` plus the output bias, and the attention weights
        (or None, as the kernel returns them)."""
        if kwargs.get("head_mask") is not None:
            raise NotImplementedError(
                f"{type(self).__name__} does not support head_mask; mask heads by editing the "
                "model or export it back with quotientopt.nn.export"
            )
        kwargs = {key: value for key, value in kwargs.items() if key != "head_mask"}
        attn = self.attn
        (a_q, a_k), (a_v, b_o) = attn.qk_factors(), attn.vo_factors()
        # [x, 1] A per head: (batch, heads, length, head_dim), the layout transformers uses
        query, key, value = (attn._project(hidden_states, a) for a in (a_q, a_k, a_v))
        if past_key_values is not None:
            key, value = _self_attention_cache(past_key_values).update(key, value, self.layer_idx)
        function = _attention_function(self.config, self._eager)
        heads, weights = function(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=self.scaling,
            **kwargs,
        )  # heads: (batch, length, heads, head_dim)
        out = torch.einsum("nlhk,hek->nle", heads, b_o)
        if attn.out_bias is not None:
            out = out + attn.out_bias
        _record_attentions(self, weights)
        return out, weights


# --------------------------------------------------------------------------------------- GPT-2
class QuotientGPT2Attention(_QuotientHFAttention):
    """GPT-2 self-attention (``GPT2Attention``) with its heads on quotient manifolds.

    Same forward signature and return value ``(attn_output, attn_weights)`` as the installed
    ``GPT2Attention``; ``attn_output`` includes ``c_proj`` and the residual dropout (the block adds
    the residual). ``geometry`` (``qk_geometry``, ``vo_geometry``) goes to the sectors.
    """

    def __init__(self, config, layer_idx: int | None = None, **geometry: str) -> None:
        super().__init__()
        self._require_transformers()
        if getattr(config, "reorder_and_upcast_attn", False):
            raise ValueError(
                "GPT-2's reorder_and_upcast_attn is not supported; build the model with "
                "reorder_and_upcast_attn=False"
            )
        self.config, self.layer_idx = config, layer_idx
        self.embed_dim, self.num_heads = config.hidden_size, config.num_attention_heads
        self.head_dim = self.embed_dim // self.num_heads
        self.scale_attn_weights = config.scale_attn_weights
        self.scale_attn_by_inverse_layer_idx = config.scale_attn_by_inverse_layer_idx
        self.scaling = self.head_dim**-0.5 if self.scale_attn_weights else 1.0
        if self.scale_attn_by_inverse_layer_idx:
            self.scaling /= float(layer_idx + 1)
        self.is_causal, self.is_cross_attention = True, False
        self.attn = QuotientMultiheadAttention(
            self.embed_dim,
            self.num_heads,
            dropout=config.attn_pdrop,
            bias=True,
            batch_first=True,
            **_check_options(geometry),
        )
        self.attn_dropout = nn.Dropout(config.attn_pdrop)
        self.resid_dropout = nn.Dropout(config.resid_pdrop)
        self._eager = _gpt2_eager_attention

    def forward(
        self,
        hidden_states: torch.Tensor,
        past_key_values=None,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        output_attentions: bool | None = False,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if encoder_hidden_states is not None:
            raise NotImplementedError(
                "QuotientGPT2Attention is self-attention only; cross-attention "
                "(encoder_hidden_states) is not supported"
            )
        dropout = self.attn_dropout.p if self.training else 0.0
        out, weights = self._attend(hidden_states, attention_mask, past_key_values, dropout, kwargs)
        return self.resid_dropout(out), weights

    @classmethod
    def from_standard(cls, module: GPT2Attention, **geometry: str) -> QuotientGPT2Attention:
        if module.is_cross_attention:
            raise ValueError(
                "GPT-2 cross-attention (add_cross_attention=True) is not supported; convert a "
                "model without cross-attention layers"
            )
        weight = module.c_attn.weight
        new = cls(module.config, module.layer_idx, **geometry).to(weight.device, weight.dtype)
        # Conv1D stores (in, out): transpose to nn.Linear's (out, in)
        w_q, w_k, w_v = weight.t().split(module.embed_dim, dim=0)
        new.attn.load_weights(
            w_q, w_k, w_v, module.c_attn.bias, module.c_proj.weight.t(), module.c_proj.bias
        )
        new.attn_dropout.p, new.resid_dropout.p = module.attn_dropout.p, module.resid_dropout.p
        return new.train(module.training)

    @torch.no_grad()
    def to_standard(self) -> GPT2Attention:
        """The ``GPT2Attention`` computing the same function."""
        old = GPT2Attention(self.config, is_cross_attention=False, layer_idx=self.layer_idx)
        old = old.to(self.attn.qk.device, self.attn.qk.dtype)
        w_q, w_k, w_v, in_bias, w_out, out_bias = self.attn.to_weights()
        old.c_attn.weight.copy_(torch.cat((w_q, w_k, w_v), dim=0).t())
        old.c_attn.bias.copy_(in_bias)
        old.c_proj.weight.copy_(w_out.t())
        old.c_proj.bias.copy_(out_bias)
        old.attn_dropout.p, old.resid_dropout.p = self.attn_dropout.p, self.resid_dropout.p
        return old.train(self.training)


# ---------------------------------------------------------------------------------------- BERT
class QuotientBertAttention(_QuotientHFAttention):
    """BERT's ``BertAttention`` (self-attention plus ``BertSelfOutput``) with its heads on quotient
    manifolds: ``LayerNorm(dropout(attention(x)) + x)``.

    Same forward signature and return value ``(attention_output, attn_weights)`` as the installed
    ``BertAttention``; ``W_O`` and its bias (``output.dense``) are the VO sector's ``B`` factors and
    the sectors' ``out_bias``. Causal self-attention (``is_decoder``) is supported.
    """

    def __init__(
        self, config, is_causal: bool = False, layer_idx: int | None = None, **geometry: str
    ) -> None:
        super().__init__()
        self._require_transformers()
        self.config, self.layer_idx, self.is_causal = config, layer_idx, is_causal
        self.is_cross_attention = False
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // self.num_heads
        self.scaling = self.head_dim**-0.5
        self.attn = QuotientMultiheadAttention(
            config.hidden_size,
            self.num_heads,
            dropout=config.attention_probs_dropout_prob,
            bias=True,
            batch_first=True,
            **_check_options(geometry),
        )
        self.attn_dropout = nn.Dropout(config.attention_probs_dropout_prob)
        self.output_dropout = nn.Dropout(config.hidden_dropout_prob)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self._eager = _bert_eager_attention

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        past_key_values=None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if encoder_hidden_states is not None:
            raise NotImplementedError(
                "QuotientBertAttention is self-attention only; cross-attention "
                "(encoder_hidden_states) is not supported"
            )
        dropout = self.attn_dropout.p if self.training else 0.0
        out, weights = self._attend(hidden_states, attention_mask, past_key_values, dropout, kwargs)
        return self.LayerNorm(self.output_dropout(out) + hidden_states), weights

    @classmethod
    def from_standard(cls, module: BertAttention, **geometry: str) -> QuotientBertAttention:
        attention, output = module.self, module.output
        if module.is_cross_attention:
            raise ValueError(
                "BERT cross-attention (add_cross_attention=True) is not supported; convert a model "
                "without cross-attention layers"
            )
        weight = attention.query.weight
        new = cls(attention.config, attention.is_causal, attention.layer_idx, **geometry)
        new = new.to(weight.device, weight.dtype)
        new.attn.load_weights(
            attention.query.weight,
            attention.key.weight,
            attention.value.weight,
            torch.cat((attention.query.bias, attention.key.bias, attention.value.bias)),
            output.dense.weight,
            output.dense.bias,
        )
        new.LayerNorm = copy.deepcopy(output.LayerNorm)
        new.attn_dropout.p, new.output_dropout.p = attention.dropout.p, output.dropout.p
        return new.train(module.training)

    @torch.no_grad()
    def to_standard(self) -> BertAttention:
        """The ``BertAttention`` computing the same function."""
        old = BertAttention(self.config, is_causal=self.is_causal, layer_idx=self.layer_idx)
        old = old.to(self.attn.qk.device, self.attn.qk.dtype)
        attention, output = old.self, old.output
        w_q, w_k, w_v, in_bias, w_out, out_bias = self.attn.to_weights()
        for linear, w, b in zip(
            (attention.query, attention.key, attention.value),
            (w_q, w_k, w_v),
            in_bias.split(self.config.hidden_size),
            strict=True,
        ):
            linear.weight.copy_(w)
            linear.bias.copy_(b)
        output.dense.weight.copy_(w_out)
        output.dense.bias.copy_(out_bias)
        output.LayerNorm = copy.deepcopy(self.LayerNorm)
        attention.dropout.p, output.dropout.p = self.attn_dropout.p, self.output_dropout.p
        return old.train(self.training)


# -------------------------------------------------------------------------------- registration
def _gpt2_sectors(path: str, module: GPT2Attention) -> list[Sector]:
    e, heads = module.embed_dim, module.num_heads
    has_bias = module.c_attn.bias is not None

    def layout(values: tuple) -> tuple:  # Conv1D stores (in, out): transpose to nn.Linear's
        w_q, w_k, w_v = values[0].T.split(e)
        return w_q, w_k, w_v, values[1] if has_bias else None, values[-1].T

    params = (
        (module.c_attn.weight,)
        + ((module.c_attn.bias,) if has_bias else ())
        + (module.c_proj.weight,)
    )
    return standard_sectors(path, params, layout, heads, heads, e // heads)


def _gpt2_spec(module: GPT2Attention) -> AttentionSpec:
    e, h = module.embed_dim, module.num_heads
    return AttentionSpec(
        module_type=type(module).__name__,
        embed_dim=e,
        kdim=e,
        vdim=e,
        heads=h,
        kv_heads=h,
        head_dim=module.head_dim,
        in_bias=module.c_attn.bias is not None,
        out_bias=module.c_proj.bias is not None,
    )


def _bert_sectors(path: str, module: BertAttention) -> list[Sector]:
    s, o = module.self, module.output
    heads, head_dim = s.num_attention_heads, s.attention_head_size
    has_bias = s.query.bias is not None
    params = (s.query.weight, s.key.weight, s.value.weight)
    params += (s.query.bias, s.key.bias, s.value.bias) if has_bias else ()
    params += (o.dense.weight,)

    def layout(values: tuple) -> tuple:
        in_bias = torch.cat(values[3:6]) if has_bias else None
        return values[0], values[1], values[2], in_bias, values[-1]

    return standard_sectors(path, params, layout, heads, heads, head_dim)


def _bert_spec(module: BertAttention) -> AttentionSpec:
    attention, output = module.self, module.output
    return AttentionSpec(
        module_type=type(module).__name__,
        embed_dim=attention.query.in_features,
        kdim=attention.key.in_features,
        vdim=attention.value.in_features,
        heads=attention.num_attention_heads,
        kv_heads=attention.num_attention_heads,
        head_dim=attention.attention_head_size,
        in_bias=attention.query.bias is not None,
        out_bias=output.dense.bias is not None,
        output_norm=True,
    )


def _standard_patterns(module: nn.Module, causal: bool, scaling: float) -> PatternRecipe | None:
    if getattr(module, "is_cross_attention", False):
        return None
    return PatternRecipe(causal=bool(causal), scaling=float(scaling))


def register() -> None:
    """Register ``GPT2Attention`` and ``BertAttention`` and their twins in the attention registry
    (:mod:`quotientopt.nn.adapters`): sectors, audit specs, attention patterns and conversion both
    ways. Done on import; idempotent."""
    if _IMPORT_ERROR is not None:
        raise ImportError(_IMPORT_ERROR)
    register_attention(
        GPT2Attention,
        sectors=_gpt2_sectors,
        spec=_gpt2_spec,
        patterns=lambda m: _standard_patterns(m, m.is_causal, m.scaling),
        to_quotient=QuotientGPT2Attention.from_standard,
    )
    register_attention(
        QuotientGPT2Attention,
        sectors=lambda path, m: quotient_sectors(path, m.attn),
        spec=lambda m: quotient_spec(m.attn, type(m).__name__),
        patterns=lambda m: quotient_patterns(m.attn, causal=m.is_causal, scaling=m.scaling),
        to_standard=lambda module: module.to_standard(),
    )
    register_attention(
        BertAttention,
        sectors=_bert_sectors,
        spec=_bert_spec,
        patterns=lambda m: _standard_patterns(m, m.self.is_causal, m.self.scaling),
        to_quotient=QuotientBertAttention.from_standard,
    )
    register_attention(
        QuotientBertAttention,
        sectors=lambda path, m: quotient_sectors(path, m.attn),
        spec=lambda m: quotient_spec(m.attn, type(m).__name__, output_norm=True),
        patterns=lambda m: quotient_patterns(m.attn, causal=m.is_causal, scaling=m.scaling),
        to_standard=lambda module: module.to_standard(),
    )


if _IMPORT_ERROR is None:
    register()

__all__ = ["QuotientBertAttention", "QuotientGPT2Attention", "register"]
