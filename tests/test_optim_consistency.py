"""One definition each for facts that several optimizers rely on (issue 26, point 6)."""

from __future__ import annotations

import torch

from quotientopt.optim import _base, hamiltonian, sgd


def test_one_fused_kernel_rule_for_every_optimizer() -> None:
    """QuotientSGD and QuotientHamiltonian send the same tensors to torch's fused SGD kernel."""
    assert sgd._fused_kernel_is_exact is _base._fused_kernel_is_exact
    assert hamiltonian._fused_kernel_is_exact is _base._fused_kernel_is_exact


def test_fused_kernel_only_where_it_is_known_exact() -> None:
    """float32/float64 take the fused kernel on every device; reduced precision only on CUDA
    (the CPU kernel is wrong for it, other devices' kernels are untested), so a bfloat16 tensor
    on any other device (here: meta) takes the exact single-tensor step."""
    exact = _base._fused_kernel_is_exact
    for device in ("cpu", "meta"):
        for dtype in (torch.float32, torch.float64):
            assert exact(torch.empty(2, dtype=dtype, device=device))
        for dtype in (torch.bfloat16, torch.float16):
            assert not exact(torch.empty(2, dtype=dtype, device=device))
    if torch.cuda.is_available():
        assert exact(torch.empty(2, dtype=torch.bfloat16, device="cuda"))
