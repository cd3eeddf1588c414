"""The reference GPT: exact conversion, training, and the groups its attention declares."""

from __future__ import annotations

import pytest
import torch

from quotientopt.manifolds import FactorQuotient
from quotientopt.models import GPT, GPTConfig, QuotientCausalSelfAttention
from quotientopt.nn import convert, export
from quotientopt.nn.groups import qk_group_generators
from quotientopt.optim import QuotientSGD
from tests.helpers import rng

SMALL = {"n_layer": 2, "n_embd": 32, "n_head": 4, "block_size": 16, "vocab_size": 32}
VARIANTS = [
    {},
    {"rope": True},
    {"qk_norm": True},
    {"rope": True, "qk_norm": True},
    {"bias": False},
    {"n_kv_head": 2},
    {"n_kv_head": 1, "rope": True},
]


def pair(seed=0, **variant):
    torch.manual_seed(seed)
    standard = GPT(GPTConfig(quotient=False, **SMALL, **variant)).eval()
    torch.manual_seed(seed)
    quotient = GPT(GPTConfig(quotient=True, **SMALL, **variant)).eval()
    return standard, quotient


def tokens(seed=1, batch=3, length=16):
    return torch.randint(0, SMALL["vocab_size"], (batch, length), generator=rng(seed))


@pytest.mark.parametrize("variant", VARIANTS)
def test_quotient_gpt_computes_the_standard_function_both_ways(variant):
    standard, quotient = pair(**variant)
    idx = tokens()
    expected, _ = standard(idx)
    assert (quotient(idx)[0] - expected).abs().max() <= 1e-5
    export(quotient)
    assert not any(isinstance(m, QuotientCausalSelfAttention) for m in quotient.modules())
    assert (quotient(idx)[0] - expected).abs().max() <= 1e-5
    convert(quotient)
    assert (
        sum(isinstance(m, QuotientCausalSelfAttention) for m in quotient.modules())
        == SMALL["n_layer"]
    )
    assert (quotient(idx)[0] - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("name", ["QuotientSGD", "AdamW"])
def test_overfits_a_tiny_batch(name):
    torch.manual_seed(0)
    model = GPT(GPTConfig(quotient=name == "QuotientSGD", **SMALL))
    optimizer = (
        QuotientSGD(model.parameters(), lr=0.1, momentum=0.9)
        if name == "QuotientSGD"
        else torch.optim.AdamW(model.parameters(), lr=1e-2)
    )
    idx = tokens(seed=2, batch=4, length=17)
    first = None
    for _ in range(200):
        optimizer.zero_grad()
        _, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        optimizer.step()
        first = first or loss.item()
    assert first > 3.0 and loss.item() < 0.05


# ----------------------------------------------------------------------- the declared groups
def random_group_element(generators: torch.Tensor, heads: int, gen, scale=0.5) -> torch.Tensor:
    """exp of a random element of the Lie algebra spanned by ``generators``, one per head."""
    coefficients = scale * torch.randn(
        heads, generators.shape[0], generator=gen, dtype=torch.float64
    )
    return torch.linalg.matrix_exp(torch.einsum("hr,rij->hij", coefficients, generators))


def act_on_layers(model, sector: str, elements) -> None:
    with torch.no_grad():
        for block in model.h:
            attention = block.attn.attn
            point = getattr(attention, sector)
            manifold = attention.qk_manifold if sector == "qk" else attention.vo_manifold
            point.copy_(FactorQuotient.act(manifold, point.double(), elements).float())


@pytest.mark.parametrize("variant", VARIANTS[:4])
def test_declared_qk_group_is_a_symmetry_and_gl_is_not(variant):
    gen = rng(3)
    _, model = pair(**variant)
    idx = tokens()
    expected, _ = model(idx)
    k = SMALL["n_embd"] // SMALL["n_head"]
    if variant:
        generators = qk_group_generators(
            k, rope=variant.get("rope", False), qk_norm=variant.get("qk_norm", False)
        )
    else:
        generators = torch.eye(k * k, dtype=torch.float64).reshape(k * k, k, k)  # all of gl(k)
    act_on_layers(model, "qk", random_group_element(generators, SMALL["n_head"], gen))
    assert (model(idx)[0] - expected).abs().max() <= 1e-4
    if variant:  # a generic GL(k) element is not a symmetry of this architecture
        full = torch.eye(k * k, dtype=torch.float64).reshape(k * k, k, k)
        act_on_layers(model, "qk", random_group_element(full, SMALL["n_head"], gen))
        assert (model(idx)[0] - expected).abs().max() > 1e-3


def test_vo_sector_keeps_all_of_gl_unless_paper_003_breaks_it():
    gen = rng(4)
    k = SMALL["n_embd"] // SMALL["n_head"]
    full = torch.eye(k * k, dtype=torch.float64).reshape(k * k, k, k)
    element = random_group_element(full, SMALL["n_head"], gen)
    _, model = pair(rope=True)
    idx = tokens()
    expected, _ = model(idx)
    act_on_layers(model, "vo", element)
    assert (model(idx)[0] - expected).abs().max() <= 1e-4
    _, broken = pair(symmetry_breaking=True)  # eval mode: the biases sit at their means
    expected, _ = broken(idx)
    act_on_layers(broken, "vo", element)
    assert (broken(idx)[0] - expected).abs().max() > 1e-3


def test_symmetry_breaking_biases_resample_in_training():
    _, model = pair(symmetry_breaking=True)
    idx = tokens()
    model.train()
    first, second = model(idx)[0], model(idx)[0]
    assert (first - second).abs().max() > 1e-4
    model.eval()
    assert torch.equal(model(idx)[0], model(idx)[0])


def test_bad_configs_and_inputs():
    with pytest.raises(ValueError, match="divisible by n_head"):
        GPTConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="even head dimension"):
        GPTConfig(n_embd=12, n_head=4, rope=True)
    with pytest.raises(ValueError, match="n_layer must be a positive int"):
        GPTConfig(n_layer=0)
    with pytest.raises(ValueError, match="n_kv_head"):
        GPTConfig(n_head=4, n_kv_head=3)
    model = GPT(GPTConfig(**SMALL))
    with pytest.raises(ValueError, match="longer than block_size"):
        model(tokens(length=20))


def test_grouped_query_attention_keeps_one_gl_per_key_value_head():
    """With 4 query heads sharing 2 key/value heads, GL(k) of a key/value head acts on its whole
    group of query heads at once (one element per group is a symmetry); an element acting on one
    query head and its shared key head is not (it changes the group's other query heads)."""
    gen = rng(5)
    k = SMALL["n_embd"] // SMALL["n_head"]
    full = torch.eye(k * k, dtype=torch.float64).reshape(k * k, k, k)
    _, model = pair(n_kv_head=2)
    idx = tokens()
    expected, _ = model(idx)
    for sector in ("qk", "vo"):
        act_on_layers(model, sector, random_group_element(full, 2, gen))
    assert (model(idx)[0] - expected).abs().max() <= 1e-4
    attention = model.h[0].attn.attn
    g = random_group_element(full, 1, gen)[0].float()
    with torch.no_grad():
        a, b = attention.qk_manifold.factors(attention.qk)
        rows = a.shape[-2] // 2  # the first query head of key/value head 0
        a[0, :rows] = a[0, :rows] @ g
        b[0] = b[0] @ torch.linalg.inv(g).T
    assert (model(idx)[0] - expected).abs().max() > 1e-3
