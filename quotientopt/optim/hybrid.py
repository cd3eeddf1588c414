"""One optimizer made of two: a quotient optimizer for the heads, any torch optimizer for the rest.

>>> optimizer = HybridOptimizer.for_parameters(
...     model.parameters(),
...     heads=lambda ps: QuotientSGD(ps, lr=0.1, momentum=0.9),
...     rest=lambda ps: torch.optim.AdamW(ps, lr=3e-4),
... )

It is a ``torch.optim.Optimizer``: ``param_groups`` lists the groups of both (the same dicts, so
LR schedulers act on both), ``step(closure)`` evaluates the closure once and steps both,
``zero_grad``, ``state_dict`` / ``load_state_dict`` and ``add_param_group`` cover both.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch

from quotientopt.optim._base import (
    KeepStateDtypes,
    Momentum,
    held_state,
    manifold_of,
    momentum_of,
    own_loaded_state,
)
from quotientopt.optim._guard import check_declared_geometries


def split_parameters(
    params: Iterable[torch.Tensor],
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``(heads, rest)``: parameters on a geoopt manifold (the quotient sectors) and the others."""
    heads, rest, params = [], [], list(params)
    check_declared_geometries(params, "split_parameters")  # a declared sector gets its geometry
    for p in params:
        (heads if manifold_of(p) is not None else rest).append(p)
    return heads, rest


class RoutedState(Mapping):
    """A read view of two optimizers' states: ``state[p]`` is the state of the optimizer that
    steps ``p``. (A ``ChainMap`` would not do: torch's ``state`` is a ``defaultdict``, so the
    first map answers, with a new empty entry, for the second map's parameters.)"""

    def __init__(self, *optimizers: torch.optim.Optimizer) -> None:
        self._optimizers = optimizers

    def _owner(self, p: torch.Tensor) -> torch.optim.Optimizer | None:
        for optimizer in self._optimizers:
            if any(q is p for g in optimizer.param_groups for q in g["params"]):
                return optimizer
        return None

    def __getitem__(self, p: torch.Tensor) -> Any:
        for optimizer in self._optimizers:
            if p in optimizer.state:
                return optimizer.state[p]
        owner = self._owner(p)
        if owner is None:
            raise KeyError(p)
        return owner.state[p]

    def __contains__(self, p: object) -> bool:
        return any(p in optimizer.state for optimizer in self._optimizers)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for optimizer in self._optimizers:
            yield from optimizer.state

    def __len__(self) -> int:
        return sum(len(optimizer.state) for optimizer in self._optimizers)


class HybridOptimizer(torch.optim.Optimizer):
    """``heads`` steps the manifold parameters, ``rest`` everything else; both act as one."""

    def __init__(self, heads: torch.optim.Optimizer, rest: torch.optim.Optimizer) -> None:
        for name, child in (("heads", heads), ("rest", rest)):
            if not isinstance(child, torch.optim.Optimizer):
                raise ValueError(
                    f"HybridOptimizer: {name} must be a torch.optim.Optimizer, got {type(child).__name__}"
                )
        seen = {id(p) for g in heads.param_groups for p in g["params"]}
        if any(id(p) in seen for g in rest.param_groups for p in g["params"]):
            raise ValueError(
                "HybridOptimizer: a parameter is in both optimizers; give each parameter to one of them"
            )
        everything = [p for child in (heads, rest) for g in child.param_groups for p in g["params"]]
        super().__init__(everything, defaults={})
        self.heads, self.rest = heads, rest
        self.__dict__.pop("_init_groups", None)
        self.state = RoutedState(heads, rest)  # a read view of both

    @classmethod
    def for_parameters(
        cls,
        params: Iterable[torch.Tensor],
        heads: Callable[[list[torch.Tensor]], torch.optim.Optimizer],
        rest: Callable[[list[torch.Tensor]], torch.optim.Optimizer],
    ) -> HybridOptimizer:
        """Split ``params`` with :func:`split_parameters` and build both optimizers."""
        head_params, rest_params = split_parameters(params)
        if not head_params:
            raise ValueError(
                "HybridOptimizer: no manifold parameters found for `heads`; declare the heads as geoopt.ManifoldParameter (see quotientopt.nn)"
            )
        if not rest_params:
            raise ValueError(
                "HybridOptimizer: every parameter is a manifold parameter; use the heads optimizer alone"
            )
        return cls(heads(head_params), rest(rest_params))

    def __getstate__(self) -> dict[str, Any]:
        """The two optimizers (each pickles its own state), for ``copy.deepcopy`` and pickling."""
        return {"defaults": self.defaults, "heads": self.heads, "rest": self.rest}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__({"defaults": state["defaults"]})
        self.heads, self.rest = state["heads"], state["rest"]
        self.state = RoutedState(self.heads, self.rest)

    @property
    def optimizers(self) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
        return self.heads, self.rest

    @property  # type: ignore[override]
    def param_groups(self) -> list[dict[str, Any]]:
        if not hasattr(self, "heads"):  # during torch.optim.Optimizer.__init__
            return self.__dict__.setdefault("_init_groups", [])
        return [*self.heads.param_groups, *self.rest.param_groups]

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.__dict__["_init_groups"] = value

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Route a new group's manifold parameters to ``heads`` and the others to ``rest``."""
        if not hasattr(self, "heads"):
            return super().add_param_group(param_group)
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        head_params, rest_params = split_parameters(params)
        options = {k: v for k, v in param_group.items() if k != "params"}
        if head_params:
            self.heads.add_param_group({"params": head_params, **options})
        if rest_params:
            self.rest.add_param_group({"params": rest_params, **options})
        return None

    def momentum(self, p: torch.Tensor) -> Momentum | None:
        """The momentum at ``p`` of whichever of the two optimizers steps it
        (:func:`~quotientopt.optim.momentum_of`)."""
        for child in (self.heads, self.rest):
            if any(q is p for g in child.param_groups for q in g["params"]):
                return momentum_of(child, p)
        return None

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if loss is not None:  # the loss for heads that need it (QuotientECD), not a re-run
            self.heads.step(lambda: loss)
        elif getattr(self.heads, "needs_closure", False):
            raise ValueError(
                f"HybridOptimizer: {type(self.heads).__name__} needs the loss value: call "
                "optimizer.step(closure) with a closure that returns the loss"
            )
        else:
            self.heads.step()
        self.rest.step()
        return loss

    def invalidate(self) -> None:
        """``invalidate()`` of each part that has one (see
        :meth:`quotientopt.optim.QuotientOptimizer.invalidate`)."""
        for child in (self.heads, self.rest):
            if callable(getattr(child, "invalidate", None)):
                child.invalidate()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.heads.zero_grad(set_to_none)
        self.rest.zero_grad(set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"heads": self.heads.state_dict(), "rest": self.rest.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if set(state_dict) != {"heads", "rest"}:
            raise ValueError(
                "HybridOptimizer.load_state_dict: expected a dict with keys 'heads' and 'rest' "
                f"(from HybridOptimizer.state_dict()), got keys {sorted(state_dict)}"
            )
        for child, saved in ((self.heads, state_dict["heads"]), (self.rest, state_dict["rest"])):
            # a torch optimizer's loader keeps the tensors it need not cast: a hybrid loaded
            # from another's state_dict would share (and update) the other's state; ours and a
            # nested hybrid copy what they must themselves
            torch_loader = isinstance(child, torch.optim.Optimizer) and not isinstance(
                child, (HybridOptimizer, KeepStateDtypes)
            )
            held = held_state(child) if torch_loader else {}
            child.load_state_dict(saved)
            if torch_loader:
                own_loaded_state(child, saved, held)
