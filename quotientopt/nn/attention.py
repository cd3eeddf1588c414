r"""Multi-head attention whose two sectors are quotient-manifold parameters.

Per head :math:`h` the module computes with two factor pairs, stored for all heads in one
``geoopt.ManifoldParameter`` per sector:

* QK: :math:`A = [W_Q^h; b_Q^h]` (``(E + 1) x k``), :math:`B = [W_K^h; b_K^h]` (``(kdim + 1) x k``),
  scores :math:`[x, 1] A B^\top [y, 1]^\top / \sqrt{k}`;
* VO: :math:`A = [W_V^h; b_V^h]` (``(vdim + 1) x k``), :math:`B = (W_O^h)^\top` (``E x k``), the
  head's contribution to the output :math:`P^h [y, 1] A B^\top`; plus one output bias.

The bias rows ride along with their factor, so a re-factorization :math:`(A G, B G^{-\top})` moves
:math:`b_Q \to b_Q G`, :math:`b_K \to b_K G^{-\top}`, :math:`b_V \to b_V G` and changes nothing:
the group acting is GL(k) per head and sector (without biases the extra rows are absent). The
geometry of each sector is a constructor choice: ``"gl"`` (:class:`FactorQuotient`, the default),
``"orthogonal"`` (:class:`SubgroupFactorQuotient` with :func:`orthogonal_generators`: only the
rotations :math:`(A O, B O)`, :math:`O \in O(k)`, are divided out) or
``"fixed-rank"`` (:class:`FixedRank`, the three-factor ``U S V^T`` form, no biases).

Shapes follow ``torch.nn.MultiheadAttention``: ``(L, N, E)`` or with ``batch_first`` ``(N, L, E)``,
or unbatched ``(L, E)``. The attention itself runs in
``torch.nn.functional.scaled_dot_product_attention`` unless ``need_weights`` asks for the weights.
"""

from __future__ import annotations

import math

import geoopt
import torch
import torch.nn.functional as F
from torch import nn

from quotientopt.manifolds import FactorQuotient, FixedRank
from quotientopt.manifolds.projected_rank import ProjectedRank
from quotientopt.manifolds.subgroup_quotient import SubgroupFactorQuotient, orthogonal_generators
from quotientopt.nn.groups import qk_group_generators
from quotientopt.nn.rope import apply_rope, rms_normalize
from quotientopt.nn.sector_geometry import DeclaresSectors
from quotientopt.nn.symmetry_breaking import SymmetryBreakingBiases

GEOMETRIES = ("gl", "orthogonal", "fixed-rank", "composite")


def _sector_manifold(geometry: str, n: int, m: int, k: int) -> geoopt.manifolds.Manifold:
    if geometry == "gl":
        return FactorQuotient(n, m)
    if geometry == "orthogonal":  # O(k) acting as (A O, B O) = (A G, B G^{-T}) with G = O
        return SubgroupFactorQuotient(n, m, orthogonal_generators(k), name="orthogonal")
    if geometry == "composite":  # paper 002's invariant reparameterization
        return ProjectedRank(k)
    return FixedRank(n, m)


def qk_sector_manifold(n: int, m: int, k: int, geometry: str, rope: bool, qk_norm: bool):
    """The QK sector's manifold for the group that really acts (see :mod:`quotientopt.nn.groups`)."""
    if rope or qk_norm:
        return SubgroupFactorQuotient(n, m, qk_group_generators(k, rope=rope, qk_norm=qk_norm))
    return _sector_manifold(geometry, n, m, k)


def _stack_pair(manifold, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A point of ``manifold`` for the factor pair ``(a, b)`` (heads, rows, k)."""
    if isinstance(manifold, ProjectedRank):  # the composite itself
        return a @ b.mT
    if isinstance(manifold, FixedRank):  # W = A B^T = U S V^T with S SPD (polar form)
        qa, ra = torch.linalg.qr(a.double())
        qb, rb = torch.linalg.qr(b.double())
        u, s, vh = torch.linalg.svd(ra @ rb.mT)
        point = manifold.from_factors(qa @ u, torch.diag_embed(s), qb @ vh.mT)
        return point.to(a.dtype)
    return torch.cat((a, b), dim=-2)


def _pair_of(manifold, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The factor pair ``(A, B)`` with ``A B^T`` the sector's product, for any sector geometry."""
    if isinstance(manifold, ProjectedRank):  # balanced factors of the composite
        u, s, vh = torch.linalg.svd(z.double(), full_matrices=False)
        root = s[..., : manifold.rank].sqrt()[..., None, :]
        a, b = u[..., : manifold.rank] * root, vh[..., : manifold.rank, :].mT * root
        return a.to(z.dtype), b.to(z.dtype)
    if isinstance(manifold, FixedRank):
        u, s, v = manifold.factors(z)
        return u @ s, v
    return manifold.factors(z)


def factors_from_weights(
    w_q: torch.Tensor,
    w_k: torch.Tensor,
    w_v: torch.Tensor,
    in_bias: torch.Tensor | None,
    w_out: torch.Tensor,
    heads: int,
    kv_heads: int,
    head_dim: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per key/value head factor pairs of standard attention weights (``nn.Linear`` layout:
    ``w_q`` (E, E), ``w_k`` (kv, kdim), ``w_v`` (kv, vdim), ``kv = kv_heads * head_dim``,
    ``in_bias`` (E + 2 kv) or None, ``w_out`` (E, E)).

    Returns ``(a_q, a_k, a_v, b_o)``: the QK pair ``a_q`` (kv_heads, r (E + b), k) (the query
    factors of a group stacked as rows, bias rows last in each) and ``a_k`` (kv_heads, kdim + b, k),
    the VO pair ``a_v`` (kv_heads, vdim + b, k) and ``b_o`` (kv_heads, r E, k). Linear in the
    weights, so it maps gradients, updates and momenta the same way.
    """
    e, k = w_q.shape[0], head_dim

    def split(weight: torch.Tensor, count: int) -> torch.Tensor:
        return weight.reshape(count, k, -1).transpose(-1, -2)

    a_q, a_k, a_v = split(w_q, heads), split(w_k, kv_heads), split(w_v, kv_heads)
    b_o = w_out.reshape(e, heads, k).permute(1, 0, 2)  # (heads, E, k)
    if in_bias is not None:
        biases = (b.reshape(-1, 1, k) for b in in_bias.split((e, kv_heads * k, kv_heads * k)))
        a_q, a_k, a_v = (
            torch.cat((a, b), dim=-2) for a, b in zip((a_q, a_k, a_v), biases, strict=True)
        )
    return a_q.reshape(kv_heads, -1, k), a_k, a_v, b_o.reshape(kv_heads, -1, k)


class QuotientMultiheadAttention(DeclaresSectors):
    r"""Drop-in for ``torch.nn.MultiheadAttention`` with its heads on quotient manifolds.

    ``embed_dim``, ``num_heads``, ``dropout``, ``bias``, ``kdim``, ``vdim``, ``batch_first``,
    ``device``, ``dtype``: as for ``torch.nn.MultiheadAttention`` (``add_bias_kv`` and
    ``add_zero_attn`` are not supported).

    Args:
        qk_geometry: ``"gl"`` (default), ``"orthogonal"``, ``"fixed-rank"`` or ``"composite"``.
        vo_geometry: ``"gl"`` (default), ``"orthogonal"``, ``"fixed-rank"`` or ``"composite"``.

    Parameters: ``qk`` (heads, (E + b) + (kdim + b), k), ``vo`` (heads, (vdim + b) + E, k) with
    ``b = 1`` when ``bias`` (the bias rows, see the module docstring), ``out_bias`` (E) or None.
    """

    # torch's Transformer layers read these to choose a fused fast path that needs packed
    # projection weights; None sends them through this module's forward instead.
    in_proj_weight = None
    in_proj_bias = None

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        device=None,
        dtype=None,
        *,
        qk_geometry: str = "gl",
        vo_geometry: str = "gl",
        rope: bool = False,
        rope_base: float = 10000.0,
        qk_norm: bool = False,
        symmetry_breaking: bool = False,
        num_kv_heads: int | None = None,
    ) -> None:
        super().__init__()
        if not (
            isinstance(embed_dim, int)
            and isinstance(num_heads, int)
            and embed_dim > 0
            and num_heads > 0
        ):
            raise ValueError(
                f"embed_dim and num_heads must be positive ints, got {embed_dim!r} and {num_heads!r}"
            )
        if embed_dim % num_heads:
            raise ValueError(
                f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads}); the head "
                "dimension is embed_dim // num_heads"
            )
        if add_bias_kv or add_zero_attn:
            raise ValueError(
                "QuotientMultiheadAttention does not support add_bias_kv or add_zero_attn (they add "
                "key/value rows outside the head factorization); build the module without them"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        for name, geometry in (("qk_geometry", qk_geometry), ("vo_geometry", vo_geometry)):
            if geometry not in GEOMETRIES:
                raise ValueError(f"unknown {name} {geometry!r}; expected one of {GEOMETRIES}")
            if geometry == "fixed-rank" and bias:
                raise ValueError(
                    f"{name}='fixed-rank' keeps U and V orthonormal, which leaves no room for bias "
                    "rows; use bias=False or the 'gl' geometry"
                )
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        self.num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if (
            not isinstance(self.num_kv_heads, int)
            or self.num_kv_heads < 1
            or num_heads % self.num_kv_heads
        ):
            raise ValueError(
                f"num_kv_heads ({num_kv_heads!r}) must be a positive int dividing num_heads ({num_heads})"
            )
        self.group_size = num_heads // self.num_kv_heads  # query heads per key/value head
        self.kdim, self.vdim = kdim or embed_dim, vdim or embed_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.dropout, self.batch_first, self.bias = dropout, batch_first, bias
        extra = 1 if bias else 0
        self.rope, self.rope_base, self.qk_norm = rope, rope_base, qk_norm
        if (rope or qk_norm) and qk_geometry != "gl":
            raise ValueError(
                "with rope or qk_norm the architecture fixes the QK group (scaled rotations that "
                "commute with RoPE, or O(k)); leave qk_geometry='gl'"
            )
        if rope and self.head_dim % 2:
            raise ValueError(f"rope needs an even head dimension, got {self.head_dim}")
        # grouped-query attention: a key/value head's GL(k) acts on all the query heads (QK) and
        # output blocks (VO) of its group at once, so their factors are stacked as rows of one A (B)
        r = self.group_size
        self.qk_manifold = qk_sector_manifold(
            r * (embed_dim + extra), self.kdim + extra, self.head_dim, qk_geometry, rope, qk_norm
        )
        self.breaking = SymmetryBreakingBiases(self.head_dim) if symmetry_breaking else None
        self.vo_manifold = _sector_manifold(
            vo_geometry, self.vdim + extra, r * embed_dim, self.head_dim
        )
        if "composite" in (qk_geometry, vo_geometry) and (r > 1 or rope or qk_norm):
            raise ValueError(
                "the 'composite' geometry trains W_QK / W_VO directly; it does not combine with "
                "grouped-query attention, rope or qk_norm"
            )
        self.qk_geometry, self.vo_geometry = qk_geometry, vo_geometry
        for sector, rows in (
            ("QK", (embed_dim + extra, self.kdim + extra)),
            ("VO", (self.vdim + extra, embed_dim)),
        ):
            if min(rows) < self.head_dim:
                raise ValueError(
                    f"the {sector} factors of each head have {min(rows)} rows, fewer than the head "
                    f"dimension {self.head_dim}: the head cannot have full rank and GL(k) does not act "
                    "freely on it; use kdim, vdim >= embed_dim // num_heads"
                )
        qk, vo, out_bias = self._points_from_weights(*self._initial_weights(device, dtype))
        self.qk = geoopt.ManifoldParameter(qk, manifold=self.qk_manifold)
        self.vo = geoopt.ManifoldParameter(vo, manifold=self.vo_manifold)
        self.out_bias = nn.Parameter(out_bias) if bias else None

    # ------------------------------------------------------------------ parameters, layouts
    def _fresh_torch_module(self, device=None, dtype=None) -> nn.MultiheadAttention:
        return nn.MultiheadAttention(
            self.embed_dim,
            self.num_heads,
            bias=self.bias,
            kdim=self.kdim,
            vdim=self.vdim,
            device=device,
            dtype=dtype,
        )

    def _initial_weights(self, device=None, dtype=None) -> tuple:
        """Standard-layout weights initialized as ``torch.nn.MultiheadAttention`` does
        (Xavier-uniform projections, zero biases); with grouped-query attention the key and value
        projections have ``num_kv_heads * head_dim`` rows."""
        if self.num_kv_heads == self.num_heads:
            mha = self._fresh_torch_module(device, dtype)
            if mha._qkv_same_embed_dim:
                w_q, w_k, w_v = mha.in_proj_weight.split(self.embed_dim, dim=0)
            else:
                w_q, w_k, w_v = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
            return w_q, w_k, w_v, mha.in_proj_bias, mha.out_proj.weight, mha.out_proj.bias
        kv = self.num_kv_heads * self.head_dim
        factory = {"device": device, "dtype": dtype}
        w_q, w_k, w_v, w_out = (
            nn.init.xavier_uniform_(torch.empty(rows, cols, **factory))
            for rows, cols in (
                (self.embed_dim, self.embed_dim),
                (kv, self.kdim),
                (kv, self.vdim),
                (self.embed_dim, self.embed_dim),
            )
        )
        in_bias = torch.zeros(self.embed_dim + 2 * kv, **factory) if self.bias else None
        out_bias = torch.zeros(self.embed_dim, **factory) if self.bias else None
        return w_q, w_k, w_v, in_bias, w_out, out_bias

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialize as ``torch.nn.MultiheadAttention`` does (Xavier-uniform projections, zero
        biases), then store the factors."""
        self.load_weights(*self._initial_weights(self.qk.device, self.qk.dtype))

    @torch.no_grad()
    def _points_from_weights(self, w_q, w_k, w_v, in_bias, w_out, out_bias):
        """The two sector points from standard projection weights (``nn.Linear`` layout):
        ``w_q`` (E, E), ``w_k`` (kv, kdim), ``w_v`` (kv, vdim) with ``kv = num_kv_heads * k``,
        ``in_bias`` (E + 2 kv) or None, ``w_out`` (E, E), ``out_bias`` (E) or None."""
        a_q, a_k, a_v, b_o = factors_from_weights(
            w_q, w_k, w_v, in_bias, w_out, self.num_heads, self.num_kv_heads, self.head_dim
        )
        if self.bias:
            out_bias = out_bias.detach().clone()
        qk = _stack_pair(self.qk_manifold, a_q, a_k).detach().contiguous()
        vo = _stack_pair(self.vo_manifold, a_v, b_o).detach().contiguous()
        return qk, vo, out_bias if self.bias else None

    def _points_from_torch(self, mha: nn.MultiheadAttention):
        """The two sector points and the output bias of a ``torch.nn.MultiheadAttention``."""
        if mha._qkv_same_embed_dim:
            w_q, w_k, w_v = mha.in_proj_weight.split(self.embed_dim, dim=0)
        else:
            w_q, w_k, w_v = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
        return self._points_from_weights(
            w_q, w_k, w_v, mha.in_proj_bias, mha.out_proj.weight, mha.out_proj.bias
        )

    @torch.no_grad()
    def load_weights(self, w_q, w_k, w_v, in_bias, w_out, out_bias) -> None:
        """Copy standard projection weights (see :meth:`_points_from_weights`) into the sectors."""
        qk, vo, bias = self._points_from_weights(w_q, w_k, w_v, in_bias, w_out, out_bias)
        self.qk.copy_(qk)
        self.vo.copy_(vo)
        if self.bias:
            self.out_bias.copy_(bias)

    @torch.no_grad()
    def to_weights(self) -> tuple[torch.Tensor, ...]:
        """``(w_q, w_k, w_v, in_bias, w_out, out_bias)`` in the standard layout."""
        a_q, a_k, a_v, b_o = self._head_factors()
        in_bias = None
        if self.bias:
            in_bias = torch.cat([a[:, -1, :].reshape(-1) for a in (a_q, a_k, a_v)])
            a_q, a_k, a_v = a_q[:, :-1], a_k[:, :-1], a_v[:, :-1]
        w_q, w_k, w_v = (a.transpose(-1, -2).reshape(-1, a.shape[-2]) for a in (a_q, a_k, a_v))
        w_out = b_o.permute(1, 0, 2).reshape(self.embed_dim, self.embed_dim)
        return (
            w_q,
            w_k,
            w_v,
            in_bias,
            w_out,
            None if self.out_bias is None else self.out_bias.detach().clone(),
        )

    @torch.no_grad()
    def load_from_torch(self, mha: nn.MultiheadAttention) -> None:
        """Copy the weights of a ``torch.nn.MultiheadAttention`` with the same configuration into
        this module's parameters (the Parameter objects are kept)."""
        qk, vo, out_bias = self._points_from_torch(mha)
        self.qk.copy_(qk)
        self.vo.copy_(vo)
        if self.bias:
            self.out_bias.copy_(out_bias)

    @classmethod
    def from_torch(cls, mha: nn.MultiheadAttention, **geometry: str) -> QuotientMultiheadAttention:
        """The quotient module computing the same function as ``mha``."""
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError(
                "cannot convert a MultiheadAttention with add_bias_kv or add_zero_attn"
            )
        module = cls(
            mha.embed_dim,
            mha.num_heads,
            dropout=mha.dropout,
            bias=mha.in_proj_bias is not None,
            kdim=mha.kdim,
            vdim=mha.vdim,
            batch_first=mha.batch_first,
            device=mha.out_proj.weight.device,
            dtype=mha.out_proj.weight.dtype,
            **geometry,
        )
        module.load_from_torch(mha)
        module.train(mha.training)
        return module

    @torch.no_grad()
    def to_torch(self) -> nn.MultiheadAttention:
        """The standard ``torch.nn.MultiheadAttention`` computing the same function."""
        if self.rope or self.qk_norm or self.breaking is not None or self.group_size > 1:
            raise ValueError(
                "torch.nn.MultiheadAttention has no RoPE, QK-norm, grouped-query attention or "
                "symmetry-breaking biases; this module cannot be exported to it"
            )
        mha = nn.MultiheadAttention(
            self.embed_dim,
            self.num_heads,
            dropout=self.dropout,
            bias=self.bias,
            kdim=self.kdim,
            vdim=self.vdim,
            batch_first=self.batch_first,
            device=self.qk.device,
            dtype=self.qk.dtype,
        )
        w_q, w_k, w_v, in_bias, w_out, out_bias = self.to_weights()
        if self.bias:
            mha.in_proj_bias.copy_(in_bias)
            mha.out_proj.bias.copy_(out_bias)
        if mha._qkv_same_embed_dim:
            mha.in_proj_weight.copy_(torch.cat((w_q, w_k, w_v), dim=0))
        else:
            mha.q_proj_weight.copy_(w_q)
            mha.k_proj_weight.copy_(w_k)
            mha.v_proj_weight.copy_(w_v)
        mha.out_proj.weight.copy_(w_out)
        mha.train(self.training)
        return mha

    def qk_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` of the QK sector, (heads, rows, k) each, bias rows last when ``bias``."""
        return _pair_of(self.qk_manifold, self.qk)

    def _head_factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-head factors: queries ``(heads, E+b, k)``, keys and values ``(kv_heads, .., k)``,
        output blocks ``(heads, E, k)``."""
        (a_q, a_k), (a_v, b_o) = self.qk_factors(), self.vo_factors()
        k = self.head_dim
        return a_q.reshape(self.num_heads, -1, k), a_k, a_v, b_o.reshape(self.num_heads, -1, k)

    def vo_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` of the VO sector: ``A = [W_V^h; b_V^h]``, ``B = (W_O^h)^T``."""
        return _pair_of(self.vo_manifold, self.vo)

    # ----------------------------------------------------------------------------- forward
    def _project(self, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        """``[x, 1] A`` for every head: (N, L, d) x (heads, d(+1), k) -> (N, heads, L, k)."""
        if self.bias:
            weight, bias = factor[:, :-1, :], factor[:, -1, :]
            return torch.einsum("nld,hdk->nhlk", x, weight) + bias[None, :, None, :]
        return torch.einsum("nld,hdk->nhlk", x, factor)

    def _queries_keys_values(self, query, key, value):
        """Per-head ``q``, ``k``, ``v`` (batch, heads, length, dim) and the output blocks (None
        for a composite VO sector). A composite QK sector gives ``q = [x, 1] W_QK`` and
        ``k = [y, 1]`` (shared by the heads); a composite VO sector ``v = [y, 1] W_VO``."""
        a_q, a_k, a_v, b_o = (None,) * 4
        if self.qk_geometry != "composite" or self.vo_geometry != "composite":
            a_q, a_k, a_v, b_o = self._head_factors()
        if self.qk_geometry == "composite":
            q = self._project(query, self.qk)
            k = torch.cat((key, torch.ones_like(key[..., :1])), dim=-1) if self.bias else key
            k = k.unsqueeze(1).expand(-1, self.num_heads, -1, -1)
        else:
            q, k = self._project(query, a_q), self._project(key, a_k)
        if self.vo_geometry == "composite":
            return q, k, self._project(value, self.vo), None
        return q, k, self._project(value, a_v), b_o

    def _merge_masks(
        self, attn_mask, key_padding_mask, n: int, target: int, source: int, dtype
    ) -> torch.Tensor | None:
        """One additive float mask broadcastable to (N, heads, L, S), from torch's mask options."""
        mask = None
        if attn_mask is not None:
            if attn_mask.dim() == 2:
                expected = (target, source)
                shaped = (
                    attn_mask.reshape(1, 1, target, source) if attn_mask.shape == expected else None
                )
            elif attn_mask.dim() == 3:
                expected = (n * self.num_heads, target, source)
                shaped = (
                    attn_mask.reshape(n, self.num_heads, target, source)
                    if attn_mask.shape == expected
                    else None
                )
            else:
                expected, shaped = (target, source), None
            if shaped is None:
                raise ValueError(
                    f"attn_mask has shape {tuple(attn_mask.shape)}; expected {expected} or "
                    f"({n * self.num_heads}, {target}, {source}) (batch * heads, L, S)"
                )
            mask = (
                torch.zeros_like(shaped, dtype=dtype).masked_fill(shaped, float("-inf"))
                if shaped.dtype == torch.bool
                else shaped.to(dtype)
            )
        if key_padding_mask is not None:
            if key_padding_mask.shape != (n, source):
                raise ValueError(
                    f"key_padding_mask has shape {tuple(key_padding_mask.shape)}; expected (batch, S) = ({n}, {source})"
                )
            padding = key_padding_mask.reshape(n, 1, 1, source)
            padding = (
                torch.zeros_like(padding, dtype=dtype).masked_fill(padding, float("-inf"))
                if padding.dtype == torch.bool
                else padding.to(dtype)
            )
            mask = padding if mask is None else mask + padding
        return mask

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """As ``torch.nn.MultiheadAttention.forward``; ``is_causal`` without ``attn_mask`` builds
        the causal mask (torch requires the mask as well)."""
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        if not self.batch_first or unbatched:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        for name, tensor, dim in (
            ("query", query, self.embed_dim),
            ("key", key, self.kdim),
            ("value", value, self.vdim),
        ):
            if tensor.dim() != 3 or tensor.shape[-1] != dim:
                raise ValueError(
                    f"{name} has shape {tuple(tensor.shape)}; expected last dimension {dim} (and 2 or 3 dims)"
                )
        n, target, source = query.shape[0], query.shape[1], key.shape[1]
        q, k, v, b_o = self._queries_keys_values(query, key, value)
        if self.qk_norm:
            q, k = rms_normalize(q), rms_normalize(k)
        if self.rope:
            q, k = apply_rope(q, self.rope_base), apply_rope(k, self.rope_base)
        if self.breaking is not None:
            bias_q, bias_v = self.breaking(q)
            q, v = q + bias_q, v + bias_v
        mask = self._merge_masks(attn_mask, key_padding_mask, n, target, source, q.dtype)
        causal = is_causal and mask is None
        if is_causal and mask is not None and attn_mask is None:  # padding mask plus causality
            mask = mask + torch.full(
                (target, source), float("-inf"), device=q.device, dtype=q.dtype
            ).triu(1)
        dropout = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            if self.group_size > 1:  # each key/value head serves group_size consecutive query heads
                k, v = (
                    k.repeat_interleave(self.group_size, 1),
                    v.repeat_interleave(self.group_size, 1),
                )
            scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)
            if causal:
                scores = scores + torch.full(
                    (target, source), float("-inf"), device=q.device, dtype=q.dtype
                ).triu(1)
            if mask is not None:
                scores = scores + mask
            weights = scores.softmax(-1)
            heads = F.dropout(weights, dropout, self.training) @ v
            weights = weights.mean(1) if average_attn_weights else weights
        else:
            heads = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                dropout_p=dropout,
                is_causal=causal,
                enable_gqa=self.group_size > 1,
                scale=1.0 / math.sqrt(self.head_dim),
            )
        if b_o is None:  # composite VO sector: the heads already live in the output space
            out = heads.sum(1)
        else:
            out = torch.einsum("nhlk,hek->nle", heads, b_o)
        if self.out_bias is not None:
            out = out + self.out_bias
        if not self.batch_first or unbatched:
            out = out.transpose(0, 1)
        if unbatched:
            out = out.squeeze(1)
            weights = None if weights is None else weights.squeeze(0)
        return out, weights
