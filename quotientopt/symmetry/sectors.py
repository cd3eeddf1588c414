r"""Find the attention sectors of a model, in any supported layout, as factor pairs.

A :class:`Sector` knows which parameters hold one sector (QK or VO) of one attention module and
the linear map from them to the per-head factor pair ``(A, B)``, ``A B^T`` the sector's product,
bias rows included (so that ``(A G, B G^{-T})`` is exactly the symmetry). Because the map is
linear it reads values, gradients, updates and optimizer momenta alike:
``sector.pair(lambda p: p)``, ``sector.pair(lambda p: p.grad)``,
``sector.pair(lambda p: optimizer.state[p]["momentum_buffer"])``.

Layouts: every attention type in the registry :mod:`quotientopt.nn.adapters` (``sectors``):
:class:`~quotientopt.nn.QuotientMultiheadAttention`, ``torch.nn.MultiheadAttention``, the
reference GPT's two attention types, and Hugging Face's ``GPT2Attention`` and ``BertAttention``
with their twins. A sector is named by the outermost registered module (``"h.0.attn.QK"`` for
the standard and the quotient GPT alike). Shapes: ``(groups, rows, k)`` with one group per
key/value head (per head without grouped-query attention).
"""

from __future__ import annotations

from torch import nn

from quotientopt.nn.adapters import Sector, attention_modules

__all__ = ["Sector", "find_sectors"]


def find_sectors(model: nn.Module) -> list[Sector]:
    """Every QK and VO sector of ``model``'s attention modules, in module order (see the module
    docstring); empty when the model has no registered attention type."""
    sectors: list[Sector] = []
    for path, module, adapter in attention_modules(model, "sectors"):
        sectors += adapter.sectors(path, module)
    return sectors
