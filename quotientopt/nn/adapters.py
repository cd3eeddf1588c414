r"""One registry of attention adapters: everything quotientopt knows about an attention type.

Each supported attention module type registers one :class:`AttentionAdapter` here, and every
part of the package that needs to understand attention looks it up instead of keeping its own
list of classes:

=====================  ===========================================  ==========================
field                  what it answers                              used by
=====================  ===========================================  ==========================
``sectors``            the QK and VO :class:`Sector` s (parameters, :func:`quotientopt.symmetry.find_sectors`,
                       linear map to the factor pairs, head        the monitor
                       geometry if the sector has one)
``spec``               an :class:`AttentionSpec` (shapes, biases,   :func:`quotientopt.symmetry.audit`
                       RoPE / QK-norm / breaking, geometries)
``patterns``           a :class:`PatternRecipe` (causality, RoPE,   :func:`quotientopt.tensorboard.attention_patterns`
                       QK-norm, breaking bias, scaling), or None
                       when the weights cannot be recomputed from
                       the QK factors
``to_quotient``        build the quotient twin (``**options``)      :func:`quotientopt.nn.convert`
``to_standard``        build the standard module back               :func:`quotientopt.nn.export`
=====================  ===========================================  ==========================

Lookups are by exact type, and they report the *outermost* registered module: a wrapper (the
reference GPT's :class:`~quotientopt.models.QuotientCausalSelfAttention`, the Hugging Face
twins) is reported at its own path and the :class:`QuotientMultiheadAttention` inside it is not
visited. Since a standard module and its twin sit at the same path, sector names
(``"h.0.attn.QK"``) are the same for every flavour of one architecture.

Who registers: this module registers ``torch.nn.MultiheadAttention`` and
:class:`QuotientMultiheadAttention`; :mod:`quotientopt.models.gpt` registers the reference GPT's
two attention types when it is imported (a GPT cannot exist before that); and
:mod:`quotientopt.nn.huggingface` registers ``GPT2Attention`` and ``BertAttention`` with their
twins. The Hugging Face registration is deferred (:func:`add_deferred_registration`): it runs at
the first lookup after ``transformers`` has been imported, so neither ``import quotientopt`` nor
a lookup imports ``transformers``. No module of :mod:`quotientopt.nn` imports
:mod:`quotientopt.models`.

To support a new attention type, call :func:`register_attention` with what you can provide;
every field is optional (a type with only ``to_quotient`` converts but is not monitored).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import torch
from torch import nn

from quotientopt.manifolds.protocol import HeadGeometry, is_head_geometry
from quotientopt.nn.attention import QuotientMultiheadAttention, factors_from_weights

__all__ = [
    "AttentionAdapter",
    "AttentionSpec",
    "PatternRecipe",
    "Sector",
    "adapter_of",
    "add_deferred_registration",
    "attention_modules",
    "no_attention_error",
    "quotient_patterns",
    "quotient_sectors",
    "quotient_spec",
    "register_attention",
    "register_conversion",
    "registered_types",
    "standard_sectors",
]

ValueOf = Callable[[torch.Tensor], "torch.Tensor | None"]


# ------------------------------------------------------------------------------- data types
@dataclass
class Sector:
    """One sector (QK or VO) of one attention module.

    ``read`` maps the values of ``parameters`` (or anything of their shapes: gradients, updates,
    Euclidean momenta) linearly to the factor pair ``(A, B)``, each ``(groups, rows, k)`` with one
    group per key/value head, bias rows included, so that ``(A G, B G^{-T})`` is the symmetry.
    ``manifold`` is the sector's head geometry when its parameter lives on one (then
    ``parameters`` is the single point ``z`` of shape ``(groups, n + m, k)``).
    """

    path: str  # module path in the model
    kind: str  # "QK" or "VO"
    heads: int  # groups (key/value heads) in the leading dimension
    head_dim: int
    parameters: tuple[torch.Tensor, ...]  # the parameters the pair is read from
    read: Callable[[tuple[torch.Tensor, ...]], tuple[torch.Tensor, torch.Tensor]]
    manifold: HeadGeometry | None = None  # the sector's head geometry, if it has one

    @property
    def name(self) -> str:
        """``"<path>.<kind>"`` (``"<kind>"`` for the model itself): the tag the monitor uses."""
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


@dataclass
class AttentionSpec:
    """What the symmetry audit needs to know about one attention module (attributes and shapes
    only). ``kdim``/``vdim``: key and value input widths; ``in_bias``: query/key/value biases;
    ``breaking``: paper 003's fixed ``b_Q``, ``b_V``; ``bias_kv``: entries of torch's
    ``add_bias_kv`` parameters; ``output_norm``: a mean-subtracting LayerNorm on the output
    inside the module (BERT)."""

    module_type: str
    embed_dim: int
    kdim: int
    vdim: int
    heads: int
    kv_heads: int
    head_dim: int
    in_bias: bool
    out_bias: bool
    rope: bool = False
    qk_norm: bool = False
    breaking: bool = False
    qk_geometry: str = "gl"
    vo_geometry: str = "gl"
    bias_kv: int = 0
    zero_attn: bool = False
    output_norm: bool = False


@dataclass(frozen=True)
class PatternRecipe:
    r"""How to recompute a module's attention weights from its QK factors and its input ``x``
    (batch, length, E): :math:`q = [x, 1] A_Q`, :math:`k = [x, 1] A_K` per head, then QK-norm
    (``qk_norm``), RoPE (``rope``, ``rope_base``), the query bias ``breaking`` adds at
    evaluation, ``scores = q k^T * scaling`` (default :math:`k^{-1/2}`), the causal mask
    (``causal``) and the softmax. ``batch_first``: whether the module's first input is
    ``(batch, length, E)`` (else ``(length, batch, E)``). Masks passed at call time (padding)
    are not known here."""

    causal: bool
    batch_first: bool = True
    rope: bool = False
    rope_base: float = 10000.0
    qk_norm: bool = False
    breaking: nn.Module | None = None
    scaling: float | None = None


@dataclass(frozen=True)
class AttentionAdapter:
    """What quotientopt knows about one attention module type (see the module docstring).
    ``sectors(path, module) -> list[Sector]``; ``spec(module) -> AttentionSpec``;
    ``patterns(module) -> PatternRecipe | None``; ``to_quotient(module, **options) -> nn.Module``;
    ``to_standard(module) -> nn.Module``. None: not provided."""

    sectors: Callable[[str, nn.Module], list[Sector]] | None = None
    spec: Callable[[nn.Module], AttentionSpec] | None = None
    patterns: Callable[[nn.Module], PatternRecipe | None] | None = None
    to_quotient: Callable[..., nn.Module] | None = None
    to_standard: Callable[[nn.Module], nn.Module] | None = None


# ------------------------------------------------------------------------------- the registry
_ADAPTERS: dict[type, AttentionAdapter] = {}
_DEFERRED: list[Callable[[], bool]] = []
_CAPABILITIES = ("sectors", "spec", "patterns", "to_quotient", "to_standard")


def register_attention(module_type: type, **capabilities: Callable | None) -> AttentionAdapter:
    """Register (or extend) the adapter of ``module_type``: keyword arguments among ``sectors``,
    ``spec``, ``patterns``, ``to_quotient``, ``to_standard`` (see :class:`AttentionAdapter`);
    fields not given keep their registered value. Returns the adapter now registered."""
    unknown = sorted(set(capabilities) - set(_CAPABILITIES))
    if unknown:
        raise TypeError(
            f"register_attention: unknown capabilities {unknown}; use some of {_CAPABILITIES}"
        )
    if not isinstance(module_type, type) or not issubclass(module_type, nn.Module):
        raise TypeError(
            f"register_attention: module_type must be an nn.Module subclass, got {module_type!r}"
        )
    adapter = replace(_ADAPTERS.get(module_type, AttentionAdapter()), **capabilities)
    _ADAPTERS[module_type] = adapter
    return adapter


def register_conversion(
    standard: type,
    quotient: type,
    to_quotient: Callable[..., nn.Module],
    to_standard: Callable[[nn.Module], nn.Module],
) -> None:
    """Teach :func:`~quotientopt.nn.convert` and :func:`~quotientopt.nn.export` a new pair of
    module types (shorthand for two :func:`register_attention` calls)."""
    register_attention(standard, to_quotient=to_quotient)
    register_attention(quotient, to_standard=to_standard)


def add_deferred_registration(loader: Callable[[], bool]) -> None:
    """Run ``loader()`` before each lookup until it returns True (done). For registrations that
    need an optional dependency only once the user has imported it (the Hugging Face twins)."""
    _DEFERRED.append(loader)


def _run_deferred() -> None:
    for loader in list(_DEFERRED):
        if loader():
            _DEFERRED.remove(loader)


def registered_types(capability: str = "sectors") -> list[type]:
    """The module types whose adapter provides ``capability``, in registration order."""
    _run_deferred()
    return [t for t, adapter in _ADAPTERS.items() if getattr(adapter, capability) is not None]


def adapter_of(module: nn.Module) -> AttentionAdapter | None:
    """The adapter registered for ``type(module)`` (exact type), or None."""
    _run_deferred()
    return _ADAPTERS.get(type(module))


def attention_modules(
    model: nn.Module, capability: str = "sectors"
) -> Iterator[tuple[str, nn.Module, AttentionAdapter]]:
    """``(path, module, adapter)`` of every module of ``model`` whose adapter provides
    ``capability``, in module order, outermost only (modules inside a yielded one are skipped)."""
    if capability not in _CAPABILITIES:
        raise ValueError(f"unknown capability {capability!r}; use one of {_CAPABILITIES}")
    _run_deferred()
    taken: list[str] = []
    for path, module in model.named_modules():
        if any(done == "" or path.startswith(f"{done}.") for done in taken):
            continue
        adapter = _ADAPTERS.get(type(module))
        if adapter is not None and getattr(adapter, capability) is not None:
            taken.append(path)
            yield path, module, adapter


def no_attention_error(where: str, model: nn.Module, capability: str = "sectors") -> ValueError:
    """The one error every entry point raises on a model in which it finds no attention (issue
    26.8: ``convert``, ``audit``, ``muon_and_adamw``, ``SymmetryMonitor``,
    ``HybridOptimizer.for_parameters``): it names the model, the registered types, and the fix."""
    standard = next(attention_modules(model, "to_quotient"), None)
    if standard is not None and capability == "sectors":
        return ValueError(
            f"{where}: the attention of the model ({type(standard[1]).__name__} at "
            f"'{standard[0] or '<root>'}') has no quotient heads; convert it first: "
            "model = quotientopt.nn.convert(model)"
        )
    supported = ", ".join(t.__name__ for t in registered_types(capability)) or "none"
    return ValueError(
        f"{where}: found no attention module in the model ({type(model).__name__}; registered "
        f"attention types: {supported}). Import the module that registers yours (quotientopt.models "
        "for the reference GPT) or register its type with quotientopt.nn.register_attention; a "
        "model without attention needs no quotientopt (use torch.optim, e.g. torch.optim.Muon "
        "with AdamW)"
    )


# ------------------------------------------------------------------ helpers for adapter authors
def standard_sectors(
    path: str,
    params: tuple[torch.Tensor, ...],
    layout: Callable[[tuple[torch.Tensor, ...]], tuple],
    heads: int,
    kv_heads: int,
    head_dim: int,
) -> list[Sector]:
    """The QK and VO sectors of standard-layout weights ``params``, where
    ``layout(values) -> (w_q, w_k, w_v, in_bias or None, w_out)`` in the ``nn.Linear`` layout
    (``w_q``: (heads * head_dim, E), ``w_k``, ``w_v``: (kv_heads * head_dim, E), ``in_bias``:
    (heads + 2 kv_heads) * head_dim, ``w_out``: (E, heads * head_dim))."""

    def read(kind: str) -> Callable:
        def pair(values: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
            a_q, a_k, a_v, b_o = factors_from_weights(*layout(values), heads, kv_heads, head_dim)
            return (a_q, a_k) if kind == "QK" else (a_v, b_o)

        return pair

    return [Sector(path, kind, kv_heads, head_dim, params, read(kind)) for kind in ("QK", "VO")]


def quotient_sectors(path: str, module: QuotientMultiheadAttention) -> list[Sector]:
    """The sectors of a :class:`QuotientMultiheadAttention` (or of the one inside a wrapper,
    reported at the wrapper's ``path``) that live on a head geometry; composite and fixed-rank
    sectors have no factor pair and are left out."""
    out = []
    for kind, param, manifold in (
        ("QK", module.qk, module.qk_manifold),
        ("VO", module.vo, module.vo_manifold),
    ):
        if is_head_geometry(manifold):
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


def quotient_spec(
    module: QuotientMultiheadAttention, module_type: str | None = None, **overrides
) -> AttentionSpec:
    """The :class:`AttentionSpec` of a :class:`QuotientMultiheadAttention`; ``module_type``
    names a wrapper, ``overrides`` set other fields (e.g. ``output_norm=True``)."""
    spec = AttentionSpec(
        module_type=module_type or type(module).__name__,
        embed_dim=module.embed_dim,
        kdim=module.kdim,
        vdim=module.vdim,
        heads=module.num_heads,
        kv_heads=module.num_kv_heads,
        head_dim=module.head_dim,
        in_bias=bool(module.bias),
        out_bias=module.out_bias is not None,
        rope=bool(module.rope),
        qk_norm=bool(module.qk_norm),
        breaking=module.breaking is not None,
        qk_geometry=module.qk_geometry,
        vo_geometry=module.vo_geometry,
    )
    return replace(spec, **overrides)


def quotient_patterns(
    module: QuotientMultiheadAttention,
    causal: bool,
    batch_first: bool = True,
    scaling: float | None = None,
) -> PatternRecipe | None:
    """The :class:`PatternRecipe` of a :class:`QuotientMultiheadAttention` called with
    ``is_causal=causal``; None for composite or fixed-rank QK sectors (no factors to read)."""
    if not is_head_geometry(module.qk_manifold):
        return None
    return PatternRecipe(
        causal=causal,
        batch_first=batch_first,
        rope=bool(module.rope),
        rope_base=float(module.rope_base),
        qk_norm=bool(module.qk_norm),
        breaking=module.breaking,
        scaling=scaling,
    )


# ------------------------------------------------------------------------ built-in adapters
def _torch_mha_sectors(path: str, module: nn.MultiheadAttention) -> list[Sector]:
    e, heads = module.embed_dim, module.num_heads
    if module._qkv_same_embed_dim:
        params: tuple[torch.Tensor, ...] = (module.in_proj_weight,)

        def weights(values: tuple) -> tuple:
            return tuple(values[0].split(e))

    else:
        params = (module.q_proj_weight, module.k_proj_weight, module.v_proj_weight)

        def weights(values: tuple) -> tuple:
            return values[:3]

    has_bias = module.in_proj_bias is not None
    params = params + ((module.in_proj_bias,) if has_bias else ()) + (module.out_proj.weight,)

    def layout(values: tuple) -> tuple:
        w_q, w_k, w_v = weights(values)
        return w_q, w_k, w_v, values[-2] if has_bias else None, values[-1]

    return standard_sectors(path, params, layout, heads, heads, e // heads)


def _torch_mha_spec(module: nn.MultiheadAttention) -> AttentionSpec:
    return AttentionSpec(
        module_type=type(module).__name__,
        embed_dim=module.embed_dim,
        kdim=module.kdim,
        vdim=module.vdim,
        heads=module.num_heads,
        kv_heads=module.num_heads,
        head_dim=module.head_dim,
        in_bias=module.in_proj_bias is not None,
        out_bias=module.out_proj.bias is not None,
        bias_kv=sum(p.numel() for p in (module.bias_k, module.bias_v) if p is not None),
        zero_attn=bool(module.add_zero_attn),
    )


register_attention(
    nn.MultiheadAttention,
    sectors=_torch_mha_sectors,
    spec=_torch_mha_spec,
    patterns=lambda m: PatternRecipe(causal=False, batch_first=m.batch_first),
    to_quotient=lambda module, **options: QuotientMultiheadAttention.from_torch(module, **options),
)
register_attention(
    QuotientMultiheadAttention,
    sectors=quotient_sectors,
    spec=quotient_spec,
    patterns=lambda m: quotient_patterns(m, causal=False, batch_first=m.batch_first),
    to_standard=lambda module: module.to_torch(),
)
