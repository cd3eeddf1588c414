"""Optimizers on the head quotients, drop-in replacements for torch.optim ones."""

from quotientopt.optim.hamiltonian import QuotientHamiltonian
from quotientopt.optim.sgd import QuotientSGD

__all__ = ["QuotientHamiltonian", "QuotientSGD"]
