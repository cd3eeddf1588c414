"""A/B of one optimizer step between two copies of quotientopt, in one process.

Both package trees are imported side by side (each under the name ``quotientopt``, one after the
other, each keeping its own modules), the two optimizers step identical parameters (two head
sectors of shape ``(layers, 12, 2 * width, 64)`` and one plain ``4 width x width`` matrix, fixed
gradients), and their steps alternate (old, new; new, old; ...). Each step is timed in CPU time
of the main thread with torch on one thread, which a loaded machine disturbs far less than wall
time. Printed per optimizer: the median step of each and the median and quartiles of the
per-pair ratio new / old.

    git archive <base> quotientopt | tar -x -C /tmp/old
    python benchmarks/step_loop_ab.py /tmp/old . --width 256 --rounds 20
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import time
from types import ModuleType

import geoopt
import torch

KINDS = {
    "QuotientSGD": lambda o, ps: o.QuotientSGD(ps, lr=1e-3),
    "QuotientSGD momentum": lambda o, ps: o.QuotientSGD(ps, lr=1e-3, momentum=0.9),
    "QuotientSGD refresh_every=8": lambda o, ps: o.QuotientSGD(
        ps, lr=1e-3, momentum=0.9, refresh_every=8
    ),
    "QuotientAdam": lambda o, ps: o.QuotientAdam(ps, lr=1e-4),
    "QuotientHamiltonian": lambda o, ps: o.QuotientHamiltonian(ps, lr=1e-3),
    "QuotientHamiltonian implicit": lambda o, ps: o.QuotientHamiltonian(
        ps, lr=1e-3, integrator="implicit"
    ),
    "QuotientECD": lambda o, ps: o.QuotientECD(ps, lr=1e-3),
    "QuotientMuon per-head": lambda o, ps: o.QuotientMuon(ps, lr=1e-3, head_norm="per-head"),
    "QuotientMuon all-heads": lambda o, ps: o.QuotientMuon(ps, lr=1e-3, head_norm="all-heads"),
}


def load(root: str) -> tuple[ModuleType, ModuleType]:
    """``quotientopt.optim`` and ``quotientopt.manifolds`` of the tree at ``root``."""
    for name in [m for m in sys.modules if m == "quotientopt" or m.startswith("quotientopt.")]:
        del sys.modules[name]
    sys.path.insert(0, root)
    try:
        return importlib.import_module("quotientopt.optim"), importlib.import_module(
            "quotientopt.manifolds"
        )
    finally:
        sys.path.pop(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--only", default=",".join(KINDS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    libs = {"old": load(args.old), "new": load(args.new)}
    for key, (optim, _) in libs.items():
        print(key, optim.__file__)
    gen = torch.Generator().manual_seed(0)
    d = args.width
    z0 = torch.randn(args.layers, 12, 2 * d, 64, generator=gen) / d**0.5
    plain0 = torch.randn(4 * d, d, generator=gen) / d**0.5
    grads = [torch.randn(z0.shape, generator=gen) * 1e-3 for _ in range(2)]
    grads.append(torch.randn(plain0.shape, generator=gen) * 1e-3)
    loss = torch.tensor(1.0)
    for kind in args.only.split(","):
        optimizers = {}
        for key, (optim, manifolds) in libs.items():
            geometry = manifolds.FactorQuotient(d, d)
            params = [geoopt.ManifoldParameter(z0.clone(), manifold=geometry) for _ in range(2)]
            params.append(torch.nn.Parameter(plain0.clone()))
            for p, g in zip(params, grads, strict=True):
                p.grad = g.clone()
            optimizers[key] = KINDS[kind](optim, params)
        closure = (lambda: loss) if "ECD" in kind else None
        for optimizer in optimizers.values():
            for _ in range(3):
                optimizer.step(closure)
        times: dict[str, list[float]] = {key: [] for key in optimizers}
        for r in range(args.rounds):
            for key in ("old", "new") if r % 2 == 0 else ("new", "old"):
                start = time.thread_time()
                optimizers[key].step(closure)
                times[key].append(time.thread_time() - start)
        ratios = [n / o for n, o in zip(times["new"], times["old"], strict=True)]
        low, _, high = statistics.quantiles(ratios, n=4)
        print(
            f"{kind}: old {1e3 * statistics.median(times['old']):.1f} ms, "
            f"new {1e3 * statistics.median(times['new']):.1f} ms; new/old per pair: median "
            f"{statistics.median(ratios):.3f}, quartiles {low:.3f}-{high:.3f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
