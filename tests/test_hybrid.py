"""HybridOptimizer: two optimizers that behave as one torch.optim.Optimizer."""

from __future__ import annotations

import copy

import geoopt
import pytest
import torch

from quotientopt.manifolds import FactorQuotient
from quotientopt.optim import HybridOptimizer, QuotientSGD, split_parameters
from tests.helpers import rng


def model(seed=0):
    gen = rng(seed)
    manifold = FactorQuotient(6, 5)
    heads = geoopt.ManifoldParameter(torch.randn(2, 11, 2, generator=gen), manifold=manifold)
    weight = torch.nn.Parameter(torch.randn(5, 3, generator=gen))
    bias = torch.nn.Parameter(torch.zeros(3))
    return manifold, [heads, weight, bias]


def loss_of(manifold, params, batch):
    heads, weight, bias = params
    return ((batch @ manifold.product(heads).sum(0) @ weight + bias) ** 2).mean()


def make(params, rest="adamw"):
    rests = {
        "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2),
        "sgd": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9),
    }
    return HybridOptimizer.for_parameters(
        params, heads=lambda ps: QuotientSGD(ps, lr=0.05, momentum=0.9), rest=rests[rest]
    )


def run(optimizer, manifold, params, steps, seed=1, scheduler=None):
    gen = rng(seed)
    for _ in range(steps):
        batch = torch.randn(8, 6, generator=gen)
        optimizer.zero_grad()
        loss_of(manifold, params, batch).backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()


def test_split_parameters():
    _, params = model()
    heads, rest = split_parameters(params)
    assert heads == [params[0]] and rest == params[1:]


@pytest.mark.parametrize("rest", ["adamw", "sgd"])
def test_steps_match_the_two_optimizers_run_separately(rest):
    manifold, params = model()
    hybrid = make(params, rest)
    run(hybrid, manifold, params, 5)
    manifold2, params2 = model()
    heads = QuotientSGD([params2[0]], lr=0.05, momentum=0.9)
    others = (
        torch.optim.AdamW(params2[1:], lr=1e-2)
        if rest == "adamw"
        else torch.optim.SGD(params2[1:], lr=1e-2, momentum=0.9)
    )
    gen = rng(1)
    for _ in range(5):
        batch = torch.randn(8, 6, generator=gen)
        heads.zero_grad()
        others.zero_grad()
        loss_of(manifold2, params2, batch).backward()
        heads.step()
        others.step()
    for a, b in zip(params, params2, strict=True):
        assert torch.equal(a.detach(), b.detach())


def test_state_dict_resume_is_bitwise_identical():
    manifold, params = model()
    hybrid = make(params)
    run(hybrid, manifold, params, 4)
    saved = [p.detach().clone() for p in params]
    state = copy.deepcopy(hybrid.state_dict())
    run(hybrid, manifold, params, 4, seed=2)
    _, params2 = model(seed=5)
    with torch.no_grad():
        for p, s in zip(params2, saved, strict=True):
            p.copy_(s)
    resumed = make(params2)
    resumed.load_state_dict(state)
    run(resumed, manifold, params2, 4, seed=2)
    for a, b in zip(params, params2, strict=True):
        assert torch.equal(a.detach(), b.detach())


def test_scheduler_closure_zero_grad_and_add_param_group():
    manifold, params = model()
    hybrid = make(params)
    scheduler = torch.optim.lr_scheduler.StepLR(hybrid, step_size=1, gamma=0.1)
    run(hybrid, manifold, params, 2, scheduler=scheduler)
    assert hybrid.heads.param_groups[0]["lr"] == pytest.approx(0.05 * 0.01)
    assert hybrid.rest.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.01)
    calls = []

    def closure():
        calls.append(1)
        hybrid.zero_grad()
        loss = loss_of(manifold, params, torch.ones(8, 6))
        loss.backward()
        return loss

    assert hybrid.step(closure) is not None and len(calls) == 1
    hybrid.zero_grad()
    assert all(p.grad is None for p in params)
    extra_heads = geoopt.ManifoldParameter(manifold.random(11, 2), manifold=manifold)
    extra = torch.nn.Parameter(torch.zeros(4))
    hybrid.add_param_group({"params": [extra_heads, extra], "lr": 0.3})
    assert hybrid.heads.param_groups[-1]["params"] == [extra_heads]
    assert hybrid.rest.param_groups[-1]["params"] == [extra]
    assert len(hybrid.param_groups) == 4 and hybrid.param_groups[-1]["lr"] == 0.3


def test_muon_for_the_matrices():
    manifold, params = model()
    hybrid = HybridOptimizer(
        QuotientSGD([params[0]], lr=0.05, momentum=0.9),
        torch.optim.Muon([params[1]], lr=0.02),
    )
    before = params[1].detach().clone()
    run(hybrid, manifold, params, 3)
    assert not torch.equal(params[1].detach(), before)


def test_bad_construction():
    _, params = model()
    with pytest.raises(ValueError, match="in both optimizers"):
        HybridOptimizer(QuotientSGD(params, lr=0.1), torch.optim.SGD(params[1:], lr=0.1))
    with pytest.raises(ValueError, match="no manifold parameters"):
        HybridOptimizer.for_parameters(
            params[1:],
            heads=lambda ps: QuotientSGD(ps, lr=0.1),
            rest=lambda ps: torch.optim.SGD(ps, lr=0.1),
        )
    with pytest.raises(ValueError, match=r"must be a torch\.optim\.Optimizer"):
        HybridOptimizer(QuotientSGD(params[:1], lr=0.1), "adamw")
    hybrid = make(params)
    with pytest.raises(ValueError, match="keys 'heads' and 'rest'"):
        hybrid.load_state_dict({"state": {}, "param_groups": []})


def test_state_reads_each_parameter_from_its_own_optimizer():
    """``hybrid.state[p]`` is the state of the optimizer that steps ``p`` (torch's states are
    defaultdicts: a ChainMap answered a rest parameter with a new empty entry of the heads')."""
    manifold, params = model()
    hybrid = make(params)
    run(hybrid, manifold, params, 2)
    heads, weight, bias = params
    for p, owner in ((heads, hybrid.heads), (weight, hybrid.rest), (bias, hybrid.rest)):
        assert hybrid.state[p] is owner.state[p]
        assert hybrid.state[p]  # not empty
    assert weight not in hybrid.heads.state
    assert len(hybrid.state) == 3 and set(map(id, hybrid.state)) == set(map(id, params))
    with pytest.raises(KeyError):
        hybrid.state[torch.nn.Parameter(torch.zeros(1))]


def test_a_deep_copy_steps_like_the_original():
    manifold, params = model()
    hybrid = make(params)
    run(hybrid, manifold, params, 3)
    twin_params, twin = copy.deepcopy((params, hybrid))
    assert (
        twin.state[twin_params[0]]["momentum_buffer"]
        is not hybrid.state[params[0]]["momentum_buffer"]
    )
    run(hybrid, manifold, params, 3, seed=2)
    run(twin, manifold, twin_params, 3, seed=2)
    for a, b in zip(params, twin_params, strict=True):
        assert torch.equal(a.detach(), b.detach())


def test_heads_that_need_the_loss_get_it_from_the_closure():
    """QuotientECD on the heads needs the loss value: the hybrid evaluates the closure once and
    hands the loss on, so the heads move as QuotientECD alone would move them."""
    from quotientopt.optim import QuotientECD

    manifold, params = model()
    batch = torch.randn(8, 6, generator=rng(3))
    hybrid = HybridOptimizer(QuotientECD([params[0]], lr=0.01), torch.optim.SGD(params[1:], lr=0))
    calls = []

    def closure():
        calls.append(1)
        hybrid.zero_grad()
        loss = loss_of(manifold, params, batch)
        loss.backward()
        return loss

    hybrid.step(closure)
    assert len(calls) == 1
    _, alone_params = model()
    alone = QuotientECD([alone_params[0]], lr=0.01)

    def alone_closure():
        alone.zero_grad()
        loss = loss_of(manifold, alone_params, batch)
        loss.backward()
        return loss

    alone.step(alone_closure)
    assert torch.equal(params[0].detach(), alone_params[0].detach())
    with pytest.raises(ValueError, match="needs the loss value"):
        hybrid.step()
