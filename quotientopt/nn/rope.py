r"""Rotary position embedding (RoPE) and the parameter-free RMS normalization of QK-norm.

RoPE uses the "rotate half" layout (GPT-NeoX, LLaMA): head dimension ``i`` pairs with
``i + k/2``, rotated by the angle :math:`t\, \theta_i`, :math:`\theta_i = \mathrm{base}^{-2i/k}`,
at position :math:`t`.
"""

from __future__ import annotations

import torch


def rope_angles(length: int, head_dim: int, base: float, device=None, dtype=None) -> torch.Tensor:
    r"""``(length, head_dim / 2)`` angles :math:`t\, \theta_i`."""
    inv_freq = base ** (
        -torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim
    )
    positions = torch.arange(length, device=device, dtype=torch.float32)
    return (positions[:, None] * inv_freq[None, :]).to(dtype or torch.float32)


def apply_rope(x: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotate ``x`` of shape ``(..., length, head_dim)`` by its positions ``0 .. length - 1``."""
    length, head_dim = x.shape[-2], x.shape[-1]
    angles = rope_angles(length, head_dim, base, device=x.device, dtype=x.dtype)
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x[..., : head_dim // 2], x[..., head_dim // 2 :]
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


def rms_normalize(x: torch.Tensor) -> torch.Tensor:
    r"""RMSNorm over the last (head) dimension without a gain,
    :math:`x / \sqrt{\max(\overline{x^2}, t)}` with :math:`t` the dtype's smallest normal number.

    It is exactly scale-invariant, :math:`n(c x) = n(x)` for :math:`c > 0` (up to rounding), so
    the common scaling of the QK-norm group (:func:`quotientopt.nn.groups.qk_group_generators`) is
    a symmetry of the head and not only nearly one. The usual :math:`\overline{x^2} + \epsilon`
    is not: with :math:`\epsilon = 10^{-6}` a rebalance in float64 moved the output by 6e-8
    (issue 26). The clamp at :math:`t` only keeps :math:`x = 0` at 0. Only rotations and this
    scaling commute with it."""
    mean_square = x.pow(2).mean(-1, keepdim=True)
    return x * torch.rsqrt(mean_square.clamp_min(torch.finfo(x.dtype).tiny))
