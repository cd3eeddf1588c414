"""QuotientAdam's step against torch AdamW at GPT-2-small attention shapes, in one process.

Shapes: 12 layers x (QK, VO) = 24 ``FactorQuotient(768, 768)`` sectors of 12 heads with
``k = 64``, i.e. tensors of shape ``(12, 1536, 64)`` (28.3M numbers). torch AdamW (fused and
foreach) steps plain ``nn.Parameter`` tensors of the same shapes. Gradients are fixed random
tensors, so only ``optimizer.step()`` is timed. Every optimizer takes one step per round
(interleaved, which spreads a shared machine's load over all of them); the medians are printed.

    python benchmarks/adam_step.py [--threads 1] [--rounds 5] [--sectors 24]
    python benchmarks/adam_step.py --before OLD_ADAM.py   # also time an older adam.py, e.g.
        # git show <rev>:quotientopt/optim/adam.py > /tmp/adam_old.py
    python benchmarks/adam_step.py --ops                   # the batched k x k / n x k op costs
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time

import geoopt
import torch

from quotientopt.manifolds import FactorQuotient
from quotientopt.optim import QuotientAdam


def load_class(path: str) -> type:
    spec = importlib.util.spec_from_file_location("adam_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.QuotientAdam


def op_costs(rounds: int) -> None:
    """Median times of the batched operations at the shapes of 24 sectors: 576 factors of
    ``768 x 64`` and 576 ``64 x 64`` matrices."""
    batch, n, k = 576, 768, 64
    a = torch.randn(batch, n, k)
    v = torch.randn(batch, k, k)
    v = v @ v.mT / k + torch.eye(k)
    chol = torch.linalg.cholesky(v)
    eye = torch.eye(k).expand(batch, k, k)
    ops = {
        "Gram X^T X, (576, 768, 64)": lambda: a.mT @ a,
        "X C, C (576, 64, 64)": lambda: a @ v,
        "baddbmm X + X C": lambda: torch.baddbmm(a, a, v, alpha=-0.1),
        "k x k matmul (576, 64, 64)": lambda: v @ v,
        "cholesky_ex (576, 64, 64)": lambda: torch.linalg.cholesky_ex(v),
        "solve_triangular(L, I)": lambda: torch.linalg.solve_triangular(chol, eye, upper=False),
        "eigh (576, 64, 64)": lambda: torch.linalg.eigh(v),
        "solve_triangular(X, R) (n x k)": lambda: torch.linalg.solve_triangular(
            chol.mT, a, upper=True, left=False
        ),
        "qr (576, 768, 64)": lambda: torch.linalg.qr(a),
    }
    times: dict[str, list[float]] = {name: [] for name in ops}
    for _ in range(rounds):
        for name, op in ops.items():
            start = time.perf_counter()
            op()
            times[name].append(time.perf_counter() - start)
    for name, ts in times.items():
        print(f"{name:36s} {1e3 * statistics.median(ts):9.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sectors", type=int, default=24)
    parser.add_argument("--before", default=None, help="path of an older adam.py to time too")
    parser.add_argument("--ops", action="store_true", help="time the batched ops instead")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    if args.ops:
        op_costs(args.rounds)
        return

    gen = torch.Generator().manual_seed(0)
    manifold = FactorQuotient(768, 768)
    start = [0.02 * torch.randn(12, 1536, 64, generator=gen) for _ in range(args.sectors)]
    grads = [1e-3 * torch.randn(12, 1536, 64, generator=gen) for _ in range(args.sectors)]

    def heads():
        ps = [geoopt.ManifoldParameter(z.clone(), manifold=manifold) for z in start]
        for p, g in zip(ps, grads, strict=True):
            p.grad = g
        return ps

    def plain():
        ps = [torch.nn.Parameter(z.clone()) for z in start]
        for p, g in zip(ps, grads, strict=True):
            p.grad = g
        return ps

    optimizers = {
        "torch AdamW (fused)": torch.optim.AdamW(plain(), lr=1e-4, fused=True),
        "torch AdamW (foreach)": torch.optim.AdamW(plain(), lr=1e-4, foreach=True),
        "QuotientAdam": QuotientAdam(heads(), lr=1e-4),
    }
    if args.before:
        optimizers["QuotientAdam (before)"] = load_class(args.before)(heads(), lr=1e-4)
    for optimizer in optimizers.values():  # warm-up: state allocation, first-step QR
        optimizer.step()
    times: dict[str, list[float]] = {name: [] for name in optimizers}
    for _ in range(args.rounds):
        for name, optimizer in optimizers.items():
            begin = time.perf_counter()
            optimizer.step()
            times[name].append(time.perf_counter() - begin)
    median = {name: statistics.median(ts) for name, ts in times.items()}
    fused, foreach = median["torch AdamW (fused)"], median["torch AdamW (foreach)"]
    print(f"{'optimizer':24s} {'median step':>12s} {'/ fused':>8s} {'/ foreach':>10s}")
    for name, m in median.items():
        print(f"{name:24s} {1e3 * m:9.1f} ms {m / fused:8.2f} {m / foreach:10.2f}")


if __name__ == "__main__":
    main()
