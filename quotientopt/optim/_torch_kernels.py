r"""torch's own functional SGD kernel for the tensors that the quotient optimizers hand to it:
plain tensors, QuotientSGD's head sectors between two metric refreshes, and the Hamiltonian's
Euclidean leapfrog. One function, :func:`torch_sgd_step`, with torch's rule

.. math:: g \leftarrow \pm g + \lambda x, \qquad b \leftarrow \beta b + (1 - \tau) g
          \ (b_1 = g), \qquad x \leftarrow x - \eta\,(g + \beta b \text{ (Nesterov) or } b),

skipped on the device where ``found_inf`` is set (no host synchronisation)."""

from __future__ import annotations

import torch
from torch.optim.sgd import sgd as torch_sgd

from quotientopt.optim._base import _fused_kernel_is_exact


def single_tensor_sgd(
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
    written into ``param`` and ``buf`` only where ``found_inf`` is 0 (no synchronisation; torch's
    own single-tensor kernel rejects ``found_inf``). Returns the momentum buffer (new on the
    first step)."""
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


def torch_sgd_step(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    buffers: list[torch.Tensor | None],
    found_inf: torch.Tensor,
    **options: float | bool,
) -> list[torch.Tensor | None]:
    """torch's fused SGD kernel on ``params`` (one device) along ``grads``, with the momentum
    ``buffers`` (None: a first step) and torch SGD's ``options`` (``weight_decay``, ``momentum``,
    ``lr``, ``dampening``, ``nesterov``, ``maximize``); tensors the fused kernel does not step
    exactly (:func:`~quotientopt.optim._base._fused_kernel_is_exact`) take :func:`single_tensor_sgd`. Returns the buffers
    (new ones on a first step, zero where ``found_inf`` is set)."""
    buffers = list(buffers)
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
            [grads[i] for i in subset],
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
            buffers[i] = single_tensor_sgd(p, grads[i], buffers[i], found_inf, **options)
    return buffers
