"""Step time of QuotientMuon against torch.optim.Muon on GPT-2-small attention shapes.

    python benchmarks/muon_step.py                 # 12 layers, d = 768, 12 heads of k = 64
    python benchmarks/muon_step.py --layers 2 --repeats 3   # a quick look
    python benchmarks/muon_step.py --invariance             # what a bfloat16 polar keeps

torch Muon steps the 48 ``d x d`` attention matrices (W_Q, W_K, W_V, W_O of 12 layers);
QuotientMuon steps the same weights as 24 sectors of shape ``(12, 2d, 64)`` (QK and VO per
layer, every head of a layer in one tensor), with ``head_norm="all-heads"`` (default: one
``Hk x Hk`` polar per sector side) and ``"per-head"`` (``k x k`` polars), each with the
Newton-Schulz polar at its two precisions (``polar="newton-schulz-float32"``: the float32
iteration on the ``Hk x Hk`` Gram; ``"newton-schulz-bf16"``: torch Muon's bfloat16 iteration on
the ``n x Hk`` matrix ``X``; the default ``"newton-schulz"`` is one of them, by
``quotientopt.optim.muon.polar_route``) and with ``eigh``. Gradients are fixed random tensors (the step cost does not depend on them); each timing
is the median of ``--repeats`` steps after one warm-up step, in float32 on the CPU with the
process's torch threads. Prints the times and the ratio QuotientMuon / torch Muon (issue 24: the default <= 1).

``--invariance`` instead measures how far the products of two float32 runs part that start
from the same products factored two ways, ``Z`` and the re-factorized ``Z G`` (one ``G`` per
head with condition number 1000): ``--steps`` steps of all-heads QuotientMuon (lr 0.003, torch
Muon's other defaults) on a product-fit loss, ``--heads`` heads of ``n = m = --n`` rows and
``k = --head-k`` columns, for each polar precision, and torch Muon on the concatenated ``n x Hk``
matrices for scale. Prints the largest relative Frobenius difference of a head's product.
"""

from __future__ import annotations

import argparse
import statistics
import time

import geoopt
import torch

from quotientopt.manifolds import FactorQuotient
from quotientopt.optim import QuotientMuon
from quotientopt.optim.muon import bfloat16_matmul_is_fast, polar_route


def timed(optimizer: torch.optim.Optimizer, repeats: int) -> float:
    """Median seconds of ``optimizer.step()`` over ``repeats`` steps after one warm-up step."""
    optimizer.step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def invariance(args: argparse.Namespace) -> dict[str, float]:
    """Largest relative product difference per run kind (see the module docs)."""
    gen = torch.Generator().manual_seed(0)
    heads, n, k = args.heads, args.n, args.head_k
    z0 = torch.randn(heads, 2 * n, k, generator=gen, dtype=torch.float64)
    target = torch.randn(heads, n, n, generator=gen, dtype=torch.float64)
    u, _, v = torch.linalg.svd(torch.randn(heads, k, k, generator=gen, dtype=torch.float64))
    g = u @ torch.diag_embed(torch.logspace(0, 3, k, dtype=torch.float64)) @ v  # cond 1000
    z1 = torch.cat((z0[..., :n, :] @ g, z0[..., n:, :] @ torch.linalg.inv(g).mT), dim=-2)
    target32 = target.float()

    def loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return ((a @ b.mT - target32) ** 2).sum()

    def quotient(z: torch.Tensor, polar: str) -> torch.Tensor:
        p = geoopt.ManifoldParameter(z.float().clone(), manifold=FactorQuotient(n, n))
        opt = QuotientMuon([p], lr=0.003, polar=polar)
        for _ in range(args.steps):
            opt.zero_grad()
            loss(p[..., :n, :], p[..., n:, :]).backward()
            opt.step()
        return p.detach()[..., :n, :] @ p.detach()[..., n:, :].mT

    def concatenated(z: torch.Tensor) -> torch.Tensor:
        side = lambda x: torch.nn.Parameter(x.float().transpose(0, 1).reshape(n, -1))  # noqa: E731
        a, b = side(z[..., :n, :]), side(z[..., n:, :])
        opt = torch.optim.Muon([a, b], lr=0.003, adjust_lr_fn="match_rms_adamw")
        for _ in range(args.steps):
            opt.zero_grad()
            heads_of = lambda x: x.reshape(n, heads, k).transpose(0, 1)  # noqa: E731
            loss(heads_of(a), heads_of(b)).backward()
            opt.step()
        return heads_of(a.detach()) @ heads_of(b.detach()).mT

    def gap(w0: torch.Tensor, w1: torch.Tensor) -> float:
        rel = torch.linalg.matrix_norm(w0 - w1) / torch.linalg.matrix_norm(w0)
        return float(rel.max())

    results = {
        f"QuotientMuon polar={polar}": gap(quotient(z0, polar), quotient(z1, polar))
        for polar in ("newton-schulz-float32", "newton-schulz-bf16")
    }
    results["torch Muon, concatenated n x Hk (bfloat16)"] = gap(concatenated(z0), concatenated(z1))
    default = polar_route("newton-schulz", z0.float(), row_sharded=False)
    print(
        f"{heads} heads, n = m = {n}, k = {k}, float32 parameters, {args.steps} steps, start Z "
        f"vs Z G (cond(G) = 1000 per head); bf16 matrix units: {bfloat16_matmul_is_fast('cpu')} "
        f"(default polar route here: {default})"
    )
    print("| run | max relative product difference |\n|---|---:|")
    for name, value in results.items():
        print(f"| {name} | {value:.2e} |")
    return results


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--d", type=int, default=768)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--invariance", action="store_true")
    parser.add_argument("--heads", type=int, default=4, help="--invariance: heads")
    parser.add_argument("--n", type=int, default=32, help="--invariance: rows n = m")
    parser.add_argument("--head-k", type=int, default=8, help="--invariance: columns k")
    parser.add_argument("--steps", type=int, default=100, help="--invariance: steps")
    args = parser.parse_args(argv)
    if args.invariance:
        return invariance(args)
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
    runs = [
        ("all-heads", polar)
        for polar in ("newton-schulz", "newton-schulz-float32", "newton-schulz-bf16", "eigh")
    ]
    runs += [("per-head", polar) for polar in ("newton-schulz", "eigh")]
    for head_norm, polar in runs:
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
