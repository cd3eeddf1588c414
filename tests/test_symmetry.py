"""Symmetry diagnostics against the exact laws of the design notes (section 5)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from quotientopt.nn import QuotientMultiheadAttention
from quotientopt.optim import QuotientSGD
from quotientopt.symmetry import (
    charge,
    conditioning,
    find_sectors,
    momentum_map,
    velocity_momentum_map,
    vertical_fraction,
)
from tests.helpers import relative_error, rng


def problem(seed=0):
    gen = rng(seed)
    torch.manual_seed(seed)
    model = nn.MultiheadAttention(8, 2).double()
    x = torch.randn(5, 3, 8, generator=gen, dtype=torch.float64)
    target = torch.randn(5, 3, 8, generator=gen, dtype=torch.float64)
    return model, x, target


def loss_of(model, x, target):
    return ((model(x, x, x, need_weights=False)[0] - target) ** 2).sum()


def step(model, optimizer, x, target):
    optimizer.zero_grad()
    loss_of(model, x, target).backward()
    optimizer.step()


def skew(m):
    return 0.5 * (m - m.mT)


def test_sectors_read_every_layout_to_the_same_factors():
    model, _, _ = problem()
    quotient = QuotientMultiheadAttention.from_torch(model)
    for standard, ours in zip(find_sectors(model), find_sectors(quotient), strict=True):
        assert standard.kind == ours.kind
        for p, q in zip(standard.pair(), ours.pair(), strict=True):
            assert torch.allclose(p, q.double(), atol=1e-12)


def test_charge_follows_the_exact_law_under_sgd_with_coupled_weight_decay():
    model, x, target = problem()
    lr, decay = 0.01, 0.1
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=decay)
    for _ in range(10):
        optimizer.zero_grad()
        loss_of(model, x, target).backward()
        before = [(s.pair(), s.pair(lambda p: p.grad)) for s in find_sectors(model)]
        optimizer.step()
        for sector, ((a, b), (g_a, g_b)) in zip(find_sectors(model), before, strict=True):
            predicted = (1 - lr * decay) ** 2 * charge(a, b) + lr**2 * (g_a.mT @ g_a - g_b.mT @ g_b)
            assert relative_error(charge(*sector.pair()), predicted) < 1e-12, sector.name


@pytest.mark.parametrize("decay", [0.0, 0.5])
def test_momentum_map_skew_part_decays_by_beta_under_sgd_momentum(decay):
    """SGD-momentum with decoupled decay mu: skew(J') = beta (1 - lr mu) skew(J) exactly."""
    model, x, target = problem()
    beta, lr = 0.9, 0.01
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=beta)
    step(model, optimizer, x, target)
    gen = rng(1)
    for p in model.parameters():  # a random momentum: a non-zero skew charge to follow
        optimizer.state[p]["momentum_buffer"].add_(
            torch.randn(p.shape, generator=gen, dtype=p.dtype)
        )

    def skew_charges():
        return [
            skew(momentum_map(*s.pair(), *s.pair(lambda p: optimizer.state[p]["momentum_buffer"])))
            for s in find_sectors(model)
        ]

    previous = skew_charges()
    assert min(float(c.abs().max()) for c in previous) > 0.1
    for _ in range(10):
        optimizer.zero_grad()
        loss_of(model, x, target).backward()
        with torch.no_grad():  # decoupled decay: theta <- (1 - lr mu) theta - lr v
            for p in model.parameters():
                p.mul_(1 - lr * decay)
        optimizer.step()
        current = skew_charges()
        for now, then in zip(current, previous, strict=True):
            assert relative_error(now, beta * (1 - lr * decay) * then) < 1e-10
        previous = current


def test_adam_breaks_both_laws():
    model, x, target = problem()
    lr = 0.01
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    worst_charge_law, worst_skew = 0.0, 0.0
    for _ in range(5):
        optimizer.zero_grad()
        loss_of(model, x, target).backward()
        before = [(s.pair(), s.pair(lambda p: p.grad)) for s in find_sectors(model)]
        optimizer.step()
        for sector, ((a, b), (g_a, g_b)) in zip(find_sectors(model), before, strict=True):
            predicted = charge(a, b) + lr**2 * (g_a.mT @ g_a - g_b.mT @ g_b)
            worst_charge_law = max(
                worst_charge_law, relative_error(charge(*sector.pair()), predicted)
            )
            j = momentum_map(*sector.pair(), *sector.pair(lambda p: optimizer.state[p]["exp_avg"]))
            worst_skew = max(worst_skew, float(skew(j).abs().max() / j.abs().max()))
    assert worst_charge_law > 1e-4  # the SGD law does not hold
    assert worst_skew > 1e-3  # and the skew charge is not held at 0 from a zero start


def test_quotient_sgd_keeps_its_momentum_map_at_zero():
    model, x, target = problem()
    quotient = QuotientMultiheadAttention.from_torch(model)
    optimizer = QuotientSGD(quotient.parameters(), lr=1e-3, momentum=0.9)
    for _ in range(10):
        step(quotient, optimizer, x, target)
        for sector in find_sectors(quotient):
            v = sector.pair(lambda p: optimizer.state[p]["momentum_buffer"])
            j = velocity_momentum_map(*sector.pair(), *v)
            scale = float(momentum_map(*sector.pair(), *v).abs().max())
            assert float(j.abs().max()) < 1e-9 * max(scale, 1.0)


def update_fractions(model, optimizer, x, target, steps=3):
    euclidean, preconditioned = [], []
    for _ in range(steps):
        sectors = find_sectors(model)
        before = [s.pair() for s in sectors]
        snapshot = {id(p): p.detach().clone() for p in model.parameters()}
        step(model, optimizer, x, target)
        for sector, (a, b) in zip(sectors, before, strict=True):
            d_a, d_b = sector.pair(lambda p, before=snapshot: p.detach() - before[id(p)])
            euclidean.append(float(vertical_fraction(a, b, d_a, d_b, "euclidean").max()))
            preconditioned.append(float(vertical_fraction(a, b, d_a, d_b, "preconditioned").max()))
    return max(euclidean), max(preconditioned)


def test_vertical_fraction_separates_the_optimizers():
    model, x, target = problem()
    euclidean, _ = update_fractions(model, torch.optim.SGD(model.parameters(), lr=1e-3), x, target)
    assert euclidean < 1e-6  # plain gradient descent: ~0 in the Euclidean metric (O(lr) only)
    model, x, target = problem()
    quotient = QuotientMultiheadAttention.from_torch(model)
    _, preconditioned = update_fractions(
        quotient, QuotientSGD(quotient.parameters(), lr=1e-2), x, target
    )
    assert preconditioned < 1e-6  # quotient SGD: ~0 in the preconditioned metric
    for make in (
        lambda ps: torch.optim.Adam(ps, lr=1e-2),
        lambda ps: torch.optim.SGD(ps, lr=1e-2, weight_decay=1.0),  # factor weight decay
    ):
        model, x, target = problem()
        euclidean, preconditioned = update_fractions(model, make(model.parameters()), x, target)
        assert euclidean > 1e-4 and preconditioned > 1e-4


def test_conditioning_of_a_known_pair():
    a = torch.diag(torch.tensor([1.0, 10.0]))[None].double()
    b = torch.eye(2)[None].double()
    report = conditioning(a, b)
    assert float(report["cond_product"]) == pytest.approx(10.0)
    assert float(report["cond_gram_a"]) == pytest.approx(100.0)
    assert float(report["cond_gram_b"]) == pytest.approx(1.0)
    assert 1.0 < float(report["effective_rank"]) < 2.0


def test_conditioning_reports_nan_for_a_diverged_head():
    a = torch.randn(3, 6, 2, generator=rng(21), dtype=torch.float64)
    b = torch.randn(3, 5, 2, generator=rng(22), dtype=torch.float64)
    a[1, 0, 0] = float("nan")
    report = conditioning(a, b)
    healthy = conditioning(a[[0, 2]], b[[0, 2]])
    for name, value in report.items():
        assert bool(torch.isnan(value[1])), name
        assert torch.allclose(value[[0, 2]], healthy[name]), name
