"""QuotientMultiheadAttention: exact conversion both ways, the symmetry it divides out, training."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from quotientopt.manifolds import FactorQuotient
from quotientopt.nn import QuotientMultiheadAttention, convert, export
from quotientopt.optim import HybridOptimizer, QuotientSGD
from tests.helpers import matrix_with_condition, rng

CONFIGS = [
    {},
    {"bias": False},
    {"kdim": 5, "vdim": 7},
    {"batch_first": True},
    {"bias": False, "kdim": 6, "vdim": 5, "batch_first": True},
]


def make_mha(seed=0, **config):
    torch.manual_seed(seed)
    mha = nn.MultiheadAttention(8, 2, **config)
    with torch.no_grad():  # non-zero biases, so that the bias rows are exercised
        if mha.in_proj_bias is not None:
            mha.in_proj_bias.normal_()
            mha.out_proj.bias.normal_()
    return mha.eval()


def inputs(config, gen, target=4, source=6, batch=3):
    kdim, vdim = config.get("kdim", 8), config.get("vdim", 8)

    def shaped(length, dim):
        t = torch.randn(length, batch, dim, generator=gen)
        return t.transpose(0, 1) if config.get("batch_first") else t

    return shaped(target, 8), shaped(source, kdim), shaped(source, vdim)


MASKS = ["none", "float", "bool", "padding", "both", "per-head"]


def masks(kind, gen, target=4, source=6, batch=3, heads=2):
    padding = torch.zeros(batch, source, dtype=torch.bool)
    padding[0, -2:] = True
    float_mask = torch.randn(target, source, generator=gen)
    bool_mask = torch.rand(target, source, generator=gen) > 0.7
    bool_mask[:, 0] = False  # every query sees at least one key
    return {
        "none": {},
        "float": {"attn_mask": float_mask},
        "bool": {"attn_mask": bool_mask},
        "padding": {"key_padding_mask": padding},
        "both": {"attn_mask": bool_mask, "key_padding_mask": padding},
        "per-head": {"attn_mask": torch.randn(batch * heads, target, source, generator=gen)},
    }[kind]


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("need_weights", [True, False])
def test_conversion_round_trip_is_exact(config, mask_kind, need_weights):
    gen = rng(1)
    mha = make_mha(**config)
    quotient = QuotientMultiheadAttention.from_torch(mha)
    back = quotient.to_torch()
    query, key, value = inputs(config, gen)
    options = {**masks(mask_kind, gen), "need_weights": need_weights}
    expected, expected_weights = mha(query, key, value, **options)
    ours, our_weights = quotient(query, key, value, **options)
    again, _ = back(query, key, value, **options)
    assert (ours - expected).abs().max() <= 1e-5
    assert (again - expected).abs().max() <= 1e-5
    if need_weights:
        assert (our_weights - expected_weights).abs().max() <= 1e-5


def test_causal_unbatched_and_per_head_weights():
    gen = rng(2)
    mha = make_mha()
    quotient = QuotientMultiheadAttention.from_torch(mha)
    x = torch.randn(5, 8, generator=gen)  # unbatched (L, E)
    causal = nn.Transformer.generate_square_subsequent_mask(5)
    expected, w1 = mha(x, x, x, attn_mask=causal, is_causal=True, average_attn_weights=False)
    ours, w2 = quotient(x, x, x, attn_mask=causal, is_causal=True, average_attn_weights=False)
    assert (ours - expected).abs().max() <= 1e-5 and (w1 - w2).abs().max() <= 1e-5
    sdpa, _ = quotient(x, x, x, is_causal=True, need_weights=False)  # causal without a mask
    assert (sdpa - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("geometry", ["gl", "orthogonal"])
def test_other_geometries_convert_exactly(geometry):
    gen = rng(3)
    mha = make_mha()
    quotient = QuotientMultiheadAttention.from_torch(
        mha, qk_geometry=geometry, vo_geometry=geometry
    )
    x = torch.randn(4, 3, 8, generator=gen)
    assert (quotient(x, x, x)[0] - mha(x, x, x)[0]).abs().max() <= 1e-5
    assert (quotient.to_torch()(x, x, x)[0] - mha(x, x, x)[0]).abs().max() <= 1e-5


def test_fixed_rank_geometry_without_biases():
    gen = rng(4)
    mha = make_mha(bias=False)
    quotient = QuotientMultiheadAttention.from_torch(
        mha, qk_geometry="fixed-rank", vo_geometry="fixed-rank"
    )
    quotient.qk_manifold.assert_check_point_on_manifold(quotient.qk.detach(), atol=1e-4)
    x = torch.randn(4, 3, 8, generator=gen)
    assert (quotient(x, x, x)[0] - mha(x, x, x)[0]).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="no room for bias"):
        QuotientMultiheadAttention(8, 2, qk_geometry="fixed-rank")


# ----------------------------------------------------------------------------------- symmetry
def test_gl_refactorization_with_biases_leaves_the_output_unchanged():
    gen = rng(5)
    quotient = QuotientMultiheadAttention.from_torch(make_mha())
    x = torch.randn(4, 3, 8, generator=gen)
    before = quotient(x, x, x)[0]
    g_qk = matrix_with_condition((2,), 4, 4, 10.0, gen, torch.float32)
    g_vo = matrix_with_condition((2,), 4, 4, 10.0, gen, torch.float32)
    with torch.no_grad():
        quotient.qk.copy_(quotient.qk_manifold.act(quotient.qk, g_qk))
        quotient.vo.copy_(quotient.vo_manifold.act(quotient.vo, g_vo))
    assert (quotient(x, x, x)[0] - before).abs().max() <= 1e-5
    # a map outside the group (G on A without G^{-T} on B) changes the function
    a, b = quotient.qk_manifold.factors(quotient.qk.detach())
    with torch.no_grad():
        quotient.qk.copy_(torch.cat((a @ g_qk, b), dim=-2))
    assert (quotient(x, x, x)[0] - before).abs().max() > 1e-3


# ------------------------------------------------------------------------------ model-level
class Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(3, 16)
        layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.cross = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 1)

    def forward(self, x):
        h = self.encoder(self.embed(x))
        h, _ = self.cross(h, h, h, need_weights=False)
        return self.head(h.mean(1)).squeeze(-1)


def test_convert_and_export_a_whole_model():
    gen = rng(6)
    torch.manual_seed(0)
    model = Classifier().eval()
    x = torch.randn(5, 7, 3, generator=gen)
    expected = model(x)
    convert(model)
    kinds = [type(m) for m in model.modules()]
    assert nn.MultiheadAttention not in kinds and kinds.count(QuotientMultiheadAttention) == 3
    assert (model(x) - expected).abs().max() <= 1e-5
    export(model)
    assert QuotientMultiheadAttention not in [type(m) for m in model.modules()]
    assert (model(x) - expected).abs().max() <= 1e-5


def test_converted_model_trains_with_quotient_sgd():
    gen = rng(7)
    torch.manual_seed(0)
    model = convert(Classifier()).train()
    x = torch.randn(32, 7, 3, generator=gen)
    y = x.sum((1, 2)).tanh()
    optimizer = HybridOptimizer.for_parameters(
        model.parameters(),
        heads=lambda ps: QuotientSGD(ps, lr=0.05, momentum=0.9),
        rest=lambda ps: torch.optim.AdamW(ps, lr=3e-3),
    )
    losses = []
    for _ in range(60):
        optimizer.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]
    assert all(
        isinstance(m.qk_manifold, FactorQuotient)
        for m in model.modules()
        if isinstance(m, QuotientMultiheadAttention)
    )


# ---------------------------------------------------------------------------------- bad input
def test_bad_construction_and_inputs():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        QuotientMultiheadAttention(10, 3)
    with pytest.raises(ValueError, match="add_bias_kv"):
        QuotientMultiheadAttention(8, 2, add_bias_kv=True)
    with pytest.raises(ValueError, match="fewer than the head dimension 4"):
        QuotientMultiheadAttention(8, 2, vdim=3, bias=False)
    module = QuotientMultiheadAttention(8, 2)
    x = torch.randn(4, 3, 8)
    with pytest.raises(ValueError, match="attn_mask has shape"):
        module(x, x, x, attn_mask=torch.zeros(3, 3))
    with pytest.raises(ValueError, match="key_padding_mask has shape"):
        module(x, x, x, key_padding_mask=torch.zeros(4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="expected last dimension 8"):
        module(torch.randn(4, 3, 6), x, x)


def test_convert_names_the_module_and_never_half_converts():
    model = nn.Sequential()
    model.add_module("good", nn.MultiheadAttention(8, 2))
    model.add_module("bad", nn.MultiheadAttention(8, 2, add_bias_kv=True))
    with pytest.raises(ValueError, match="'bad'"):
        convert(model)
    assert type(model.good) is nn.MultiheadAttention  # untouched


@pytest.mark.parametrize(
    ("qk", "vo"), [("composite", "gl"), ("gl", "composite"), ("composite", "composite")]
)
def test_composite_sectors_convert_exactly_and_train_at_fixed_rank(qk, vo):
    """Paper 002's invariant reparameterization: W_QK / W_VO trained directly, rank kept by a
    truncated-SVD projection after each step."""
    gen = rng(8)
    mha = make_mha(kdim=6, vdim=5)
    quotient = QuotientMultiheadAttention.from_torch(mha, qk_geometry=qk, vo_geometry=vo)
    query, key, value = inputs({"kdim": 6, "vdim": 5}, gen)
    assert (quotient(query, key, value)[0] - mha(query, key, value)[0]).abs().max() <= 1e-5
    assert (
        quotient.to_torch()(query, key, value)[0] - mha(query, key, value)[0]
    ).abs().max() <= 1e-5
    target = torch.randn(4, 3, 8, generator=gen)
    optimizer = QuotientSGD(quotient.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(40):
        optimizer.zero_grad()
        loss = ((quotient(query, key, value, need_weights=False)[0] - target) ** 2).mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    for name in ("qk", "vo"):
        manifold = getattr(quotient, f"{name}_manifold")
        manifold.assert_check_point_on_manifold(getattr(quotient, name).detach(), atol=1e-4)
