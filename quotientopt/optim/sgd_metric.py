r"""Where QuotientSGD's Grams come from on each step: a *metric provider*, chosen per parameter
group from ``refresh_every`` (see :mod:`quotientopt.optim.sgd`): :class:`ExactMetric` (the Grams
of the current point on every step) or :class:`LazyMetric` (the cached Grams, refreshed on an
adaptive schedule measured by :func:`metric_drift`).

A stale metric is only safe while the Grams move slowly: a Gram that grew since the refresh makes
the step too long in its directions (the preconditioned curvature is
:math:`P_s^{-1} P_t`, not :math:`I`). So the interval adapts. Each refresh measures how far the
metric moved over the interval just finished,

.. math::

    \delta^2 = \max_{\text{heads}} \sum_i (\mu_i - 1)^2 \;\ge\; \max_i (\mu_i - 1)^2, \qquad
    \mu_i \text{ the eigenvalues of } P_{\text{old}}^{-1} P_{\text{new}} \text{ (and of the } Q
    \text{ pair)},

computed as :math:`\|L^{-1} P_{\text{new}} L^{-\top} - I\|_F^2` with
:math:`P_{\text{old}} = L L^\top` (a symmetric matrix similar to
:math:`P_{\text{old}}^{-1} P_{\text{new}}`, so a sum of squares without cancellation; invariant:
the :math:`\mu_i` do not depend on the representative). The next interval doubles, up to
:math:`R`, while :math:`\delta` stays below ``refresh_tolerance``, and falls back to one step when
it does not, or when the step was withheld (a non-finite gradient)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from quotientopt.distributed import max_over_head_shards
from quotientopt.manifolds.protocol import Grams
from quotientopt.optim._base import WriteLog, geometry_of, where_heads

__all__ = ["ExactMetric", "LazyMetric", "MetricProvider", "frozen_where_unhealthy", "metric_drift"]


def frozen_where_unhealthy(grams: Grams) -> Grams:
    """The Grams with a zero preconditioner for heads flagged unhealthy, so that the steps
    between refreshes leave their gradient out as the refresh steps do."""
    mask = grams.ok[..., None, None]
    zero = torch.zeros((), dtype=grams.p.dtype, device=grams.p.device)
    fields = grams._asdict()
    for name in ("p", "q", "p_inv", "q_inv"):
        if fields[name] is not None:
            fields[name] = torch.where(mask, fields[name], zero)
    return Grams(**fields)


def metric_drift(old: Grams, new: Grams, moved: torch.Tensor) -> torch.Tensor:
    r"""How far the metric moved between two refreshes, largest over the heads that moved
    (0-dim; ``inf`` when the step was withheld, for a non-finite gradient or a healthy head's rank
    loss): :math:`\delta = \|L^{-1} P_{\text{new}} L^{-\top} - I\|_F` with
    :math:`P_{\text{old}} = L L^\top`, the larger of the P and Q values. The matrix is symmetric
    and similar to :math:`P_{\text{old}}^{-1} P_{\text{new}}`, so
    :math:`\delta^2 = \sum_i (\mu_i - 1)^2` over its eigenvalues, computed as a sum of squares (the
    trace form cancels badly when the factors are ill-conditioned)."""
    chol = torch.stack((old.chol_p, old.chol_q), dim=-3)
    eye = torch.eye(chol.shape[-1], dtype=chol.dtype, device=chol.device)
    chol_inv = torch.linalg.solve_triangular(chol, eye.expand_as(chol), upper=False)
    similar = chol_inv @ torch.stack((new.p, new.q), dim=-3) @ chol_inv.transpose(-1, -2)
    squared = (similar - eye).square().sum((-1, -2)).amax(-1)
    squared = torch.where(moved & old.ok & new.ok, squared, 0.0)
    # a withheld step (non-finite gradient), or a healthy head whose update was withheld for
    # rank loss, is not a calm interval (heads unhealthy since earlier do not count)
    calm_to_judge = moved.any() & ~(old.ok & ~moved).any()
    return torch.where(calm_to_judge, squared.amax().sqrt(), torch.inf)


class MetricProvider(Protocol):
    """Where a head tensor's Grams come from on each step (see the module docstring)."""

    def grams(self, p: torch.Tensor, state: dict) -> tuple[Grams, bool]:
        """The Grams this step uses at ``p``, and whether the step refreshes them: then they are
        the Grams of the current point and the step is :func:`quotient_sgd_update`, which
        computes those of the point it reaches; otherwise they are stale."""
        ...

    def record(self, p: torch.Tensor, state: dict, used: Grams, reached: Grams, ok: torch.Tensor):
        """After a refresh step was written: keep ``reached`` (the Grams of the new point; the
        ``used`` ones for heads whose update was withheld, ``ok`` False) for the next steps."""
        ...


class ExactMetric:
    """The Grams of the current point on every step: those the previous step computed at the
    point it reached, kept in ``state["grams"]`` (so that a resumed run is bitwise identical);
    computed afresh when missing, or when something other than the optimizer modified ``p``."""

    refresh_every = 1

    def __init__(self, log: WriteLog, warn_if_rank_deficient: Callable[[torch.Tensor], None]):
        self.log = log
        self.warn_if_rank_deficient = warn_if_rank_deficient

    @torch.compiler.disable  # reads the write log; the stored Grams enter a graph as inputs
    def grams(self, p: torch.Tensor, state: dict) -> tuple[Grams, bool]:
        return self.current(p, state)[0], True

    def current(self, p: torch.Tensor, state: dict) -> tuple[Grams, bool]:
        """The stored Grams, or those of ``p`` computed now; and whether they were computed now."""
        stored = state.get("grams")
        if stored is not None and not self.log.modified_elsewhere(p):
            return Grams(**stored), False
        grams = geometry_of(p).grams(p.detach(), check=False, inverses=True, regularize=True)
        if "step" not in state:
            self.warn_if_rank_deficient(~grams.ok)
        buf = state.get("momentum_buffer")
        if buf is not None:  # edited elsewhere: a head that lost rank does not coast
            where_heads(grams.ok, buf, torch.zeros((), dtype=buf.dtype), out=buf)
        return grams, True

    def record(
        self, p: torch.Tensor, state: dict, used: Grams, reached: Grams, ok: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        # heads whose update was withheld keep the Grams they stepped with
        stored = state["grams"] = {
            name: where_heads(ok, fresh, kept)
            for name, fresh, kept in zip(Grams._fields, reached, used, strict=True)
            if fresh is not None and kept is not None
        }
        return stored


class LazyMetric(ExactMetric):
    """The Grams of the last refresh step, refreshed at most every ``refresh_every`` steps: the
    interval doubles (up to ``refresh_every``) while the metric moved less than
    ``refresh_tolerance`` over the last one (:func:`metric_drift`), else it restarts at 1. Each
    refresh reads the drift on the host. Keeps ``refresh_interval`` and ``next_refresh`` in the
    state."""

    def __init__(
        self,
        log: WriteLog,
        warn_if_rank_deficient: Callable[[torch.Tensor], None],
        refresh_every: int,
        refresh_tolerance: float,
    ):
        super().__init__(log, warn_if_rank_deficient)
        self.refresh_every = refresh_every
        self.refresh_tolerance = refresh_tolerance

    @torch.compiler.disable
    def grams(self, p: torch.Tensor, state: dict) -> tuple[Grams, bool]:
        grams, computed_now = self.current(p, state)
        if computed_now:
            return grams, True
        step, due = state.get("step", 0), state.get("next_refresh", 0)
        # a refresh_every lowered since the last refresh shortens the current interval
        due = min(due, due - state.get("refresh_interval", 1) + self.refresh_every)
        return grams, step >= due

    def record(
        self, p: torch.Tensor, state: dict, used: Grams, reached: Grams, ok: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        drift = max_over_head_shards(p, metric_drift(used, reached, ok))
        calm = float(drift) <= self.refresh_tolerance  # NaN counts as not calm
        interval = min(2 * state.get("refresh_interval", 1), self.refresh_every) if calm else 1
        state["refresh_interval"] = interval
        state["next_refresh"] = state.get("step", 0) + interval
        stored = super().record(p, state, used, reached, ok)
        buf = state.get("momentum_buffer")
        if buf is not None:
            # a head left at a rank-deficient point must not coast on its momentum through the
            # steps until the next refresh (with the exact metric it never moves anyway)
            zero = torch.zeros((), dtype=buf.dtype, device=buf.device)
            where_heads(stored["ok"], buf, zero, out=buf)
        return stored
