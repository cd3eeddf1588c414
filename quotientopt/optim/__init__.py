"""Optimizers on the head quotients, drop-in replacements for torch.optim ones."""

from quotientopt.optim.sgd import QuotientSGD

__all__ = ["QuotientSGD"]
