"""Loading an optimizer's state: full-precision entries kept in full precision, and the loaded
tensors owned (not shared with the state_dict they came from)."""

from __future__ import annotations

from itertools import chain
from typing import Any

import torch

from quotientopt.linalg import compute_dtype
from quotientopt.optim._params import is_quotient_parameter


def _restore(saved: Any, dtype: torch.dtype, device: torch.device, exact: bool = False) -> Any:
    """``saved`` (a state entry as written by ``state_dict``) with its tensors copied to
    ``device``, floating ones in their dtype or ``dtype`` if that is wider (``exact``: in
    ``dtype``), the others (flags, counts) in their own dtype."""
    if isinstance(saved, torch.Tensor):
        target = saved.dtype
        if saved.is_floating_point():
            target = dtype if exact else torch.promote_types(saved.dtype, dtype)
        return saved.to(device=device, dtype=target, copy=True)
    if isinstance(saved, dict):
        return {key: _restore(item, dtype, device, exact) for key, item in saved.items()}
    if isinstance(saved, (tuple, list)):
        return type(saved)(_restore(item, dtype, device, exact) for item in saved)
    return saved


def _restored_already(
    saved: Any, dtype: torch.dtype, device: torch.device, exact: bool = False
) -> bool:
    """Whether ``_restore`` would only copy ``saved``: every tensor in it already on ``device``,
    in the dtype it would be restored in."""
    if isinstance(saved, dict):
        return all(_restored_already(item, dtype, device, exact) for item in saved.values())
    if isinstance(saved, (tuple, list)):
        return all(_restored_already(item, dtype, device, exact) for item in saved)
    if not isinstance(saved, torch.Tensor):
        return True
    if saved.device != device:
        return False
    if not saved.is_floating_point():
        return True
    return saved.dtype == (dtype if exact else torch.promote_types(saved.dtype, dtype))


def held_state(optimizer: torch.optim.Optimizer) -> dict[torch.Tensor, dict[str, Any]]:
    """What each parameter's state slots hold now (taken before a ``load_state_dict``)."""
    return {p: dict(entries) for p, entries in optimizer.state.items()}


def own_loaded_state(
    optimizer: torch.optim.Optimizer,
    state_dict: dict[str, Any],
    held: dict[torch.Tensor, dict[str, Any]],
) -> None:
    """After torch's ``load_state_dict``: copy each state tensor that the loader kept from
    ``state_dict`` (torch keeps the tensors it need not cast, so two optimizers would share and
    update them), unless it is the very tensor that slot ``held`` before the load (the
    optimizer's own state passed back, as ``torch.distributed.checkpoint`` does)."""
    saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
    params = chain.from_iterable(g["params"] for g in optimizer.param_groups)
    for param_id, p in zip(saved_ids, params, strict=True):
        entries = state_dict["state"].get(param_id)
        if entries is None:
            continue
        state, ours = optimizer.state[p], held.get(p, {})
        for key, value in state.items():
            if (
                isinstance(value, torch.Tensor)
                and value is entries.get(key)
                and value is not ours.get(key)
            ):
                state[key] = value.clone()


class KeepStateDtypes:
    """``load_state_dict`` that keeps the quotient parameters' full-precision state in full
    precision.

    ``torch.optim.Optimizer.load_state_dict`` casts every floating tensor of a parameter's state to
    the parameter's dtype, and boolean flags too. The entries named in ``full_precision_state``
    (``k x k`` data, moments kept in float32 or better whatever the parameter dtype) are restored
    in their saved dtype or ``compute_dtype(p.dtype)`` if that is wider, flags in their own
    dtype; the other entries (momentum buffers like the parameter) keep torch's rule.
    """

    full_precision_state: tuple[str, ...] = ()
    #: restore those entries in exactly ``compute_dtype(p.dtype)`` (not a wider saved dtype)
    state_in_compute_dtype: bool = False

    def _full_precision_keys(self, p: torch.Tensor) -> tuple[str, ...]:
        """The state entries of ``p`` to restore in full precision (by default: those named in
        ``full_precision_state``, for quotient parameters; the others step like torch's)."""
        return self.full_precision_state if is_quotient_parameter(p) else ()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # what each slot held before: a saved entry that is that very object (the state_dict
        # passed back in place, as torch.distributed.checkpoint does) is already ours
        held = held_state(self)  # type: ignore[arg-type]
        super().load_state_dict(state_dict)  # type: ignore[misc]
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)  # type: ignore[attr-defined]
        by_id = dict(zip(saved_ids, params, strict=True))
        for param_id, entries in state_dict["state"].items():
            p = by_id.get(param_id)
            if p is None:
                continue
            state = self.state[p]  # type: ignore[attr-defined]
            ours = held.get(p, {})
            dtype = compute_dtype(p.dtype)
            for key in self._full_precision_keys(p):
                if key in entries:
                    saved = entries[key]
                    exact = self.state_in_compute_dtype
                    if not (
                        saved is ours.get(key) and _restored_already(saved, dtype, p.device, exact)
                    ):
                        saved = _restore(saved, dtype, p.device, exact)
                    state[key] = saved
        # the steps update their state in place and recycle its memory: own what was kept
        own_loaded_state(self, state_dict, held)  # type: ignore[arg-type]
