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
from quotientopt.optim import (
    QuotientAdam,
    QuotientECD,
    QuotientHamiltonian,
    QuotientMuon,
    QuotientSGD,
    geometry_of,
    split_parameters,
)

STEPS = 120
# each quotient contender against torch's AdamW at its compare default (torch SGD at its default
# lr 0.3 is chaotic here: its loss after 120 steps went from 0.71 to 1.03 with the thread count).
# The quotient contenders run at their compare defaults, except QuotientHamiltonian, which is slow
# on this task at its default 0.03 from any start (smoothed loss 1.50 after 240 steps from the
# standard initialization, 1.54 from the zero one) and runs at 0.06 (0.85; 0.1 gave 0.69).
PAIRS = [
    ("quotient-sgd", None),
    ("quotient-adam", None),
    ("quotient-hamiltonian", 0.06),
    ("quotient-muon", None),
]


def copy_task(seed: int, batch: int = 16, length: int = 16, vocab: int = 32):
    """Sequences that repeat a random block of 4 tokens: predicting the next token needs
    attention (the token 4 positions back)."""
    gen = torch.Generator().manual_seed(seed)
    block = torch.randint(vocab, (batch, 4), generator=gen)
    x = block.repeat(1, length // 4 + 1)
    return x[:, :length], x[:, 1 : length + 1]


def standard_model(all_zero: bool = False) -> torch.nn.Module:
    """The one-layer GPT with a zero output projection (``all_zero``: and zero query, key and
    value projections, so every head is all zero)."""
    config = GPTConfig(block_size=16, vocab_size=32, n_layer=1, n_head=2, n_embd=32, quotient=False)
    torch.manual_seed(0)
    model = GPT(config)
    with torch.no_grad():
        for block in model.h:
            block.attn.c_proj.weight.zero_()
            if all_zero:
                block.attn.c_attn.weight.zero_()
    return model


def train(model: torch.nn.Module, name: str, steps: int, lr: float | None = None) -> list[float]:
    contender = CONTENDERS[name]
    optimizer = contender.build(model, lr or contender.default_lr)
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


OPTIMIZERS = {
    "sgd": lambda ps, lr: QuotientSGD(ps, lr=lr, momentum=0.9),
    "adam": lambda ps, lr: QuotientAdam(ps, lr=lr),
    "hamiltonian": lambda ps, lr: QuotientHamiltonian(ps, lr=lr),
    "ecd": lambda ps, lr: QuotientECD(ps, lr=lr),
    "muon": lambda ps, lr: QuotientMuon(ps, lr=lr),
}


def heads_optimizer(name: str, model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    """The quotient optimizer ``name`` on ``model``'s head parameters."""
    heads, _ = split_parameters(model.parameters())
    return OPTIMIZERS[name](heads, lr)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_all_zero_sectors_leave_the_zero_point_without_changing_the_function(name):
    """At A = B = 0 both factor gradients vanish. Before the first step every quotient optimizer
    moves such a sector to (U, 0), U with orthonormal columns: the loss is unchanged (lr = 0, so
    only that move happens), the first factor has full rank, the second stays zero, and the
    optimizer says so."""
    model = convert(standard_model(all_zero=True))
    heads = [p for p in model.parameters() if geometry_of(p) is not None]
    assert all(float(p.detach().abs().max()) == 0 for p in heads)
    x, y = copy_task(0)
    before = model(x, y)[1]
    optimizer = heads_optimizer(name, model, 0.0)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = model(x, y)[1]
        loss.backward()
        return loss

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        optimizer.step(closure)
    assert any("all zero" in str(w.message) for w in caught)
    assert torch.equal(model(x, y)[1], before)
    for p in heads:
        a, b = geometry_of(p).factors(p.detach())
        assert torch.equal(b, torch.zeros_like(b))
        eye = torch.eye(a.shape[-1]).expand(a.shape[:-2] + (a.shape[-1],) * 2)
        torch.testing.assert_close(a.mT @ a, eye, atol=1e-5, rtol=0)


def test_a_nonzero_sector_is_not_moved():
    """Only all-zero sectors move: a zero output projection (A = W_V != 0, B = 0) is left as it
    is (its B has a non-zero gradient and the regularized step handles it)."""
    model = convert(standard_model())
    start = [p.detach().clone() for p in model.parameters()]
    optimizer = heads_optimizer("sgd", model, 0.0)
    _, loss = model(*copy_task(0))
    loss.backward()
    optimizer.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), start, strict=True))


@pytest.mark.parametrize(("quotient", "lr"), PAIRS)
def test_all_zero_heads_train(quotient, lr):
    """Every head all zero (query, key, value and output projections): torch's optimizers never
    move them (zero gradients), the quotient optimizers do. The loss falls at least as far as
    torch AdamW's on the same model within twice its steps, and every head reaches full rank."""
    model = convert(standard_model(all_zero=True))
    heads = [p for p in model.parameters() if geometry_of(p) is not None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        losses = smoothed(train(model, quotient, 2 * STEPS, lr))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    for p in heads:
        assert bool(geometry_of(p).grams(p.detach(), check=False).ok.all())
    baseline = smoothed(train(standard_model(all_zero=True), "adamw", STEPS))
    assert min(losses) <= baseline[-1] + 0.05, (min(losses), baseline[-1])
    # and the zero start costs little against the standard initialization
    reference = smoothed(train(convert(standard_init_model()), quotient, 2 * STEPS, lr))
    assert min(losses) <= min(reference) + 0.15, (min(losses), min(reference))


def train_ecd(model: torch.nn.Module, steps: int, lr: float) -> list[float]:
    """QuotientECD on every parameter (it needs the loss: a closure)."""
    optimizer = QuotientECD(model.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        x, y = copy_task(step)

        def closure(x=x, y=y) -> torch.Tensor:
            optimizer.zero_grad()
            loss = model(x, y)[1]
            loss.backward()
            return loss

        losses.append(float(optimizer.step(closure)))
    return losses


def test_all_zero_heads_train_under_ecd():
    """The same for QuotientECD (lr 0.1; 0.01 and 0.03 are slow on this task from any start)."""
    model = convert(standard_model(all_zero=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        losses = smoothed(train_ecd(model, 2 * STEPS, 0.1))
    for p in model.parameters():
        assert torch.isfinite(p).all()
        if geometry_of(p) is not None:
            assert bool(geometry_of(p).grams(p.detach(), check=False).ok.all())
    baseline = smoothed(train(standard_model(all_zero=True), "adamw", STEPS))
    assert min(losses) <= baseline[-1] + 0.05, (min(losses), baseline[-1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = smoothed(train_ecd(convert(standard_init_model()), 2 * STEPS, 0.1))
    assert min(losses) <= min(reference) + 0.15, (min(losses), min(reference))
