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


def rms_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last (head) dimension without a gain: only rotations commute with it."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
