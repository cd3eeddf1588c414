"""The registry of attention adapters: a new attention type registered once is found by the
sector reader, the audit, the attention patterns, the monitor and the conversion."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from quotientopt.nn import QuotientMultiheadAttention, adapters, convert, export
from quotientopt.nn.adapters import (
    AttentionSpec,
    PatternRecipe,
    attention_modules,
    register_attention,
    registered_types,
    standard_sectors,
)
from quotientopt.symmetry import audit, find_sectors
from quotientopt.tensorboard import SymmetryMonitor, attention_patterns


class ToyAttention(nn.Module):
    """Unmasked multi-head self-attention without biases, written out: ``x`` (batch, length, E)."""

    def __init__(self, embed_dim: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (
            nn.Linear(embed_dim, embed_dim, bias=False) for _ in range(4)
        )

    def weights(self, x: torch.Tensor) -> torch.Tensor:
        """Attention weights (batch, heads, length, length)."""
        q, k = (f(x).unflatten(-1, (self.heads, -1)).transpose(1, 2) for f in (self.q, self.k))
        return (q @ k.mT / q.shape[-1] ** 0.5).softmax(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = self.v(x).unflatten(-1, (self.heads, -1)).transpose(1, 2)
        return self.o((self.weights(x) @ v).transpose(1, 2).flatten(-2))


def toy_sectors(path: str, module: ToyAttention) -> list:
    e = module.q.in_features
    params = (module.q.weight, module.k.weight, module.v.weight, module.o.weight)
    return standard_sectors(
        path, params, lambda v: (v[0], v[1], v[2], None, v[3]), module.heads, module.heads, e // 2
    )


def toy_spec(module: ToyAttention) -> AttentionSpec:
    e = module.q.in_features
    return AttentionSpec("ToyAttention", e, e, e, module.heads, module.heads, e // 2, False, False)


def toy_to_quotient(module: ToyAttention, **options) -> QuotientMultiheadAttention:
    e = module.q.in_features
    new = QuotientMultiheadAttention(e, module.heads, bias=False, batch_first=True, **options)
    new.load_weights(module.q.weight, module.k.weight, module.v.weight, None, module.o.weight, None)
    return new


@pytest.fixture
def registry(monkeypatch):
    """A copy of the registry for one test, with ToyAttention registered in it."""
    monkeypatch.setattr(adapters, "_ADAPTERS", dict(adapters._ADAPTERS))
    register_attention(ToyAttention, sectors=toy_sectors, spec=toy_spec)
    register_attention(
        ToyAttention, patterns=lambda m: PatternRecipe(causal=False), to_quotient=toy_to_quotient
    )
    return adapters._ADAPTERS


def model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), ToyAttention(), nn.Sequential(ToyAttention()))


def test_a_registered_type_is_read_everywhere(registry, tmp_path):
    net = model()
    assert ToyAttention in registered_types("sectors")
    assert [s.name for s in find_sectors(net)] == ["1.QK", "1.VO", "2.0.QK", "2.0.VO"]
    report = audit(net)
    assert [row.path for row in report.rows] == ["1", "1", "2.0", "2.0"]
    assert all(row.per_head == 16 for row in report.rows)  # GL(4): k^2 per head
    x = torch.randn(3, 5, 8)
    patterns = attention_patterns(net, x)
    assert (patterns["1"].float() - net[1].weights(net[0](x))).abs().max() < 1e-6
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    monitor = SymmetryMonitor(net, optimizer, tmp_path, every=1)
    for _ in range(2):
        optimizer.zero_grad()
        net(x).square().mean().backward()
        optimizer.step()
    monitor.close()
    assert "momentum_map_skew/2.0.VO" in monitor.history


def test_a_registered_type_converts_and_is_then_read_as_its_twin(registry):
    net = model()
    x = torch.randn(3, 5, 8)
    before = [net[1](x), net[2][0](x)]
    convert(net)
    assert type(net[1]) is QuotientMultiheadAttention
    assert type(net[2][0]) is QuotientMultiheadAttention  # nested modules too
    after = [net[1](x, x, x, need_weights=False)[0], net[2][0](x, x, x, need_weights=False)[0]]
    for old, new in zip(before, after, strict=True):
        assert (old - new).abs().max() < 1e-5
    assert [s.name for s in find_sectors(net)] == ["1.QK", "1.VO", "2.0.QK", "2.0.VO"]
    export(net)  # the twin's own adapter exports it to torch's module
    assert type(net[1]) is nn.MultiheadAttention
    assert (net[1](x, x, x, need_weights=False)[0] - before[0]).abs().max() < 1e-5


def test_outermost_registered_module_wins(registry):
    """A registered module inside a registered module is not visited on its own."""
    outer = ToyAttention()
    outer.inner = ToyAttention()
    found = [path for path, _, _ in attention_modules(nn.Sequential(outer))]
    assert found == ["0"]


def test_registration_errors_name_the_problem(registry):
    with pytest.raises(TypeError, match="unknown capabilities \\['sector'\\]"):
        register_attention(ToyAttention, sector=toy_sectors)
    with pytest.raises(TypeError, match=r"must be an nn\.Module subclass"):
        register_attention(int, sectors=toy_sectors)
    with pytest.raises(ValueError, match="unknown capability 'nope'"):
        list(attention_modules(model(), "nope"))


def test_the_monitor_names_the_registered_types_when_it_finds_none(tmp_path):
    net = nn.Linear(3, 3)
    with pytest.raises(ValueError, match="registered: MultiheadAttention, QuotientMultihead"):
        SymmetryMonitor(net, torch.optim.SGD(net.parameters(), lr=0.1), tmp_path)
