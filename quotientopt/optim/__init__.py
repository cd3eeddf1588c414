"""Optimizers on the head quotients, drop-in replacements for torch.optim ones."""

from quotientopt.optim._base import Momentum, geometry_of, momentum_of
from quotientopt.optim.adam import QuotientAdam
from quotientopt.optim.ecd import QuotientECD
from quotientopt.optim.hamiltonian import QuotientHamiltonian
from quotientopt.optim.hybrid import HybridOptimizer, split_parameters
from quotientopt.optim.muon import QuotientMuon, muon_and_adamw
from quotientopt.optim.sgd import QuotientSGD

__all__ = [
    "HybridOptimizer",
    "Momentum",
    "QuotientAdam",
    "QuotientECD",
    "QuotientHamiltonian",
    "QuotientMuon",
    "QuotientSGD",
    "geometry_of",
    "momentum_of",
    "muon_and_adamw",
    "split_parameters",
]
