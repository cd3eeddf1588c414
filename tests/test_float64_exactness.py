r"""Issue 26.4: a float64 run keeps the model function to float64 precision.

``QuotientSGD(lr=0, rebalance_every=1)`` only moves each head along its group orbit, so the
output must not change beyond rounding. QK-norm's group contains the common scaling of the
head dimensions, which RMSNorm's ``+ eps`` inside the square root used to break by
:math:`O(\epsilon / \mathrm{rms}^2)` (6e-8 measured).
"""

import pytest
import torch

from quotientopt.nn import QuotientMultiheadAttention
from quotientopt.nn.rope import rms_normalize
from quotientopt.optim import QuotientSGD


@pytest.fixture
def float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.mark.parametrize(
    "kwargs", [{}, {"rope": True}, {"qk_norm": True}, {"rope": True, "qk_norm": True}]
)
def test_rebalance_keeps_float64_function(float64, kwargs):
    torch.manual_seed(0)
    attn = QuotientMultiheadAttention(16, 2, batch_first=True, **kwargs)
    with torch.no_grad():  # unbalance the heads so that rebalancing moves them far
        for p in attn.parameters():
            p.mul_(torch.linspace(0.2, 5.0, p.shape[-1]))
    x = torch.randn(3, 5, 16)
    before = attn(x, x, x)[0].detach().clone()
    opt = QuotientSGD(attn.parameters(), lr=0, rebalance_every=1)
    attn(x, x, x)[0].square().sum().backward()
    opt.step()
    after = attn(x, x, x)[0].detach()
    assert (after - before).abs().max().item() <= 1e-12


def test_rms_normalize_is_scale_invariant(float64):
    x = torch.randn(7, 8)
    c = torch.logspace(-2, 2, 7)[:, None]
    torch.testing.assert_close(rms_normalize(c * x), rms_normalize(x), rtol=1e-15, atol=1e-15)
    assert torch.isfinite(rms_normalize(torch.zeros(3, 8))).all()
