"""A short demonstration on a real problem: the best rank-k approximation of the character-bigram
statistics of a text (by default the Python standard library's own sources), over the text's own
most frequent characters (any script).

Two optimizers fit the same factorization ``W = A B^T`` from the same start, and again from a
re-factorized start ``(A G, B G^{-T})`` (same product, ill-conditioned ``G``):

* quotient: geoopt's ``RiemannianSGD`` on :class:`~quotientopt.manifolds.FactorQuotient`
  (preconditioned metric), the ``ManifoldParameter`` way;
* euclidean: ``torch.optim.SGD`` on the same stacked factors.

It prints the gap to the Eckart-Young optimum (the truncated SVD) and how far the two starts'
trajectories of products drift apart: zero, to rounding, on the quotient.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass

import geoopt
import torch

from quotientopt.manifolds import FactorQuotient

#: At most this many characters (the text's most frequent ones) index the bigram matrix.
MAX_ALPHABET = 96
#: ``--rank`` when not given: this, or less when the text's bigram matrix has lower rank.
DEFAULT_RANK = 8


def alphabet(text: str, size: int = MAX_ALPHABET) -> str:
    """The text's ``size`` most frequent characters (ties: by code point), in code-point order."""
    counts = Counter(text)
    top = sorted(counts, key=lambda c: (-counts[c], c))[:size]
    return "".join(sorted(top))


def bigram_matrix(text: str, chars: str | None = None) -> torch.Tensor:
    """``log(1 + count)`` of each character bigram over ``chars`` (default: :func:`alphabet` of the
    text), float64, scaled to unit spectral norm; other characters are skipped."""
    chars = alphabet(text) if chars is None else chars
    index = {c: i for i, c in enumerate(chars)}
    ids = torch.tensor([index.get(c, -1) for c in text], dtype=torch.long)
    pairs = torch.stack((ids[:-1], ids[1:]))
    pairs = pairs[:, (pairs >= 0).all(0)]
    size = len(chars)
    counts = torch.bincount(pairs[0] * size + pairs[1], minlength=size * size).reshape(size, size)
    matrix = torch.log1p(counts.double())
    norm = torch.linalg.matrix_norm(matrix, ord=2)
    if norm == 0:
        raise ValueError(
            "the text has no two consecutive characters among its most frequent ones; "
            "pass a longer text"
        )
    return matrix / norm


def matrix_rank(matrix: torch.Tensor) -> int:
    """Numerical rank: singular values above ``1e-10`` times the largest."""
    values = torch.linalg.svdvals(matrix)
    return int((values > 1e-10 * values[0]).sum())


@dataclass
class Run:
    name: str
    gaps: dict[int, float]  # step -> relative gap to the optimum
    products: torch.Tensor
    seconds: float
    diverged_at: int | None = None


def _fit(name, z0, target, manifold, steps, lr, optimum, checkpoints, euclidean) -> Run:
    point = geoopt.ManifoldParameter(z0.clone(), manifold=manifold)
    optimizer = (
        torch.optim.SGD([point], lr=lr) if euclidean else geoopt.optim.RiemannianSGD([point], lr=lr)
    )
    gaps: dict[int, float] = {}
    diverged_at = None
    start = time.perf_counter()
    for step in range(steps + 1):
        optimizer.zero_grad()
        loss = 0.5 * ((manifold.product(point) - target) ** 2).sum()
        if step in checkpoints:
            gaps[step] = (loss.item() - optimum) / optimum
        if not math.isfinite(loss.item()):
            diverged_at = step
            break
        if step < steps:
            loss.backward()
            optimizer.step()
    seconds = time.perf_counter() - start
    return Run(name, gaps, manifold.product(point).detach(), seconds, diverged_at)


def run_demo(
    text: str, rank: int | None = None, steps: int = 300, condition: float = 100.0, seed: int = 0
) -> str:
    """Fit, and return the printed report. ``rank`` must be below the rank of the text's bigram
    matrix (else the fit is exact and there is no gap to show; ``ValueError``); ``None`` takes
    :data:`DEFAULT_RANK`, lowered to fit."""
    chars = alphabet(text)
    target = bigram_matrix(text, chars)
    size = target.shape[0]
    full = matrix_rank(target)
    if full < 2:
        raise ValueError(
            f"this text's {size} x {size} bigram matrix has rank {full}: nothing to approximate "
            "at a lower rank; pass a more varied text"
        )
    if rank is None:
        rank = min(DEFAULT_RANK, full - 1)
    elif rank >= full:
        raise ValueError(
            f"--rank must be below {full}, the rank of this text's {size} x {size} bigram matrix "
            f"({size} distinct characters): at rank {rank} the fit is exact; pass --rank "
            f"{full - 1} or less, or a more varied text"
        )
    spectrum = torch.linalg.svdvals(target)
    optimum = 0.5 * float((spectrum[rank:] ** 2).sum())
    manifold = FactorQuotient(size, size)
    gen = torch.Generator().manual_seed(seed)
    z0 = torch.randn(2 * size, rank, generator=gen, dtype=torch.float64) / size**0.5
    q1, _ = torch.linalg.qr(torch.randn(rank, rank, generator=gen, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(rank, rank, generator=gen, dtype=torch.float64))
    g = (q1 * torch.logspace(0, math.log10(condition), rank, dtype=torch.float64)) @ q2
    if rank == 1:  # GL(1) is the scalars: re-scale A by sqrt(condition) and B by its inverse
        g = torch.full((1, 1), math.sqrt(condition), dtype=torch.float64)
    z0_refactored = manifold.act(z0, g)
    checkpoints = sorted({c for c in (0, 10, 30, 100) if c < steps} | {steps})
    lines = [
        f"Best rank-{rank} approximation of a {size} x {size} character-bigram matrix "
        f"over the text's {size} most frequent characters (log counts of {len(text):,} "
        f"characters; rank {full}; condition number sigma_1/sigma_{rank} = "
        f"{float(spectrum[0] / spectrum[rank - 1]):.1f}).",
        f"Optimum (Eckart-Young, truncated SVD): cost {optimum:.6g}. Relative gap to it after each step:",
        "",
    ]
    header = (
        f"{'method':<44}{'start':<15}"
        + "".join(f"{f'step {s}':>11}" for s in checkpoints)
        + f"{'time':>8}"
    )
    lines += [header, "-" * len(header)]
    runs = {}
    for euclidean, lr, label in (
        (False, 0.5, "quotient  (RiemannianSGD on FactorQuotient)"),
        (True, 0.5, "euclidean (torch.optim.SGD on the factors)"),
    ):
        for refactored, start_name, start in (
            (False, "(A, B)", z0),
            (True, "(A G, B G^-T)", z0_refactored),
        ):
            run = _fit(label, start, target, manifold, steps, lr, optimum, checkpoints, euclidean)
            runs[(euclidean, refactored)] = run
            cells = "".join(
                f"{run.gaps[s]:>11.2e}" if s in run.gaps else f"{'diverged':>11}"
                for s in checkpoints
            )
            lines.append(f"{label:<44}{start_name:<15}{cells}{run.seconds:>7.2f}s")
    lines.append("")
    for euclidean, label in ((False, "quotient"), (True, "euclidean")):
        a, b = runs[(euclidean, False)], runs[(euclidean, True)]
        if a.diverged_at is None and b.diverged_at is None:
            drift = float(
                torch.linalg.matrix_norm(a.products - b.products)
                / torch.linalg.matrix_norm(a.products)
            )
            lines.append(
                f"{label:>9}: final products from the two factorizations of the same start differ by "
                f"{drift:.1e} (relative Frobenius)"
            )
        else:
            lines.append(
                f"{label:>9}: one of the two runs diverged (non-finite loss); their products cannot be compared"
            )
    what = (
        f"G has condition number {condition:g}"
        if rank > 1
        else f"G is the scalar {math.sqrt(condition):g} (rank 1: GL(1) is the scalars)"
    )
    lines.append(
        f"\n{what}: it changes nothing in the product A B^T, and nothing in the quotient trajectory."
    )
    return "\n".join(lines)
