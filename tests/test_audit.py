"""The symmetry audit's counts against the numerical rank of each module's Jacobian.

For one small attention module of each kind (float64), the Jacobian of its outputs on a fixed
random batch with respect to all its parameters (restricted to the tangent space of a constrained
parameter manifold) has rank ``dimension - redundant``; the audit, which reads shapes only, must
give that ``redundant``.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

import quotientopt.nn.attention as attention_module
from quotientopt.manifolds import FixedRank
from quotientopt.manifolds.projected_rank import ProjectedRank
from quotientopt.models import GPT, GPTConfig
from quotientopt.models.gpt import CausalSelfAttention, QuotientCausalSelfAttention
from quotientopt.nn import QuotientMultiheadAttention
from quotientopt.symmetry.audit import audit

# torch.func has no batching rule for the CPU flash-attention backward and falls back to a loop
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")

BATCH, LENGTH = 8, 7  # outputs: 8 x 7 x 8 = 448 > every module's function-space dimension
RTOL = 1e-9


def _tangent_basis(param: torch.Tensor) -> torch.Tensor:
    """Columns spanning the tangent space of ``param``'s manifold inside its stored tensor (the
    identity for unconstrained parameters and for the factored quotients, whose points are the
    unconstrained factor pairs)."""
    n = param.numel()
    eye = torch.eye(n, dtype=param.dtype)
    manifold = getattr(param, "manifold", None)
    x = param.detach()
    if isinstance(manifold, ProjectedRank):
        cols = [manifold.proju(x, eye[i].reshape(x.shape)).reshape(-1) for i in range(n)]
    elif isinstance(manifold, FixedRank):  # total space St x SPD x St (not the horizontal part)
        u, _, v = manifold.factors(x)
        cols = []
        for i in range(n):
            gu, gs, gv = manifold.factors(eye[i].reshape(x.shape))
            tangent = manifold.from_factors(
                manifold.stiefel.proju(u, gu),
                (gs + gs.mT) / 2,
                manifold.stiefel.proju(v, gv),
            )
            cols.append(tangent.reshape(-1))
    else:
        return eye
    basis = torch.stack(cols, dim=1)
    u, s, _ = torch.linalg.svd(basis, full_matrices=False)
    return u[:, s > 1e-9 * s[0]]


def numerical_redundancy(
    module: nn.Module, run, label: str = "", singular_values=None, root=None, prefix=""
) -> int:
    """``dimension - rank(J)`` of ``run(call)``'s outputs over all ``module`` parameters, where
    ``call`` runs ``root`` (default: ``module``, at ``prefix`` inside ``root``) with them
    (``singular_values``: a list that receives the relative singular values, and then the rank
    gap is not asserted)."""
    names, params = zip(*module.named_parameters(), strict=True)
    shapes = [p.shape for p in params]
    sizes = [p.numel() for p in params]
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    bases = [_tangent_basis(p) for p in params]
    dimension = sum(b.shape[1] for b in bases)
    root = module if root is None else root

    def outputs(vector: torch.Tensor) -> torch.Tensor:
        chunks = vector.split(sizes)
        state = {prefix + n: c.reshape(s) for n, c, s in zip(names, chunks, shapes, strict=True)}
        return run(lambda *a, **kw: functional_call(root, state, a, kw, strict=False))

    jac = jacrev(outputs)(flat).reshape(-1, flat.numel())
    jac = torch.cat([j @ b for j, b in zip(jac.split(sizes, dim=1), bases, strict=True)], dim=1)
    s = torch.linalg.svdvals(jac.detach())
    rank = int((s > RTOL * s[0]).sum())
    above = s[rank - 1] / s[0]
    below = s[rank] / s[0] if rank < len(s) else torch.tensor(0.0)
    print(f"{label}: rank {rank} of {dimension}; gap {float(above):.1e} | {float(below):.1e}")
    if singular_values is not None:
        singular_values.extend((s / s[0]).tolist())
        return dimension - rank
    assert below < 1e-12 and above > 1e-7, f"{label}: ambiguous rank ({above:.1e} vs {below:.1e})"
    return dimension - rank


def _inputs(e: int, kdim: int, vdim: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return tuple(
        torch.randn(BATCH, LENGTH, d, generator=g, dtype=torch.float64) for d in (e, kdim, vdim)
    )


def _randomize(module: nn.Module, seed: int = 1) -> nn.Module:
    """Generic weights (nonzero biases) on the module's own manifolds, float64."""
    module = module.double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            manifold = getattr(p, "manifold", None)
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5
            if isinstance(manifold, FixedRank):  # orthonormal U, V and a well-conditioned SPD S
                u, _, v = manifold.factors(noise)
                k = p.shape[-1]
                root = torch.randn(*p.shape[:-2], k, k, generator=g, dtype=p.dtype)
                s = root @ root.mT / k + torch.eye(k, dtype=p.dtype)
                p.copy_(manifold.from_factors(torch.linalg.qr(u)[0], s, torch.linalg.qr(v)[0]))
            elif isinstance(manifold, ProjectedRank):
                p.copy_(manifold.projx(p + 0.3 * noise))
            else:
                p.copy_(noise)
    return module


def _mha_run(module, e, kdim, vdim, causal=False, self_attention=False):
    q, k, v = _inputs(e, kdim, vdim)
    if self_attention:
        k = v = q
    mask = torch.ones(LENGTH, LENGTH, dtype=torch.bool).triu(1) if causal else None

    def run(call):
        out, _ = call(q, k, v, need_weights=False, attn_mask=mask)
        return out

    return run


def _check(module, run, label):
    report = audit(module)
    numeric = numerical_redundancy(module, run, label)
    assert report.redundant == numeric, f"{label}: audit {report.redundant}, Jacobian {numeric}"
    assert report.attention_parameters == sum(p.numel() for p in module.parameters())
    return report


def _no_eps_rms(monkeypatch):
    """QK-norm's scalings are flat only as eps -> 0 (to eps / |q|^2 otherwise)."""

    def rms(x, eps=0.0):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True))

    monkeypatch.setattr(attention_module, "rms_normalize", rms)


# ------------------------------------------------------------------- torch.nn.MultiheadAttention
TORCH_CASES = {
    "no-bias": {"bias": False},
    "bias": {"bias": True},
    "bias-kdim-vdim": {"bias": True, "kdim": 6, "vdim": 5},
    "bias-small-vdim": {"bias": True, "vdim": 3},  # vdim < head_dim: rank-deficient VO products
    "add-bias-kv": {"bias": True, "add_bias_kv": True},
    "add-zero-attn": {"bias": True, "add_zero_attn": True},
}


@pytest.mark.parametrize("case", list(TORCH_CASES))
def test_torch_multihead_attention(case):
    options = TORCH_CASES[case]
    torch.manual_seed(0)
    module = _randomize(nn.MultiheadAttention(8, 2, batch_first=True, **options))
    kdim, vdim = options.get("kdim", 8), options.get("vdim", 8)
    _check(module, _mha_run(module, 8, kdim, vdim), f"torch {case}")


def test_torch_multihead_attention_counts_by_hand():
    k, h = 4, 2
    rows = {r.sector: r for r in audit(nn.MultiheadAttention(8, h, bias=True)).rows}
    assert rows["QK"].redundant == rows["VO"].redundant == h * k * k
    assert rows["biases"].redundant == 2 * h * k  # key bias and value bias
    no_bias = audit(nn.MultiheadAttention(8, h, bias=False))
    assert no_bias.redundant == 2 * h * k * k
    assert no_bias.head_permutations[""] == 2


# ----------------------------------------------------------------- QuotientMultiheadAttention
QUOTIENT_CASES = {
    "plain": {},
    "plain-no-bias": {"bias": False},
    "self-attention-causal": {},
    "rope": {"rope": True, "rope_base": 3.0},
    "rope-no-bias": {"rope": True, "rope_base": 3.0, "bias": False},
    "qk-norm": {"qk_norm": True},
    "qk-norm-no-bias": {"qk_norm": True, "bias": False},
    "rope-qk-norm": {"rope": True, "qk_norm": True, "rope_base": 3.0},
    "gqa-1": {"num_heads": 4, "num_kv_heads": 1},
    "gqa-2": {"num_heads": 4, "num_kv_heads": 2},
    "gqa-2-qk-norm": {"num_heads": 4, "num_kv_heads": 2, "qk_norm": True},
    "gqa-2-rope-qk-norm": {
        "num_heads": 4,
        "num_kv_heads": 2,
        "qk_norm": True,
        "rope": True,
        "rope_base": 3.0,
    },
    "kdim-vdim": {"kdim": 6, "vdim": 5},
    "composite-qk": {"qk_geometry": "composite"},
    "composite-vo": {"vo_geometry": "composite"},
    "composite-both-no-bias": {
        "qk_geometry": "composite",
        "vo_geometry": "composite",
        "bias": False,
    },
    "fixed-rank": {"qk_geometry": "fixed-rank", "vo_geometry": "fixed-rank", "bias": False},
    "orthogonal": {"qk_geometry": "orthogonal", "vo_geometry": "orthogonal"},
    "breaking": {"symmetry_breaking": True},
    "breaking-no-bias": {"symmetry_breaking": True, "bias": False},
    "breaking-qk-norm": {"symmetry_breaking": True, "qk_norm": True},
    "breaking-rope": {"symmetry_breaking": True, "rope": True, "rope_base": 3.0},
}


@pytest.mark.parametrize("case", list(QUOTIENT_CASES))
def test_quotient_multihead_attention(case, monkeypatch):
    options = dict(QUOTIENT_CASES[case])
    heads = options.pop("num_heads", 2)
    if options.get("qk_norm"):
        _no_eps_rms(monkeypatch)
    torch.manual_seed(0)
    module = _randomize(QuotientMultiheadAttention(8, heads, batch_first=True, **options))
    module.eval()  # paper 003's biases at their means
    kdim, vdim = options.get("kdim", 8), options.get("vdim", 8)
    causal = case == "self-attention-causal"
    run = _mha_run(module, 8, kdim, vdim, causal=causal, self_attention=causal)
    _check(module, run, f"quotient {case}")


def test_quotient_counts_by_hand():
    k = 4
    by = {}
    for name, options in {
        "rope": {"rope": True},
        "qk_norm": {"qk_norm": True},
        "both": {"rope": True, "qk_norm": True},
    }.items():
        by[name] = {r.sector: r for r in audit(QuotientMultiheadAttention(8, 2, **options)).rows}
    assert by["rope"]["QK"].per_head == k and by["rope"]["VO"].per_head == k * k
    assert by["qk_norm"]["QK"].per_head == k * (k - 1) // 2 + 2
    assert by["qk_norm"]["QK"].group == "R>0 x O(k) + joint scale"
    assert by["both"]["QK"].per_head == k // 2 + 2
    for rows in by.values():  # the key bias is not redundant with RoPE or QK-norm
        assert rows["biases"].redundant == 2 * k  # the value bias is, in both heads
    gqa = audit(QuotientMultiheadAttention(8, 4, num_kv_heads=2))
    assert gqa.head_permutations[""] == 2 * 2**2
    assert {r.sector: r.redundant for r in gqa.rows} == {"QK": 8, "VO": 8, "biases": 8}


def test_qk_norm_scalings_are_exactly_flat():
    """With the real eps = 1e-6 the normalization ``x / max(rms, eps)`` is exactly
    scale-invariant, so the two scalings per head are flat directions of the Jacobian and the
    numerical count equals the audit's (issue 26.4; with ``+ eps`` under the square root they were
    only flat to eps / |q|^2)."""
    torch.manual_seed(0)
    module = _randomize(QuotientMultiheadAttention(8, 2, batch_first=True, qk_norm=True))
    run = _mha_run(module, 8, 8, 8)
    assert numerical_redundancy(module, run, "qk-norm eps=1e-6") == audit(module).redundant


# ------------------------------------------------------------------ reference GPT attention
GPT_CASES = {
    "standard-bias": {},
    "standard-no-bias": {"bias": False},
    "standard-gqa": {"n_head": 4, "n_kv_head": 2},
}


@pytest.mark.parametrize("case", list(GPT_CASES))
def test_gpt_attention_modules(case):
    options = {"n_layer": 1, "n_head": 2, "n_embd": 8, "block_size": 16, **GPT_CASES[case]}
    config = GPTConfig(**options)
    torch.manual_seed(0)
    standard = _randomize(CausalSelfAttention(config))
    x, _, _ = _inputs(8, 8, 8)
    counted = _check(standard, lambda call: call(x), f"gpt {case}")
    quotient = QuotientCausalSelfAttention.from_standard(standard)
    numeric = numerical_redundancy(quotient, lambda call: call(x), f"gpt quotient {case}")
    assert audit(quotient).redundant == numeric == counted.redundant


@pytest.mark.parametrize("options", [{}, {"rope": True, "qk_norm": True, "n_kv_head": 1}])
def test_gpt_audit_totals(options):
    config = {"n_layer": 2, "n_head": 4, "n_embd": 16, "block_size": 8, **options}
    torch.manual_seed(0)
    quotient = GPT(GPTConfig(**config))
    standard = GPT(GPTConfig(**config, quotient=False))
    reports = [audit(quotient), audit(standard)]
    for model, report in zip((quotient, standard), reports, strict=True):
        assert report.total_parameters == sum(p.numel() for p in model.parameters())
        assert report.module_paths() == ["h.0.attn", "h.1.attn"]
        attention = sum(p.numel() for block in model.h for p in block.attn.parameters())
        assert report.attention_parameters == attention
        assert report.redundant == sum(row.redundant for row in report.rows)
        assert report.function_space_dim == report.total_parameters - report.redundant
        single = audit(model.h[0].attn)
        assert single.redundant == report.module_redundant("h.0.attn")
        assert report.redundant == 2 * single.redundant
        data = report.to_dict()
        assert data["redundant"] == report.redundant and len(data["rows"]) == len(report.rows)
        assert "| h.1.attn |" in report.to_markdown()
    strip = [[(r.sector, r.redundant, r.parameters) for r in rep.rows] for rep in reports]
    assert strip[0] == strip[1]
    h = config["n_head"]
    kv = options.get("n_kv_head", h)
    expected = kv and math.factorial(kv) * math.factorial(h // kv) ** kv
    assert reports[0].head_permutations["h.0.attn"] == expected


@pytest.mark.parametrize("bias", [True, False])
def test_gpt_context_adds_layernorm_symmetries(bias):
    """Inside the pre-LayerNorm GPT, one layer's attention parameters have 4 k more flat
    directions per head than the module alone (plus 1 with an output bias): ln_1 confines the
    inputs to a hyperplane, so W_Q, W_K, W_V along its normal duplicate b_Q, b_K, b_V (or are dead
    without biases), and every later LayerNorm hides W_O and b_O along the all-ones vector. The
    audit counts the module alone; its model total is an upper bound."""
    config = GPTConfig(n_layer=1, n_head=2, n_embd=8, vocab_size=16, block_size=8, bias=bias)
    torch.manual_seed(0)
    model = _randomize(GPT(config))
    idx = torch.randint(0, 16, (BATCH, LENGTH), generator=torch.Generator().manual_seed(3))
    attn = model.h[0].attn
    numeric = numerical_redundancy(
        attn, lambda call: call(idx)[0], "gpt context", root=model, prefix="h.0.attn."
    )
    k, heads = 4, 2
    assert numeric == audit(attn).redundant + 4 * k * heads + (1 if bias else 0)


def test_huge_head_permutation_order_is_a_string():
    report = audit(nn.MultiheadAttention(64, 64))
    assert isinstance(report.head_permutations[""], str)
    assert report.head_permutations[""].startswith("64! ~ 1.26")


# --------------------------------------------------------------------------- Hugging Face
def _hf_cases():
    transformers = pytest.importorskip("transformers")
    from transformers.models.bert.modeling_bert import BertAttention
    from transformers.models.gpt2.modeling_gpt2 import GPT2Attention

    gpt2 = transformers.GPT2Config(
        n_embd=8, n_head=2, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0
    )
    bert = transformers.BertConfig(
        hidden_size=8,
        num_attention_heads=2,
        attention_probs_dropout_prob=0.0,
        hidden_dropout_prob=0.0,
    )
    gpt2._attn_implementation = bert._attn_implementation = "eager"
    return GPT2Attention(gpt2, layer_idx=0), BertAttention(bert)


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_huggingface_attention(kind):
    from quotientopt.nn.huggingface import QuotientBertAttention, QuotientGPT2Attention

    torch.manual_seed(0)
    gpt2, bert = _hf_cases()
    module = _randomize(gpt2 if kind == "gpt2" else bert)
    x, _, _ = _inputs(8, 8, 8)

    def run(call):
        return call(x)[0]

    counted = _check_hf(module, run, f"hf {kind}")
    twin_type = QuotientGPT2Attention if kind == "gpt2" else QuotientBertAttention
    twin = twin_type.from_standard(module)
    numeric = numerical_redundancy(twin, run, f"hf quotient {kind}")
    assert audit(twin).redundant == numeric == counted


def _check_hf(module, run, label):
    report = audit(module)
    numeric = numerical_redundancy(module, run, label)
    assert report.redundant == numeric, f"{label}: audit {report.redundant}, Jacobian {numeric}"
    return numeric
