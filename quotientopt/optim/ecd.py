r"""QuotientECD: energy-conserving descent on the head quotients (the unit-speed ECD variant of
paper 003).

The parameters move at unit speed in the metric, and the direction of motion turns towards the
negative gradient at a rate inversely proportional to the loss gap :math:`F - F_0`. For the
velocity :math:`v` (one tangent vector per parameter; all parameters of a group form one point
:math:`\theta` and share one speed), the Riemannian gradient :math:`g` (horizontal for head
parameters), :math:`d` the dimension of the group's quotient (``geometry.quotient_dimension(k)``
per head: :math:`(n + m - k) k` for GL(k), :math:`(n + m) k - \dim H` for a subgroup :math:`H`;
``numel`` per plain tensor) and :math:`\Delta t = \mathrm{lr} / \sqrt{\eta}`:

.. math::

    \delta &= \frac{\Delta t\, \eta\, d}{2 (d - 1) (F - F_0)}, \\
    v &\leftarrow \frac{v - \delta\,\big(g - v\, \langle v, g\rangle\big)}
                       {\|v - \delta\,(g - v\, \langle v, g\rangle)\|}, \\
    \theta &\leftarrow R_\theta(\Delta t\, v), \qquad
    v \leftarrow \frac{\mathrm{proj}^h_{\theta}(v)}{\|\mathrm{proj}^h_{\theta}(v)\|}.

Inner products and norms are those of the head geometry (``geometry.inner``, the preconditioned
metric of :class:`~quotientopt.manifolds.FactorQuotient`) for head parameters of shape
``(..., n + m, k)`` and Euclidean for plain tensors, summed over the group; :math:`R` is the
geometry's retraction (a plain tensor moves by :math:`\theta + \Delta t\, v`) and
:math:`\mathrm{proj}^h` its horizontal projection. The first step starts downhill,
:math:`v = -g / \|g\|`. :math:`F - F_0` is floored at ``1e-12``.

The speed is fixed, so the step slows where :math:`F - F_0` is large relative to the gradient
and the dynamics concentrates at low loss. Every operation is equivariant under the head group
(:math:`v \mapsto v G` with :math:`Z \mapsto Z G`, inner products invariant), so the trajectory
of products does not depend on the factorization the run starts from.

The update needs the loss value :math:`F`: call ``step(closure)`` with a closure that
re-evaluates the model and returns the loss. State: ``state[p]["velocity"]`` (a tangent vector
for head parameters, shape of ``p``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from quotientopt.distributed import is_dtensor
from quotientopt.manifolds.protocol import HeadGeometry
from quotientopt.optim._base import (
    HeadUpdate,
    Momentum,
    QuotientOptimizer,
    check_number,
    geometry_of,
    manifold_of,
)

__all__ = ["QuotientECD", "ecd_group"]


def refuse_sharded(p: torch.Tensor, who: str) -> None:
    """Raise a ``ValueError`` for a DTensor (FSDP2-sharded) parameter: ECD's unit speed and
    turning rate need the loss and the inner products of the whole group, and a rank sees only
    its own shards and its own part of the batch."""
    if is_dtensor(p):
        raise ValueError(
            f"{who} cannot step FSDP2-sharded (DTensor) parameters: its unit speed and turning "
            "rate need the loss and the inner products over the whole group, and each rank sees "
            "only its own shards and batch. Use QuotientSGD, QuotientAdam, QuotientMuon or "
            "QuotientHamiltonian under FSDP2, or QuotientECD under DDP (whole parameters)."
        )


def ecd_group(group: dict, loss: torch.Tensor, nonfinite: dict, state: dict) -> list:
    r"""One ECD step of a parameter group (see the module docs), nothing written.

    ``group`` holds ``params``, ``lr``, ``eta`` and ``loss_floor``; ``loss`` is :math:`F` (a
    0-dim tensor); ``nonfinite`` maps each device to its non-finite-gradient flag; ``state`` is
    the optimizer's state (``state[p]["velocity"]`` is read). Returns one
    ``(p, new_point, new_velocity, keep)`` per parameter with a gradient; ``keep`` is a 0-dim
    bool tensor (False: a gradient was non-finite or a head lost rank; keep the old values).
    """
    params = [p for p in group["params"] if p.grad is not None]
    dt = group["lr"] / math.sqrt(group["eta"])
    geometries = [geometry_of(p) for p in params]
    dims = sum(_dimension(p, geometry) for p, geometry in zip(params, geometries, strict=True))
    gap = (loss.double() - group["loss_floor"]).clamp_min(1e-12)
    delta = dt * group["eta"] * dims / (2 * max(dims - 1, 1)) / gap
    points = [p.detach() for p in params]
    grams = [
        None if g is None else g.grams(z, check=False)
        for g, z in zip(geometries, points, strict=True)
    ]
    grads = [
        p.grad if g is None else g.egrad2rgrad(z, p.grad, grams=gram)
        for p, g, z, gram in zip(params, geometries, points, grams, strict=True)
    ]
    velocities = [state[p].get("velocity") if p in state else None for p in params]
    if any(v is None for v in velocities):  # start downhill
        norm = _total(geometries, points, grams, grads, grads).sqrt()
        velocities = [-g / norm.clamp_min(1e-30).to(g.dtype) for g in grads]
    along = _total(geometries, points, grams, velocities, grads)
    velocities = [
        v - delta.to(v.dtype) * (g - v * along.to(v.dtype))
        for v, g in zip(velocities, grads, strict=True)
    ]
    norm = _total(geometries, points, grams, velocities, velocities).sqrt()
    moved = [
        _move(geometry, z, v / norm.to(v.dtype), dt)
        for geometry, z, v in zip(geometries, points, velocities, strict=True)
    ]
    new_points, transported, new_grams = (list(x) for x in zip(*moved, strict=True))
    norm = _total(geometries, new_points, new_grams, transported, transported).sqrt()
    out = []
    for p, new, v, gram in zip(params, new_points, transported, new_grams, strict=True):
        keep = nonfinite[p.device] == 0
        if gram is not None:
            keep = keep & gram.ok.all()
        out.append((p, new, v / norm.to(v.dtype), keep))
    return out


def _dimension(p: torch.Tensor, geometry: HeadGeometry | None) -> int:
    """The dimension a parameter adds to the group's quotient: ``quotient_dimension(k)`` per
    head for a head parameter, ``numel`` for a plain tensor."""
    if geometry is None:
        return p.numel()
    return p[..., 0, 0].numel() * geometry.quotient_dimension(p.shape[-1])


def _total(geometries, points, grams, us, vs) -> torch.Tensor:
    r"""The group's inner product :math:`\sum \langle u, v\rangle` (the geometries' metrics for
    head parameters, Euclidean for plain tensors), in float64."""
    total = torch.zeros((), dtype=torch.float64)
    for geometry, z, gram, u, v in zip(geometries, points, grams, us, vs, strict=True):
        if geometry is None:
            part = (u.double() * v.double()).sum()
        else:
            part = geometry.inner(z, u, v, grams=gram).double().sum()
        total = total.to(part.device) + part
    return total


def _move(geometry: HeadGeometry | None, z: torch.Tensor, v: torch.Tensor, dt: float):
    """``(R_z(dt v), proj^h(v), grams)`` of one parameter (a plain tensor: ``z + dt v``)."""
    if geometry is None:
        return z + dt * v, v, None
    new = geometry.retr(z, dt * v)
    gram = geometry.grams(new, check=False)
    return new, geometry.proju(new, v, grams=gram), gram


def ecd_updates(
    group: dict, loss: torch.Tensor, nonfinite: dict, state: dict
) -> list[tuple[torch.Tensor, HeadUpdate]]:
    """:func:`ecd_group`'s proposals as the step loop's :class:`HeadUpdate` s (velocity state)."""
    updates = ecd_group(group, loss.detach(), nonfinite, state)
    return [(p, HeadUpdate(new, {"velocity": v}, keep)) for p, new, v, keep in updates]


def write_ecd(state: dict, updates: list) -> None:
    """Write the updates of :func:`ecd_group` where their ``keep`` holds (no host sync)."""
    for p, new, v, keep in updates:
        entry = state[p]
        old = entry.get("velocity")
        p.copy_(torch.where(keep, new, p))
        entry["velocity"] = torch.where(keep, v, torch.zeros_like(v) if old is None else old)


class QuotientECD(QuotientOptimizer):
    r"""Energy-conserving descent (unit speed) on the head quotients; see the module docs for the
    equations.

    Args:
        params: parameters or parameter groups: head parameters (a head geometry, e.g.
            :class:`~quotientopt.manifolds.FactorQuotient`) and plain tensors. Each group is one
            point with one unit speed.
        lr: the time step; :math:`\Delta t = \mathrm{lr} / \sqrt{\eta}` is the distance moved
            per step in the metric.
        eta: :math:`\eta > 0`, the turning rate's scale.
        loss_floor: :math:`F_0`, a lower bound of the loss (the dynamics slows down as
            :math:`F \to F_0`).
        on_nonfinite: ``"skip"`` (default, no host synchronisation), ``"warn"`` or ``"raise"``:
            a NaN/Inf gradient, or a head that would lose rank, leaves the points and velocities of
            its group untouched.

    ``step(closure)`` needs a closure that returns the loss (a ``ValueError`` says so otherwise).
    """

    needs_closure = True

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-2,
        *,
        eta: float = 1.0,
        loss_floor: float = 0.0,
        on_nonfinite: str = "skip",
    ) -> None:
        check_number("lr", lr, 0.0, float("inf"))
        check_number("eta", eta, 0.0, float("inf"), low_open=True)
        check_number("loss_floor", loss_floor, -float("inf"), float("inf"))
        defaults = dict(lr=lr, eta=eta, loss_floor=loss_floor)
        super().__init__(params, defaults, on_nonfinite=on_nonfinite)

    @staticmethod
    def _check_parameter(p: torch.Tensor) -> None:
        refuse_sharded(p, "QuotientECD")
        if geometry_of(p) is None and manifold_of(p) is not None:
            raise ValueError(
                f"QuotientECD supports head geometries and plain parameters, not {p.manifold!r}; "
                "step those with QuotientSGD or geoopt's optimizers"
            )

    def momentum(self, p: torch.Tensor) -> Momentum | None:
        """The unit-speed velocity at ``p`` (a tangent vector for head parameters, a Euclidean
        covector for plain tensors); None before the first step."""
        velocity = self.state[p].get("velocity") if p in self.state else None
        if velocity is None:
            return None
        return Momentum(velocity, "vector" if geometry_of(p) is not None else "covector")

    def _group_update(
        self, group: dict, loss: torch.Tensor | None, nonfinite: dict
    ) -> list[tuple[torch.Tensor, HeadUpdate]]:
        """:func:`ecd_group`: the whole group is one point with one unit speed."""
        return ecd_updates(group, loss, nonfinite, self.state)
