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
:math:`A_t B_t^\top` does not depend on the factorization the run starts from. Parameters on
other geoopt manifolds step as in geoopt's ``RiemannianSGD`` (gradient, retraction, transport);
plain tensors step exactly as ``torch.optim.SGD`` (its fused kernel).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim.sgd import sgd as torch_sgd

from quotientopt.manifolds import FactorQuotient
from quotientopt.manifolds.factor_quotient import Grams, balance
from quotientopt.optim._base import (
    NONFINITE_POLICIES,
    HealthMixin,
    check_choice,
    check_number,
    found_nonfinite,
    is_quotient_parameter,
    manifold_of,
    where_heads,
)

WEIGHT_DECAY_MODES = ("product", "nuclear")


def quotient_weight_decay(manifold: FactorQuotient, z: torch.Tensor, mode: str) -> torch.Tensor:
    r"""Euclidean gradient of a weight-decay penalty that depends on the product only.

    * ``"product"``: :math:`\tfrac12 \|A B^\top\|_F^2`, gradient :math:`(A\, B^\top B,\; B\, A^\top A)`;
      in the preconditioned metric its Riemannian gradient is exactly :math:`(A, B)`, so a step
      scales the product by :math:`(1 - \eta\lambda)^2`.
    * ``"nuclear"``: :math:`\|A B^\top\|_*`, the factor norm
      :math:`\tfrac12(\|A'\|_F^2 + \|B'\|_F^2)` of the balanced representative :math:`(A', B')`;
      with :math:`S = A'^\top A'` its gradient is :math:`(A' S^{-1} B'^\top B,\; B' S^{-1} A'^\top A)`.

    Neither is the representative-dependent factor decay :math:`\tfrac12(\|A\|^2 + \|B\|^2)`.
    """
    a, b = manifold.factors(z)
    if mode == "product":
        return torch.cat((a @ (b.mT @ b), b @ (a.mT @ a)), dim=-2)
    a_bal, b_bal = balance(a, b)
    s_inv = 1.0 / (a_bal * a_bal).sum(-2)  # S is diagonal: the singular values of A B^T
    grad_a = (a_bal * s_inv[..., None, :]) @ (b_bal.mT @ b)
    grad_b = (b_bal * s_inv[..., None, :]) @ (a_bal.mT @ a)
    return torch.cat((grad_a, grad_b), dim=-2)


class QuotientSGD(HealthMixin, torch.optim.Optimizer):
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
        on_nonfinite: str = "skip",
    ) -> None:
        check_number("lr", lr, 0.0, float("inf"))
        check_number("momentum", momentum, 0.0, 1.0, high_open=True)
        check_number("dampening", dampening, 0.0, 1.0)
        check_number("weight_decay", weight_decay, 0.0, float("inf"))
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
        defaults = dict(
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            nesterov=nesterov,
            weight_decay=weight_decay,
            weight_decay_mode=weight_decay_mode,
            maximize=maximize,
            rebalance_every=rebalance_every,
        )
        super().__init__(params, defaults)
        self.on_nonfinite = on_nonfinite
        self._gram_cache: dict[torch.Tensor, tuple[int, Grams]] = {}
        self._work: dict[torch.Tensor, tuple[torch.Tensor, torch.Tensor]] = {}
        self._init_health()

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._gram_cache = {}
        self._work = {}
        if not hasattr(self, "_nonfinite_steps"):
            self._init_health()

    # ----------------------------------------------------------------------------- helpers
    def _grams(self, p: torch.Tensor, manifold: FactorQuotient) -> Grams:
        """The Grams at ``p``: cached from the previous step if ``p`` was not modified since."""
        cached = self._gram_cache.get(p)
        if cached is not None and cached[0] == p._version:
            return cached[1]
        return manifold.grams(p.detach(), check=False, inverses=True)

    def _work_buffers(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Two tensors shaped like ``p``, reused every step for the Riemannian gradient and the
        candidate point: allocating them afresh each step (page faults) cost about as much as the
        arithmetic on a CPU. Not part of ``state_dict``."""
        buffers = self._work.get(p)
        if buffers is None or buffers[0].shape != p.shape or buffers[0].dtype != p.dtype:
            buffers = self._work[p] = (torch.empty_like(p.detach()), torch.empty_like(p.detach()))
        return buffers

    def _quotient_update(
        self, p: torch.Tensor, grad: torch.Tensor, group: dict, keep: torch.Tensor
    ):
        """Candidate new point, momentum and Grams for one FactorQuotient tensor (nothing written
        to ``p`` or its state); the few full-size temporaries are reused in place."""
        manifold: FactorQuotient = p.manifold
        z = p.detach()
        lr, beta, dampening = group["lr"], group["momentum"], group["dampening"]
        grams = self._grams(p, manifold)
        rgrad_out, new_out = self._work_buffers(p)
        rgrad = manifold.egrad2rgrad(z, grad, grams=grams, out=rgrad_out)
        if group["maximize"]:
            rgrad.neg_()
        if group["weight_decay"]:
            if (
                group["weight_decay_mode"] == "product"
                and manifold.metric == "preconditioned"
                and manifold.damping == 0
            ):
                rgrad.add_(z, alpha=group["weight_decay"])  # exact: (A P) P^{-1} = A
            else:
                penalty = quotient_weight_decay(manifold, z, group["weight_decay_mode"])
                rgrad.add_(
                    manifold.egrad2rgrad(z, penalty, grams=grams), alpha=group["weight_decay"]
                )
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
        new = torch.add(z, direction, alpha=-lr, out=new_out)
        new_grams = manifold.grams(new, check=False, reference=grams, inverses=True)
        ok = grams.ok & new_grams.ok & keep  # non-finite points have non-finite Grams
        if buf is not None:
            buf = manifold.proju_(new, buf, grams=new_grams)
        return new, buf, new_grams, ok

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
    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """Perform one optimization step (``closure`` re-evaluates the model and returns the loss)."""
        loss, grads = self._closure_and_grads(closure)
        if not grads:
            return loss
        nonfinite = found_nonfinite(grads)

        # phase 1: every quotient and manifold update, computed and checked, nothing written
        pending = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                flag = nonfinite[p.device]
                if is_quotient_parameter(p):
                    new, buf, new_grams, ok = self._quotient_update(p, p.grad, group, flag == 0)
                    pending.append(("quotient", p, group, new, buf, new_grams, ok))
                elif manifold_of(p) is not None:
                    new, buf = self._manifold_update(p, p.grad, group)
                    pending.append(("manifold", p, group, new, buf, None, flag == 0))
        self._enforce_policy(nonfinite, [ok for kind, *_, ok in pending if kind == "quotient"])

        # phase 2: write
        for kind, p, group, new, buf, new_grams, ok in pending:
            state = self.state[p]
            old_buf = state.get("momentum_buffer")
            if buf is not None:
                if old_buf is None:
                    state["momentum_buffer"] = where_heads(ok, buf, torch.zeros_like(buf), out=buf)
                else:
                    where_heads(ok, buf, old_buf, out=old_buf)
            where_heads(ok, new, p.detach(), out=p.detach())
            if kind != "quotient":
                continue
            state["step"] = state.get("step", 0) + 1
            cached = self._gram_cache.get(p)
            if cached is not None:
                new_grams = Grams(
                    *(where_heads(ok, t, c) for t, c in zip(new_grams, cached[1], strict=True))
                )
            self._gram_cache[p] = (p._version, new_grams)
            self._count(self._rank_skips, p.device, (~ok & (nonfinite[p.device] == 0)).sum())
            every = group["rebalance_every"]
            if every and state["step"] % every == 0:
                self._rebalance(p)

        for group in self.param_groups:
            plain = [p for p in group["params"] if p.grad is not None and manifold_of(p) is None]
            if not plain:
                continue
            for device in {p.device for p in plain}:
                params = [p for p in plain if p.device == device]
                buffers = [self.state[p].get("momentum_buffer") for p in params]
                torch_sgd(
                    params,
                    [p.grad for p in params],
                    buffers,
                    weight_decay=group["weight_decay"],
                    momentum=group["momentum"],
                    lr=group["lr"],
                    dampening=group["dampening"],
                    nesterov=group["nesterov"],
                    maximize=group["maximize"],
                    fused=True,
                    found_inf=nonfinite[device],
                )
                if group["momentum"]:
                    for p, buf in zip(params, buffers, strict=True):
                        self.state[p]["momentum_buffer"] = buf
        for device, flag in nonfinite.items():
            self._count(self._nonfinite_steps, device, flag)
        return loss

    @torch.no_grad()
    def _rebalance(self, p: torch.Tensor) -> None:
        r"""Move ``p`` to its balanced representative :math:`Z G` and push the momentum along
        (:math:`m \mapsto (m_A G, m_B G^{-\top})`, with :math:`G = Q^{-1} A^\top A'`)."""
        manifold: FactorQuotient = p.manifold
        z = p.detach()
        balanced = manifold.balance(z)
        state = self.state[p]
        buf = state.get("momentum_buffer")
        if buf is not None:
            a, _ = manifold.factors(z)
            a_bal, _ = manifold.factors(balanced)
            grams = self._grams(p, manifold)
            g = torch.cholesky_solve(a.mT.to(grams.q.dtype) @ a_bal.to(grams.q.dtype), grams.chol_q)
            state["momentum_buffer"] = manifold.push(buf, g)
        p.copy_(balanced)
        self._gram_cache.pop(p, None)
