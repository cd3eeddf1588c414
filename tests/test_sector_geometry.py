"""A head sector keeps its geometry through every tool that replaces the parameter object, and a
quotient optimizer never steps a declared sector as a plain tensor (issue 26, points 1 and 2).

The geometry is declared by the module (``quotientopt.nn.sector_geometry``): each check below
re-creates the parameters of a ``QuotientMultiheadAttention`` with one of torch's tools, then
trains it and the untouched module for 3 steps of ``QuotientSGD`` (float64) and asserts the same
parameters. Stepped as a plain tensor, a sector ends more than 1e-3 away.
"""

from __future__ import annotations

import copy
import io
import pickle

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

E, H = 8, 2


def make() -> QuotientMultiheadAttention:
    torch.manual_seed(0)
    return QuotientMultiheadAttention(E, H, batch_first=True, dtype=torch.float64)


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
    module: nn.Module, optimizer_class=QuotientSGD, reference: nn.Module | None = None
) -> None:
    """``module`` trains as ``reference`` (default: a fresh ``make()``), its sectors on their
    declared geometry."""
    want = train(make() if reference is None else reference, optimizer_class)
    got = train(module, optimizer_class)
    inner = getattr(module, "_orig_mod", module)
    for name in ("qk", "vo"):
        assert isinstance(geometry_of(inner._parameters[name]), FactorQuotient), name
    got = {key.removeprefix("_orig_mod."): value for key, value in got.items()}
    worst = max(float((got[k] - want[k]).abs().max()) for k in want)
    assert worst < 1e-12, f"largest difference {worst:.2e}"


def assign(module: nn.Module) -> nn.Module:
    fresh = QuotientMultiheadAttention(E, H, batch_first=True, dtype=torch.float64)
    fresh.load_state_dict(module.state_dict(), assign=True)
    return fresh


def to_empty(module: nn.Module) -> nn.Module:
    with torch.device("meta"):
        fresh = QuotientMultiheadAttention(E, H, batch_first=True, dtype=torch.float64)
    fresh.to_empty(device="cpu")
    fresh.load_state_dict(module.state_dict())
    return fresh


def overwrite_on_conversion(module: nn.Module) -> nn.Module:
    module = module.float()
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        before = module.qk
        module = module.double()
        assert module.qk is not before  # a new parameter object
        return module
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(False)


def swap_on_conversion(module: nn.Module) -> nn.Module:
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        module.load_state_dict(make().state_dict())  # swaps in load_state_dict too
        return module.double()
    finally:
        torch.__future__.set_swap_module_params_on_conversion(False)


def torch_save(module: nn.Module) -> nn.Module:
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


TOOLS = {
    "load_state_dict(assign=True)": assign,
    "meta + to_empty": to_empty,
    "overwrite_module_params_on_conversion": overwrite_on_conversion,
    "swap_module_params_on_conversion": swap_on_conversion,
    "deepcopy": copy.deepcopy,
    "pickle": lambda m: pickle.loads(pickle.dumps(m)),
    "torch.save": torch_save,
}


@pytest.mark.parametrize("tool", list(TOOLS))
def test_a_recreated_sector_trains_on_its_geometry(tool):
    # the float32 round trip rounds the values: the reference takes it keeping its objects
    reference = make().float().double() if "overwrite" in tool else None
    assert_same_training(TOOLS[tool](make()), reference=reference)


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
