"""quotientopt: attention heads trained on the quotient of their factor space by the head symmetry group.

The subpackages load on first use (PEP 562), so that ``import quotientopt`` and
``quotientopt --help`` do not import torch.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__version__ = "0.1.0"

__all__ = ["__version__", "linalg", "manifolds"]


def __getattr__(name: str) -> ModuleType:
    if name in ("linalg", "manifolds"):
        return importlib.import_module(f"quotientopt.{name}")
    raise AttributeError(f"module 'quotientopt' has no attribute {name!r}")
