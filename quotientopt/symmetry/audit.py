r"""The symmetry audit (paper 004's count): redundant dimensions per head and sector.

``audit(model)`` finds every attention module of ``model`` and counts, from module attributes and
parameter shapes only (no forward pass), for the group that really acts on it:

* the parameters of each sector (QK: ``W_Q``, ``W_K``; VO: ``W_V``, ``W_O``; biases: every bias);
* the continuous redundant dimensions: parameter directions along which the module's function
  does not change (the tangent of the symmetry orbits), per key/value head and sector;
* the discrete head permutations;
* the dimension of the function space, parameters minus constraints minus redundant dimensions
  (constraints: the dimensions a constrained parameter manifold, e.g. the composite sectors'
  rank-``k`` matrices, removes from the stored tensor).

The counts, per key/value head, with ``k`` the head dimension and ``r`` the query heads per
key/value head (``r = 1`` without grouped-query attention); each is checked against the numerical
rank of the module's Jacobian in ``tests/test_audit.py``:

====================================  ==========================================================
QK, plain dot product                 ``k^2`` (GL(k): ``(A G, B G^{-T})``)
QK, RoPE                              ``k`` (a scaled rotation ``a I + b J`` per rotated pair)
QK, QK-norm (no gain)                 ``k (k - 1) / 2 + r + 1`` (O(k), and every query head's
                                      and the key head's own scale: the conformal scale of the
                                      family plus the joint scaling ``(c A, c B)`` for ``r = 1``)
QK, RoPE and QK-norm                  ``k / 2 + r + 1`` (a rotation per pair and the scales)
QK, paper 003's fixed ``b_Q`` (eval)  the stabilizer of ``b_Q``: ``k^2 - k``, RoPE ``0``, QK-norm
                                      ``(k-1)(k-2)/2 + r + 1``, both ``r + 1``; unchanged when a
                                      learned query bias absorbs it (no RoPE, no QK-norm)
VO                                    ``k^2`` (GL(k)); with paper 003's ``b_V`` and neither a
                                      value nor an output bias ``k^2 - k``
key bias                              ``k`` (a per-query constant in the scores, which the softmax
                                      ignores), not with RoPE or QK-norm (then it depends on the
                                      key's position or is normalized with the key)
value bias                            ``k`` when an output bias absorbs it
                                      (``b_V -> b_V + d``, ``b_O -> b_O - d W_O^T``, using
                                      that the attention weights sum to 1)
output LayerNorm inside the module    ``k`` per query head in VO (``W_O`` along the all-ones
(BERT)                                vector) and 1 in the output bias: the mean is subtracted
composite sectors                     ``0`` inside the sector (a dense rank-``k`` ``W`` has no
                                      GL(k) redundancy); the bias counts stay
fixed-rank sectors (``U S V^T``)      ``k (k - 1) / 2`` (O(k))
====================================  ==========================================================

The bias redundancies are independent of the GL(k) orbits (those move ``W_V``/``W_Q``, the bias
directions do not). Discrete: permutations of the heads, ``H!``, or with grouped-query attention
``H_kv! (r!)^{H_kv}`` (key/value groups, and query heads within a group).

These are the symmetries of the module as a function of generic inputs. A surrounding network can
add more: a pre-LayerNorm confines the inputs to a hyperplane (then ``W_K`` along its normal acts
as a key bias, and without LayerNorm biases ``W_Q``, ``W_K``, ``W_V`` each have ``k`` dead
directions per head), and a mean-subtracting LayerNorm after the residual stream hides ``W_O``
and ``b_O`` along the all-ones vector; LayerNorm gains rescale neighbouring weights. The model's
``function_space_dim`` here is therefore an upper bound. With QK-norm the scalings are exact
(the normalization is ``x / max(rms(x), eps)``, scale-invariant wherever ``rms(x) > eps``).
Unsupported here:
relative-position variants of BERT attention (their extra embeddings are not counted).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from torch import nn

from quotientopt.nn.adapters import AttentionSpec, attention_modules, no_attention_error

__all__ = ["AuditReport", "AuditRow", "audit"]

#: head-permutation orders with more digits than this are reported as a string
_MAX_DIGITS = 30


@dataclass(frozen=True)
class AuditRow:
    """One sector of one attention module."""

    path: str  # module path in the model ("" for the model itself)
    module_type: str
    sector: str  # "QK", "VO" or "biases"
    heads: int  # query heads
    kv_heads: int  # key/value heads (the groups the continuous group acts on)
    head_dim: int
    group: str  # the group that really acts on this sector
    parameters: int  # stored parameter entries counted for this sector
    constraints: int  # entries removed by a constrained parameter manifold (composite, fixed-rank)
    redundant: int  # continuous redundant dimensions, all heads
    per_head: int  # redundant dimensions per key/value head (module-wide extras: see note)
    note: str = ""

    @property
    def function_dim(self) -> int:
        """Dimensions of the function space this sector spans: parameters - constraints -
        redundant."""
        return self.parameters - self.constraints - self.redundant


@dataclass
class AuditReport:
    """The audit of a model: one :class:`AuditRow` per (module, sector) and the totals."""

    rows: list[AuditRow]
    total_parameters: int  # every parameter of the model (tied ones once)
    head_permutations: dict[str, int | str] = field(default_factory=dict)  # path -> group order
    head_permutation_formula: dict[str, str] = field(default_factory=dict)  # path -> "H!" ...

    @property
    def attention_parameters(self) -> int:
        return sum(row.parameters for row in self.rows)

    @property
    def constraints(self) -> int:
        return sum(row.constraints for row in self.rows)

    @property
    def redundant(self) -> int:
        return sum(row.redundant for row in self.rows)

    @property
    def function_space_dim(self) -> int:
        """Model parameters - constraints - redundant attention dimensions (an upper bound on the
        dimension of the model's function space: symmetries outside attention are not counted)."""
        return self.total_parameters - self.constraints - self.redundant

    def module_paths(self) -> list[str]:
        return list(dict.fromkeys(row.path for row in self.rows))

    def module_redundant(self, path: str) -> int:
        """Redundant dimensions of the module at ``path`` (all its sectors)."""
        return sum(row.redundant for row in self.rows if row.path == path)

    def totals(self) -> dict:
        return {
            "total_parameters": self.total_parameters,
            "attention_parameters": self.attention_parameters,
            "constraints": self.constraints,
            "redundant": self.redundant,
            "function_space_dim": self.function_space_dim,
            "head_permutations": dict(self.head_permutations),
        }

    def to_dict(self) -> dict:
        rows = []
        for row in self.rows:
            entry = asdict(row)
            entry["function_dim"] = row.function_dim
            rows.append(entry)
        return {
            "rows": rows,
            **self.totals(),
            "head_permutation_formula": dict(self.head_permutation_formula),
        }

    def to_markdown(self) -> str:
        lines = [
            "| module | type | sector | heads (kv) | k | group | parameters | constrained "
            "| redundant (per head) | function dims |",
            "|---|---|---|---:|---:|---|---:|---:|---:|---:|",
        ]
        for row in self.rows:
            heads = f"{row.heads}" if row.kv_heads == row.heads else f"{row.heads} ({row.kv_heads})"
            group = f"{row.group} ({row.note})" if row.note else row.group
            lines.append(
                f"| {row.path or '(model)'} | {row.module_type} | {row.sector} | {heads} | "
                f"{row.head_dim} | {group} | {row.parameters} | {row.constraints} | "
                f"{row.redundant} ({row.per_head}) | {row.function_dim} |"
            )
        lines.append("")
        if not self.rows:
            lines.append("No supported attention module found.")
        for path in self.module_paths():
            lines.append(
                f"- head permutations of `{path or '(model)'}`: "
                f"{self.head_permutation_formula[path]} = {self.head_permutations[path]}"
            )
        lines += [
            f"- model parameters: {self.total_parameters}",
            f"- attention parameters: {self.attention_parameters}",
            f"- constrained dimensions: {self.constraints}",
            f"- redundant dimensions: {self.redundant}",
            f"- function-space dimension (upper bound): {self.function_space_dim}",
        ]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------- counts
def _fiber(n: int, m: int, k: int) -> int:
    """Dimension of the fibers of ``(A, B) -> A B^T`` for generic ``A`` (n x k), ``B`` (m x k)."""
    rank = min(n, m, k)
    return (n + m) * k - rank * (n + m - rank)


def _count(path: str, spec: AttentionSpec) -> list[AuditRow]:
    e, k, h, g = spec.embed_dim, spec.head_dim, spec.heads, spec.kv_heads
    # paper 003's b_Q breaks the QK group unless a learned query bias absorbs it (b_Q -> b_Q G +
    # beta (G - I)), which it cannot with RoPE or QK-norm in between; b_V needs no output bias
    # and no learned value bias to break the VO group
    breaks_qk = spec.breaking and (not spec.in_bias or spec.rope or spec.qk_norm)
    breaks_vo = spec.breaking and not spec.in_bias and not spec.out_bias
    r = h // g
    inner, kv_inner = h * k, g * k
    b = 1 if spec.in_bias else 0
    per_kv = "" if r == 1 else " per KV head"
    base = {
        "path": path,
        "module_type": spec.module_type,
        "heads": h,
        "kv_heads": g,
        "head_dim": k,
    }
    rows = []

    # ---- QK
    qk_params = inner * e + kv_inner * spec.kdim
    constraints, note = 0, ""
    if spec.qk_geometry == "composite":  # dense (E + b) x (kdim + b) per head, rank k
        n, m = e + b, spec.kdim + b
        qk_params = h * n * m
        constraints = h * (n * m - k * (n + m - k))
        per, group = 0, "none (composite W_QK)"
    elif spec.qk_geometry == "fixed-rank":  # [U; S; V] per head: Stiefel x SPD x Stiefel
        qk_params = g * (r * e + k + spec.kdim) * k
        constraints = g * (k * (k + 1) + k * (k - 1) // 2)
        per, group = k * (k - 1) // 2, "O(k) (U S V^T)"
    elif spec.rope and spec.qk_norm:
        per = (0 if breaks_qk else k // 2) + r + 1
        group = "RoPE rotations + scales"
    elif spec.rope:
        per, group = (0 if breaks_qk else k), "RoPE scaled rotations"
    elif spec.qk_norm:
        rotations = (k - 1) * (k - 2) // 2 if breaks_qk else k * (k - 1) // 2
        per = rotations + r + 1
        group = "R>0 x O(k) + joint scale" if r == 1 else "R>0 x O(k) + scale per query head"
    else:
        per = _fiber(r * (e + b), spec.kdim, k) - (k if breaks_qk else 0)
        group = "GL(k)"
    if spec.breaking and spec.qk_geometry in ("gl", "orthogonal"):
        group += ", fixing b_Q" if breaks_qk else " (b_Q absorbs paper 003's b_Q)"
        note = "paper 003 biases at their evaluation values"
    if spec.qk_geometry in ("gl", "orthogonal") and r > 1:
        group += per_kv
    rows.append(
        AuditRow(
            **base,
            sector="QK",
            group=group,
            parameters=qk_params,
            constraints=constraints,
            redundant=g * per,
            per_head=per,
            note=note,
        )
    )

    # ---- VO
    vo_params = kv_inner * spec.vdim + e * inner
    constraints, note = 0, ""
    norm_extra = r * k if spec.output_norm else 0
    if spec.vo_geometry == "composite":  # dense (vdim + b) x E per head, rank k
        n, m = spec.vdim + b, e
        vo_params = h * n * m
        constraints = h * (n * m - k * (n + m - k))
        per, group = norm_extra, "none (composite W_VO)"
    elif spec.vo_geometry == "fixed-rank":
        vo_params = g * (spec.vdim + k + r * e) * k
        constraints = g * (k * (k + 1) + k * (k - 1) // 2)
        per, group = k * (k - 1) // 2 + norm_extra, "O(k) (U S V^T)"
    else:
        broken = k if breaks_vo else 0
        per, group = _fiber(spec.vdim, r * e, k) - broken + norm_extra, "GL(k)"
        if spec.breaking:
            group += ", fixing b_V" if broken else " (biases absorb paper 003's b_V)"
            note = "paper 003 biases at their evaluation values"
        group += per_kv
    if spec.output_norm:
        group += " + W_O along 1 (output LayerNorm)"
    rows.append(
        AuditRow(
            **base,
            sector="VO",
            group=group,
            parameters=vo_params,
            constraints=constraints,
            redundant=g * per,
            per_head=per,
            note=note,
        )
    )

    # ---- biases
    factored_rows = 0  # bias rows stored inside factored sectors
    if spec.in_bias:
        factored_rows += inner if spec.qk_geometry != "composite" else 0
        factored_rows += kv_inner if spec.qk_geometry != "composite" else 0
        factored_rows += kv_inner if spec.vo_geometry != "composite" else 0
    bias_params = factored_rows + (e if spec.out_bias else 0) + spec.bias_kv
    redundant, parts, note = 0, [], ""
    if spec.in_bias and not spec.zero_attn:
        if not (spec.rope or spec.qk_norm):
            redundant += kv_inner
            parts.append("b_K (softmax shift)")
        absorbed = kv_inner if spec.out_bias else max(0, kv_inner - e)
        if absorbed:
            redundant += absorbed
            parts.append("b_V into b_O" if spec.out_bias else "b_V (W_O not injective)")
    per = redundant // g if redundant % g == 0 else 0
    if spec.output_norm and spec.out_bias:
        redundant += 1
        parts.append("b_O along 1")
        note = "+1 for the module"
    if bias_params or redundant:
        rows.append(
            AuditRow(
                **base,
                sector="biases",
                group=", ".join(parts) if parts else "none",
                parameters=bias_params,
                constraints=0,
                redundant=redundant,
                per_head=per,
                note=note,
            )
        )
    return rows


def _permutations(spec: AttentionSpec) -> tuple[int | str, str]:
    g, r = spec.kv_heads, spec.heads // spec.kv_heads
    order = math.factorial(g) * math.factorial(r) ** g
    formula = f"{g}!" if r == 1 else f"{g}! x ({r}!)^{g}"
    if len(str(order)) > _MAX_DIGITS:
        digits = len(str(order)) - 1
        return f"{formula} ~ {order / 10**digits:.3f}e{digits}", formula
    return order, formula


def audit(model: nn.Module) -> AuditReport:
    """Count the parameters, redundant dimensions and head permutations of every attention module
    of ``model`` (see the module docstring). Reads attributes and shapes only; no forward pass.

    Supported: every type in the attention registry (:mod:`quotientopt.nn.adapters`) with a
    ``spec``: ``torch.nn.MultiheadAttention``, :class:`~quotientopt.nn.QuotientMultiheadAttention`
    and its wrappers (the reference GPT's and the Hugging Face twins), the reference GPT's
    standard ``CausalSelfAttention``, Hugging Face ``GPT2Attention`` and ``BertAttention``. A
    wrapper is reported once, at its own path; modules inside a reported one are not visited.
    """
    rows: list[AuditRow] = []
    permutations: dict[str, int | str] = {}
    formulas: dict[str, str] = {}
    for path, module, adapter in attention_modules(model, "spec"):
        spec = adapter.spec(module)
        rows += _count(path, spec)
        permutations[path], formulas[path] = _permutations(spec)
    if not rows:
        raise no_attention_error("audit", model, "spec")
    total = sum(p.numel() for p in model.parameters())
    return AuditReport(rows, total, permutations, formulas)
