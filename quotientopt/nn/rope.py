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
    r"""RMSNorm over the last (head) dimension without a gain: :math:`x / \max(r, \epsilon)`,
    :math:`r = (\mathrm{mean}\, x^2)^{1/2}` over the last dimension (any shape ``(..., k)``).

    Exactly invariant under :math:`x \mapsto c x` (:math:`c > 0`) and rotations wherever
    :math:`r > \epsilon`, so QK-norm's conformal group (scalings times
    :math:`O(k)`) is an exact symmetry; the clamp (as in ``torch.nn.functional.normalize``) only
    guards zero vectors. (The usual :math:`x / (\mathrm{mean}\, x^2 + \epsilon)^{1/2}` breaks
    the scalings by :math:`O(\epsilon / r^2)`, 6e-8 in a float64 test.)
    """
    return x / x.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(eps)
