"""What a head kernel returns (:class:`HeadUpdate`, :class:`Direction`), the plain tensors' batch,
and the per-head writes of the step loop (:func:`write_update`, :func:`where_heads`)."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from quotientopt.manifolds.protocol import HeadGeometry


class HeadUpdate(NamedTuple):
    r"""What a head kernel proposes for one sector; nothing is written yet.

    ``point``: :math:`Z_{t+1}` (``(..., n + m, k)``); ``state``: the new value of each state
    entry named (its leading dims the heads'); ``ok`` (``(...,)`` bool, or 0-dim for a whole
    tensor): where the update may be written. :func:`write_update` writes the point and each
    entry where ``ok`` holds and keeps the old value elsewhere: ``kept[name]`` when given, else
    the stored entry, else zero. ``aux``: anything the optimizer's :meth:`_stepped` needs."""

    point: torch.Tensor
    state: dict[str, Any]
    ok: torch.Tensor
    kept: dict[str, torch.Tensor] | None = None
    aux: Any = None


class Direction(NamedTuple):
    """A head kernel's answer for a step that torch's functional kernel takes: the direction
    (a Riemannian gradient with its sign and decay applied) to move the sector along."""

    tensor: torch.Tensor


class PlainBatch(NamedTuple):
    """What the loop hands to an optimizer's ``_plain_step``: parameters of one group and device
    (the parameters themselves, which key the state: pass ``p.detach()`` to a kernel), the
    directions to move them along (None: their gradients, for plain tensors; else the head
    kernels' :class:`Direction` s) and the device's non-finite flag (a step with it set changes
    nothing)."""

    params: list[torch.Tensor]
    directions: list[torch.Tensor] | None
    found_inf: torch.Tensor


def write_update(state: dict[str, Any], p: torch.Tensor, update: HeadUpdate) -> None:
    """Write ``update`` (:class:`HeadUpdate`) into ``p`` and ``state`` head by head where its
    ``ok`` holds; a stored entry of the same shape and dtype is updated in place (as torch's
    optimizers keep their state tensors), the others are replaced."""
    ok, kept = update.ok, update.kept or {}
    for name, value in update.state.items():
        if value is None:
            continue
        stored = state.get(name)
        old = kept.get(name, stored)
        if old is None:
            zero = torch.zeros((), dtype=value.dtype, device=value.device)
            state[name] = where_heads(ok, value, zero)
        elif not isinstance(value, torch.Tensor):  # a dict or tuple of per-head tensors
            state[name] = _merged(ok, value, old)
        elif old is stored and old.shape == value.shape and old.dtype == value.dtype:
            where_heads(ok, value, old, out=old)
        else:
            state[name] = where_heads(ok, value.to(old.dtype), old)
    z = p.detach()
    where_heads(ok, update.point.to(z.dtype), z, out=z)


def rebalance(
    p: torch.Tensor,
    geometry: HeadGeometry,
    state: dict[str, Any],
    *,
    vectors: tuple[str, ...] = (),
    caches: tuple[str, ...] = (),
) -> None:
    r"""Move ``p`` by the balancing move of its geometry's group,
    :math:`Z \mapsto (A M_A, B M_B)` (``balancing_transform``; nothing where the group has none),
    push the tangent vectors stored under ``vectors`` along with the same group element, and drop
    the ``caches`` derived from the old point. The model's function does not change."""
    z = p.detach()
    transform = geometry.balancing_transform(z)
    if transform is None:
        return
    m_a, m_b = transform
    for name in vectors:
        if state.get(name) is not None:
            state[name] = geometry.right_multiply(state[name], m_a, m_b)
    z.copy_(geometry.right_multiply(z, m_a, m_b))
    for name in caches:
        state.pop(name, None)


def _merged(ok: torch.Tensor, value: Any, old: Any) -> Any:
    """``value`` where ``ok`` holds, else ``old``, through dicts and tuples of tensors."""
    if isinstance(value, dict):
        return {key: _merged(ok, item, old[key]) for key, item in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_merged(ok, v, o) for v, o in zip(value, old, strict=True))
    return where_heads(ok, value, old)


def where_heads(
    ok: torch.Tensor, new: torch.Tensor, old: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``new`` where the per-head flag ``ok`` (shape ``new.shape[:ok.dim()]``) holds, else ``old``
    (written into ``out`` when given, which may alias ``new`` or ``old``)."""
    mask = ok.reshape(ok.shape + (1,) * (new.dim() - ok.dim()))
    if out is None:
        return torch.where(mask, new, old)
    if torch.compiler.is_compiling():  # out= with symbolic shapes fails to trace; the copy fuses
        return out.copy_(torch.where(mask, new, old))
    return torch.where(mask, new, old, out=out)
