"""Step time of QuotientMuon against torch.optim.Muon on GPT-2-small attention shapes.

    python benchmarks/muon_step.py                 # 12 layers, d = 768, 12 heads of k = 64
    python benchmarks/muon_step.py --layers 2 --repeats 3   # a quick look

torch Muon steps the 48 ``d x d`` attention matrices (W_Q, W_K, W_V, W_O of 12 layers);
QuotientMuon steps the same weights as 24 sectors of shape ``(12, 2d, 64)`` (QK and VO per
layer, every head of a layer in one tensor), with ``head_norm="all-heads"`` (default: one
``Hk x Hk`` polar per sector side) and ``"per-head"`` (``k x k`` polars), each with the
Newton-Schulz polar (default) and with ``eigh``. Gradients are fixed random tensors (the step cost does not depend on them); each timing
is the median of ``--repeats`` steps after one warm-up step, in float32 on the CPU with the
process's torch threads. Prints the times and the ratio QuotientMuon / torch Muon (target <= 0.25).
"""

from __future__ import annotations

import argparse
import statistics
import time

import geoopt
import torch

from quotientopt.manifolds import FactorQuotient
from quotientopt.optim import QuotientMuon


def timed(optimizer: torch.optim.Optimizer, repeats: int) -> float:
    """Median seconds of ``optimizer.step()`` over ``repeats`` steps after one warm-up step."""
    optimizer.step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--d", type=int, default=768)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    heads = args.d // args.k
    gen = torch.Generator().manual_seed(0)
    options = dict(lr=0.02, adjust_lr_fn="match_rms_adamw")

    matrices = []
    for _ in range(4 * args.layers):
        w = torch.nn.Parameter(0.02 * torch.randn(args.d, args.d, generator=gen))
        w.grad = torch.randn(args.d, args.d, generator=gen)
        matrices.append(w)
    muon = torch.optim.Muon(matrices, **options)

    manifold = FactorQuotient(args.d, args.d)
    sectors = []
    for _ in range(2 * args.layers):
        z = 0.02 * torch.randn(heads, 2 * args.d, args.k, generator=gen)
        p = geoopt.ManifoldParameter(z, manifold=manifold)
        p.grad = torch.randn(z.shape, generator=gen)
        sectors.append(p)

    results = {"torch-muon": timed(muon, args.repeats)}
    for head_norm in ("all-heads", "per-head"):
        for polar in ("newton-schulz", "eigh"):
            quotient = QuotientMuon(sectors, polar=polar, head_norm=head_norm, **options)
            results[f"quotient-muon ({head_norm}, {polar})"] = timed(quotient, args.repeats)
    base = results["torch-muon"]
    print(
        f"{args.layers} layers, d = {args.d}, {heads} heads of k = {args.k}; "
        f"{torch.get_num_threads()} torch threads; median of {args.repeats} steps"
    )
    print("| optimizer | step (ms) | / torch Muon |\n|---|---:|---:|")
    for name, seconds in results.items():
        print(f"| {name} | {1e3 * seconds:.1f} | {seconds / base:.3f} |")
    return results


if __name__ == "__main__":
    main()
