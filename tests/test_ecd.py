"""QuotientECD: unit speed, the closure it needs, invariance under re-factorization, and the
deprecated ``QuotientHamiltonian(mode="ecd")`` delegating to it."""

from __future__ import annotations

import geoopt
import pytest
import torch

import quotientopt.optim
from quotientopt.manifolds import FactorQuotient
from quotientopt.optim import QuotientECD, QuotientHamiltonian
from tests.helpers import matrix_with_condition, relative_error, rng


def problem(seed=0):
    gen = rng(seed)
    manifold = FactorQuotient(8, 6)
    target = torch.randn(3, 8, 2, generator=gen, dtype=torch.float64) @ torch.randn(
        3, 2, 6, generator=gen, dtype=torch.float64
    )
    z0 = torch.randn(3, 14, 2, generator=gen, dtype=torch.float64)
    return manifold, target, z0, gen


def run(make, manifold, z0, target, steps, bias=None):
    """``steps`` ECD steps on ``|A B^T + bias - target|^2 / 2``; the points, losses and optimizer."""
    point = geoopt.ManifoldParameter(z0.clone(), manifold=manifold)
    params = [point] if bias is None else [point, torch.nn.Parameter(bias.clone())]
    optimizer = make(params)

    def closure():
        optimizer.zero_grad()
        product = manifold.product(point)
        if bias is not None:
            product = product + params[1]
        loss = 0.5 * ((product - target) ** 2).sum()
        loss.backward()
        return loss

    losses = [optimizer.step(closure).item() for _ in range(steps)]
    return params, losses, optimizer


def test_is_exported():
    assert quotientopt.optim.QuotientECD is QuotientECD
    assert "QuotientECD" in quotientopt.optim.__all__


def test_moves_at_unit_speed_horizontally_and_descends():
    manifold, target, z0, gen = problem()
    bias = 0.1 * torch.randn(6, generator=gen, dtype=torch.float64)
    params, losses, optimizer = run(
        lambda ps: QuotientECD(ps, lr=0.1), manifold, z0, target, 300, bias
    )
    point, plain = params
    z = point.detach()
    v, w = optimizer.state[point]["velocity"], optimizer.state[plain]["velocity"]
    # one point, one speed: the metric norm of the heads' velocity plus the plain tensor's
    speed = float(manifold.inner(z, v).sum()) + float((w * w).sum())
    assert abs(speed - 1.0) < 1e-9
    assert float(manifold.inner(z, v).sum()) > 1e-3  # the heads do move
    assert float((manifold.proju(z, v) - v).abs().max()) < 1e-9  # horizontal
    assert losses[-1] < 0.6 * losses[0]  # measured 0.48 (the plain tensor shares the speed)
    momentum = optimizer.momentum(point)
    assert momentum.kind == "vector" and torch.equal(momentum.tensor, v)
    assert optimizer.momentum(plain).kind == "covector"


def test_each_step_moves_the_same_metric_distance():
    """Unit speed: every step moves by lr in the metric (to first order in lr)."""
    manifold, target, z0, _ = problem(1)
    point = geoopt.ManifoldParameter(z0.clone(), manifold=manifold)
    lr = 1e-3
    optimizer = QuotientECD([point], lr=lr)

    def closure():
        optimizer.zero_grad()
        loss = 0.5 * ((manifold.product(point) - target) ** 2).sum()
        loss.backward()
        return loss

    for _ in range(5):
        before = point.detach().clone()
        optimizer.step(closure)
        step = point.detach() - before
        distance = float(manifold.inner(before, step).sum().sqrt())
        assert abs(distance / lr - 1.0) < 1e-2


def test_needs_a_closure_with_a_clear_error():
    manifold, target, z0, _ = problem()
    point = geoopt.ManifoldParameter(z0.clone(), manifold=manifold)
    optimizer = QuotientECD([point], lr=0.1)
    (0.5 * ((manifold.product(point) - target) ** 2).sum()).backward()
    with pytest.raises(
        ValueError, match=r"QuotientECD needs the loss value: call .*step\(closure\)"
    ):
        optimizer.step()
    assert torch.equal(point.detach(), z0)
    assert point not in optimizer.state or "velocity" not in optimizer.state[point]


def test_trajectory_does_not_depend_on_the_factorization():
    manifold, target, z0, gen = problem()
    g = matrix_with_condition((3,), 2, 2, 1e3, gen, torch.float64)

    def make(ps):
        return QuotientECD(ps, lr=0.05)

    (z_1,), losses, _ = run(make, manifold, z0, target, 200)
    (z_g,), _, _ = run(make, manifold, manifold.act(z0, g), target, 200)
    assert losses[-1] < 0.5 * losses[0]
    assert relative_error(manifold.product(z_g.detach()), manifold.product(z_1.detach())) < 1e-10


def test_nonfinite_gradients_leave_points_and_velocities_untouched():
    manifold, target, z0, _ = problem()
    point = geoopt.ManifoldParameter(z0.clone(), manifold=manifold)
    optimizer = QuotientECD([point], lr=0.1)

    def closure(poison=False):
        optimizer.zero_grad()
        loss = 0.5 * ((manifold.product(point) - target) ** 2).sum()
        loss.backward()
        if poison:
            point.grad[0, 0, 0] = float("nan")
        return loss

    optimizer.step(closure)
    before, velocity = point.detach().clone(), optimizer.state[point]["velocity"].clone()
    optimizer.step(lambda: closure(poison=True))
    assert torch.equal(point.detach(), before)
    assert torch.equal(optimizer.state[point]["velocity"], velocity)
    assert optimizer.nonfinite_steps() == 1


def test_hamiltonian_ecd_mode_is_deprecated_and_equals_quotient_ecd():
    manifold, target, z0, _ = problem()
    with pytest.warns(DeprecationWarning, match="QuotientECD"):
        QuotientHamiltonian([torch.nn.Parameter(torch.zeros(2))], lr=0.1, mode="ecd")

    def old(ps):
        with pytest.warns(DeprecationWarning):
            return QuotientHamiltonian(ps, lr=0.1, mode="ecd", eta=2.0, loss_floor=-0.5)

    (z_old,), losses_old, _ = run(old, manifold, z0, target, 50)
    (z_new,), losses_new, _ = run(
        lambda ps: QuotientECD(ps, lr=0.1, eta=2.0, loss_floor=-0.5), manifold, z0, target, 50
    )
    assert torch.equal(z_old.detach(), z_new.detach())
    assert losses_old == losses_new


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"lr": -1.0}, "invalid lr"),
        ({"eta": 0.0}, "invalid eta"),
        ({"loss_floor": float("nan")}, "invalid loss_floor"),
        ({"on_nonfinite": "ignore"}, "invalid on_nonfinite"),
    ],
)
def test_invalid_hyperparameters(options, message):
    with pytest.raises(ValueError, match=message):
        QuotientECD([torch.nn.Parameter(torch.zeros(2))], **{"lr": 0.1, **options})


def test_other_manifolds_are_refused_clearly():
    sphere = geoopt.ManifoldParameter(torch.ones(3) / 3**0.5, manifold=geoopt.Sphere())
    with pytest.raises(ValueError, match="QuotientECD supports head geometries"):
        QuotientECD([sphere], lr=0.1)
