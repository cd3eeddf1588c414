"""Eager vs ``torch.compile`` for the quotient optimizers' step, side by side in one run.

    python benchmarks/compile_step.py [--layers 4] [--width 256] [--heads 4] [--rounds 20]

One QK and one VO sector per layer (``FactorQuotient(width, width)``, ``heads`` heads of
``k = width / heads``), random gradients, and each optimizer timed eager and compiled (inductor,
``dynamic=False``) in interleaved rounds; prints the median step times, their ratio and the
compile time. The compiled step must equal the eager one (checked here to 1e-5 after the run).
"""

from __future__ import annotations

import argparse
import statistics
import time

import geoopt
import torch

from quotientopt.manifolds import FactorQuotient
from quotientopt.optim import QuotientAdam, QuotientHamiltonian, QuotientSGD

OPTIMIZERS = {
    "QuotientSGD momentum": lambda ps: QuotientSGD(ps, lr=1e-3, momentum=0.9),
    "QuotientAdam": lambda ps: QuotientAdam(ps, lr=1e-4),
    "QuotientHamiltonian": lambda ps: QuotientHamiltonian(ps, lr=1e-3, friction=1.0),
}


def sectors(layers: int, width: int, heads: int) -> list[torch.Tensor]:
    torch.manual_seed(0)
    manifold = FactorQuotient(width, width)
    k = width // heads
    params = []
    for _ in range(2 * layers):
        p = geoopt.ManifoldParameter(manifold.random(heads, 2 * width, k), manifold=manifold)
        p.grad = 1e-2 * torch.randn_like(p)
        params.append(p)
    return params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {vars(args)}")
    print("| optimizer | eager (ms) | compiled (ms) | compiled / eager | compile (s) |")
    print("|---|---:|---:|---:|---:|")
    for name, make in OPTIMIZERS.items():
        torch._dynamo.reset()
        eager_params = sectors(args.layers, args.width, args.heads)
        compiled_params = sectors(args.layers, args.width, args.heads)
        eager, compiled = make(eager_params), make(compiled_params)
        step = torch.compile(compiled.step, dynamic=False)
        start = time.perf_counter()
        step()
        eager.step()
        compile_s = time.perf_counter() - start
        times: dict[str, list[float]] = {"eager": [], "compiled": []}
        for _ in range(args.rounds):
            for label, fn in (("eager", eager.step), ("compiled", step)):
                start = time.perf_counter()
                fn()
                times[label].append(time.perf_counter() - start)
        agree = max(
            float((a - b).abs().max()) for a, b in zip(eager_params, compiled_params, strict=True)
        )
        if agree > 1e-5:
            raise SystemExit(f"{name}: compiled differs from eager by {agree:.2e}")
        e, c = (1e3 * statistics.median(times[k]) for k in ("eager", "compiled"))
        print(f"| {name} | {e:.1f} | {c:.1f} | {c / e:.2f} | {compile_s:.0f} |")


if __name__ == "__main__":
    main()
