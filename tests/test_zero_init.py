"""Zero-initialized heads (issue 16, fault 4): a zero output projection puts every VO sector on
the rank-deficient set, where the quotient metric is singular. The quotient optimizers must still
train it (a regularized step until the head has full rank) about as fast as torch's optimizers
train the same model, and say so once."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from quotientopt.compare import CONTENDERS
from quotientopt.models import GPT, GPTConfig
from quotientopt.nn import convert
from quotientopt.optim import geometry_of

STEPS = 120
# each quotient contender against torch's AdamW at its compare default (torch SGD at its default
# lr 0.3 is chaotic here: its loss after 120 steps went from 0.71 to 1.03 with the thread count).
# The quotient contenders run at their compare defaults, except QuotientHamiltonian, which is slow
# on this task at its default 0.03 from any start (smoothed loss 1.50 after 240 steps from the
# standard initialization, 1.54 from the zero one) and runs at 0.06 (0.85; 0.1 gave 0.69).
PAIRS = [("quotient-sgd", None), ("quotient-adam", None), ("quotient-hamiltonian", 0.06)]


def copy_task(seed: int, batch: int = 16, length: int = 16, vocab: int = 32):
    """Sequences that repeat a random block of 4 tokens: predicting the next token needs
    attention (the token 4 positions back)."""
    gen = torch.Generator().manual_seed(seed)
    block = torch.randint(vocab, (batch, 4), generator=gen)
    x = block.repeat(1, length // 4 + 1)
    return x[:, :length], x[:, 1 : length + 1]


def standard_model() -> torch.nn.Module:
    config = GPTConfig(block_size=16, vocab_size=32, n_layer=1, n_head=2, n_embd=32, quotient=False)
    torch.manual_seed(0)
    model = GPT(config)
    with torch.no_grad():
        for block in model.h:
            block.attn.c_proj.weight.zero_()
    return model


def train(model: torch.nn.Module, name: str, steps: int, lr: float | None = None) -> list[float]:
    contender = CONTENDERS[name]
    optimizer = contender.build(list(model.parameters()), lr or contender.default_lr)
    losses = []
    for step in range(steps):
        x, y = copy_task(step)
        _, loss = model(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    return losses


def smoothed(losses: list[float], window: int = 10) -> list[float]:
    return [sum(losses[i - window : i]) / window for i in range(window, len(losses) + 1)]


def standard_init_model() -> torch.nn.Module:
    torch.manual_seed(0)
    config = GPTConfig(block_size=16, vocab_size=32, n_layer=1, n_head=2, n_embd=32, quotient=False)
    return GPT(config)


@pytest.mark.parametrize(("quotient", "lr"), PAIRS)
def test_zero_initialized_output_projection_trains(quotient, lr):
    model = convert(standard_model())
    heads = [p for p in model.parameters() if geometry_of(p) is not None]
    assert heads
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        losses = smoothed(train(model, quotient, 2 * STEPS, lr))
    assert any("start rank-deficient" in str(w.message) for w in caught)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert losses[-1] < losses[0] - 1.0
    # every head now has full rank: the exact geometry has taken over
    for p in heads:
        assert bool(geometry_of(p).grams(p.detach(), check=False).ok.all())
    # the zero start costs (almost) nothing against the standard initialization
    reference = smoothed(train(convert(standard_init_model()), quotient, 2 * STEPS, lr))
    assert min(losses) <= min(reference) + 0.1, (min(losses), min(reference))
    # and it gets as far as torch's AdamW (same zero start) within twice AdamW's steps
    baseline = smoothed(train(standard_model(), "adamw", STEPS))
    assert min(losses) <= baseline[-1] + 0.05, (min(losses), baseline[-1])


def test_zero_init_model_is_the_standard_one():
    """The converted model computes the same function as the standard zero-init one."""
    model = standard_model()
    converted = convert(copy.deepcopy(model))
    x, y = copy_task(0)
    assert torch.allclose(model(x, y)[1], converted(x, y)[1], atol=1e-5)
