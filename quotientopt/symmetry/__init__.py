"""Symmetry diagnostics: conserved quantities, orbit motion and conditioning of attention sectors,
for quotient and standard layouts alike."""

from quotientopt.symmetry.audit import AuditReport, AuditRow, audit
from quotientopt.symmetry.diagnostics import (
    charge,
    conditioning,
    effective_rank,
    momentum_map,
    velocity_momentum_map,
    vertical_fraction,
)
from quotientopt.symmetry.sectors import Sector, find_sectors

__all__ = [
    "AuditReport",
    "AuditRow",
    "Sector",
    "audit",
    "charge",
    "conditioning",
    "effective_rank",
    "find_sectors",
    "momentum_map",
    "velocity_momentum_map",
    "vertical_fraction",
]
