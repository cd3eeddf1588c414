"""Which group acts on a QK sector, by architecture, as a basis of its Lie algebra.

* plain dot-product attention: GL(k) (all of it; use :class:`FactorQuotient`);
* RoPE on q and k: the scaled rotations :math:`a I + b J` on each rotated pair, which commute with
  every RoPE rotation: ``k`` dimensions (a scaling and a rotation per pair);
* QK-norm (RMSNorm over the head dimension, no gain): O(k), ``k (k - 1) / 2`` dimensions;
* RoPE and QK-norm: the rotations that commute with RoPE, one per pair: ``k / 2`` dimensions.

Biases ride with their factors and do not change the group. With grouped-query attention the
key factor is shared by several query heads, and the GL(k) of the key head acts on all of them
at once: stack their query factors as the rows of one ``A`` (``FactorQuotient(r * n, m)``).
"""

from __future__ import annotations

import torch

from quotientopt.manifolds.subgroup_quotient import orthogonal_generators, rope_generators


def qk_group_generators(k: int, *, rope: bool, qk_norm: bool) -> torch.Tensor:
    """``(r, k, k)`` basis of the Lie algebra of the QK group (RoPE in the rotate-half layout)."""
    if rope and qk_norm:
        return rope_generators(k, pairing="half")[1::2]  # the J (rotation) generator of each pair
    if rope:
        return rope_generators(k, pairing="half")
    if qk_norm:
        return orthogonal_generators(k)
    raise ValueError("plain attention: the QK group is all of GL(k); use FactorQuotient")
