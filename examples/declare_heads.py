"""Declare attention heads as quotient parameters in your own model and train them with QuotientSGD.

One ``geoopt.ManifoldParameter`` per sector holds every head: the QK sector stacks [W_Q; W_K]
and the VO sector [W_V; W_O^T], shape (heads, 2 * d, k). The model only ever uses the products
W_QK = W_Q W_K^T and W_VO = W_V W_O, so the optimizer works on the quotient by GL(k).

    python examples/declare_heads.py [--steps 200]
"""

from __future__ import annotations

import argparse

import geoopt
import torch

from quotientopt.manifolds import FactorQuotient
from quotientopt.optim import HybridOptimizer, QuotientSGD


class TinyAttention(torch.nn.Module):
    def __init__(self, d: int = 32, heads: int = 4, k: int = 8) -> None:
        super().__init__()
        self.sector = FactorQuotient(d, d)
        self.qk = geoopt.ManifoldParameter(
            self.sector.random(heads, 2 * d, k), manifold=self.sector
        )
        self.vo = geoopt.ManifoldParameter(
            self.sector.random(heads, 2 * d, k), manifold=self.sector
        )
        self.readout = torch.nn.Linear(d, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (batch, tokens, d)
        w_qk = self.sector.product(self.qk)  # (heads, d, d) = W_Q W_K^T
        w_vo = self.sector.product(self.vo)  # (heads, d, d) = W_V W_O
        scores = torch.einsum("btd,hde,bse->bhts", x, w_qk, x) / w_qk.shape[-1] ** 0.5
        mixed = torch.einsum("bhts,bsd,hde->bte", scores.softmax(-1), x, w_vo)
        return self.readout(mixed.mean(1)).squeeze(-1)


def main(steps: int = 200) -> dict[str, float]:
    torch.manual_seed(0)
    teacher, student = TinyAttention(), TinyAttention()
    x = torch.randn(256, 6, 32)
    with torch.no_grad():
        y = teacher(x)
    optimizer = HybridOptimizer.for_parameters(
        student.parameters(),
        heads=lambda ps: QuotientSGD(ps, lr=0.05, momentum=0.9),
        rest=lambda ps: torch.optim.AdamW(ps, lr=1e-2),
    )
    first = None
    for step in range(steps):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(student(x), y)
        loss.backward()
        optimizer.step()
        first = loss.item() if first is None else first
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step:4d}  loss {loss.item():.5f}")
    charge = student.sector.charge(student.qk.detach())
    print(
        f"QK charge A^T A - B^T B after training: max |entry| {charge.abs().max():.3e} (per head, k x k)"
    )
    return {"first_loss": first, "last_loss": loss.item()}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    main(parser.parse_args().steps)
