"""The optimizer/geometry interface: every quotient optimizer on every head geometry.

Each optimizer must (1) keep the trajectory of the model's function independent of the
representative under the geometry's own group, (2) never change the function by a move the group
does not contain (rebalancing, balanced frames), (3) work under ``torch.compile`` (the eager result) and a float64
default dtype, and (4) survive non-finite gradients and rank-deficient heads as documented.
"""

from __future__ import annotations

import copy
import warnings

import geoopt
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quotientopt.manifolds import FactorQuotient
from quotientopt.manifolds.protocol import HeadGeometry, is_head_geometry
from quotientopt.nn import QuotientMultiheadAttention
from quotientopt.optim import (
    HybridOptimizer,
    QuotientAdam,
    QuotientECD,
    QuotientHamiltonian,
    QuotientMuon,
    QuotientSGD,
    geometry_of,
)
from tests.helpers import rng

OPTIMIZERS = {
    "sgd": lambda ps: QuotientSGD(ps, lr=0.05),
    "sgd-momentum-rebalance": lambda ps: QuotientSGD(
        ps, lr=0.05, momentum=0.9, nesterov=True, rebalance_every=2, weight_decay=1e-2
    ),
    "sgd-lazy": lambda ps: QuotientSGD(ps, lr=0.05, momentum=0.9, refresh_every=4),
    "adam": lambda ps: QuotientAdam(ps, lr=0.01, weight_decay=1e-2),
    "hamiltonian": lambda ps: QuotientHamiltonian(ps, lr=0.05, friction=1.0),
    "muon": lambda ps: QuotientMuon([p for p in ps if p.dim() >= 2], lr=0.02),
}
GEOMETRIES = {
    "gl": {},
    "rope": {"rope": True},
    "qk-norm": {"qk_norm": True},
    "rope-qk-norm": {"rope": True, "qk_norm": True},
    # sector geometry "orthogonal": O(k) on both sectors (issue 26, point 3)
    "orthogonal": {"qk_geometry": "orthogonal", "vo_geometry": "orthogonal"},
}
# QK-norm's RMSNorm adds eps = 1e-6 to the mean square, so the scalings in its conformal group
# change the output at order eps / mean(q^2) (measured: 1.4e-8 to 1.3e-6 here); rotations are
# exact.
TOLERANCE = {"gl": 1e-12, "rope": 1e-12, "qk-norm": 1e-5, "rope-qk-norm": 1e-5, "orthogonal": 1e-12}
# the invariance check also runs QuotientECD (it needs the closure that train passes)
INVARIANCE_OPTIMIZERS = {**OPTIMIZERS, "ecd": lambda ps: QuotientECD(ps, lr=0.05)}


def attention(options: dict, seed: int = 0) -> QuotientMultiheadAttention:
    torch.manual_seed(seed)
    return QuotientMultiheadAttention(
        16, 2, batch_first=True, dtype=torch.float64, bias=False, **options
    )


def head_parameters(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p for p in module.parameters() if geometry_of(p) is not None]


def group_element(
    manifold, batch: tuple[int, ...], scale: float, seed: int, traceless: bool = False
) -> torch.Tensor:
    """``exp(sum_i c_i E_i)`` with random coefficients over the manifold's own Lie algebra
    (``traceless``: its traceless part, e.g. the rotations of QK-norm's conformal group, which
    RMSNorm's eps leaves exact)."""
    k = manifold.factors(torch.zeros(1, manifold.n + manifold.m, 8))[0].shape[-1]
    gens = getattr(manifold, "generators", None)
    if gens is None:  # all of GL(k)
        gens = torch.eye(k * k, dtype=torch.float64).reshape(k * k, k, k)
    if traceless:
        trace = gens.diagonal(dim1=-2, dim2=-1).sum(-1)
        gens = gens - (trace / k)[:, None, None] * torch.eye(k, dtype=gens.dtype)
    coefficients = torch.randn(*batch, gens.shape[0], generator=rng(seed), dtype=torch.float64)
    return torch.linalg.matrix_exp(scale * torch.einsum("...r,rij->...ij", coefficients, gens))


def train(module, make_optimizer, x, target, steps):
    optimizer = make_optimizer(head_parameters(module))

    def closure():
        optimizer.zero_grad()
        out, _ = module(x, x, x, need_weights=False)
        loss = ((out - target) ** 2).mean()
        loss.backward()
        return loss

    for _ in range(steps):
        optimizer.step(closure)
    with torch.no_grad():
        return module(x, x, x, need_weights=False)[0]


def test_head_manifolds_implement_the_protocol():
    for options in GEOMETRIES.values():
        module = attention(options)
        for p in head_parameters(module):
            assert is_head_geometry(p.manifold)
            assert isinstance(p.manifold, HeadGeometry)
    assert not is_head_geometry(geoopt.Euclidean())


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_rebalancing_never_changes_the_function(geometry):
    """Fault 1 of issue 12: GL(k) balancing on RoPE / QK-norm heads changed the output by 0.5."""
    module = attention(GEOMETRIES[geometry])
    x = torch.randn(3, 7, 16, generator=rng(1), dtype=torch.float64)
    before = module(x, x, x, need_weights=False)[0]
    optimizer = QuotientSGD(head_parameters(module), lr=0.0, momentum=0.9, rebalance_every=1)
    before.sum().backward()
    optimizer.step()
    after = module(x, x, x, need_weights=False)[0]
    assert torch.allclose(after, before, rtol=0, atol=TOLERANCE[geometry])


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_balancing_transform_lies_in_the_group_and_balances(geometry):
    module = attention(GEOMETRIES[geometry])
    for p in head_parameters(module):
        manifold, z = p.manifold, p.detach() * torch.tensor([1.0, 3.0])[:, None, None]
        transform = manifold.balancing_transform(z)
        if transform is None:
            continue
        m_a, m_b = transform
        assert torch.allclose(m_a.mT @ m_b, torch.eye(m_a.shape[-1], dtype=m_a.dtype), atol=1e-12)
        moved = manifold.right_multiply(z, m_a, m_b)
        gens = getattr(manifold, "basis", None)
        if gens is not None and manifold.structure != "full":
            # block scalings: a positive diagonal whose logarithm lies in the Lie algebra
            diagonal = m_a.diagonal(dim1=-2, dim2=-1)
            assert torch.equal(m_a, torch.diag_embed(diagonal)) and bool((diagonal > 0).all())
            log = torch.diag_embed(diagonal.log())
            flat = gens.reshape(gens.shape[0], -1)
            residual = log.flatten(-2) - (log.flatten(-2) @ flat.T) @ flat
            assert float(residual.abs().max()) < 1e-10
        a, b = manifold.factors(moved)
        assert float(((a.square().sum((-1, -2)) / b.square().sum((-1, -2))) - 1).abs().max()) < 1e-9


def check_trajectory_independence(geometry: str, name: str, seed: int) -> None:
    """From ``Z`` and from ``Z G`` with ``G`` in the geometry's own group, the model's outputs
    agree after 15 steps of optimizer ``name`` (float64)."""
    module = attention(GEOMETRIES[geometry], seed=seed % 7)
    moved = copy.deepcopy(module)
    with torch.no_grad():
        for p in head_parameters(moved):
            # QK-norm: rotations only (RMSNorm's eps makes its scalings inexact, 1e-6 relative)
            exact = "qk-norm" in geometry
            g = group_element(p.manifold, p.shape[:-2], 0.5, seed, traceless=exact)
            p.copy_(p.manifold.act(p.detach(), g))
    gen = rng(seed)
    x = torch.randn(2, 6, 16, generator=gen, dtype=torch.float64)
    target = torch.randn(2, 6, 16, generator=gen, dtype=torch.float64)
    with torch.no_grad():  # the two starts are the same model
        start = module(x, x, x, need_weights=False)[0]
        assert torch.allclose(moved(x, x, x, need_weights=False)[0], start, atol=1e-12)
    out = train(module, INVARIANCE_OPTIMIZERS[name], x, target, steps=15)
    out_moved = train(moved, INVARIANCE_OPTIMIZERS[name], x, target, steps=15)
    assert float((out - start).abs().max()) > 1e-4  # it moved
    assert float((out_moved - out).abs().max()) < 1e-9 * max(1.0, float(out.abs().max()))


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    geometry=st.sampled_from(list(GEOMETRIES)),
    name=st.sampled_from(list(OPTIMIZERS)),
    seed=st.integers(0, 2**16),
)
def test_trajectories_do_not_depend_on_the_representative_in_the_group(geometry, name, seed):
    """Every optimizer, every head geometry: from ``Z`` and from ``Z G`` with ``G`` in the
    geometry's own group, the model's outputs agree after 15 steps (float64)."""
    check_trajectory_independence(geometry, name, seed)


@pytest.mark.parametrize("name", list(INVARIANCE_OPTIMIZERS))
def test_orthogonal_sectors_trajectories_do_not_depend_on_the_representative(name):
    """Issue 26, point 3: the sector geometry ``"orthogonal"`` (O(k) on QK and VO) is a head
    geometry that every quotient optimizer steps (QuotientSGD, QuotientAdam, QuotientHamiltonian,
    QuotientMuon, QuotientECD), with trajectories independent of the representative in O(k)."""
    check_trajectory_independence("orthogonal", name, seed=5)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_every_optimizer_steps_under_a_float64_default_dtype(name):
    """Fault 2 of issue 12: the non-finite check raised 'inv_scale must be a float tensor'."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        module = attention({})
        x = torch.randn(2, 5, 16, dtype=torch.float64)
        optimizer = OPTIMIZERS[name](list(module.parameters()))
        before = [p.detach().clone() for p in module.parameters()]
        for _ in range(2):
            optimizer.zero_grad()
            module(x, x, x, need_weights=False)[0].square().mean().backward()
            optimizer.step()
        assert any(not torch.equal(b, p) for b, p in zip(before, module.parameters(), strict=True))
    finally:
        torch.set_default_dtype(previous)


def two_shape_problem(dtype=torch.float32):
    """Two sectors of different shapes (and a plain tensor) with a regression loss."""
    torch.manual_seed(3)
    gen = rng(3)
    big, small = FactorQuotient(12, 10), FactorQuotient(6, 5)
    params = [
        geoopt.ManifoldParameter(big.random(3, 22, 4, dtype=dtype), manifold=big),
        geoopt.ManifoldParameter(small.random(2, 11, 2, dtype=dtype), manifold=small),
        torch.nn.Parameter(torch.randn(5, dtype=dtype)),
    ]
    x1 = torch.randn(16, 12, generator=gen, dtype=dtype)
    x2 = torch.randn(16, 6, generator=gen, dtype=dtype)

    def loss_fn(ps):
        out1 = (x1 @ big.product(ps[0])).square().mean()
        out2 = ((x2 @ small.product(ps[1])).mean(-2) - ps[2]).square().mean()
        return out1 + out2 + (ps[2] - 1).square().sum()

    return params, loss_fn


def run_two_shapes(name: str, step_of) -> list[torch.Tensor]:
    params, loss_fn = two_shape_problem()
    optimizer = OPTIMIZERS[name](params)
    step = step_of(optimizer)
    for _ in range(4):
        optimizer.zero_grad()
        loss_fn(params).backward()
        step()
    return [p.detach().clone() for p in params]


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_compiled_step_equals_eager(name):
    """Fault 4 of issue 12: compiled QuotientSGD drifted by 0.6 after 3 steps with two sector
    shapes; QuotientAdam failed with a shape mismatch. ``torch.compile(optimizer.step)`` with the
    default backend must give the eager result (the step runs eagerly: ``eager_step``)."""
    torch._dynamo.reset()
    eager = run_two_shapes(name, lambda opt: opt.step)
    compiled = run_two_shapes(name, lambda opt: torch.compile(opt.step))
    start, _ = two_shape_problem()
    for e, c, before in zip(eager, compiled, start, strict=True):
        # it trained (QuotientMuon is given the matrices only)
        assert not torch.equal(e, before.detach()) or (name == "muon" and e.dim() == 1)
        assert torch.allclose(c, e, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_traced_step_equals_eager(name):
    """The step itself traces correctly: dynamo's graph of the undecorated step (``aot_eager``
    backend, no code generation) gives the eager result. This is what the version checks and
    caches that run eagerly (``WriteLog``) fixed; inductor still miscompiles it (see
    ``quotientopt.optim._base.eager_step``). QuotientAdam's QR and eigh need ``dynamic=False``."""
    torch._dynamo.reset()
    dynamic = False if name == "adam" else None
    eager = run_two_shapes(name, lambda opt: opt.step)

    def traced(opt):
        undecorated = type(opt).step.__wrapped__.__get__(opt)
        return torch.compile(undecorated, backend="aot_eager", dynamic=dynamic)

    for e, c in zip(eager, run_two_shapes(name, traced), strict=True):
        assert torch.allclose(c, e, rtol=0, atol=1e-6)


@pytest.mark.parametrize("policy", ["skip", "warn", "raise"])
def test_quotient_adam_survives_nonfinite_gradients_at_k8(policy):
    """Fault 5 of issue 12: eigh of a NaN second moment raised LinAlgError at k = 8."""
    manifold = FactorQuotient(12, 10)
    point = geoopt.ManifoldParameter(manifold.random(3, 22, 8), manifold=manifold)
    optimizer = QuotientAdam([point], lr=0.01, on_nonfinite=policy)
    manifold.product(point).square().sum().backward()
    optimizer.step()
    kept = point.detach().clone()
    optimizer.zero_grad()
    point.grad = torch.full_like(point, float("nan"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if policy == "raise":
            with pytest.raises(ValueError, match="NaN or Inf"):
                optimizer.step()
        else:
            optimizer.step()
    assert torch.equal(point.detach(), kept)
    assert optimizer.nonfinite_steps() == (0 if policy == "raise" else 1)


def test_quotient_adam_moves_a_head_with_a_zero_column_to_full_rank():
    """Fault 5 of issue 12: a start with a zero column in one head crashed eigh. Now that head
    takes the regularized step onto the full-rank set (issue 16, fault 4), with one warning."""
    torch.manual_seed(5)
    manifold = FactorQuotient(12, 10)
    z = manifold.random(3, 22, 8)
    target = manifold.product(manifold.random(3, 22, 8))  # rank 8: the loss wants full rank
    z[1, :12, 3] = 0  # head 1: A loses a column
    point = geoopt.ManifoldParameter(z.clone(), manifold=manifold)
    optimizer = QuotientAdam([point], lr=0.01)
    with pytest.warns(RuntimeWarning, match="start rank-deficient"):
        for _ in range(2):
            optimizer.zero_grad()
            (manifold.product(point) - target).square().sum().backward()
            optimizer.step()
    assert torch.isfinite(point).all()
    assert not torch.equal(point.detach()[1], z[1])
    assert bool(manifold.grams(point.detach(), check=False).ok.all())
    assert optimizer.rank_skips() == 0


# ------------------------------------------------------------------ state: copies, loads, writes
def _steps(optimizer, params, loss_fn, n):
    for _ in range(n):
        optimizer.zero_grad()
        loss_fn(params).backward()
        optimizer.step()


def _reference(name: str, steps: int) -> list[torch.Tensor]:
    params, loss_fn = two_shape_problem()
    _steps(OPTIMIZERS[name](params), params, loss_fn, steps)
    return [p.detach().clone() for p in params]


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_a_deep_copied_optimizer_steps_like_the_original(name):
    """copy.deepcopy (and pickling) keeps the policy and the counters; both copies go on as the
    uninterrupted run, bitwise."""
    params, loss_fn = two_shape_problem()
    optimizer = OPTIMIZERS[name](params)
    optimizer.on_nonfinite = "warn"
    _steps(optimizer, params, loss_fn, 2)
    twin_params, twin = copy.deepcopy((params, optimizer))
    assert twin.on_nonfinite == "warn" and twin.nonfinite_steps() == 0
    _steps(optimizer, params, loss_fn, 2)
    _steps(twin, twin_params, loss_fn, 2)
    for p, q, r in zip(params, twin_params, _reference(name, 4), strict=True):
        assert torch.equal(p.detach(), r) and torch.equal(q.detach(), r)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_a_branch_loaded_from_the_state_dict_leaves_the_source_alone(name):
    """torch's loader keeps state tensors it need not cast; a second optimizer loaded from the
    first one's state_dict (no copy) and run at another lr must not write into the first's
    state: the first run goes on exactly as if alone."""
    params, loss_fn = two_shape_problem()
    optimizer = OPTIMIZERS[name](params)
    _steps(optimizer, params, loss_fn, 2)
    branch_params = [type(p)(p.detach().clone(), **_manifold_kwargs(p)) for p in params]
    branch = OPTIMIZERS[name](branch_params)
    branch.load_state_dict(optimizer.state_dict())
    for group in branch.param_groups:
        group["lr"] *= 3
    for _ in range(2):
        _steps(optimizer, params, loss_fn, 1)
        _steps(branch, branch_params, loss_fn, 1)
    for p, r in zip(params, _reference(name, 4), strict=True):
        assert torch.equal(p.detach(), r)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_loading_its_own_state_dict_in_place_keeps_the_state_tensors(name):
    """torch.distributed.checkpoint loads into the tensors of ``optimizer.state_dict()`` and
    passes that dict back to ``load_state_dict``: the state is the optimizer's own already, so no
    tensor is copied (a copy would double the state's memory at load time), and the run goes on
    bitwise as if uninterrupted."""
    params, loss_fn = two_shape_problem()
    optimizer = OPTIMIZERS[name](params)
    _steps(optimizer, params, loss_fn, 2)
    before = _state_tensors(optimizer)
    optimizer.load_state_dict(optimizer.state_dict())
    after = _state_tensors(optimizer)
    assert before.keys() == after.keys()
    assert before or name == "sgd"  # plain QuotientSGD keeps no tensor state
    assert all(after[slot] is tensor for slot, tensor in before.items())
    _steps(optimizer, params, loss_fn, 2)
    for p, r in zip(params, _reference(name, 4), strict=True):
        assert torch.equal(p.detach(), r)


def _state_tensors(optimizer: torch.optim.Optimizer) -> dict[tuple, torch.Tensor]:
    """Every tensor of the optimizer's state, nested ones (cached Grams) too, by its place."""
    found = {}

    def visit(place: tuple, value) -> None:
        if isinstance(value, torch.Tensor):
            found[place] = value
        elif isinstance(value, dict):
            for key, item in value.items():
                visit((*place, key), item)
        elif isinstance(value, (tuple, list)):
            for index, item in enumerate(value):
                visit((*place, index), item)

    for i, state in enumerate(optimizer.state.values()):
        visit((i,), state)
    return found


def test_a_hybrid_loaded_from_another_hybrid_shares_no_state():
    """HybridOptimizer's torch part (AdamW here) keeps the tensors torch's loader need not cast:
    a hybrid loaded from another one's state_dict must not step the other's AdamW state, and a
    hybrid loaded from its own state_dict keeps its tensors."""

    def hybrid(ps):
        return HybridOptimizer.for_parameters(
            ps,
            heads=lambda hs: QuotientSGD(hs, lr=0.05, momentum=0.9),
            rest=lambda rs: torch.optim.AdamW(rs, lr=0.01),
        )

    params, loss_fn = two_shape_problem()
    first = hybrid(params)
    _steps(first, params, loss_fn, 2)
    twin_params = [type(p)(p.detach().clone(), **_manifold_kwargs(p)) for p in params]
    twin = hybrid(twin_params)
    twin.load_state_dict(first.state_dict())
    snapshot = {place: t.clone() for place, t in _state_tensors(first.rest).items()}
    _steps(twin, twin_params, loss_fn, 1)
    assert snapshot and all(
        torch.equal(t, snapshot[place]) for place, t in _state_tensors(first.rest).items()
    )
    own = {
        place: t for part in (first.heads, first.rest) for place, t in _state_tensors(part).items()
    }
    first.load_state_dict(first.state_dict())
    again = {
        place: t for part in (first.heads, first.rest) for place, t in _state_tensors(part).items()
    }
    assert all(again[place] is t for place, t in own.items())


def _manifold_kwargs(p: torch.Tensor) -> dict:
    return {"manifold": p.manifold} if isinstance(p, geoopt.ManifoldParameter) else {}


@pytest.mark.parametrize("name", ["sgd", "sgd-lazy", "adam", "hamiltonian"])
def test_writes_the_version_counter_misses_are_caught_by_invalidate(name):
    """Writing a head through ``p.data`` leaves ``p._version`` as it was, so cached Grams or
    frames would be stale; after ``invalidate()`` the step equals that of a fresh optimizer
    state on the written point (here: a re-factorization, which leaves the function as it is,
    followed by reloading the state into a new optimizer)."""
    params, loss_fn = two_shape_problem(torch.float64)
    optimizer = OPTIMIZERS[name](params)
    _steps(optimizer, params, loss_fn, 2)
    head = params[0]
    g = torch.eye(4, dtype=torch.float64) + 0.5 * torch.triu(torch.ones(4, 4, dtype=torch.float64))
    version = head._version
    head.data.copy_(head.manifold.right_multiply(head.detach(), g, torch.linalg.inv(g).mT))
    assert head._version == version  # invisible to the version counter
    expected_params = [type(p)(p.detach().clone(), **_manifold_kwargs(p)) for p in params]
    fresh = OPTIMIZERS[name](expected_params)
    fresh.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    for state in fresh.state.values():
        state.pop("grams", None)  # nothing cached from before the write
        state.pop("frame", None)
        state.pop("frame_inv", None)
    optimizer.invalidate()
    _steps(optimizer, params, loss_fn, 1)
    _steps(fresh, expected_params, loss_fn, 1)
    for p, q in zip(params, expected_params, strict=True):
        assert torch.equal(p.detach(), q.detach())
