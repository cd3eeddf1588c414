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

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim.sgd import sgd as torch_sgd

from quotientopt.distributed import max_over_head_shards
from quotientopt.manifolds.factor_quotient import Grams, product_decay_egrad
from quotientopt.optim._base import (
    NONFINITE_POLICIES,
    HealthMixin,
    KeepStateDtypes,
    Momentum,
    WriteLog,
    check_choice,
    check_number,
    found_nonfinite,
    geometry_of,
    is_quotient_parameter,
    manifold_of,
    optimizer_step,
    where_heads,
)

WEIGHT_DECAY_MODES = ("product", "nuclear")


#: the Euclidean gradient of a product weight-decay penalty (kept under its old name)
quotient_weight_decay = product_decay_egrad


def _fused_kernel_is_exact(p: torch.Tensor) -> bool:
    """Whether torch's fused SGD kernel computes torch.optim.SGD's step for ``p``."""
    return p.device.type != "cpu" or p.dtype in (torch.float32, torch.float64)


def _single_tensor_sgd(
    param: torch.Tensor,
    grad: torch.Tensor,
    buf: torch.Tensor | None,
    found_inf: torch.Tensor,
    *,
    weight_decay: float,
    momentum: float,
    lr: float,
    dampening: float,
    nesterov: bool,
    maximize: bool,
) -> torch.Tensor | None:
    """torch.optim.SGD's single-tensor step, operation for operation (so with its roundings),
    written into ``param`` and ``buf`` only where ``found_inf`` is 0 (no synchronisation).
    Returns the momentum buffer (new on the first step)."""
    skip = found_inf > 0
    grad = -grad if maximize else grad
    if weight_decay:
        grad = grad.add(param, alpha=weight_decay)
    if momentum:
        if buf is None:
            new_buf = torch.clone(grad).detach()
            buf = torch.where(skip, torch.zeros_like(new_buf), new_buf)
        else:
            new_buf = buf.mul(momentum).add_(grad, alpha=1 - dampening)
            torch.where(skip, buf, new_buf, out=buf)
        grad = grad.add(new_buf, alpha=momentum) if nesterov else new_buf
    torch.where(skip, param, param.add(grad, alpha=-lr), out=param)
    return buf


class QuotientSGD(KeepStateDtypes, HealthMixin, torch.optim.Optimizer):
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
            reads one number on the host (a synchronisation on CUDA). See the module docstring.
        refresh_tolerance: how far the metric may move over an interval (``delta`` in the
            module docstring) for the next interval to double; otherwise it restarts at 1.
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
        check_choice("on_nonfinite", on_nonfinite, NONFINITE_POLICIES)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError(
                "invalid nesterov=True: Nesterov momentum needs momentum > 0 and dampening = 0"
            )
        if not isinstance(rebalance_every, int) or rebalance_every < 0:
            raise ValueError(
                f"invalid rebalance_every: {rebalance_every!r}; expected an int >= 0 (0 = never)"
            )
        if (
            not isinstance(refresh_every, int)
            or isinstance(refresh_every, bool)
            or refresh_every < 1
        ):
            raise ValueError(
                f"invalid refresh_every: {refresh_every!r}; expected an int >= 1 (1 = every step)"
            )
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
        super().__init__(params, defaults)
        self.on_nonfinite = on_nonfinite
        self._log = WriteLog()
        self._init_health()

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("refresh_every", 1)
            group.setdefault("refresh_tolerance", 0.1)
        self._log = WriteLog()
        if not hasattr(self, "_nonfinite_steps"):
            self._init_health()

    def momentum(self, p: torch.Tensor) -> Momentum | None:
        """The momentum buffer at ``p``: a tangent vector (Riemannian heavy ball) for head
        parameters, torch SGD's Euclidean buffer for the others; None before the first step or
        without momentum."""
        buf = self.state[p].get("momentum_buffer") if p in self.state else None
        if buf is None:
            return None
        return Momentum(buf, "vector" if is_quotient_parameter(p) else "covector")

    # ----------------------------------------------------------------------------- helpers
    @torch.compiler.disable  # reads the write log; the stored Grams enter a graph as inputs
    def _metric(self, p: torch.Tensor, group: dict) -> tuple[Grams, bool]:
        """The Grams this step uses at ``p`` and whether the step refreshes them.

        They live in ``state["grams"]`` (so that a resumed run is bitwise identical): the Grams of
        the point the last refresh step reached. They are computed afresh at the current point
        when missing, or when something other than this optimizer modified ``p`` since.
        """
        state = self.state[p]
        stored = state.get("grams")
        if stored is None or self._log.modified_elsewhere(p):
            grams = geometry_of(p).grams(p.detach(), check=False, inverses=True, regularize=True)
            if "step" not in state:
                self._warn_if_rank_deficient(~grams.ok)
            buf = state.get("momentum_buffer")
            if buf is not None:  # edited elsewhere: a head that lost rank does not coast
                where_heads(grams.ok, buf, torch.zeros((), dtype=buf.dtype), out=buf)
            return grams, True
        step, due = state.get("step", 0), state.get("next_refresh", 0)
        # a refresh_every lowered since the last refresh shortens the current interval
        due = min(due, due - state.get("refresh_interval", 1) + group["refresh_every"])
        return Grams(**stored), step >= due

    @staticmethod
    def _metric_drift(old: Grams, new: Grams, moved: torch.Tensor) -> torch.Tensor:
        r"""How far the metric moved between two refreshes, largest over the heads that moved
        (0-dim; ``inf`` when the step was withheld, for a non-finite gradient or a healthy
        head's rank loss):
        :math:`\delta = \|L^{-1} P_{\text{new}} L^{-\top} - I\|_F` with :math:`P_{\text{old}} = L
        L^\top`, the larger of the P and Q values. The matrix is symmetric and similar to
        :math:`P_{\text{old}}^{-1} P_{\text{new}}`, so :math:`\delta^2 = \sum_i (\mu_i - 1)^2`
        over its eigenvalues, computed as a sum of squares (the trace form cancels badly when
        the factors are ill-conditioned)."""
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

    def _schedule_next_refresh(self, p: torch.Tensor, group: dict, drift: torch.Tensor) -> None:
        """Set the step of the next refresh: the interval doubles (up to ``refresh_every``)
        while the metric moved less than ``refresh_tolerance`` over the last one, else it is 1.
        Reads ``drift`` on the host."""
        state = self.state[p]
        interval = state.get("refresh_interval", 1)
        calm = float(drift) <= group["refresh_tolerance"]  # NaN counts as not calm
        interval = min(2 * interval, group["refresh_every"]) if calm else 1
        state["refresh_interval"] = interval
        state["next_refresh"] = state.get("step", 0) + interval

    def _work_buffers(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Two tensors shaped like ``p``, reused every step for the Riemannian gradient and the
        candidate point: allocating them afresh each step (page faults) cost about as much as the
        arithmetic on a CPU. Not part of ``state_dict``."""
        buffers = self._log.get(p, "work")
        if (
            buffers is None
            or buffers[0].shape != p.shape
            or buffers[0].dtype != p.dtype
            or buffers[0].device != p.device
        ):
            buffers = (torch.empty_like(p.detach()), torch.empty_like(p.detach()))
            self._log.put(p, "work", buffers)
        return buffers

    def _riemannian_gradient(
        self, p: torch.Tensor, grad: torch.Tensor, group: dict, grams: Grams, *, between=False
    ) -> torch.Tensor:
        r"""The Riemannian gradient of the loss plus the quotient weight decay at ``p`` (sign
        flipped for ``maximize``), in ``p``'s dtype, written into a reused work buffer. On steps
        ``between`` refreshes, which nothing checks afterwards, heads flagged unhealthy in
        ``grams`` get no decay either, and a non-finite decay (the nuclear norm at a head that
        lost rank since the refresh) is left out."""
        manifold = geometry_of(p)
        z = p.detach()
        rgrad = manifold.egrad2rgrad(z, grad, grams=grams, out=self._work_buffers(p)[0])
        if group["maximize"]:
            rgrad.neg_()
        if group["weight_decay"]:
            decay = manifold.decay_rgrad(z, group["weight_decay_mode"], grams)
            if decay is z:  # exact: (A P) P^{-1} = A, no extra pass
                decay = where_heads(grams.ok, z, 0) if between else z
            rgrad.add_(decay, alpha=group["weight_decay"])
        return rgrad

    def _refresh_update(
        self, p: torch.Tensor, grad: torch.Tensor, group: dict, grams: Grams, keep: torch.Tensor
    ):
        """Candidate new point, momentum and Grams for one FactorQuotient tensor on a refresh
        step (nothing written to ``p`` or its state); the few full-size temporaries are reused."""
        manifold = geometry_of(p)
        z = p.detach()
        lr, beta, dampening = group["lr"], group["momentum"], group["dampening"]
        rgrad = self._riemannian_gradient(p, grad, group, grams)
        buf = None
        if beta:
            old = self.state[p].get("momentum_buffer")
            if old is None:
                buf = rgrad.clone()  # becomes the state; rgrad lives in a reused work buffer
            elif group["nesterov"]:
                buf = torch.add(rgrad, old, alpha=beta)  # dampening is 0 with Nesterov
            else:
                buf = (
                    rgrad.mul_(1 - dampening).add_(old, alpha=beta)
                    if dampening
                    else rgrad.add_(old, alpha=beta)
                )
            direction = rgrad.add_(buf, alpha=beta) if group["nesterov"] else buf
        else:
            direction = rgrad
        new = torch.add(z, direction, alpha=-lr, out=self._work_buffers(p)[1])
        new_grams = manifold.grams(
            new, check=False, reference=grams, inverses=True, regularize=True
        )
        # a healthy head must stay healthy; a rank-deficient one (regularized metric) must stay
        # finite; non-finite points have non-finite Grams
        usable = new_grams.ok | new_grams.regularized
        started_deficient = grams.regularized if grams.regularized is not None else ~grams.ok
        ok = torch.where(grams.ok, new_grams.ok, started_deficient & usable) & keep
        if buf is not None:
            buf = manifold.proju_(new, buf, grams=new_grams)
        return new, buf, new_grams, ok

    @staticmethod
    def _frozen_where_unhealthy(grams: Grams) -> Grams:
        """The Grams with a zero preconditioner for heads flagged unhealthy, so that the steps
        between refreshes leave their gradient out as the refresh steps do."""
        mask = grams.ok[..., None, None]
        zero = torch.zeros((), dtype=grams.p.dtype, device=grams.p.device)
        fields = grams._asdict()
        for name in ("p", "q", "p_inv", "q_inv"):
            if fields[name] is not None:
                fields[name] = torch.where(mask, fields[name], zero)
        return Grams(**fields)

    def _manifold_update(self, p: torch.Tensor, grad: torch.Tensor, group: dict):
        """geoopt RiemannianSGD's step for a parameter on another geoopt manifold (nothing written)."""
        manifold = p.manifold
        z = p.detach()
        if group["maximize"]:
            grad = -grad
        if group["weight_decay"]:
            grad = grad.add(z, alpha=group["weight_decay"])
        rgrad = manifold.egrad2rgrad(z, grad)
        beta = group["momentum"]
        buf = None
        if beta:
            old = self.state[p].get("momentum_buffer")
            buf = (
                rgrad.clone()
                if old is None
                else old.mul(beta).add_(rgrad, alpha=1 - group["dampening"])
            )
            direction = rgrad.add(buf, alpha=beta) if group["nesterov"] else buf
            new, buf = manifold.retr_transp(z, -group["lr"] * direction, buf)
        else:
            new = manifold.retr(z, -group["lr"] * rgrad)
        return new, buf

    # -------------------------------------------------------------------------------- step
    @optimizer_step
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """Perform one optimization step (``closure`` re-evaluates the model and returns the loss)."""
        loss, grads = self._closure_and_grads(closure)
        if not grads:
            return loss
        nonfinite = found_nonfinite(grads)

        # phase 1: every update computed and checked, nothing written
        refreshed, manifold_updates = [], []
        between: dict[tuple[int, torch.device], list] = {}  # quotient steps between refreshes
        for index, group in enumerate(self.param_groups):
            for p in group["params"]:
                if p.grad is None:
                    continue
                flag = nonfinite[p.device]
                if is_quotient_parameter(p):
                    grams, refresh = self._metric(p, group)
                    if refresh:
                        update = self._refresh_update(p, p.grad, group, grams, flag == 0)
                        refreshed.append((p, group, grams, *update))
                    else:
                        rgrad = self._riemannian_gradient(
                            p, p.grad, group, self._frozen_where_unhealthy(grams), between=True
                        )
                        between.setdefault((index, p.device), []).append((p, rgrad))
                elif manifold_of(p) is not None:
                    manifold_updates.append((p, *self._manifold_update(p, p.grad, group)))
        self._enforce_policy(nonfinite, [ok for *_, ok in refreshed])

        # phase 2: write
        for p, group, grams, new, buf, new_grams, ok in refreshed:
            self._write(p, new, buf, ok)
            if group["refresh_every"] > 1:
                drift = max_over_head_shards(p, self._metric_drift(grams, new_grams, ok))
                self._schedule_next_refresh(p, group, drift)
            # heads whose update was withheld keep the Grams they stepped with
            stored = self.state[p]["grams"] = {
                name: where_heads(ok, fresh, kept)
                for name, fresh, kept in zip(Grams._fields, new_grams, grams, strict=True)
                if fresh is not None and kept is not None
            }
            buf = self.state[p].get("momentum_buffer")
            if group["refresh_every"] > 1 and buf is not None:
                # a head left at a rank-deficient point must not coast on its momentum through
                # the steps until the next refresh (with refresh_every=1 it never moves anyway)
                where_heads(
                    stored["ok"], buf, torch.zeros((), dtype=buf.dtype, device=buf.device), out=buf
                )
            self._count(self._rank_skips, p.device, (~ok & (nonfinite[p.device] == 0)).sum())
        for p, new, buf in manifold_updates:
            self._write(p, new, buf, nonfinite[p.device] == 0)
        for (index, device), entries in between.items():
            self._torch_sgd_step(
                self.param_groups[index],
                [p.detach() for p, _ in entries],
                [rgrad for _, rgrad in entries],
                [self.state[p] for p, _ in entries],
                nonfinite[device],
            )
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None or not is_quotient_parameter(p):
                    continue
                state = self.state[p]
                state["step"] = state.get("step", 0) + 1
                every = group["rebalance_every"]
                if every and state["step"] % every == 0:
                    self._rebalance(p)
                self._log.record(p)

        for group in self.param_groups:
            plain = [p for p in group["params"] if p.grad is not None and manifold_of(p) is None]
            for device in {p.device for p in plain}:
                params = [p for p in plain if p.device == device]
                self._torch_sgd_step(
                    group,
                    params,
                    [p.grad for p in params],
                    [self.state[p] for p in params],
                    nonfinite[device],
                    weight_decay=group["weight_decay"],
                    maximize=group["maximize"],
                )
        for device, flag in nonfinite.items():
            self._count(self._nonfinite_steps, device, flag)
        return loss

    def _write(
        self, p: torch.Tensor, new: torch.Tensor, buf: torch.Tensor | None, ok: torch.Tensor
    ) -> None:
        """Write a checked candidate point and momentum, head by head where ``ok`` holds."""
        state = self.state[p]
        if buf is not None:
            old_buf = state.get("momentum_buffer")
            if old_buf is None:
                state["momentum_buffer"] = where_heads(ok, buf, torch.zeros_like(buf), out=buf)
            else:
                where_heads(ok, buf, old_buf, out=old_buf)
        where_heads(ok, new, p.detach(), out=p.detach())

    def _torch_sgd_step(
        self,
        group: dict,
        params: list[torch.Tensor],
        directions: list[torch.Tensor],
        states: list[dict],
        found_inf: torch.Tensor,
        *,
        weight_decay: float = 0.0,
        maximize: bool = False,
    ) -> None:
        """torch's fused SGD kernel on ``params`` along ``directions`` (gradients, or Riemannian
        gradients with weight decay and sign already applied), skipping everything on the device
        when ``found_inf`` is set; momentum buffers are read from and stored in ``states``.

        torch 2.13's fused CPU kernel writes wrong momentum buffers for bfloat16 and float16
        (``tests/test_quotient_sgd.py::test_reduced_precision_plain_tensors_step_as_torch_sgd``),
        so reduced-precision tensors on a CPU take :func:`_single_tensor_sgd` instead."""
        buffers = [state.get("momentum_buffer") for state in states]
        options = dict(
            weight_decay=weight_decay,
            momentum=group["momentum"],
            lr=group["lr"],
            dampening=group["dampening"],
            nesterov=group["nesterov"],
            maximize=maximize,
        )
        fused = [i for i, p in enumerate(params) if _fused_kernel_is_exact(p)]
        # the kernel treats a call as a first step only if every buffer is missing
        for subset in (
            [i for i in fused if buffers[i] is not None],
            [i for i in fused if buffers[i] is None],
        ):
            if not subset:
                continue
            some = [buffers[i] for i in subset]
            torch_sgd(
                [params[i] for i in subset],
                [directions[i] for i in subset],
                some,
                fused=True,
                found_inf=found_inf,
                **options,
            )
            for i, buf in zip(subset, some, strict=True):
                if buffers[i] is None and buf is not None:
                    # the kernel allocates first-step buffers uninitialized and skips them too
                    zero = torch.zeros((), dtype=buf.dtype, device=buf.device)
                    torch.where(found_inf > 0, zero, buf, out=buf)
                buffers[i] = buf
        for i, p in enumerate(params):
            if i not in fused:
                buffers[i] = _single_tensor_sgd(p, directions[i], buffers[i], found_inf, **options)
        if group["momentum"]:
            for state, buf in zip(states, buffers, strict=True):
                state["momentum_buffer"] = buf

    @torch.no_grad()
    def _rebalance(self, p: torch.Tensor) -> None:
        r"""Move ``p`` by the balancing move of its geometry's group,
        :math:`Z \mapsto (A M_A, B M_B)` (``balancing_transform``; nothing where the group has
        none), and push the momentum along with the same group element."""
        manifold = geometry_of(p)
        z = p.detach()
        transform = manifold.balancing_transform(z)
        if transform is None:
            return
        m_a, m_b = transform
        state = self.state[p]
        buf = state.get("momentum_buffer")
        if buf is not None:
            state["momentum_buffer"] = manifold.right_multiply(buf, m_a, m_b)
        p.copy_(manifold.right_multiply(z, m_a, m_b))
        state.pop("grams", None)  # the next step computes the Grams of the balanced point
