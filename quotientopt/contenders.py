"""The optimizers of ``quotientopt compare``: names, descriptions and default learning rates.

A table without torch, so that ``quotientopt --help`` answers without importing it; the builders
live in :mod:`quotientopt.compare` (:data:`~quotientopt.compare.CONTENDERS`).
"""

from __future__ import annotations

from dataclasses import dataclass

MUON_DEFAULT_LR = 0.02  # 200-step grid on the default corpus, seed 0: see docs/symmetry.md
QUOTIENT_MUON_DEFAULT_LR = 0.02  # the same grid, for the all-heads step (per-head: 0.01)
#: ``--tune``: each optimizer's grid is its starting lr (default or ``--lr``) times these factors.
TUNE_FACTORS = (0.1, 0.3, 1.0, 3.0)


@dataclass(frozen=True)
class ContenderSpec:
    """One optimizer of the comparison as the command line shows it."""

    name: str
    description: str
    quotient: bool  # heads on the quotient (True) or the standard layout
    symmetry_breaking: bool
    default_lr: float


SPECS: dict[str, ContenderSpec] = {
    spec.name: spec
    for spec in (
        ContenderSpec("sgd", "SGD, Nesterov momentum 0.9", False, False, 0.3),
        ContenderSpec("adamw", "AdamW, betas (0.9, 0.99), weight decay 0.1", False, False, 3e-3),
        ContenderSpec(
            "muon",
            "torch Muon (Nesterov 0.95, weight decay 0.1, AdamW-matched RMS) on the blocks' "
            "matrices, AdamW on the rest, both at lr",
            False,
            False,
            MUON_DEFAULT_LR,
        ),
        ContenderSpec(
            "quotient-muon",
            "QuotientMuon (all heads in one spectral norm) on the heads at 0.2 lr, torch Muon's step "
            "on the MLP matrices and AdamW "
            "(betas (0.9, 0.99), weight decay 0.1) on the rest at lr (optim.muon_and_adamw)",
            True,
            False,
            QUOTIENT_MUON_DEFAULT_LR,
        ),
        ContenderSpec(
            "quotient-sgd",
            "QuotientSGD, Nesterov momentum 0.9; heads on the quotient at lr, the rest at 30 lr",
            True,
            False,
            0.01,
        ),
        ContenderSpec(
            "quotient-adam",
            "QuotientAdam, betas (0.9, 0.99), on the heads at lr (no decay); AdamW on the rest at "
            "lr (its fused step inside QuotientAdam; weight decay 0.1)",
            True,
            False,
            3e-3,
        ),
        ContenderSpec(
            "quotient-hamiltonian",
            "QuotientHamiltonian, friction 3; heads on the quotient at step lr, the rest at 10 lr",
            True,
            False,
            0.03,
        ),
        ContenderSpec(
            "breaking-sgd",
            "SGD, Nesterov momentum 0.9, paper 003's symmetry-breaking biases",
            False,
            True,
            0.3,
        ),
    )
}
