"""QuotientHamiltonian: energy conservation, the momentum map, invariance, descent."""

from __future__ import annotations

import math

import geoopt
import pytest
import torch

from quotientopt.manifolds import FactorQuotient, SubgroupFactorQuotient
from quotientopt.manifolds.subgroup_quotient import rope_generators
from quotientopt.optim import QuotientHamiltonian
from quotientopt.optim.hamiltonian import momentum_map, spd_inverse, tril_inverse
from tests.helpers import matrix_with_condition, relative_error, rng
from tests.test_quotient_sgd import M, N, regression_problem, train


def smooth_problem(seed=0):
    gen = rng(seed)
    manifold = FactorQuotient(8, 6)
    target = torch.randn(3, 8, 2, generator=gen, dtype=torch.float64) @ torch.randn(
        3, 2, 6, generator=gen, dtype=torch.float64
    )
    z0 = torch.randn(3, 14, 2, generator=gen, dtype=torch.float64)
    return manifold, target, z0, gen


def loss_fn(manifold, z, target):
    return 0.5 * ((manifold.product(z) - target) ** 2).sum()


def test_frictionless_dynamics_conserves_energy_and_stays_reduced():
    manifold, target, z0, _ = smooth_problem()
    point = geoopt.ManifoldParameter(z0.clone(), manifold=manifold)
    optimizer = QuotientHamiltonian([point], lr=0.003)
    energies, charges = [], []
    for _ in range(1000):
        optimizer.zero_grad()
        loss = loss_fn(manifold, point, target)
        loss.backward()
        optimizer.step()
        energies.append(loss.item() + optimizer.kinetic_energy().item())
        charges.append(optimizer.state[point]["momentum_map"].abs().max().item())
    energies = torch.tensor(energies)
    kinetic_peak = optimizer.kinetic_energy().item()
    assert float((energies - energies[0]).abs().max() / energies[0]) < 1e-3
    assert max(charges) < 1e-9 * energies[0].sqrt().item()
    assert kinetic_peak > 1.0  # it really moved: potential energy became kinetic energy


def test_unreduced_euclidean_dynamics_conserves_only_the_skew_charge():
    """Euclidean kinetic energy: only O(k) is a symmetry of H, so skew(J) is conserved, at the
    non-zero value it starts from, while sym(J) changes (design notes, section 5)."""
    manifold, target, z0, gen = smooth_problem()
    x = torch.nn.Parameter(z0.clone())
    h = 0.002
    optimizer = QuotientHamiltonian([x], lr=h)
    # an initial momentum p~ = -sigma b in the torch-SGD form the plain leapfrog keeps
    optimizer.state[x]["momentum_buffer"] = torch.randn(
        z0.shape, generator=gen, dtype=torch.float64
    )
    optimizer.state[x]["momentum_scale"] = 1.0

    def full_step_charge():
        """J at (x_n, p_n), p_n = p_{n-1/2} - h/2 grad L(x_n)."""
        x.grad = None
        loss_fn(manifold, x, target).backward()
        momentum = optimizer.momentum(x).tensor - 0.5 * h * x.grad
        return momentum_map(manifold, x.detach(), momentum)

    first = None
    sym_change = 0.0
    for step in range(300):
        optimizer.zero_grad()
        loss_fn(manifold, x, target).backward()
        optimizer.step()
        charge = full_step_charge()
        if first is None:
            first = charge
        skew = 0.5 * (charge - charge.mT)
        first_skew = 0.5 * (first - first.mT)
        assert relative_error(skew, first_skew) < 1e-9, step
        sym_change = max(sym_change, relative_error(charge + charge.mT, first + first.mT))
    assert float((0.5 * (first - first.mT)).abs().max()) > 0.1
    assert sym_change > 1e-2


# measured on a 2-core AMD EPYC VM (relative error of the products after 200 float64 steps at
# cond(G) = 1000): implicit 4.9e-12 (it steps in the balanced representative), splitting 2.4e-10
# frictionless (it inverts the Grams of the parameter's own representative) and below 1e-10 with
# friction, which contracts rounding errors
@pytest.mark.parametrize(
    ("integrator", "friction", "bound"),
    [
        ("implicit", 0.0, 1e-10),
        ("implicit", 2.0, 1e-10),
        ("splitting", 0.0, 5e-10),
        ("splitting", 2.0, 1e-10),
    ],
)
def test_trajectory_does_not_depend_on_the_factorization(integrator, friction, bound):
    x, y, z0, gen = regression_problem()
    manifold = FactorQuotient(N, M)
    g = matrix_with_condition((z0.shape[0],), z0.shape[-1], z0.shape[-1], 1e3, gen, torch.float64)

    def make(params):
        return QuotientHamiltonian(params, lr=0.05, friction=friction, integrator=integrator)

    w1, _ = train(manifold, z0, x, y, make)
    w2, _ = train(manifold, manifold.act(z0, g), x, y, make)
    assert relative_error(w2, w1) < bound
    assert relative_error(w1, manifold.product(z0)) > 1e-2  # it moved


def test_friction_descends():
    manifold, target, z0, _ = smooth_problem()
    point = geoopt.ManifoldParameter(z0.clone(), manifold=manifold)
    optimizer = QuotientHamiltonian([point], lr=0.05, friction=3.0)
    losses = []
    for _ in range(300):
        optimizer.zero_grad()
        loss = loss_fn(manifold, point, target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 1e-4 * losses[0]


def test_invalid_arguments():
    manifold = FactorQuotient(4, 4, metric="inv")
    point = geoopt.ManifoldParameter(manifold.random(8, 2), manifold=manifold)
    with pytest.raises(ValueError, match="metric='preconditioned'"):
        QuotientHamiltonian([point], lr=0.1)
    sphere = geoopt.ManifoldParameter(torch.tensor([1.0, 0.0, 0.0]), manifold=geoopt.Sphere())
    with pytest.raises(ValueError, match="supports FactorQuotient and plain"):
        QuotientHamiltonian([sphere], lr=0.1)
    with pytest.raises(ValueError, match="invalid friction"):
        QuotientHamiltonian([torch.nn.Parameter(torch.zeros(2))], lr=0.1, friction=-1.0)
    with pytest.raises(ValueError, match="invalid implicit_iterations"):
        QuotientHamiltonian([torch.nn.Parameter(torch.zeros(2))], lr=0.1, implicit_iterations=0)


def test_nonfinite_gradient_leaves_state_untouched():
    manifold, target, z0, _ = smooth_problem()
    point = geoopt.ManifoldParameter(z0.clone(), manifold=manifold)
    optimizer = QuotientHamiltonian([point], lr=0.01)
    for _ in range(3):
        optimizer.zero_grad()
        loss_fn(manifold, point, target).backward()
        optimizer.step()
    before, momentum = point.detach().clone(), optimizer.state[point]["momentum"].clone()
    optimizer.zero_grad()
    loss_fn(manifold, point, target).backward()
    point.grad[0, 0, 0] = float("inf")
    optimizer.step()
    assert torch.equal(point.detach(), before)
    assert torch.equal(optimizer.state[point]["momentum"], momentum)
    assert optimizer.nonfinite_steps() == 1


def ecd_run(manifold, z0, target, steps=300, lr=0.1):
    point = geoopt.ManifoldParameter(z0.clone(), manifold=manifold)
    optimizer = QuotientHamiltonian([point], lr=lr, mode="ecd", eta=1.0)
    losses = []

    def closure():
        optimizer.zero_grad()
        loss = loss_fn(manifold, point, target)
        loss.backward()
        return loss

    for _ in range(steps):
        losses.append(optimizer.step(closure).item())
    return point.detach(), losses, optimizer


def test_ecd_mode_descends_at_unit_speed_and_is_invariant():
    manifold, target, z0, gen = smooth_problem()
    z, losses, optimizer = ecd_run(manifold, z0, target)
    assert losses[-1] < 0.1 * losses[0]
    velocity = next(iter(optimizer.state.values()))["velocity"]
    assert abs(float(manifold.inner(z, velocity).sum()) - 1.0) < 1e-9  # unit speed in the metric
    assert float(manifold.proju(z, velocity).sub(velocity).abs().max()) < 1e-9  # horizontal
    g = matrix_with_condition((3,), 2, 2, 1e3, gen, torch.float64)
    z_g, _, _ = ecd_run(manifold, manifold.act(z0, g), target, steps=200, lr=0.05)
    z_1, _, _ = ecd_run(manifold, z0, target, steps=200, lr=0.05)
    assert relative_error(manifold.product(z_g), manifold.product(z_1)) < 1e-10


def test_ecd_mode_needs_a_closure():
    manifold, target, z0, _ = smooth_problem()
    point = geoopt.ManifoldParameter(z0.clone(), manifold=manifold)
    optimizer = QuotientHamiltonian([point], lr=0.1, mode="ecd")
    loss_fn(manifold, point, target).backward()
    with pytest.raises(ValueError, match="needs the loss value"):
        optimizer.step()
    with pytest.raises(ValueError, match="invalid mode"):
        QuotientHamiltonian([point], lr=0.1, mode="leapfrog")


def test_a_diverging_head_never_writes_a_nonfinite_point():
    gen = rng(11)
    manifold = FactorQuotient(6, 5)
    z = torch.randn(3, 11, 2, generator=gen, dtype=torch.float64)
    point = geoopt.ManifoldParameter(z.clone(), manifold=manifold)
    optimizer = QuotientHamiltonian([point], lr=0.1)
    grad = 1e-3 * torch.randn(3, 11, 2, generator=gen, dtype=torch.float64)
    grad[1] = 1e300  # finite, but the implicit stage of head 1 overflows
    point.grad = grad
    optimizer.step()
    assert bool(torch.isfinite(point.detach()).all())
    assert torch.equal(point.detach()[1], z[1])
    assert not torch.equal(point.detach()[0], z[0])
    assert bool(torch.isfinite(optimizer.state[point]["momentum"]).all())
    assert optimizer.rank_skips() == 1
    strict = QuotientHamiltonian([point], lr=0.1, on_nonfinite="raise")
    with pytest.raises(ValueError, match="lose rank"):
        strict.step()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_point_at_rest_stays_put_bitwise(dtype):
    """The step runs at the balanced representative; only the increment is carried back, so a
    point with zero force and zero velocity is not rounded on the way (it was, by 0.22 relative
    in bf16 over 50 steps, when the whole point made the round trip)."""
    gen = rng(21)
    manifold = FactorQuotient(32, 32)
    g = matrix_with_condition((3,), 4, 4, 100.0, gen, torch.float64)
    z = manifold.act(torch.randn(3, 64, 4, generator=gen, dtype=torch.float64), g).to(dtype)
    point = geoopt.ManifoldParameter(z.clone(), manifold=manifold)
    optimizer = QuotientHamiltonian([point], lr=0.01)
    for _ in range(20):
        point.grad = torch.zeros_like(point)
        optimizer.step()
    assert torch.equal(point.detach(), z)


def test_a_rank_deficient_head_moves_to_full_rank_with_finite_energy():
    """A head that starts rank-deficient moves with the regularized metric (issue 16, fault 4):
    its gradient comes from a loss of the product, so it lies in the range of the Grams."""
    gen = rng(22)
    manifold = FactorQuotient(6, 5)
    z = torch.randn(3, 11, 2, generator=gen, dtype=torch.float64)
    target = torch.randn(3, 6, 5, generator=gen, dtype=torch.float64)
    z[1, :6, 1] = 0.0  # head 1: A loses a column
    point = geoopt.ManifoldParameter(z.clone(), manifold=manifold)
    optimizer = QuotientHamiltonian([point], lr=0.05, friction=1.0)
    with pytest.warns(RuntimeWarning, match="start rank-deficient"):
        for _ in range(3):
            optimizer.zero_grad()
            (manifold.product(point) - target).square().sum().backward()
            optimizer.step()
    assert bool(torch.isfinite(point).all())
    assert not torch.equal(point.detach()[1], z[1])
    assert bool(manifold.grams(point.detach(), check=False).ok.all())
    assert math.isfinite(float(optimizer.kinetic_energy()))
    assert optimizer.rank_skips() == 0


def test_the_kinetic_energy_survives_a_resume_in_float64():
    gen = rng(23)
    weight = torch.nn.Parameter(torch.randn(30, generator=gen).bfloat16())
    optimizer = QuotientHamiltonian([weight], lr=0.1)
    for _ in range(2):
        weight.grad = torch.randn(30, generator=gen).bfloat16()
        optimizer.step()
    resumed = QuotientHamiltonian([weight], lr=0.1)
    resumed.load_state_dict(optimizer.state_dict())
    assert resumed.state[weight]["kinetic"].dtype == torch.float64  # torch's loader: bfloat16
    assert float(resumed.kinetic_energy()) == float(optimizer.kinetic_energy())


def _head_run(manifold, target, z0, steps):
    point = geoopt.ManifoldParameter(z0.clone(), manifold=manifold)
    optimizer = QuotientHamiltonian([point], lr=0.01)
    for _ in range(steps):
        optimizer.zero_grad()
        loss_fn(manifold, point, target).backward()
        optimizer.step()
    return point, optimizer


def _continue(point, optimizer, manifold, target):
    optimizer.zero_grad()
    loss_fn(manifold, point, target).backward()
    optimizer.step()


def test_a_head_resumes_in_the_same_process_bitwise():
    """Loading a state dict into the optimizer that wrote it (same parameter, cached Grams
    still current) steps on exactly as without the load; the cache's flags stay boolean."""
    manifold, target, z0, _ = smooth_problem(5)
    reference, _ = _head_run(manifold, target, z0, 5)
    point, optimizer = _head_run(manifold, target, z0, 2)
    optimizer.load_state_dict(optimizer.state_dict())
    assert all(flags[3].dtype == torch.bool for flags in optimizer.state[point]["grams"].values())
    for _ in range(3):
        _continue(point, optimizer, manifold, target)
    assert torch.equal(point.detach(), reference.detach())


def test_a_loaded_momentum_is_not_shared_with_the_source_optimizer():
    """torch's loader keeps a state tensor of matching dtype and device as it is; the splitting
    step recycles its old momentum as a work buffer, so a shared tensor would let one optimizer
    write into the other's state. A branch at another lr must leave the first run as it was."""
    manifold, target, z0, _ = smooth_problem(6)
    reference, _ = _head_run(manifold, target, z0, 5)
    first, first_optimizer = _head_run(manifold, target, z0, 2)
    branch = geoopt.ManifoldParameter(first.detach().clone(), manifold=manifold)
    branch_optimizer = QuotientHamiltonian([branch], lr=0.01)
    branch_optimizer.load_state_dict(first_optimizer.state_dict())  # no copy on the way
    branch_optimizer.param_groups[0]["lr"] = 0.03
    for _ in range(3):
        _continue(first, first_optimizer, manifold, target)
        _continue(branch, branch_optimizer, manifold, target)
    assert torch.equal(first.detach(), reference.detach())
    assert not torch.equal(branch.detach(), reference.detach())


def test_the_kinetic_energy_of_a_bfloat16_tensor_is_summed_before_rounding():
    """The plain tensors' kinetic energy (chunked through a scratch) agrees with float64 to
    float32 accuracy for bfloat16 parameters: the scratch is float32, so the sum
    g + (2 sigma / h) b is not rounded to bfloat16 first."""
    gen = rng(24)
    weight = torch.nn.Parameter(torch.randn(2500, generator=gen).bfloat16())
    optimizer = QuotientHamiltonian([weight], lr=0.1, friction=0.5, diagnostics=True)
    optimizer.kinetic_chunk = 256  # several chunks, the last one partial
    for _ in range(3):
        weight.grad = torch.randn(2500, generator=gen).bfloat16()
        state = optimizer.state[weight]
        if "momentum_buffer" in state:
            g, b = weight.grad.double(), state["momentum_buffer"].double()
            damping = math.exp(-0.5 * 0.1)
            pn = damping * 0.05 * (g + (2 * state["momentum_scale"] / 0.1) * b)
            expected = 0.5 * pn.square().sum()
        optimizer.step()
    assert abs(float(optimizer.state[weight]["kinetic"]) / float(expected) - 1) < 1e-6


@pytest.mark.parametrize("k", [1, 3, 5, 8, 64])
def test_tril_inverse_and_spd_inverse(k):
    gen = rng(30 + k)
    x = torch.randn(4, k + 3, k, generator=gen, dtype=torch.float64)
    gram = x.mT @ x
    inverse, ok = spd_inverse(gram)
    eye = torch.eye(k, dtype=torch.float64)
    assert bool(ok.all())
    assert float((inverse @ gram - eye).abs().max()) < 1e-10
    chol = torch.linalg.cholesky(gram)
    assert float((tril_inverse(chol) @ chol - eye).abs().max()) < 1e-12
    gram[1] = 0.0  # singular: flagged, identity instead of NaN
    inverse, ok = spd_inverse(gram)
    assert ok.tolist() == [True, False, True, True]
    assert torch.equal(inverse[1], eye)


def rope_problem(seed=0):
    """A loss invariant only under RoPE's commutant: W = A R B^T with R a fixed block rotation on
    the RoPE pairs (R commutes with every scaled rotation a I + b J of a pair, not with GL(4))."""
    gen = rng(seed)
    manifold = SubgroupFactorQuotient(7, 6, rope_generators(4), name="rope")
    angle = torch.tensor([0.3, 1.1], dtype=torch.float64)
    rot = torch.zeros(4, 4, dtype=torch.float64)
    for i, t in enumerate(angle):
        c, s = torch.cos(t), torch.sin(t)
        rot[2 * i : 2 * i + 2, 2 * i : 2 * i + 2] = torch.stack(
            (torch.stack((c, -s)), torch.stack((s, c)))
        )
    target = torch.randn(2, 7, 6, generator=gen, dtype=torch.float64)
    z0 = torch.randn(2, 13, 4, generator=gen, dtype=torch.float64)

    def loss(z):
        a, b = manifold.factors(z)
        return 0.5 * ((a @ rot @ b.mT - target) ** 2).sum()

    return manifold, loss, z0, gen


def test_a_subgroup_geometry_steps_under_its_own_group():
    manifold, loss, z0, _ = rope_problem()
    gl = FactorQuotient(7, 6)

    def run(z, steps=300):
        point = geoopt.ManifoldParameter(z.clone(), manifold=manifold)
        optimizer = QuotientHamiltonian([point], lr=0.01)
        charges, energies = [], []
        for _ in range(steps):
            optimizer.zero_grad()
            value = loss(point)
            value.backward()
            optimizer.step()
            charges.append(optimizer.state[point]["momentum_map"].abs().max().item())
            energies.append(value.item() + optimizer.kinetic_energy().item())
        return point.detach(), optimizer, charges, energies

    z, optimizer, charges, energies = run(z0)
    scale = energies[0] ** 0.5
    assert max(charges) < 1e-9 * scale  # the subgroup's momentum map J_h stays 0
    velocity = optimizer.momentum(optimizer.param_groups[0]["params"][0]).tensor
    # the GL(k) momentum map does not: the loss breaks GL(k) down to the RoPE commutant
    assert float(gl.momentum_map(z, velocity).abs().max()) > 1e-3 * scale
    assert max(abs(e - energies[0]) for e in energies) < 1e-3 * abs(energies[0])
    # products do not depend on the representative within the group (a scaled rotation per pair)
    g = torch.zeros(2, 4, 4, dtype=torch.float64)
    for i, (a, b) in enumerate([(2.0, 0.5), (0.3, -0.1)]):
        g[:, 2 * i : 2 * i + 2, 2 * i : 2 * i + 2] = torch.tensor([[a, -b], [b, a]])
    z_g, *_ = run(manifold.act(z0, g))
    assert relative_error(manifold.product(z_g), manifold.product(z)) < 1e-10
    assert relative_error(manifold.product(z), manifold.product(z0)) > 1e-2


@pytest.mark.parametrize("integrator", ["splitting", "implicit"])
def test_energy_error_does_not_drift(integrator):
    """Frictionless, 1000 steps: the energy error oscillates (a modified energy is conserved), so
    the second half's worst error is not larger than the first half's."""
    manifold, target, z0, _ = smooth_problem()
    point = geoopt.ManifoldParameter(z0.clone(), manifold=manifold)
    optimizer = QuotientHamiltonian([point], lr=0.003, integrator=integrator)
    energies = []
    for _ in range(1000):
        optimizer.zero_grad()
        loss = loss_fn(manifold, point, target)
        loss.backward()
        optimizer.step()
        energies.append(loss.item() + optimizer.kinetic_energy().item())
    error = (torch.tensor(energies) - energies[0]).abs() / energies[0]
    assert float(error.max()) < 1e-3
    assert float(error[500:].max()) < 1.5 * float(error[:500].max())
