"""Exact O(d) symmetry of :mod:`quotientopt.nn.relational`: equivariant and invariant relational
attention, and the SVD dressing with its ambiguity report."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quotientopt.nn.relational import Dressing, RelationalAttention, SVDDressing, svd_dressing
from tests.helpers import orthogonal, relative_error, rng

SETTINGS = settings(max_examples=20, deadline=None)
TOL = 1e-5


@st.composite
def attention_cases(draw):
    """(batch, T, d, heads, mask kind, seed)."""
    batch = draw(st.sampled_from([(), (2,), (2, 3)]))
    t = draw(st.integers(1, 7))
    d = draw(st.integers(1, 9))
    heads = draw(st.integers(1, 4))
    mask = draw(st.sampled_from(["none", "causal", "bool", "bool+causal", "float"]))
    seed = draw(st.integers(0, 2**31 - 1))
    return batch, t, d, heads, mask, seed


def _mask_args(kind: str, batch, heads: int, t: int, gen: torch.Generator) -> dict:
    if kind == "none":
        return {}
    if kind == "causal":
        return {"is_causal": True}
    if kind == "float":
        return {"attn_mask": torch.randn(t, t, generator=gen)}
    # a random boolean mask per batch entry and head; the diagonal is kept open half the time
    mask = torch.rand(*batch, heads, t, t, generator=gen) < 0.4
    return {"attn_mask": mask, "is_causal": kind == "bool+causal"}


def _setup(case, variant: str):
    batch, t, d, heads, kind, seed = case
    gen = rng(seed)
    torch.manual_seed(seed)
    module = RelationalAttention(heads, d, hidden=8, variant=variant)
    x = torch.randn(*batch, t, d, generator=gen)
    r = orthogonal((), d, gen, dtype=torch.float32)
    return module, x, r, _mask_args(kind, batch, heads, t, gen)


@SETTINGS
@given(attention_cases())
def test_equivariant_variant_transports_tokens(case):
    module, x, r, kw = _setup(case, "equivariant")
    with torch.no_grad():
        y = module(x, **kw)
        y_rot = module(x @ r, **kw)
    assert y.shape == x.shape
    assert torch.isfinite(y).all()
    assert (y_rot - y @ r).abs().max() <= TOL


@SETTINGS
@given(attention_cases())
def test_invariant_variant_is_invariant(case):
    module, x, r, kw = _setup(case, "invariant")
    with torch.no_grad():
        g = module(x, **kw)
        g_rot = module(x @ r, **kw)
        from_gram = module.forward_gram(x @ x.mT, **kw)
    assert g.shape == (*x.shape[:-1], x.shape[-2])
    scale = g.abs().max().clamp_min(1.0)  # G' grows like d: compare relative to its size
    assert (g_rot - g).abs().max() <= TOL * scale
    assert (from_gram - g).abs().max() <= TOL * scale
    assert (g - g.mT).abs().max() <= TOL * scale  # a Gram matrix


def test_equivariant_and_invariant_variants_agree():
    """With the same parameters, G' of the invariant variant is Y Y^T of the equivariant one."""
    torch.manual_seed(0)
    eq = RelationalAttention(3, 6, variant="equivariant")
    inv = RelationalAttention(3, 6, variant="invariant")
    inv.load_state_dict(eq.state_dict())
    x = torch.randn(2, 5, 6)
    with torch.no_grad():
        y = eq(x, is_causal=True)
        assert relative_error(inv(x, is_causal=True), y @ y.mT) <= TOL


def test_masks_are_respected():
    torch.manual_seed(0)
    module = RelationalAttention(2, 4)
    x = torch.randn(3, 5, 4)
    p = module.attention_from_gram(x @ x.mT, attn_mask=None, is_causal=True)
    assert p.shape == (3, 2, 5, 5)
    assert (p.triu(1) == 0).all()
    torch.testing.assert_close(p.sum(-1), torch.ones(3, 2, 5))
    # boolean mask, True = masked; a fully masked row attends to nothing (zero, not NaN)
    mask = torch.zeros(3, 1, 5, 5, dtype=torch.bool)
    mask[..., 1:, 2] = True
    mask[1, :, 0, :] = True
    p = module.attention_from_gram(x @ x.mT, attn_mask=mask)
    assert (p[..., 1:, 2] == 0).all()
    assert (p[1, :, 0] == 0).all()
    assert torch.isfinite(module(x, attn_mask=mask)).all()
    # an additive float mask of -inf equals the boolean mask
    additive = torch.zeros(5, 5).masked_fill(torch.eye(5, dtype=torch.bool), float("-inf"))
    boolean = torch.eye(5, dtype=torch.bool)
    torch.testing.assert_close(module(x, attn_mask=additive), module(x, attn_mask=boolean))


def test_multihead_attention_is_not_equivariant():
    """Contrast: ordinary attention reads coordinates, so rotating the tokens changes it."""
    gen = rng(1)
    torch.manual_seed(1)
    d = 8
    mha = torch.nn.MultiheadAttention(d, 2, batch_first=True)
    x = torch.randn(2, 6, d, generator=gen)
    r = orthogonal((), d, gen, dtype=torch.float32)
    with torch.no_grad():
        y, _ = mha(x, x, x, need_weights=False)
        y_rot, _ = mha(x @ r, x @ r, x @ r, need_weights=False)
    assert (y_rot - y @ r).abs().max() > 1e-3  # not equivariant
    assert (y_rot @ y_rot.mT - y @ y.mT).abs().max() > 1e-3  # Gram of the output not invariant


@pytest.mark.parametrize("variant", ["equivariant", "invariant"])
def test_gradients_flow(variant):
    torch.manual_seed(0)
    module = RelationalAttention(3, 5, variant=variant)
    x = torch.randn(2, 4, 5, requires_grad=True)
    mask = torch.rand(2, 1, 4, 4) < 0.3
    module(x, attn_mask=mask, is_causal=True).square().sum().backward()
    for name, param in [*module.named_parameters(), ("x", x)]:
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
    assert module.w1.grad.abs().sum() > 0
    assert module.log_temperature.grad.abs().sum() > 0


def test_temperature_is_positive_and_d_is_optional():
    module = RelationalAttention(2, temperature=0.5)
    torch.testing.assert_close(module.temperature, torch.full((2,), 0.5))
    assert module(torch.randn(3, 7)).shape == (3, 7)  # unbatched, d read from the input
    assert module(torch.randn(2, 3, 4)).shape == (2, 3, 4)


def test_attention_bad_inputs_raise():
    module = RelationalAttention(2, 4)
    with pytest.raises(ValueError, match="last dim 5"):
        module(torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="does not broadcast"):
        module(torch.randn(2, 3, 4), attn_mask=torch.zeros(4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="does not broadcast"):
        module(torch.randn(2, 3, 4), attn_mask=torch.zeros(3, 1, 3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool"):
        module(torch.randn(2, 3, 4), attn_mask=torch.zeros(3, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="shape"):
        module(torch.randn(4))
    with pytest.raises(ValueError, match="floating"):
        module(torch.ones(2, 3, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="dim"):
        RelationalAttention(2).forward_gram(torch.eye(3))
    with pytest.raises(ValueError, match="variant"):
        RelationalAttention(2, 4, variant="rotational")
    with pytest.raises(ValueError, match="heads"):
        RelationalAttention(0, 4)
    with pytest.raises(ValueError, match="temperature"):
        RelationalAttention(2, 4, temperature=0.0)


# ------------------------------------------------------------------------------- SVD dressing
def _separated(batch, t: int, d: int, gen: torch.Generator, dtype) -> torch.Tensor:
    """A random T x d matrix with well-separated singular values 1, 2, ..., r (r = min(T, d))."""
    r = min(t, d)
    u, _ = torch.linalg.qr(torch.randn(*batch, t, r, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(*batch, d, r, generator=gen, dtype=torch.float64))
    s = torch.arange(r, 0, -1, dtype=torch.float64)
    return ((u * s) @ v.mT).to(dtype)


@st.composite
def dressing_cases(draw):
    batch = draw(st.sampled_from([(), (3,), (2, 2)]))
    t = draw(st.integers(1, 7))
    d = draw(st.integers(1, 7))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    seed = draw(st.integers(0, 2**31 - 1))
    return batch, t, d, dtype, seed


@SETTINGS
@given(dressing_cases())
def test_dressing_is_invariant_and_idempotent(case):
    batch, t, d, dtype, seed = case
    gen = rng(seed)
    x = _separated(batch, t, d, gen, dtype)
    rot = orthogonal((), d, gen, dtype=dtype)
    a, b = svd_dressing(x), svd_dressing(x @ rot)
    r = min(t, d)
    assert a.dressed.shape == (*batch, t, r)
    assert a.singular_values.shape == (*batch, r)
    tol = TOL if dtype == torch.float32 else 1e-12
    if a.ambiguous.any():  # only a sign tie can flag this input; it must be reported as such
        assert (a.sign_ties > 0).any() and (a.degenerate_pairs == 0).all()
        return
    assert not a.ambiguous.any() and a.reason.startswith("not ambiguous")
    assert relative_error(b.dressed, a.dressed) <= tol
    assert relative_error(x @ a.frame, a.dressed) <= tol
    assert relative_error(a.dressed @ a.frame.mT, x) <= tol
    again = svd_dressing(a.dressed)
    assert relative_error(again.dressed, a.dressed) <= tol
    # sign convention: the largest-|.| entry of every column is positive
    pivot = a.dressed.abs().argmax(-2, keepdim=True)
    assert (torch.gather(a.dressed, -2, pivot) > 0).all()


def test_degenerate_singular_values_are_reported():
    gen = rng(3)
    u, _ = torch.linalg.qr(torch.randn(6, 4, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(4, 4, generator=gen, dtype=torch.float64))
    x = torch.stack(
        [
            (u * torch.tensor([3.0, 2.0, 2.0, 1.0], dtype=torch.float64)) @ v.mT,  # one pair
            (u * torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64)) @ v.mT,  # simple
            (u * torch.tensor([2.0, 2.0, 2.0, 0.0], dtype=torch.float64)) @ v.mT,  # triple + zero
        ]
    ).float()
    out = SVDDressing()(x)
    assert isinstance(out, Dressing)
    assert out.ambiguous.tolist() == [True, False, True]
    assert out.degenerate_pairs.tolist() == [1, 0, 2]
    assert out.zero_singular_values.tolist() == [0, 0, 1]
    assert "entry (0,): 1 degenerate pair" in out.reason
    assert "entry (2,): 2 degenerate pair" in out.reason and "1 zero singular" in out.reason
    assert "entry (1,)" not in out.reason
    with pytest.raises(ValueError, match="degenerate pair"):
        SVDDressing(strict=True)(x)
    SVDDressing(strict=True)(x[1])  # a simple spectrum passes


def test_rank_deficient_input_is_reported():
    gen = rng(4)
    x = torch.randn(7, 2, generator=gen) @ torch.randn(2, 5, generator=gen)  # T = 7 > rank 2
    out = svd_dressing(x)
    assert bool(out.ambiguous) and int(out.zero_singular_values) == 3
    assert int(out.degenerate_pairs) == 0
    assert out.reason.startswith("1 of 1") and "3 zero singular value(s)" in out.reason
    zero = svd_dressing(torch.zeros(3, 4))
    assert bool(zero.ambiguous) and int(zero.zero_singular_values) == 3


def test_dressing_bad_inputs_raise():
    with pytest.raises(ValueError, match="shape"):
        svd_dressing(torch.randn(4))
    with pytest.raises(ValueError, match="shape"):
        svd_dressing(torch.randn(0, 4))
    with pytest.raises(ValueError, match="floating"):
        svd_dressing(torch.ones(3, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="NaN"):
        svd_dressing(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="rtol"):
        svd_dressing(torch.randn(3, 3), rtol=-1.0)
    with pytest.raises(ValueError, match="rtol"):
        SVDDressing(rtol=float("inf"))
