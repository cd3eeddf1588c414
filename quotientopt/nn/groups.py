r"""Which group acts on a QK sector, by architecture, as a basis of its Lie algebra.

* plain dot-product attention: GL(k) (all of it; use :class:`FactorQuotient`);
* RoPE on q and k: the scaled rotations :math:`a I + b J` on each rotated pair, which commute with
  every RoPE rotation: ``k`` dimensions (a scaling and a rotation per pair);
* QK-norm (RMSNorm over the head dimension, no gain): the normalization forgets the scale of q
  and k, so inside the GL(k) family the conformal group :math:`\mathbb{R}_{>0} \times O(k)`
  acts, ``k (k - 1) / 2 + 1`` dimensions. (The joint scaling ``(c A, c B)``, which is not of the
  form ``(A G, B G^{-T})``, is a further flat direction that this family does not divide out.)
* RoPE and QK-norm: a common scaling and the rotations that commute with RoPE, one per pair:
  ``k / 2 + 1`` dimensions.

Biases ride with their factors and do not change the group. With grouped-query attention the
key factor is shared by several query heads, and the GL(k) of the key head acts on all of them
at once: stack their query factors as the rows of one ``A`` (``FactorQuotient(r * n, m)``).
"""

from __future__ import annotations

import torch

from quotientopt.manifolds.subgroup_quotient import orthogonal_generators, rope_generators


def qk_group_generators(k: int, *, rope: bool, qk_norm: bool) -> torch.Tensor:
    """``(r, k, k)`` basis of the Lie algebra of the QK group (RoPE in the rotate-half layout)."""
    identity = torch.eye(k, dtype=torch.float64)[None]
    if rope and qk_norm:  # the J (rotation) generator of each pair, and a common scaling
        return torch.cat((rope_generators(k, pairing="half")[1::2], identity))
    if rope:
        return rope_generators(k, pairing="half")
    if qk_norm:
        return torch.cat((orthogonal_generators(k), identity))
    raise ValueError("plain attention: the QK group is all of GL(k); use FactorQuotient")
