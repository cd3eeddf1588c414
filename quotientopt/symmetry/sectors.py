r"""Find the attention sectors of a model, in any supported layout, as factor pairs.

A :class:`Sector` knows which parameters hold one sector (QK or VO) of one attention module and
the linear map from them to the per-head factor pair ``(A, B)``, ``A B^T`` the sector's product,
bias rows included (so that ``(A G, B G^{-T})`` is exactly the symmetry). Because the map is
linear it reads values, gradients, updates and optimizer momenta alike:
``sector.pair(lambda p: p)``, ``sector.pair(lambda p: p.grad)``,
``sector.pair(lambda p: optimizer.state[p]["momentum_buffer"])``.

Layouts: :class:`~quotientopt.nn.QuotientMultiheadAttention` (and every module wrapping one: the
reference GPT's and the Hugging Face twins), ``torch.nn.MultiheadAttention``, the reference GPT's
standard ``CausalSelfAttention``, and Hugging Face's ``GPT2Attention`` and ``BertAttention``. Shapes:
``(groups, rows, k)`` with one group per key/value head (per head without grouped-query attention).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from quotientopt.manifolds import FactorQuotient
from quotientopt.nn.attention import QuotientMultiheadAttention, factors_from_weights

ValueOf = Callable[[torch.Tensor], "torch.Tensor | None"]


@dataclass
class Sector:
    """One sector of one attention module (see the module docstring)."""

    path: str  # module path in the model
    kind: str  # "QK" or "VO"
    heads: int  # groups (key/value heads) in the leading dimension
    head_dim: int
    parameters: tuple[torch.Tensor, ...]  # the parameters the pair is read from
    read: Callable[[tuple[torch.Tensor, ...]], tuple[torch.Tensor, torch.Tensor]]
    manifold: FactorQuotient | None = None  # the sector's quotient manifold, if it has one

    @property
    def name(self) -> str:
        return f"{self.path}.{self.kind}" if self.path else self.kind

    def pair(self, value_of: ValueOf = lambda p: p) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(A, B)`` of the tensors ``value_of(p)`` for this sector's parameters (None if any is),
        as copies: later in-place updates of the parameters do not change them."""
        values = tuple(value_of(p) for p in self.parameters)
        if any(v is None for v in values):
            return None
        with torch.no_grad():
            a, b = self.read(tuple(v.detach() for v in values))
            return a.clone(), b.clone()


def _standard(
    path: str, params: tuple, layout: Callable, heads: int, kv_heads: int, head_dim: int
) -> list[Sector]:
    """The two sectors of standard-layout weights ``params``, where
    ``layout(values) -> (w_q, w_k, w_v, in_bias, w_out)`` in the ``nn.Linear`` layout."""

    def read(kind):
        def pair(values):
            a_q, a_k, a_v, b_o = factors_from_weights(*layout(values), heads, kv_heads, head_dim)
            return (a_q, a_k) if kind == "QK" else (a_v, b_o)

        return pair

    return [Sector(path, kind, kv_heads, head_dim, params, read(kind)) for kind in ("QK", "VO")]


def _quotient_sectors(path: str, module: QuotientMultiheadAttention) -> list[Sector]:
    out = []
    for kind, param, manifold in (
        ("QK", module.qk, module.qk_manifold),
        ("VO", module.vo, module.vo_manifold),
    ):
        if isinstance(manifold, FactorQuotient):
            out.append(
                Sector(
                    path,
                    kind,
                    param.shape[0],
                    module.head_dim,
                    (param,),
                    lambda v, m=manifold: m.factors(v[0]),
                    manifold,
                )
            )
    return out


def _torch_mha(path: str, module: nn.MultiheadAttention) -> list[Sector]:
    e, heads = module.embed_dim, module.num_heads
    if module._qkv_same_embed_dim:
        params = (module.in_proj_weight,)

        def weights(values):
            w_q, w_k, w_v = values[0].split(e)
            return w_q, w_k, w_v
    else:
        params = (module.q_proj_weight, module.k_proj_weight, module.v_proj_weight)

        def weights(values):
            return values[:3]

    has_bias = module.in_proj_bias is not None
    params = params + ((module.in_proj_bias,) if has_bias else ()) + (module.out_proj.weight,)

    def layout(values):
        w_q, w_k, w_v = weights(values)
        return w_q, w_k, w_v, values[-2] if has_bias else None, values[-1]

    return _standard(path, params, layout, heads, heads, e // heads)


def _gpt_standard(path: str, module) -> list[Sector]:
    e, heads, kv = module.n_embd, module.n_head, module.n_kv_head
    has_bias = module.c_attn.bias is not None

    def layout(values):
        w_q, w_k, w_v = values[0].split((e, module.kv_width, module.kv_width))
        return w_q, w_k, w_v, values[1] if has_bias else None, values[-1]

    params = (
        (module.c_attn.weight,)
        + ((module.c_attn.bias,) if has_bias else ())
        + (module.c_proj.weight,)
    )
    return _standard(path, params, layout, heads, kv, e // heads)


def _hf_gpt2(path: str, module) -> list[Sector]:
    e, heads = module.embed_dim, module.num_heads
    has_bias = module.c_attn.bias is not None

    def layout(values):  # Conv1D stores (in, out): transpose to the nn.Linear layout
        w_q, w_k, w_v = values[0].T.split(e)
        return w_q, w_k, w_v, values[1] if has_bias else None, values[-1].T

    params = (
        (module.c_attn.weight,)
        + ((module.c_attn.bias,) if has_bias else ())
        + (module.c_proj.weight,)
    )
    return _standard(path, params, layout, heads, heads, e // heads)


def _hf_bert(path: str, module) -> list[Sector]:
    s, o = module.self, module.output
    heads, head_dim = s.num_attention_heads, s.attention_head_size
    has_bias = s.query.bias is not None
    params = (s.query.weight, s.key.weight, s.value.weight)
    params += (s.query.bias, s.key.bias, s.value.bias) if has_bias else ()
    params += (o.dense.weight,)

    def layout(values):
        in_bias = torch.cat(values[3:6]) if has_bias else None
        return values[0], values[1], values[2], in_bias, values[-1]

    return _standard(path, params, layout, heads, heads, head_dim)


def _readers() -> dict[type, Callable[[str, nn.Module], list[Sector]]]:
    from quotientopt.models.gpt import CausalSelfAttention

    readers: dict[type, Callable] = {
        QuotientMultiheadAttention: _quotient_sectors,
        nn.MultiheadAttention: _torch_mha,
        CausalSelfAttention: _gpt_standard,
    }
    try:
        from transformers.models.bert.modeling_bert import BertAttention
        from transformers.models.gpt2.modeling_gpt2 import GPT2Attention
    except ImportError:
        return readers
    readers[GPT2Attention] = _hf_gpt2
    readers[BertAttention] = _hf_bert
    return readers


def find_sectors(model: nn.Module) -> list[Sector]:
    """Every QK and VO sector of ``model``'s attention modules, in module order."""
    readers = _readers()
    sectors: list[Sector] = []
    for path, module in model.named_modules():
        reader = readers.get(type(module))
        if reader is not None:
            sectors += reader(path, module)
    return sectors
