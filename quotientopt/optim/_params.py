"""The quotient optimizers' option checks and the kinds of parameter (through the geometry
protocol, :mod:`quotientopt.manifolds.protocol`)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import geoopt
import torch

from quotientopt.distributed import local_geometry
from quotientopt.manifolds.protocol import HeadGeometry

NONFINITE_POLICIES = ("skip", "warn", "raise")


def check_number(
    name: str, value: float, low: float, high: float, *, low_open=False, high_open=False
) -> None:
    """Raise a ``ValueError`` naming ``name`` unless ``value`` is a finite number in the interval."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (
            value < high if high_open else value <= high
        )
    if not ok:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open or math.isinf(high) else ']'}"
        raise ValueError(f"invalid {name}: {value!r}; expected a finite number in {interval}")


def check_choice(name: str, value: str, choices: Iterable[str]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(
            f"invalid {name}: {value!r}; expected one of {', '.join(map(repr, choices))}"
        )


def manifold_of(p: torch.Tensor) -> geoopt.manifolds.Manifold | None:
    """The geoopt manifold of a parameter, or None for a plain tensor (or a Euclidean one)."""
    manifold = getattr(p, "manifold", None)
    if manifold is None or isinstance(manifold, geoopt.manifolds.Euclidean):
        return None
    return manifold


def geometry_of(p: torch.Tensor) -> HeadGeometry | None:
    """The head geometry of a parameter (a manifold that implements
    :class:`~quotientopt.manifolds.protocol.HeadGeometry`), or None for any other parameter.
    For a DTensor parameter (FSDP2), the geometry of its local shard, placement-aware
    (:func:`quotientopt.distributed.local_geometry`)."""
    return local_geometry(p)


def is_quotient_parameter(p: torch.Tensor) -> bool:
    """True for a parameter on a head geometry (:func:`geometry_of` is not None)."""
    return geometry_of(p) is not None
