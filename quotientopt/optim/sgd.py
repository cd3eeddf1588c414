r"""Quotient SGD with momentum: torch.optim.SGD for the heads, on the quotient.

For a parameter ``Z = [A; B]`` on :class:`~quotientopt.manifolds.FactorQuotient` one step is

.. math::

    \xi_t &= \operatorname{grad} f(Z_t) \quad (= (\nabla_A f\, P^{-1}, \nabla_B f\, Q^{-1})
            \text{ in the preconditioned metric}) \\
    m_t &= \beta\, \mathcal{T}(m_{t-1}) + (1 - \tau)\, \xi_t \qquad (m_1 = \xi_1) \\
    d_t &= \xi_t + \beta m_t \text{ (Nesterov)} \quad\text{or}\quad d_t = m_t \\
    Z_{t+1} &= Z_t - \eta\, d_t, \qquad \mathcal{T}(m_t) = \operatorname{proj}^h_{Z_{t+1}}(m_t)

with :math:`\beta` = ``momentum``, :math:`\tau` = ``dampening``, :math:`\eta` = ``lr``. Every
term transforms as :math:`Z \mapsto Z G` under a re-factorization, so the trajectory of products
:math:`A_t B_t^\top` does not depend on the factorization the run starts from.

With ``refresh_every = R > 1`` the Grams :math:`P, Q` of the metric are computed only on
refresh steps, at the point the step reaches, and the steps in between use them:

.. math::

    \xi_t = (\nabla_A f\, P_s^{-1},\; \nabla_B f\, Q_s^{-1}), \qquad
    m_t = \beta\, m_{t-1} + (1 - \tau)\, \xi_t, \qquad Z_{t+1} = Z_t - \eta\, d_t

where :math:`s \le t` is the last refresh. Stale Grams transform like fresh ones
(:math:`P_s \mapsto G^{-1} P_s G^{-\top}`), so the invariance stays exact; the momentum is carried
unchanged between refreshes and projected to the horizontal space at each refresh (its vertical
part is second order in the step). A step in between costs one batched product with a
``k x k`` matrix and torch's fused SGD kernel.

A stale metric is only safe while the Grams move slowly, so the interval adapts to how far the
metric moved over the last one (:mod:`quotientopt.optim.sgd_metric`).

The step is :class:`~quotientopt.optim._base.QuotientOptimizer`'s one loop
(``docs/architecture.md``); the head kernel is :func:`quotient_sgd_update` on a refresh step and
the direction :func:`riemannian_gradient` (for torch's SGD kernel) between two refreshes; where
the Grams come from is a metric provider (:mod:`quotientopt.optim.sgd_metric`)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple

import torch

from quotientopt.manifolds.factor_quotient import product_decay_egrad
from quotientopt.manifolds.protocol import Grams, HeadGeometry
from quotientopt.optim._base import (
    Direction,
    HeadUpdate,
    Momentum,
    PlainBatch,
    QuotientOptimizer,
    WriteLog,
    _fused_kernel_is_exact,  # noqa: F401  (kept importable here)
    check_choice,
    check_number,
    geometry_of,
    rebalance,
    where_heads,
    work_buffers,
)
from quotientopt.optim._torch_kernels import single_tensor_sgd as _single_tensor_sgd  # noqa: F401
from quotientopt.optim._torch_kernels import torch_sgd_step
from quotientopt.optim.manifold_kernels import manifold_sgd_update
from quotientopt.optim.sgd_metric import (
    ExactMetric,
    LazyMetric,
    MetricProvider,
    frozen_where_unhealthy,
    metric_drift,
)

WEIGHT_DECAY_MODES = ("product", "nuclear")


#: the Euclidean gradient of a product weight-decay penalty (kept under its old name)
quotient_weight_decay = product_decay_egrad


# ------------------------------------------------------------------------------- head kernels
def riemannian_gradient(
    point: torch.Tensor,
    grad: torch.Tensor,
    grams: Grams,
    geometry: HeadGeometry,
    *,
    weight_decay: float,
    weight_decay_mode: str,
    maximize: bool,
    frozen: bool = False,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""The Riemannian gradient of the loss plus the quotient weight decay,

    .. math::

        \xi = \pm\operatorname{egrad2rgrad}_Z(\nabla f) + \lambda\, \operatorname{grad} R(Z)
        \qquad (= \pm(\nabla_A f\, P^{-1},\; \nabla_B f\, Q^{-1}) + \lambda Z
        \text{ for the product decay in the undamped preconditioned metric}),

    with the metric given by ``grams`` (``-`` for ``maximize``). ``point``, ``grad`` and the result
    have shape ``(..., n + m, k)`` and ``point``'s dtype; the result is written into ``out`` when
    given. ``frozen``: the Grams are stale ones whose unhealthy heads carry a zero preconditioner
    (:func:`frozen_where_unhealthy`, the steps between refreshes): those heads get no decay
    either."""
    rgrad = geometry.egrad2rgrad(point, grad, grams=grams, out=out)
    if maximize:
        rgrad.neg_()
    if weight_decay:
        decay = geometry.decay_rgrad(point, weight_decay_mode, grams)
        if decay is point:  # exact: (A P) P^{-1} = A, no extra pass
            decay = where_heads(grams.ok, point, 0) if frozen else point
        rgrad.add_(decay, alpha=weight_decay)
    return rgrad


class QuotientSGDUpdate(NamedTuple):
    """What :func:`quotient_sgd_update` proposes for one head tensor; nothing is written yet."""

    point: torch.Tensor  # Z_{t+1}, (..., n + m, k)
    momentum_buffer: torch.Tensor | None  # m_t transported to Z_{t+1} (horizontal there)
    grams: Grams  # the Grams of Z_{t+1}, for the next step's metric
    ok: torch.Tensor  # (...,) bool: the head's update may be written


def quotient_sgd_update(
    point: torch.Tensor,
    grad: torch.Tensor,
    momentum_buffer: torch.Tensor | None,
    grams: Grams,
    geometry: HeadGeometry,
    *,
    lr: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    weight_decay: float,
    weight_decay_mode: str,
    maximize: bool,
    keep: torch.Tensor,
    work: tuple[torch.Tensor, ...] | None = None,
) -> QuotientSGDUpdate:
    r"""One Riemannian heavy-ball step of a head tensor on its quotient (nothing is written).

    .. math::

        \xi_t &= \operatorname{egrad2rgrad}_{Z_t}(\nabla f) + \lambda \operatorname{grad} R
                 \quad\text{(the metric of ``grams``, the Grams of } Z_t\text{)} \\
        m_t &= \beta\, m_{t-1} + (1 - \tau)\, \xi_t \qquad (m_1 = \xi_1) \\
        d_t &= \xi_t + \beta m_t \text{ (Nesterov)} \quad\text{or}\quad d_t = m_t \\
        Z_{t+1} &= Z_t - \eta\, d_t \qquad \text{(the retraction } R_Z(u) = Z + u\text{)} \\
        m_t &\leftarrow \operatorname{proj}^h_{Z_{t+1}}(m_t)
               \quad\text{(transport, with the Grams of } Z_{t+1}\text{)}

    (:math:`\eta` = ``lr``, :math:`\beta` = ``momentum``, :math:`\tau` = ``dampening``,
    :math:`\lambda` = ``weight_decay``); the Grams of :math:`Z_{t+1}` (with inverses) transport
    the momentum and are returned for the next step. Shapes: ``point``, ``grad``,
    ``momentum_buffer`` (None on the first step) ``(..., n + m, k)``; ``grams`` in float32 or
    better; ``keep`` a 0-dim bool (False: a non-finite gradient). ``ok`` is False for a head
    whose update is withheld (:func:`head_health`). ``work``: two tensors shaped like ``point``
    (three with Nesterov) for the gradient, the new point and the Nesterov buffer."""
    work = work if work is not None else (None, None, None)
    decay = dict(weight_decay=weight_decay, weight_decay_mode=weight_decay_mode)
    rgrad = riemannian_gradient(
        point, grad, grams, geometry, maximize=maximize, out=work[0], **decay
    )
    spare = work[2] if nesterov and len(work) > 2 else None
    buf, direction = heavy_ball(rgrad, momentum_buffer, momentum, dampening, nesterov, spare)
    new = torch.add(point, direction, alpha=-lr, out=work[1])
    new_grams = geometry.grams(new, check=False, reference=grams, inverses=True, regularize=True)
    if buf is not None:
        buf = geometry.proju_(new, buf, grams=new_grams)
    return QuotientSGDUpdate(new, buf, new_grams, head_health(grams, new_grams) & keep)


def heavy_ball(
    rgrad: torch.Tensor,
    buf: torch.Tensor | None,
    momentum: float,
    dampening: float,
    nesterov: bool,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    r"""torch SGD's momentum rule on ``rgrad`` (updated in place):
    :math:`m = \beta m + (1 - \tau)\xi` (:math:`m_1 = \xi`), direction :math:`\xi + \beta m`
    (Nesterov, into ``out``) or :math:`m`. Returns ``(m, direction)``; ``m`` None without
    momentum."""
    if not momentum:
        return None, rgrad
    if buf is None:
        new_buf = rgrad.clone()  # becomes the state; rgrad may live in a work buffer
    elif nesterov:  # dampening is 0 with Nesterov
        new_buf = torch.add(rgrad, buf, alpha=momentum, out=out)
    elif dampening:
        new_buf = rgrad.mul_(1 - dampening).add_(buf, alpha=momentum)
    else:
        new_buf = rgrad.add_(buf, alpha=momentum)
    return new_buf, rgrad.add_(new_buf, alpha=momentum) if nesterov else new_buf


def head_health(grams: Grams, new_grams: Grams) -> torch.Tensor:
    """Per head, whether an update from the point of ``grams`` to that of ``new_grams`` may be
    written: a healthy head must stay healthy (full rank, finite); one that started
    rank-deficient (the regularized metric) must reach a usable point."""
    usable = new_grams.ok | new_grams.regularized
    started_deficient = grams.regularized if grams.regularized is not None else ~grams.ok
    return torch.where(grams.ok, new_grams.ok, started_deficient & usable)


def _check_schedule(
    nesterov: bool, momentum: float, dampening: float, rebalance_every: int, refresh_every: int
) -> None:
    """Raise a ``ValueError`` for Nesterov without momentum (or with dampening) and for a
    ``rebalance_every`` / ``refresh_every`` that is not an int in range."""
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError(
            "invalid nesterov=True: Nesterov momentum needs momentum > 0 and dampening = 0"
        )
    if not isinstance(rebalance_every, int) or rebalance_every < 0:
        raise ValueError(
            f"invalid rebalance_every: {rebalance_every!r}; expected an int >= 0 (0 = never)"
        )
    if not isinstance(refresh_every, int) or isinstance(refresh_every, bool) or refresh_every < 1:
        raise ValueError(
            f"invalid refresh_every: {refresh_every!r}; expected an int >= 1 (1 = every step)"
        )


class QuotientSGD(QuotientOptimizer):
    r"""Stochastic gradient descent (optionally with momentum) on the head quotients.

    Args:
        params: parameters or parameter groups, as for ``torch.optim.SGD``.
        lr: learning rate.
        momentum: heavy-ball factor :math:`\beta \in [0, 1)`.
        dampening: :math:`\tau \in [0, 1]`, as in ``torch.optim.SGD``.
        nesterov: Nesterov momentum (needs ``momentum > 0`` and ``dampening == 0``).
        weight_decay: :math:`\lambda \ge 0`. On quotient parameters it decays the product
            (``weight_decay_mode="product"``, penalty :math:`\frac{\lambda}{2}\|AB^\top\|_F^2`) or
            the balanced representative (``"nuclear"``, penalty :math:`\lambda \|AB^\top\|_*`),
            never the representative-dependent factors; on other parameters it is torch's
            coupled L2 decay.
        weight_decay_mode: ``"product"`` or ``"nuclear"``.
        maximize: maximize the objective instead.
        rebalance_every: every this many steps move each quotient parameter to its balanced
            representative (paper 002's dressed representatives): the function is unchanged,
            the momentum is pushed along, and the factor Grams stay well conditioned. 0: never.
        refresh_every: at most this many steps between two computations of the metric's Grams
            (and with them the rank check and the momentum's horizontal projection); the steps
            in between use the last ones. 1 (default): every step, the exact Riemannian heavy
            ball. ``R > 1`` keeps the invariance exact (stale Grams transform equivariantly) and
            makes the steps in between cost one product with a ``k x k`` matrix plus torch's
            fused SGD kernel; rank loss is then caught at the refresh steps, and each refresh
            reads one number on the host (a synchronisation on CUDA). See the module docstring
            and :mod:`quotientopt.optim.sgd_metric`.
        refresh_tolerance: how far the metric may move over an interval (``delta`` in
            :mod:`quotientopt.optim.sgd_metric`) for the next interval to double, else it is 1.
        on_nonfinite: what a NaN/Inf gradient or a head update that loses rank does.
            ``"skip"`` (default): the step is not applied (all parameters for a non-finite
            gradient, the head alone for rank loss), with no host synchronisation; read the
            counts with :meth:`nonfinite_steps` and :meth:`rank_skips`. ``"warn"``: the same plus a
            ``RuntimeWarning`` (one synchronisation per step). ``"raise"``: a ``ValueError``
            before anything is written (one synchronisation per step).

    Quotient parameters are ``geoopt.ManifoldParameter`` on
    :class:`~quotientopt.manifolds.FactorQuotient`; their ``k x k`` algebra runs in float32 or
    better whatever their dtype, batched over all heads of the tensor.
    """

    # restored in float32 or better by load_state_dict (KeepStateDtypes)
    full_precision_state = ("grams",)

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        *,
        weight_decay_mode: str = "product",
        maximize: bool = False,
        rebalance_every: int = 0,
        refresh_every: int = 1,
        refresh_tolerance: float = 0.1,
        on_nonfinite: str = "skip",
    ) -> None:
        check_number("lr", lr, 0.0, float("inf"))
        check_number("momentum", momentum, 0.0, 1.0, high_open=True)
        check_number("dampening", dampening, 0.0, 1.0)
        check_number("weight_decay", weight_decay, 0.0, float("inf"))
        check_number("refresh_tolerance", refresh_tolerance, 0.0, float("inf"), low_open=True)
        check_choice("weight_decay_mode", weight_decay_mode, WEIGHT_DECAY_MODES)
        _check_schedule(nesterov, momentum, dampening, rebalance_every, refresh_every)
        defaults = dict(
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            nesterov=nesterov,
            weight_decay=weight_decay,
            weight_decay_mode=weight_decay_mode,
            maximize=maximize,
            rebalance_every=rebalance_every,
            refresh_every=refresh_every,
            refresh_tolerance=refresh_tolerance,
        )
        self._log = WriteLog()
        self._providers: dict[tuple[int, float], MetricProvider] = {}
        super().__init__(params, defaults, on_nonfinite=on_nonfinite)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("refresh_every", 1)
            group.setdefault("refresh_tolerance", 0.1)
        self._log = WriteLog()  # loaded Grams are trusted to be those of the current point
        self._providers = {}

    def momentum(self, p: torch.Tensor) -> Momentum | None:
        """The momentum buffer at ``p``: a tangent vector (Riemannian heavy ball) for head
        parameters, torch SGD's Euclidean buffer for the others; None before the first step or
        without momentum."""
        buf = self.state[p].get("momentum_buffer") if p in self.state else None
        if buf is None:
            return None
        return Momentum(buf, "vector" if geometry_of(p) is not None else "covector")

    # ----------------------------------------------------------------------------- helpers
    def _metric_provider(self, group: dict) -> MetricProvider:
        """The metric provider of a parameter group, chosen from its ``refresh_every``:
        :class:`ExactMetric` for 1, :class:`LazyMetric` otherwise. Made once per value (a group
        whose ``refresh_every`` or ``refresh_tolerance`` is changed between steps gets the
        provider of its new values at the next step)."""
        key = (group["refresh_every"], group["refresh_tolerance"])
        provider = self._providers.get(key)
        if provider is None:
            warn = self._warn_if_rank_deficient
            provider = self._providers[key] = (
                ExactMetric(self._log, warn) if key[0] == 1 else LazyMetric(self._log, warn, *key)
            )
        return provider

    def _metric(self, p: torch.Tensor, group: dict) -> tuple[Grams, bool]:
        """The Grams this step uses at ``p`` and whether the step refreshes them (the group's
        metric provider's answer, :meth:`MetricProvider.grams`)."""
        return self._metric_provider(group).grams(p, self.state[p])

    #: kept under its old name; see :func:`metric_drift`
    _metric_drift = staticmethod(metric_drift)

    def _work_buffers(self, p: torch.Tensor, count: int = 2) -> tuple[torch.Tensor, ...]:
        """``count`` reused tensors shaped like ``p`` for the Riemannian gradient, the candidate
        point and the Nesterov buffer (:func:`~quotientopt.optim._base.work_buffers`)."""
        return work_buffers(self._log, p, count)

    #: the hyperparameters of the head kernels, read from a parameter group
    KERNEL_OPTIONS = ("lr", "momentum", "dampening", "nesterov", "weight_decay", "maximize")

    @classmethod
    def _options(cls, group: dict) -> dict[str, Any]:
        return {name: group[name] for name in (*cls.KERNEL_OPTIONS, "weight_decay_mode")}

    # ------------------------------------------------------------------------------ the kernels
    def _head_update(
        self, p: torch.Tensor, geometry: HeadGeometry, group: dict, keep: torch.Tensor
    ) -> HeadUpdate | Direction:
        """A refresh step (every step of :class:`ExactMetric`) is :func:`quotient_sgd_update`
        with the Grams of the current point; a step between two refreshes is the direction
        :func:`riemannian_gradient` with the stale Grams, for torch's SGD kernel."""
        metric = self._metric_provider(group)
        state = self.state[p]
        grams, refresh = metric.grams(p, state)
        if not refresh:
            rgrad = riemannian_gradient(
                p.detach(),
                p.grad,
                frozen_where_unhealthy(grams),
                geometry,
                weight_decay=group["weight_decay"],
                weight_decay_mode=group["weight_decay_mode"],
                maximize=group["maximize"],
                frozen=True,
                out=self._work_buffers(p)[0],
            )
            return Direction(rgrad)
        work = self._work_buffers(p, 3 if group["nesterov"] else 2)
        update = quotient_sgd_update(
            p.detach(), p.grad, state.get("momentum_buffer"), grams, geometry,
            keep=keep, work=work, **self._options(group),
        )  # fmt: skip
        return HeadUpdate(
            update.point,
            {"momentum_buffer": update.momentum_buffer},
            update.ok,
            aux=(metric, grams, update.grams),
        )

    def _manifold_update(self, p: torch.Tensor, group: dict, keep: torch.Tensor) -> HeadUpdate:
        options = {k: v for k, v in self._options(group).items() if k != "weight_decay_mode"}
        buf = self.state[p].get("momentum_buffer")
        new, buf = manifold_sgd_update(p.detach(), p.grad, buf, p.manifold, **options)
        return HeadUpdate(new, {"momentum_buffer": buf}, keep)

    def _plain_step(self, group: dict, batch: PlainBatch) -> None:
        """torch's fused SGD (:func:`~quotientopt.optim._torch_kernels.torch_sgd_step`) along
        the gradients of plain tensors (with torch's coupled decay and sign) or along the head
        sectors' Riemannian gradients between two refreshes (decay and sign applied already)."""
        params, directions, found_inf = batch
        states = [self.state[p] for p in params]
        plain = directions is None
        buffers = torch_sgd_step(
            [p.detach() for p in params],
            [p.grad for p in params] if plain else directions,
            [state.get("momentum_buffer") for state in states],
            found_inf,
            weight_decay=group["weight_decay"] if plain else 0.0,
            momentum=group["momentum"],
            lr=group["lr"],
            dampening=group["dampening"],
            nesterov=group["nesterov"],
            maximize=group["maximize"] if plain else False,
        )
        if group["momentum"]:
            for state, buf in zip(states, buffers, strict=True):
                state["momentum_buffer"] = buf

    def _stepped(self, p: torch.Tensor, group: dict, update: HeadUpdate | Direction) -> None:
        """Keep the Grams a refresh step reached (the metric provider's ``record``), count the
        step, rebalance every ``rebalance_every`` steps and note the write."""
        state = self.state[p]
        if isinstance(update, HeadUpdate):
            metric, used, reached = update.aux
            metric.record(p, state, used, reached, update.ok)
        state["step"] = state.get("step", 0) + 1
        every = group["rebalance_every"]
        if every and state["step"] % every == 0:
            self._rebalance(p)
        self._log.record(p)

    @torch.no_grad()
    def _rebalance(self, p: torch.Tensor) -> None:
        """:func:`~quotientopt.optim._base.rebalance`, pushing the momentum along."""
        rebalance(p, geometry_of(p), self.state[p], vectors=("momentum_buffer",), caches=("grams",))
