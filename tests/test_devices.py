"""The same checks on every available device: the CPU always, CUDA when a GPU is present (the
parameter list is built from what the machine has; nothing is skipped)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from quotientopt.models import GPT, GPTConfig
from quotientopt.nn import QuotientMultiheadAttention
from quotientopt.optim import QuotientAdam, QuotientHamiltonian, QuotientSGD, split_parameters

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_attention_conversion_on_device(device):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=True).to(device).eval()
    quotient = QuotientMultiheadAttention.from_torch(mha)
    assert quotient.qk.device.type == device
    x = torch.randn(2, 7, 16, device=device)
    mask = torch.ones(7, 7, dtype=torch.bool, device=device).triu(1)
    expected = mha(x, x, x, attn_mask=mask)[0]
    assert (quotient(x, x, x, attn_mask=mask)[0] - expected).abs().max() <= 1e-5
    assert (quotient.to_torch()(x, x, x, attn_mask=mask)[0] - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "optimizer", ["QuotientSGD", "QuotientSGD-lazy", "QuotientAdam", "QuotientHamiltonian"]
)
def test_gpt_trains_on_device(device, optimizer):
    torch.manual_seed(0)
    model = GPT(
        GPTConfig(n_layer=2, n_embd=32, n_head=4, block_size=16, vocab_size=32, rope=True)
    ).to(device)
    heads, rest = split_parameters(model.parameters())
    groups = [{"params": heads, "lr": 0.01}, {"params": rest}]
    opt = {
        "QuotientSGD": lambda: QuotientSGD(groups, lr=0.3, momentum=0.9),
        "QuotientSGD-lazy": lambda: QuotientSGD(groups, lr=0.3, momentum=0.9, refresh_every=8),
        "QuotientAdam": lambda: QuotientAdam(model.parameters(), lr=3e-3),
        "QuotientHamiltonian": lambda: QuotientHamiltonian(
            model.parameters(), lr=0.1, friction=3.0
        ),
    }[optimizer]()
    idx = torch.randint(0, 32, (4, 17), device=device)
    losses = []
    for _ in range(60):
        opt.zero_grad()
        _, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0]
    assert opt.nonfinite_steps() == 0
