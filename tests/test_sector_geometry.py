"""A head sector keeps its geometry through every tool that replaces the parameter object, and a
quotient optimizer never steps a declared sector as a plain tensor (issue 26, points 1 and 2).

The geometry is recorded per module and parameter name (``quotientopt.sector_registry``): for
quotientopt's ``QuotientMultiheadAttention`` and for a user's own ``nn.Module`` holding a
``geoopt.ManifoldParameter`` (``UserHeads``, recorded by torch's global parameter registration
hook). Each check below re-creates the parameters with one of torch's tools, then trains the module
and an untouched one for 3 steps of ``QuotientSGD`` (float64) and asserts the same parameters.
Stepped as a plain tensor, a sector ends more than 1e-3 away.
"""

from __future__ import annotations

import copy
import gc
import io
import pickle
import weakref

import geoopt
import pytest
import torch
from torch import nn

from quotientopt.manifolds import FactorQuotient
from quotientopt.nn import QuotientMultiheadAttention
from quotientopt.optim import (
    QuotientAdam,
    QuotientSGD,
    geometry_of,
    muon_and_adamw,
    split_parameters,
)
from quotientopt.sector_registry import GEOMETRIES_ATTR, declared_geometries

E, H = 8, 2


class UserHeads(nn.Module):
    """A user's own module: ``H`` heads of one sector on ``FactorQuotient(E, E)`` (head dim
    ``E // H``), summed into one ``E x E`` map, and a plain bias. Nothing of quotientopt's but the
    manifold."""

    def __init__(self, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        self.manifold = FactorQuotient(E, E)
        self.sector = geoopt.ManifoldParameter(
            self.manifold.random(H, 2 * E, E // H, dtype=dtype), manifold=self.manifold
        )
        self.bias = nn.Parameter(torch.zeros(E, dtype=dtype))

    def forward(self, x, *_, need_weights: bool = False):
        return x @ self.manifold.product(self.sector).sum(0) + self.bias, None


KINDS = {
    "attention": (
        lambda: QuotientMultiheadAttention(E, H, batch_first=True, dtype=torch.float64),
        ("qk", "vo"),
    ),
    "user module": (UserHeads, ("sector",)),
}


def make(kind: str = "attention") -> nn.Module:
    torch.manual_seed(0)
    return KINDS[kind][0]()


def train(module: nn.Module, optimizer_class=QuotientSGD, steps: int = 3) -> dict:
    """``steps`` steps on fixed data; the parameters after them."""
    if optimizer_class is QuotientSGD:
        optimizer = QuotientSGD(module.parameters(), lr=0.2, momentum=0.9)
    else:
        optimizer = optimizer_class(module.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 5, E, generator=gen, dtype=torch.float64)
    target = torch.randn(4, 5, E, generator=gen, dtype=torch.float64)
    for _ in range(steps):
        out, _ = module(x, x, x, need_weights=False)
        loss = (out - target).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def assert_same_training(
    module: nn.Module,
    optimizer_class=QuotientSGD,
    reference: nn.Module | None = None,
    kind: str = "attention",
) -> None:
    """``module`` trains as ``reference`` (default: a fresh ``make(kind)``), its sectors on their
    declared geometry."""
    want = train(make(kind) if reference is None else reference, optimizer_class)
    got = train(module, optimizer_class)
    inner = getattr(module, "_orig_mod", module)
    for name in KINDS[kind][1]:
        assert isinstance(geometry_of(inner._parameters[name]), FactorQuotient), name
    got = {key.removeprefix("_orig_mod."): value for key, value in got.items()}
    worst = max(float((got[k] - want[k]).abs().max()) for k in want)
    assert worst < 1e-12, f"largest difference {worst:.2e}"


def fresh_like(module: nn.Module) -> nn.Module:
    """A new module of ``module``'s kind (new parameter values)."""
    kind = "attention" if isinstance(module, QuotientMultiheadAttention) else "user module"
    return KINDS[kind][0]()


def assign(module: nn.Module) -> nn.Module:
    fresh = fresh_like(module)
    fresh.load_state_dict(module.state_dict(), assign=True)
    return fresh


def to_empty(module: nn.Module) -> nn.Module:
    with torch.device("meta"):
        fresh = fresh_like(module)
    fresh.to_empty(device="cpu")
    fresh.load_state_dict(module.state_dict())
    return fresh


def overwrite_on_conversion(module: nn.Module) -> nn.Module:
    module = module.float()
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        before = dict(module.named_parameters())
        module = module.double()
        assert all(p is not before[n] for n, p in module.named_parameters())  # new objects
        return module
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(False)


def swap_on_conversion(module: nn.Module) -> nn.Module:
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        module.load_state_dict(module.state_dict())  # swaps in load_state_dict too
        return module.double()
    finally:
        torch.__future__.set_swap_module_params_on_conversion(False)


def torch_save(module: nn.Module) -> nn.Module:
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def write_plain(module: nn.Module) -> nn.Module:
    """What torch's ``fully_shard`` does to a module that does not override ``__setattr__``: a new
    plain parameter object written into ``_parameters`` (no hook runs)."""
    for name, p in list(module._parameters.items()):
        module._parameters[name] = nn.Parameter(p.detach().clone())
    return module


TOOLS = {
    "load_state_dict(assign=True)": assign,
    "meta + to_empty": to_empty,
    "overwrite_module_params_on_conversion": overwrite_on_conversion,
    "swap_module_params_on_conversion": swap_on_conversion,
    # a copy, then its parameters replaced the way fully_shard does: the copy is registered
    "deepcopy": lambda m: write_plain(copy.deepcopy(m)),
    "pickle": lambda m: write_plain(pickle.loads(pickle.dumps(m))),
    "torch.save": lambda m: write_plain(torch_save(m)),
}


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("tool", list(TOOLS))
def test_a_recreated_sector_trains_on_its_geometry(tool, kind):
    # the float32 round trip rounds the values: the reference takes it keeping its objects
    reference = make(kind).float().double() if "overwrite" in tool else None
    assert_same_training(TOOLS[tool](make(kind)), reference=reference, kind=kind)


def test_assign_keeps_a_user_sector_at_once():
    """``load_state_dict(assign=True)`` registers through ``setattr``: the registration hook puts
    the recorded manifold on the new parameter before any optimizer sees it."""
    module = assign(make("user module"))
    assert type(module.sector) is nn.Parameter
    assert geometry_of(module.sector) is module.manifold


def test_the_record_holds_no_module_alive():
    """The registry holds its modules weakly: a user module that is dropped is collected."""
    module = make("user module")
    assert id(module.sector) in declared_geometries()
    ref = weakref.ref(module)
    del module
    gc.collect()
    assert ref() is None


def test_a_module_without_sectors_gets_no_record():
    assert GEOMETRIES_ATTR not in vars(nn.Linear(2, 2))


def test_torch_compile_keeps_the_parameter_objects():
    """``torch.compile(model)`` wraps the module (an ``OptimizedModule``) and keeps its parameter
    objects, geometry included (training through the compiled forward is not run here: tracing
    costs seconds)."""
    module = make()
    compiled = torch.compile(module)
    assert [p for p in compiled.parameters()] == [p for p in module.parameters()]
    assert geometry_of(compiled.get_parameter("_orig_mod.qk")) is module.qk_manifold


def test_fsdp_style_reregistration_keeps_the_geometry():
    """``fully_shard`` registers its new parameters with ``setattr`` on a module that overrides
    ``__setattr__`` (torch's ``unsafe_setattr_param``): a plain ``nn.Parameter`` set that way
    gets the declared manifold."""
    module = make()
    module.qk = nn.Parameter(module.qk.detach().clone())
    module.vo = nn.Parameter(module.vo.detach().clone())
    assert_same_training(module)


def test_the_guard_recovers_a_sector_written_into_parameters_directly():
    """A parameter object written into ``_parameters`` (no hook runs) reaches a quotient optimizer
    plain: the optimizer recovers its geometry from the declaring module (QuotientSGD and
    QuotientAdam train as on the untouched module)."""
    for optimizer_class in (QuotientSGD, QuotientAdam):
        module = make()
        for name in ("qk", "vo"):
            module._parameters[name] = nn.Parameter(module._parameters[name].detach().clone())
        assert geometry_of(module.qk) is None
        assert_same_training(module, optimizer_class)


def test_the_guard_recovers_after_unpickling():
    """An unpickled module is a declaring module too (its record travels and it re-registers)."""
    module = pickle.loads(pickle.dumps(make()))
    module._parameters["qk"] = nn.Parameter(module.qk.detach().clone())
    QuotientSGD(module.parameters(), lr=0.1)
    assert geometry_of(module.qk) is module.__dict__["_quotientopt_geometries"]["qk"]


def test_the_guard_refuses_a_sector_on_another_geometry():
    module = make()
    other = FactorQuotient(module.qk_manifold.n, module.qk_manifold.m)
    module._parameters["qk"] = geoopt.ManifoldParameter(module.qk.detach().clone(), manifold=other)
    with pytest.raises(ValueError, match="'qk' of QuotientMultiheadAttention is declared"):
        QuotientSGD(module.parameters(), lr=0.1)


def test_assigning_a_new_sector_redeclares_it():
    """Assigning a ManifoldParameter on a geometry is a declaration (the user's choice)."""
    module = make()
    other = FactorQuotient(module.qk_manifold.n, module.qk_manifold.m)
    module.qk = geoopt.ManifoldParameter(module.qk.detach().clone(), manifold=other)
    QuotientSGD(module.parameters(), lr=0.1)
    assert geometry_of(module.qk) is other


def test_split_parameters_routes_a_recovered_sector_to_the_heads():
    """``split_parameters`` (HybridOptimizer's split) looks the parameters up too: a sector written
    into ``_parameters`` plain is a head, not a plain tensor for the other optimizer."""
    module = make()
    module._parameters["vo"] = nn.Parameter(module.vo.detach().clone())
    heads, rest = split_parameters(module.parameters())
    assert [id(p) for p in heads] == [id(module.qk), id(module.vo)]
    assert [id(p) for p in rest] == [id(module.out_bias)]


def test_muon_and_adamw_puts_a_recovered_sector_with_the_heads():
    """``muon_and_adamw`` sorts a model's parameters itself: a sector written into ``_parameters``
    plain goes to QuotientMuon on its geometry, not to torch Muon or AdamW as a matrix."""
    model = nn.Sequential(make())
    model[0]._parameters["vo"] = nn.Parameter(model[0].vo.detach().clone())
    optimizer = muon_and_adamw(model, lr=0.02)
    quotient = optimizer.optimizers[0]
    stepped = {id(p) for group in quotient.param_groups for p in group["params"]}
    assert {id(model[0].qk), id(model[0].vo)} <= stepped
    assert geometry_of(model[0].vo) is model[0].__dict__["_quotientopt_geometries"]["vo"]
