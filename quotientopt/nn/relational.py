r"""Attention that is exactly :math:`O(d)`-invariant in model space, and a canonical
representative of token matrices modulo :math:`O(d)`.

Token states are a matrix :math:`X` of shape ``(..., T, d)`` (leading dims batch); the group
:math:`O(d)` acts on the right, :math:`X \mapsto X R`. Everything invariant under this action is a
function of the token Gram matrix :math:`G = X X^\top` (shape ``(..., T, T)``), since
:math:`(XR)(XR)^\top = X X^\top`.

* :class:`RelationalAttention` computes its attention scores from :math:`G` alone. Its
  ``"equivariant"`` variant transports token states, :math:`Y(XR) = Y(X) R` exactly; its
  ``"invariant"`` variant propagates the Gram matrix, :math:`G'(XR) = G'(X)`.
* :func:`svd_dressing` (and the module :class:`SVDDressing`) maps :math:`X` to the canonical
  point :math:`X V = U S` of its orbit, and reports, never hides, the inputs on which that point is
  not unique (degenerate or zero singular values, sign ties).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["Dressing", "RelationalAttention", "SVDDressing", "svd_dressing"]

_VARIANTS = ("equivariant", "invariant")


class RelationalAttention(nn.Module):
    r"""Multi-head attention whose scores depend on the tokens only through :math:`G = X X^\top`.

    For head :math:`h` the score of query token :math:`i` on key token :math:`j` is

    .. math::

        s^h_{ij} = f^h_\theta\!\left(\tilde G_{ij}, \tilde G_{ii}, \tilde G_{jj}\right) / \tau_h,
        \qquad \tilde G = G / d,
        \qquad f^h_\theta(u) = \sum_k w^{(2)}_{hk}\,
            \mathrm{GELU}\Big(\sum_{f=1}^{3} w^{(1)}_{hkf} u_f + b^{(1)}_{hk}\Big),

    a scalar MLP with ``hidden`` units per head applied to every pair :math:`(i, j)` (all heads in
    one einsum), and :math:`\tau_h = \exp(\log\tau_h) > 0` a learned temperature. Dividing by
    :math:`d` keeps the features :math:`O(1)` for tokens with unit-scale entries
    (:math:`\tilde G_{ii}` is then the mean squared entry); it is a fixed scalar, so invariance is
    untouched. The MLP has no output bias: a per-head constant shift cancels in the softmax.

    The attention matrices :math:`P^h = \mathrm{softmax}_j(s^h + \text{mask})` (shape
    ``(..., heads, T, T)``) are combined with learned scalar weights :math:`w_h` into one mixing
    matrix :math:`M = \sum_h w_h P^h` (shape ``(..., T, T)``), a function of :math:`G` only. Then

    * ``variant="equivariant"``: :meth:`forward` returns :math:`Y = M X` (shape ``(..., T, d)``),
      and :math:`Y(XR) = M(G)\,XR = Y(X) R` for every orthogonal :math:`R`;
    * ``variant="invariant"``: :meth:`forward` returns :math:`G' = Y Y^\top = M G M^\top` (shape
      ``(..., T, T)``), unchanged under :math:`X \mapsto XR`. :meth:`forward_gram` takes
      :math:`G` itself, so invariant layers stack on Gram matrices without ever seeing :math:`X`.

    Masks follow :class:`torch.nn.MultiheadAttention`: ``attn_mask`` is boolean (``True`` = this
    pair does not take part) or a float added to the scores, broadcastable to
    ``(..., heads, T, T)`` (a per-batch mask is ``(batch, 1, T, T)``); ``is_causal`` masks
    :math:`j > i`. A query row with every key masked attends to nothing (its row of :math:`P^h` is
    zero) instead of producing NaN.

    Cost: the MLP runs on ``(..., heads, T, T, hidden)`` intermediates, so memory is
    :math:`O(\text{heads}\cdot T^2 \cdot \text{hidden})` per batch entry.

    Args:
        heads: number of heads.
        d: token dimension; if given, inputs with another last dim raise ``ValueError``; if
            ``None`` it is read from each input.
        hidden: hidden units of the per-head score MLP.
        variant: ``"equivariant"`` (returns token states) or ``"invariant"`` (returns the Gram
            matrix of the output token states).
        temperature: initial temperature of every head.
    """

    def __init__(
        self,
        heads: int,
        d: int | None = None,
        hidden: int = 16,
        variant: str = "equivariant",
        temperature: float = 1.0,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if heads < 1:
            raise ValueError(f"heads must be a positive integer, got {heads}")
        if d is not None and d < 1:
            raise ValueError(f"d must be a positive integer or None, got {d}")
        if hidden < 1:
            raise ValueError(f"hidden must be a positive integer, got {hidden}")
        if variant not in _VARIANTS:
            raise ValueError(f"variant must be one of {_VARIANTS}, got {variant!r}")
        if not (temperature > 0 and math.isfinite(temperature)):
            raise ValueError(f"temperature must be positive and finite, got {temperature}")
        self.heads, self.d, self.hidden, self.variant = heads, d, hidden, variant
        self.initial_temperature = float(temperature)
        kw = {"device": device, "dtype": dtype}
        self.w1 = nn.Parameter(torch.empty(heads, hidden, 3, **kw))
        self.b1 = nn.Parameter(torch.empty(heads, hidden, **kw))
        self.w2 = nn.Parameter(torch.empty(heads, hidden, **kw))
        self.log_temperature = nn.Parameter(torch.empty(heads, **kw))
        self.mix = nn.Parameter(torch.empty(heads, **kw))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Gaussian MLP weights with fan-in scaling, small uniform biases, the initial temperature,
        and equal mixing weights ``1 / heads`` (so :math:`M` starts row-stochastic)."""
        with torch.no_grad():
            nn.init.normal_(self.w1, std=1.0 / math.sqrt(3.0))
            nn.init.uniform_(self.b1, -0.1, 0.1)
            nn.init.normal_(self.w2, std=1.0 / math.sqrt(self.hidden))
            self.log_temperature.fill_(math.log(self.initial_temperature))
            self.mix.fill_(1.0 / self.heads)

    def extra_repr(self) -> str:
        return f"heads={self.heads}, d={self.d}, hidden={self.hidden}, variant={self.variant!r}"

    @property
    def temperature(self) -> torch.Tensor:
        r"""Per-head temperatures :math:`\tau_h = \exp(\log\tau_h)`, shape ``(heads,)``."""
        return self.log_temperature.exp()

    # ----------------------------------------------------------------------------- validation
    def _check_tokens(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise ValueError("x must be a floating-point tensor of shape (..., tokens, d)")
        if x.dim() < 2:
            raise ValueError(f"x must have shape (..., tokens, d), got shape {tuple(x.shape)}")
        if self.d is not None and x.shape[-1] != self.d:
            raise ValueError(
                f"x has last dim {x.shape[-1]} but this RelationalAttention was built with "
                f"d={self.d}"
            )

    def _check_gram(self, g: torch.Tensor, dim: int | None) -> int:
        if not isinstance(g, torch.Tensor) or not g.is_floating_point():
            raise ValueError("gram must be a floating-point tensor of shape (..., tokens, tokens)")
        if g.dim() < 2 or g.shape[-1] != g.shape[-2]:
            raise ValueError(
                f"gram must have shape (..., tokens, tokens), got shape {tuple(g.shape)}"
            )
        dim = self.d if dim is None else dim
        if dim is None:
            raise ValueError(
                "forward_gram needs the token dimension d for the feature scaling G / d: pass "
                "dim=..., or build the module with d=..."
            )
        if self.d is not None and dim != self.d:
            raise ValueError(f"dim={dim} differs from the d={self.d} the module was built with")
        if dim < 1:
            raise ValueError(f"dim must be a positive integer, got {dim}")
        return dim

    def _mask(
        self,
        attn_mask: torch.Tensor | None,
        is_causal: bool,
        score_shape: tuple[int, ...],
        ref: torch.Tensor,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(boolean mask, additive float mask), each broadcastable to ``score_shape``, or None."""
        t = score_shape[-1]
        masked: torch.Tensor | None = None
        additive: torch.Tensor | None = None
        if attn_mask is not None:
            if not isinstance(attn_mask, torch.Tensor):
                raise ValueError("attn_mask must be a tensor (bool or floating point) or None")
            try:
                shape = torch.broadcast_shapes(attn_mask.shape, score_shape)
            except RuntimeError:
                shape = None
            if shape != torch.Size(score_shape):
                raise ValueError(
                    f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to the "
                    f"scores' shape (..., heads, T, T) = {tuple(score_shape)}; a per-batch mask "
                    "has shape (batch, 1, T, T)"
                )
            if attn_mask.dtype == torch.bool:
                masked = attn_mask.to(ref.device)
            elif attn_mask.is_floating_point():
                additive = attn_mask.to(device=ref.device, dtype=ref.dtype)
            else:
                raise ValueError(
                    f"attn_mask must be bool (True = masked) or floating (additive), got "
                    f"{attn_mask.dtype}"
                )
        if is_causal:
            causal = torch.ones(t, t, dtype=torch.bool, device=ref.device).triu(1)
            masked = causal if masked is None else masked | causal
        return masked, additive

    # ----------------------------------------------------------------------------- core
    def scores(self, gram: torch.Tensor, dim: int) -> torch.Tensor:
        r"""Unmasked scores :math:`s^h_{ij}`, shape ``(..., heads, T, T)``, from a Gram matrix
        ``gram`` of shape ``(..., T, T)`` of tokens of dimension ``dim``."""
        g = gram / dim
        diag = torch.diagonal(g, dim1=-2, dim2=-1)  # (..., T)
        w_pair, w_query, w_key = self.w1.unbind(-1)  # each (heads, hidden)
        pre = (
            torch.einsum("...ij,hk->...hijk", g, w_pair)
            + (torch.einsum("...i,hk->...hik", diag, w_query) + self.b1[:, None, :])[
                ..., :, :, None, :
            ]
            + torch.einsum("...j,hk->...hjk", diag, w_key)[..., :, None, :, :]
        )
        f = torch.einsum("...hijk,hk->...hij", nn.functional.gelu(pre), self.w2)
        return f / self.temperature[:, None, None]

    def attention_from_gram(
        self,
        gram: torch.Tensor,
        dim: int | None = None,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        r"""Attention matrices :math:`P^h`, shape ``(..., heads, T, T)``, rows summing to 1 (0 for
        fully masked rows), from ``gram`` of shape ``(..., T, T)``. ``dim`` is the token dimension
        (defaults to the constructor's ``d``)."""
        dim = self._check_gram(gram, dim)
        score_shape = (*gram.shape[:-2], self.heads, gram.shape[-1], gram.shape[-1])
        masked, additive = self._mask(attn_mask, is_causal, score_shape, gram)
        s = self.scores(gram, dim)
        if additive is not None:
            s = s + additive
        if masked is not None:
            s = s.masked_fill(masked, float("-inf"))
        dead = torch.isneginf(s).all(-1, keepdim=True)  # rows with every key masked
        p = torch.softmax(s.masked_fill(dead, 0.0), dim=-1)
        return p.masked_fill(dead, 0.0)

    def mixing_from_gram(
        self,
        gram: torch.Tensor,
        dim: int | None = None,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        r"""Mixing matrix :math:`M = \sum_h w_h P^h`, shape ``(..., T, T)``."""
        p = self.attention_from_gram(gram, dim, attn_mask, is_causal)
        return torch.einsum("h,...hij->...ij", self.mix, p)

    def forward_gram(
        self,
        gram: torch.Tensor,
        dim: int | None = None,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        r"""Gram matrix of the output tokens, :math:`G' = M G M^\top` (shape ``(..., T, T)``),
        from the input Gram matrix alone (either variant). ``dim`` is the token dimension
        (defaults to the constructor's ``d``)."""
        m = self.mixing_from_gram(gram, dim, attn_mask, is_causal)
        return m @ gram @ m.transpose(-1, -2)

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        r"""Token states ``x`` of shape ``(..., T, d)`` to :math:`Y = M X` (shape ``(..., T, d)``)
        for the equivariant variant, or to :math:`G' = Y Y^\top` (shape ``(..., T, T)``) for the
        invariant one."""
        self._check_tokens(x)
        g = x @ x.transpose(-1, -2)
        m = self.mixing_from_gram(g, x.shape[-1], attn_mask, is_causal)
        if self.variant == "equivariant":
            return m @ x
        return m @ g @ m.transpose(-1, -2)


# --------------------------------------------------------------------------------- dressing
@dataclass(frozen=True)
class Dressing:
    r"""Result of :func:`svd_dressing` for ``x`` of shape ``(..., T, d)``, ``r = min(T, d)``.

    Attributes:
        dressed: canonical representative :math:`X V = U S`, shape ``(..., T, r)``.
        singular_values: :math:`S`, descending, shape ``(..., r)``.
        frame: :math:`V` with the sign convention applied, shape ``(..., d, r)``, so that
            ``dressed == x @ frame`` and ``x ≈ dressed @ frame.mT`` (exactly for the SVD).
        ambiguous: bool, shape ``(...)``: the representative (or the frame) is not unique to the
            tolerance, see :func:`svd_dressing`.
        degenerate_pairs: int, shape ``(...)``: adjacent pairs of nonzero singular values closer
            than ``rtol * s_max`` (a triple counts as two pairs).
        zero_singular_values: int, shape ``(...)``: singular values ``<= rtol * s_max``.
        sign_ties: int, shape ``(...)``: columns whose sign convention is decided by a margin
            ``<= rtol`` (only among nonzero, non-degenerate singular values).
        rtol: the relative tolerance used.
    """

    dressed: torch.Tensor
    singular_values: torch.Tensor
    frame: torch.Tensor
    ambiguous: torch.Tensor
    degenerate_pairs: torch.Tensor
    zero_singular_values: torch.Tensor
    sign_ties: torch.Tensor
    rtol: float

    @property
    def reason(self) -> str:
        """Human-readable account of every ambiguous batch entry (one host synchronisation)."""
        amb = self.ambiguous.reshape(-1).tolist()
        pairs = self.degenerate_pairs.reshape(-1).tolist()
        zeros = self.zero_singular_values.reshape(-1).tolist()
        ties = self.sign_ties.reshape(-1).tolist()
        shape = tuple(self.ambiguous.shape)
        idx = list(itertools.product(*(range(n) for n in shape)))
        lines = []
        for flat, is_amb in enumerate(amb):
            if not is_amb:
                continue
            parts = []
            if pairs[flat]:
                parts.append(
                    f"{pairs[flat]} degenerate pair(s) of singular values (the representative "
                    "can rotate within their subspace)"
                )
            if zeros[flat]:
                parts.append(
                    f"{zeros[flat]} zero singular value(s) (rank deficient: those columns are "
                    "zero, but the frame V is arbitrary there)"
                )
            if ties[flat]:
                parts.append(f"{ties[flat]} sign tie(s) (the column sign is not determined)")
            where = f"entry {idx[flat]}" if shape else "input"
            lines.append(f"{where}: " + "; ".join(parts))
        if not lines:
            return f"not ambiguous (rtol={self.rtol:.3g})"
        head = f"{len(lines)} of {len(amb)} batch entries ambiguous (rtol={self.rtol:.3g})"
        return head + ":\n" + "\n".join(lines)

    def raise_if_ambiguous(self) -> None:
        """Raise ``ValueError`` with :attr:`reason` if any batch entry is ambiguous."""
        if bool(self.ambiguous.any()):
            raise ValueError("SVD dressing is not unique: " + self.reason)


def svd_dressing(x: torch.Tensor, rtol: float | None = None) -> Dressing:
    r"""Canonical representative of ``x`` (shape ``(..., T, d)``) modulo :math:`O(d)` on the
    right.

    With the thin SVD :math:`X = U S V^\top` (:math:`r = \min(T, d)`, :math:`S` descending) the
    dressed matrix is :math:`X V = U S` (shape ``(..., T, r)``). :math:`X R = U S (R^\top V)^\top`
    has the same :math:`U S`, so the dressing is exactly invariant, up to the signs of the
    singular vector pairs, which are fixed by a convention: in every column of :math:`U` the entry
    of largest absolute value is made positive (the first such entry on exact ties). Dressing is
    idempotent: ``svd_dressing(d.dressed).dressed == d.dressed``.

    The representative is unique only when the spectrum is simple; every failure is counted and
    reported in the returned :class:`Dressing`, never silently resolved. With
    :math:`s_{\max}` the largest singular value, per batch entry:

    * degenerate pairs: adjacent nonzero :math:`s_i - s_{i+1} \le \mathrm{rtol}\, s_{\max}`; the
      dressed columns can rotate within the degenerate subspace (and, near degeneracy, move by
      :math:`O(\varepsilon s_{\max} / \text{gap})` under round-off);
    * zero singular values: :math:`s_i \le \mathrm{rtol}\, s_{\max}` (all of them if
      :math:`X = 0`); their dressed columns are (numerically) zero, but the frame :math:`V` is
      arbitrary there: :math:`X` has a larger stabilizer and lies on a singular stratum;
    * sign ties: a column of :math:`U` (nonzero, non-degenerate) whose largest absolute entry
      exceeds the largest absolute entry of the opposite sign by at most ``rtol``.

    ``ambiguous`` is true where any count is nonzero. The default ``rtol`` is
    :math:`\sqrt{\varepsilon}` of the dtype (3.5e-4 in float32, 1.5e-8 in float64): below that
    gap, singular vectors are determined to worse than :math:`\sqrt{\varepsilon}`.

    The SVD runs in ``x``'s dtype; gradients through it are ill-conditioned near degeneracy.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError("x must be a floating-point tensor of shape (..., tokens, d)")
    if x.dim() < 2 or x.shape[-1] == 0 or x.shape[-2] == 0:
        raise ValueError(
            f"x must have shape (..., tokens, d) with tokens, d >= 1, got {tuple(x.shape)}"
        )
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x holds NaN or Inf; its SVD dressing is undefined")
    if rtol is None:
        rtol = math.sqrt(torch.finfo(x.dtype).eps)
    if not (rtol >= 0 and math.isfinite(rtol)):
        raise ValueError(f"rtol must be non-negative and finite, got {rtol}")

    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    tol = rtol * s[..., :1]  # (..., 1): relative to s_max
    zero = s <= tol  # (..., r)
    close = (s[..., :-1] - s[..., 1:]) <= tol  # (..., r - 1): adjacent pairs
    degenerate = close & ~zero[..., 1:]
    in_pair = torch.zeros_like(zero)
    in_pair[..., :-1] |= degenerate
    in_pair[..., 1:] |= degenerate

    # sign convention: largest-|.| entry of each column of U positive (argmax takes the first)
    absu = u.abs()
    pivot = absu.argmax(dim=-2, keepdim=True)  # (..., 1, r)
    sign = torch.gather(u, -2, pivot).sign()
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    fixed_u = u * sign
    opposite = torch.where(fixed_u < 0, absu, torch.zeros_like(absu)).amax(dim=-2)  # (..., r)
    margin = absu.amax(dim=-2) - opposite
    tie = (margin <= rtol) & ~zero & ~in_pair

    dressed = fixed_u * s[..., None, :]
    frame = vh.transpose(-1, -2) * sign
    degenerate_pairs = degenerate.sum(-1)
    zero_count = zero.sum(-1)
    sign_ties = tie.sum(-1)
    ambiguous = (degenerate_pairs > 0) | (zero_count > 0) | (sign_ties > 0)
    return Dressing(
        dressed=dressed,
        singular_values=s,
        frame=frame,
        ambiguous=ambiguous,
        degenerate_pairs=degenerate_pairs,
        zero_singular_values=zero_count,
        sign_ties=sign_ties,
        rtol=float(rtol),
    )


class SVDDressing(nn.Module):
    r"""Module form of :func:`svd_dressing`: ``SVDDressing(rtol)(x)`` returns the
    :class:`Dressing` of ``x`` (shape ``(..., T, d)``). With ``strict=True`` an ambiguous input
    raises ``ValueError`` (with :attr:`Dressing.reason`) instead of being returned flagged."""

    def __init__(self, rtol: float | None = None, strict: bool = False) -> None:
        super().__init__()
        if rtol is not None and not (rtol >= 0 and math.isfinite(rtol)):
            raise ValueError(f"rtol must be non-negative and finite, got {rtol}")
        self.rtol, self.strict = rtol, strict

    def extra_repr(self) -> str:
        return f"rtol={self.rtol}, strict={self.strict}"

    def forward(self, x: torch.Tensor) -> Dressing:
        out = svd_dressing(x, self.rtol)
        if self.strict:
            out.raise_if_ambiguous()
        return out
