r"""The updates of parameters on geoopt manifolds other than a head geometry (geoopt's
RiemannianSGD and RiemannianAdam steps), as kernels of the step loop: nothing is written."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["manifold_adam_update", "manifold_sgd_update"]


def manifold_sgd_update(
    point: torch.Tensor,
    grad: torch.Tensor,
    momentum_buffer: torch.Tensor | None,
    manifold: Any,
    *,
    lr: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    weight_decay: float,
    maximize: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    r"""geoopt RiemannianSGD's step for a parameter on another geoopt manifold (nothing written):
    :math:`\xi = \operatorname{egrad2rgrad}(\pm\nabla f + \lambda x)`,
    :math:`m = \beta m + (1 - \tau)\xi` (:math:`m_1 = \xi_1`), :math:`d = \xi + \beta m` (Nesterov)
    or :math:`m`, then ``retr_transp(x, -lr * d, m)``. Returns the new point and momentum."""
    if maximize:
        grad = -grad
    if weight_decay:
        grad = grad.add(point, alpha=weight_decay)
    rgrad = manifold.egrad2rgrad(point, grad)
    if not momentum:
        return manifold.retr(point, -lr * rgrad), None
    buf = (
        rgrad.clone()
        if momentum_buffer is None
        else momentum_buffer.mul(momentum).add_(rgrad, alpha=1 - dampening)
    )
    direction = rgrad.add(buf, alpha=momentum) if nesterov else buf
    return manifold.retr_transp(point, -lr * direction, buf)


def manifold_adam_update(
    point: torch.Tensor,
    grad: torch.Tensor,
    moments: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None],
    manifold: Any,
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    maximize: bool,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    r"""geoopt RiemannianAdam's step (nothing written): :math:`\xi = \operatorname{egrad2rgrad}
    (\pm\nabla f + \lambda x)`, :math:`m = \beta_1 m + (1 - \beta_1)\xi`,
    :math:`v = \beta_2 v + (1 - \beta_2)\langle\xi, \xi\rangle_{\text{component}}`, then
    ``retr_transp(x, -lr * m_hat / (sqrt(v_hat) + eps), m)``. ``moments``: ``(exp_avg,
    exp_avg_sq, step)``, None before the first step. Returns the new point and moments."""
    beta1, beta2 = betas
    grad = -grad if maximize else grad
    if weight_decay:
        grad = grad.add(point, alpha=weight_decay)
    rgrad = manifold.egrad2rgrad(point, grad)
    exp_avg, exp_avg_sq, step = moments
    exp_avg = torch.zeros_like(point) if exp_avg is None else exp_avg
    square = manifold.component_inner(point, rgrad)
    exp_avg_sq = torch.zeros_like(square) if exp_avg_sq is None else exp_avg_sq
    step = (torch.zeros((), device=point.device) if step is None else step) + 1
    exp_avg = torch.lerp(exp_avg, rgrad, 1 - beta1)
    exp_avg_sq = torch.lerp(exp_avg_sq, square, 1 - beta2)
    denom = (exp_avg_sq / (1 - beta2**step)).sqrt().add_(eps)
    direction = exp_avg / (1 - beta1**step) / denom
    new, exp_avg = manifold.retr_transp(point, -lr * direction, exp_avg)
    return new, (exp_avg, exp_avg_sq, step)
