r"""Ill-conditioned low-rank recovery: iterations and wall time to relative error 1e-6, per method.

What it measures
----------------
For two classic nonconvex low-rank problems and a sweep of target condition numbers
:math:`\kappa`, every method starts from the SAME point on the SAME problem (float64, CPU, one
torch thread) and runs until the relative error

.. math:: \|W - W^*\|_F / \|W^*\|_F \le 10^{-6}

or until its budget is spent. Reported per (problem, kappa, method): the iterations and the wall
time (optimizer and loss/gradient work only; computing the error for the stopping test is not
timed) to reach the tolerance, or else the error at the end of the budget ("diverged" when it
blew up). The time is the quantity to compare across families: one iteration of a trust-region or
line-search method costs several function / Hessian evaluations.

Problems (rank-``r`` target, ``n x m``; defaults ``n, m, r = 60, 50, 5``)
----------------------------------------------------------------------
* target :math:`W^* = U \operatorname{diag}(s) V^\top`, :math:`U`, :math:`V` Haar-random orthonormal
  (QR of a Gaussian), :math:`s` log-spaced from 1 down to :math:`1/\kappa`, so
  :math:`\sigma_{\max} = 1` and the condition number is exactly :math:`\kappa`. The same
  :math:`U`, :math:`V` and measurement operator are used for every kappa (seed ``--seed``).
* ``sensing``: :math:`p = 5 r (n + m)` Gaussian linear measurements
  :math:`y_i = \langle A_i, W^* \rangle`, :math:`A_i` with i.i.d. :math:`N(0, 1/p)` entries
  (so :math:`\mathbb{E}\, \mathcal{A}^*\mathcal{A} = I`); loss
  :math:`\tfrac12 \sum_i (\langle A_i, W \rangle - y_i)^2`.
* ``completion``: each entry observed independently with probability ``--sampling-rate``
  (default 0.5); loss :math:`\tfrac{1}{2\rho} \|P_\Omega(W - W^*)\|_F^2`.
* start (both problems): the spectral initialization of Tong, Ma & Chi (ScaledGD, 2021): the best
  rank-``r`` approximation :math:`U_0 \Sigma_0 V_0^\top` of :math:`\mathcal{A}^*(y)` (sensing) or of
  :math:`P_\Omega(W^*)/\rho` (completion), as the balanced factor pair
  :math:`A_0 = U_0 \Sigma_0^{1/2}`, :math:`B_0 = V_0 \Sigma_0^{1/2}`; pymanopt starts from the
  same matrix (:func:`quotientopt.manifolds.factor_pair_to_pymanopt`).

Methods (all in one run)
------------------------
* quotientopt on ``FactorQuotient(n, m)`` (preconditioned metric), point :math:`Z = [A; B]`:
  ``QuotientSGD`` (plain, no momentum: Riemannian gradient descent = ScaledGD),
  ``QuotientHamiltonian`` (conformal-symplectic leapfrog with friction, i.e. the descent mode),
  ``QuotientAdam`` (skipped with a note only if ``quotientopt.optim.QuotientAdam`` is missing);
* geoopt's ``RiemannianSGD`` and ``RiemannianAdam`` on the same ``FactorQuotient``;
* torch's ``SGD`` (plain gradient descent) and ``Adam`` on the two factors ``A``, ``B``;
* pymanopt 2.2 ``SteepestDescent``, ``ConjugateGradient`` (default line searches) and
  ``TrustRegions`` on ``FixedRankEmbedded`` (numpy backend; cost, Riemannian gradient = projection
  of the Euclidean gradient, and the exact Riemannian Hessian with its curvature term; the
  linear algebra of the cost runs in torch on the same single thread).

Step sizes: every torch / geoopt / quotientopt method gets a grid of FOUR settings: ``lr`` in
{0.125, 0.25, 0.5, 1} for the gradient-descent methods (QuotientSGD, RiemannianSGD, SGD), ``lr`` in
{0.003, 0.01, 0.03, 0.1} for the Adam-type ones (QuotientAdam, RiemannianAdam, Adam; betas
(0.9, 0.999), eps 1e-8), and time step ``lr`` = h in {0.1, 0.2, 0.3, 0.4} at ``friction`` 1 for
QuotientHamiltonian. Every setting runs on every kappa, and each method is reported at the ONE
setting with the best worst case over the sweep (most kappas reached, then the fewest iterations
in the worst reached case, then the smallest final error), per problem: a method is judged by one
step size for the whole sweep, as a user would have to choose it. ``--tune-on smallest`` instead
picks the best setting on the smallest kappa alone and keeps it (the cheaper, kinder-to-fast-steps
protocol). The report and the JSON list the choices and every tuning run. pymanopt uses its own
line searches / trust region, untuned.

Budgets (default): 1000 iterations for the first-order methods (torch, geoopt, quotientopt,
pymanopt SteepestDescent and ConjugateGradient), 100 outer iterations for TrustRegions (each with
up to ``dim`` inner truncated-CG Hessian-vector products), and at most ``--max-seconds`` (60)
of wall time per run for every method.

Command (about 5 minutes on 2 shared CPU cores; measured 4 min 59 s)::

    python benchmarks/low_rank.py                    # writes benchmarks/results/low_rank.{json,md}
    python benchmarks/low_rank.py --quick            # seconds: 30 x 24, r = 3, kappa in {1, 100}
    python benchmarks/low_rank.py --kappas 1 1e3 --problems sensing --out /tmp/lr
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import geoopt
import numpy as np
import pymanopt
import torch
from _report import RESULTS, write_report
from tqdm import tqdm

import quotientopt.optim
from quotientopt.manifolds import FactorQuotient, factor_pair_to_pymanopt

DTYPE = torch.float64
TOL = 1e-6
DIVERGED = 1e3  # a relative error above this (or a non-finite one) ends the run as diverged


# ------------------------------------------------------------------------------------ problems
@dataclass
class Problem:
    r"""A least-squares low-rank recovery problem :math:`\tfrac12 \|F(W) - y\|^2` with a linear
    measurement map ``forward`` (:math:`F`) and its adjoint ``adjoint`` (:math:`F^*`)."""

    name: str
    kappa: float
    n: int
    m: int
    r: int
    target: torch.Tensor  # (n, m)
    y: torch.Tensor
    forward: Callable[[torch.Tensor], torch.Tensor]
    adjoint: Callable[[torch.Tensor], torch.Tensor]
    a0: torch.Tensor  # (n, r) spectral initialization, balanced
    b0: torch.Tensor  # (m, r)
    details: dict[str, Any] = field(default_factory=dict)

    def loss(self, w: torch.Tensor) -> torch.Tensor:
        residual = self.forward(w) - self.y
        return 0.5 * (residual * residual).sum()

    def gradient(self, w: torch.Tensor) -> torch.Tensor:
        """Euclidean gradient with respect to ``W`` (``n x m``)."""
        return self.adjoint(self.forward(w) - self.y)

    def error(self, w: torch.Tensor) -> float:
        return float(torch.linalg.matrix_norm(w - self.target) / self._target_norm)

    @property
    def _target_norm(self) -> torch.Tensor:
        return torch.linalg.matrix_norm(self.target)


def spectral_init(matrix: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    root = s[:r].sqrt()
    return u[:, :r] * root, vh[:r].T * root


def make_problem(
    name: str, kappa: float, n: int, m: int, r: int, sampling_rate: float, seed: int
) -> Problem:
    """The problem ``name`` at condition number ``kappa`` (same factors and operator for all kappas)."""
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(n, r, generator=gen, dtype=DTYPE))
    v, _ = torch.linalg.qr(torch.randn(m, r, generator=gen, dtype=DTYPE))
    s = (
        torch.logspace(0, -math.log10(kappa), r, dtype=DTYPE)
        if r > 1
        else torch.ones(1, dtype=DTYPE)
    )
    target = (u * s) @ v.T
    if name == "sensing":
        p = 5 * r * (n + m)
        sensing = torch.randn(p, n * m, generator=gen, dtype=DTYPE) / math.sqrt(p)

        def forward(w: torch.Tensor) -> torch.Tensor:
            return sensing @ w.reshape(-1)

        def adjoint(residual: torch.Tensor) -> torch.Tensor:
            return (residual @ sensing).reshape(n, m)

        details = {"measurements": p, "measurements_formula": "5 r (n + m)"}
    elif name == "completion":
        mask = torch.rand(n, m, generator=gen, dtype=DTYPE) < sampling_rate
        index = mask.reshape(-1).nonzero().squeeze(1)
        scale = 1.0 / math.sqrt(sampling_rate)

        def forward(w: torch.Tensor) -> torch.Tensor:
            return w.reshape(-1)[index] * scale

        def adjoint(residual: torch.Tensor) -> torch.Tensor:
            out = torch.zeros(n * m, dtype=residual.dtype)
            out[index] = residual * scale
            return out.reshape(n, m)

        details = {"sampling_rate": sampling_rate, "observed": int(index.numel())}
    else:
        raise ValueError(f"unknown problem {name!r}; use 'sensing' or 'completion'")
    y = forward(target)
    a0, b0 = spectral_init(adjoint(y), r)
    problem = Problem(name, kappa, n, m, r, target, y, forward, adjoint, a0, b0, details)
    problem.details["initial_error"] = problem.error(a0 @ b0.T)
    return problem


# ------------------------------------------------------------------------------------- methods
Optimizer = torch.optim.Optimizer


def _quotient_adam() -> type[Optimizer] | None:
    """``quotientopt.optim.QuotientAdam``, or None where this checkout does not have it yet."""
    cls = getattr(quotientopt.optim, "QuotientAdam", None)
    if cls is None:
        try:
            from quotientopt.optim.adam import QuotientAdam as cls  # noqa: N813
        except ImportError:
            return None
    return cls


@dataclass(frozen=True)
class Method:
    """A method: how its parameters are laid out (``family``) and its hyper-parameter grid."""

    name: str
    family: str  # "quotient": one ManifoldParameter Z = [A; B]; "factors": A, B; "pymanopt"
    grid: tuple[dict[str, float], ...]
    make: Callable[[list[torch.Tensor], dict[str, float]], Optimizer] | None = None


GD_GRID = tuple({"lr": lr} for lr in (0.125, 0.25, 0.5, 1.0))
ADAM_GRID = tuple({"lr": lr} for lr in (3e-3, 1e-2, 3e-2, 1e-1))
# time step h at friction gamma = 1 (about heavy ball with step h^2 and momentum exp(-gamma h)).
# Larger steps are faster at kappa = 1 (h = 0.5: 52 instead of 65 iterations on the default
# sensing problem) but blow up in the first steps at kappa >= 100: the implicit stages' fixed-point
# sweeps stop converging; the grid stops below that.
HAMILTONIAN_GRID = tuple({"lr": h, "friction": 1.0} for h in (0.1, 0.2, 0.3, 0.4))


def _make_quotient_adam(params: list[torch.Tensor], hp: dict[str, float]) -> Optimizer:
    cls = _quotient_adam()
    assert cls is not None
    return cls(params, lr=hp["lr"], betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)


METHODS: tuple[Method, ...] = (
    Method(
        "QuotientSGD", "quotient", GD_GRID, lambda ps, hp: quotientopt.optim.QuotientSGD(ps, **hp)
    ),
    Method(
        "QuotientHamiltonian",
        "quotient",
        HAMILTONIAN_GRID,
        lambda ps, hp: quotientopt.optim.QuotientHamiltonian(ps, **hp),
    ),
    Method("QuotientAdam", "quotient", ADAM_GRID, _make_quotient_adam),
    Method(
        "geoopt RiemannianSGD",
        "quotient",
        GD_GRID,
        lambda ps, hp: geoopt.optim.RiemannianSGD(ps, **hp),
    ),
    Method(
        "geoopt RiemannianAdam",
        "quotient",
        ADAM_GRID,
        lambda ps, hp: geoopt.optim.RiemannianAdam(ps, **hp),
    ),
    Method("torch SGD (A, B)", "factors", GD_GRID, lambda ps, hp: torch.optim.SGD(ps, **hp)),
    Method("torch Adam (A, B)", "factors", ADAM_GRID, lambda ps, hp: torch.optim.Adam(ps, **hp)),
    Method("pymanopt SteepestDescent", "pymanopt", ({},)),
    Method("pymanopt ConjugateGradient", "pymanopt", ({},)),
    Method("pymanopt TrustRegions", "pymanopt", ({},)),
)


# ------------------------------------------------------------------------------------- running
@dataclass
class Run:
    """One run of one method with one setting on one problem."""

    method: str
    problem: str
    kappa: float
    hyperparameters: dict[str, float]
    status: str  # "reached" | "budget" | "time" | "diverged" | "stalled"
    iterations: int  # to the tolerance if reached, else iterations done
    seconds: float  # to the tolerance if reached, else the time spent
    error: float  # at the tolerance if reached, else at the end
    best_error: float
    trace: list[tuple[int, float]]  # (iteration, relative error), subsampled

    @property
    def reached(self) -> bool:
        return self.status == "reached"


def _trace_keep(iteration: int) -> bool:
    """Log-spaced-ish subsampling of the error history: every step up to 20, then every 10, 100."""
    return iteration <= 20 or (iteration <= 200 and iteration % 10 == 0) or iteration % 50 == 0


def run_torch(
    problem: Problem, method: Method, hp: dict[str, float], budget: int, max_seconds: float
) -> Run:
    """Run a torch / geoopt / quotientopt optimizer; the error test is outside the timed region."""
    n, m = problem.n, problem.m
    if method.family == "quotient":
        manifold = FactorQuotient(n, m)
        z = geoopt.ManifoldParameter(torch.cat((problem.a0, problem.b0)).clone(), manifold=manifold)
        params: list[torch.Tensor] = [z]

        def product() -> torch.Tensor:
            return manifold.product(z)
    else:
        a = torch.nn.Parameter(problem.a0.clone())
        b = torch.nn.Parameter(problem.b0.clone())
        params = [a, b]

        def product() -> torch.Tensor:
            return a @ b.T

    assert method.make is not None
    optimizer = method.make(params, hp)
    trace: list[tuple[int, float]] = []
    elapsed, best, status, error, iteration = 0.0, math.inf, "budget", math.inf, 0
    for iteration in range(budget + 1):
        with torch.no_grad():
            error = problem.error(product())
        if _trace_keep(iteration):
            trace.append((iteration, error))
        if not math.isfinite(error) or error > DIVERGED:
            status = "diverged"
            break
        best = min(best, error)
        if error <= TOL:
            status = "reached"
            break
        if iteration == budget:
            break
        if elapsed > max_seconds:
            status = "time"
            break
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        problem.loss(product()).backward()
        optimizer.step()
        elapsed += time.perf_counter() - start
    if trace[-1][0] != iteration:
        trace.append((iteration, error))
    return Run(
        method.name, problem.name, problem.kappa, hp, status, iteration, elapsed, error, best, trace
    )


class _Tracker:
    """Watches the iterates of a pymanopt optimizer through its gradient calls (each optimizer
    evaluates the Riemannian gradient once at every accepted iterate) and stops it at the
    tolerance. ``offset``: pymanopt's TrustRegions evaluates the gradient of iterate ``j`` before
    the stopping test of iteration ``j``; SteepestDescent and ConjugateGradient after it."""

    def __init__(self, problem: Problem, offset: int) -> None:
        self.problem, self.offset = problem, offset
        self.checks = 0  # stopping tests done = iterations completed
        self.calls = 0
        self.monitor = 0.0  # seconds spent computing errors (not charged to the method)
        self.start = time.perf_counter()
        self.hit: tuple[int, float, float] | None = None  # (iteration, seconds, error)
        self.best = math.inf
        self.trace: list[tuple[int, float]] = []

    def observe(self, w: torch.Tensor) -> None:
        begin = time.perf_counter()
        index = 0 if self.calls == 0 else self.checks + self.offset
        self.calls += 1
        error = self.problem.error(w)
        self.best = min(self.best, error)
        if _trace_keep(index) and (not self.trace or self.trace[-1][0] != index):
            self.trace.append((index, error))
        if self.hit is None and error <= TOL:
            self.hit = (index, begin - self.start - self.monitor, error)
        self.monitor += time.perf_counter() - begin


def _tracked(cls: type, tracker: _Tracker) -> type:
    class Tracked(cls):  # type: ignore[misc, valid-type]
        def _check_stopping_criterion(self, **kwargs: Any) -> str | None:
            tracker.checks += 1
            if tracker.hit is not None:
                return "reached the target relative error"
            return super()._check_stopping_criterion(**kwargs)

    return Tracked


def run_pymanopt(problem: Problem, method: Method, budget: int, max_seconds: float) -> Run:
    """pymanopt on FixedRankEmbedded from the same starting matrix (numpy backend, torch kernels)."""
    n, m, r = problem.n, problem.m, problem.r
    manifold = pymanopt.manifolds.FixedRankEmbedded(n, m, r)

    def as_t(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(x))

    def matrix(u: np.ndarray, s: np.ndarray, vt: np.ndarray) -> torch.Tensor:
        return (as_t(u) * as_t(s)) @ as_t(vt)

    @pymanopt.function.numpy(manifold)
    def cost(u: np.ndarray, s: np.ndarray, vt: np.ndarray) -> float:
        return float(problem.loss(matrix(u, s, vt)))

    @pymanopt.function.numpy(manifold)
    def riemannian_gradient(u: np.ndarray, s: np.ndarray, vt: np.ndarray) -> Any:
        w = matrix(u, s, vt)
        tracker.observe(w)
        return manifold.projection((u, s, vt), problem.gradient(w).numpy())

    @pymanopt.function.numpy(manifold)
    def riemannian_hessian(
        u: np.ndarray, s: np.ndarray, vt: np.ndarray, up: np.ndarray, mm: np.ndarray, vp: np.ndarray
    ) -> Any:
        # Vandereycken (2013) / Manopt's fixedrankembeddedfactory.ehess2rhess: projected
        # Euclidean Hessian plus the curvature term built from the Euclidean gradient G
        ut, vtt, upt, mmt, vpt = (as_t(x) for x in (u, vt, up, mm, vp))
        g = problem.gradient(matrix(u, s, vt))
        xi = ut @ mmt @ vtt + upt @ vtt + ut @ vpt.T
        hess = manifold.projection((u, s, vt), problem.adjoint(problem.forward(xi)).numpy())
        t_u = (g @ vpt).numpy() / s
        t_v = (g.T @ upt).numpy() / s
        v = vt.T
        return type(hess)(hess.Up + t_u - u @ (u.T @ t_u), hess.M, hess.Vp + t_v - v @ (v.T @ t_v))

    trust = method.name.endswith("TrustRegions")
    tracker = _Tracker(problem, offset=1 if trust else 0)
    base = {
        "pymanopt SteepestDescent": pymanopt.optimizers.SteepestDescent,
        "pymanopt ConjugateGradient": pymanopt.optimizers.ConjugateGradient,
        "pymanopt TrustRegions": pymanopt.optimizers.TrustRegions,
    }[method.name]
    optimizer = _tracked(base, tracker)(
        max_iterations=budget,
        max_time=max_seconds,
        min_gradient_norm=0.0,
        max_cost_evaluations=10**9,
        verbosity=0,
        log_verbosity=0,
    )
    kwargs = {"riemannian_hessian": riemannian_hessian} if trust else {}
    pm_problem = pymanopt.Problem(manifold, cost, riemannian_gradient=riemannian_gradient, **kwargs)
    x0 = factor_pair_to_pymanopt(problem.a0, problem.b0)
    tracker.start = time.perf_counter()
    result = optimizer.run(pm_problem, initial_point=tuple(x0))
    elapsed = time.perf_counter() - tracker.start - tracker.monitor
    final = problem.error(matrix(*result.point))
    trace = tracker.trace
    if tracker.hit is not None:
        iteration, seconds, error = tracker.hit
        return Run(
            method.name,
            problem.name,
            problem.kappa,
            {},
            "reached",
            iteration,
            seconds,
            error,
            tracker.best,
            trace,
        )
    criterion = str(result.stopping_criterion)
    if not math.isfinite(final) or final > DIVERGED:
        status = "diverged"
    elif "max time" in criterion:
        status = "time"
    elif "max iterations" in criterion:
        status = "budget"
    else:
        status = "stalled"  # line search / trust region made no more progress
    best = min(tracker.best, final)
    iterations = int(result.iterations)
    if not trace or trace[-1][0] != iterations:
        trace.append((iterations, final))
    return Run(
        method.name,
        problem.name,
        problem.kappa,
        {},
        status,
        iterations,
        elapsed,
        final,
        best,
        trace,
    )


def run_method(
    problem: Problem,
    method: Method,
    hp: dict[str, float],
    budgets: dict[str, int],
    max_seconds: float,
) -> Run:
    if method.family == "pymanopt":
        budget = budgets["trust" if method.name.endswith("TrustRegions") else "first_order"]
        return run_pymanopt(problem, method, budget, max_seconds)
    return run_torch(problem, method, hp, budgets["first_order"], max_seconds)


def better(a: Run, b: Run) -> bool:
    """Is ``a`` a better tuning result than ``b``: reached in fewer iterations, else lower error."""
    if a.reached != b.reached:
        return a.reached
    if a.reached:
        return (a.iterations, a.seconds) < (b.iterations, b.seconds)
    return a.error < b.error


def worst_case_key(sweep: Sequence[Run]) -> tuple[int, float, float]:
    """Sort key of one setting's runs over the kappas: most kappas reached, then the fewest
    iterations in the worst reached case, then the largest final error (smaller is better)."""
    reached = [r for r in sweep if r.reached]
    worst_iterations = max((r.iterations for r in reached), default=math.inf)
    return (-len(reached), worst_iterations, max(r.error for r in sweep))


# -------------------------------------------------------------------------------------- report
def cell(run: Run) -> str:
    if run.reached:
        return f"**{run.iterations}** / {run.seconds:.2f}s"
    if run.status == "diverged":
        return "diverged"
    note = {"budget": "", "time": " (time cap)", "stalled": " (stalled)"}[run.status]
    return f"{run.error:.1e}{note}"


def format_hp(method: Method, hp: dict[str, float]) -> str:
    if method.family == "pymanopt":
        return "trust region" if method.name.endswith("TrustRegions") else "line search"
    return ", ".join(f"{k}={v:g}" for k, v in hp.items())


def markdown(
    runs: list[Run],
    problems: Sequence[str],
    kappas: Sequence[float],
    methods: Sequence[Method],
    tuned: dict[tuple[str, str], dict[str, float]],
    info: dict[str, Any],
) -> str:
    lines = [
        "# Ill-conditioned low-rank recovery",
        "",
        f"n x m = {info['n']} x {info['m']}, rank r = {info['r']}, float64, 1 torch thread; target "
        f"relative error {TOL:g}. Cell: **iterations** / seconds to the target, or the relative "
        f"error at the end of the budget ({info['budgets']['first_order']} iterations, "
        f"{info['budgets']['trust']} for TrustRegions, {info['max_seconds']:g} s cap per run). "
        f"Step sizes: {info['tuning']}.",
    ]
    for note in info["skipped"].values():
        lines += ["", f"Note: {note}"]
    by_key = {(r.problem, r.kappa, r.method): r for r in runs}
    for name in problems:
        lines += ["", f"## {name}: {info['problem_details'][name]}", ""]
        header = ["method", "setting", *[f"kappa={k:g}" for k in kappas]]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for method in methods:
            if method.name in info["skipped"]:
                continue
            row = [method.name, format_hp(method, tuned.get((name, method.name), {}))]
            row += [cell(by_key[(name, k, method.name)]) for k in kappas]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def describe(problem: Problem) -> str:
    if problem.name == "sensing":
        return f"{problem.details['measurements']} Gaussian measurements (5 r (n + m))"
    return (
        f"sampling rate {problem.details['sampling_rate']:g} "
        f"({problem.details['observed']} of {problem.n * problem.m} entries observed)"
    )


# ---------------------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kappas", type=float, nargs="+", default=None, help="condition numbers")
    parser.add_argument(
        "--problems",
        nargs="+",
        default=["sensing", "completion"],
        choices=["sensing", "completion"],
    )
    parser.add_argument("--n", type=int, default=None, help="rows of W (default 60; quick 30)")
    parser.add_argument("--m", type=int, default=None, help="columns of W (default 50; quick 24)")
    parser.add_argument("--rank", type=int, default=None, help="rank r (default 5; quick 3)")
    parser.add_argument("--sampling-rate", type=float, default=0.5, help="completion: P(observed)")
    parser.add_argument(
        "--budget", type=int, default=None, help="first-order iterations (1000; quick 200)"
    )
    parser.add_argument(
        "--trust-budget", type=int, default=None, help="TrustRegions iterations (100; quick 20)"
    )
    parser.add_argument("--max-seconds", type=float, default=60.0, help="wall-clock cap per run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--tune-on",
        choices=["all", "smallest"],
        default="all",
        help="choose each method's setting by its worst case over every kappa (all, default) "
        "or by the smallest kappa alone",
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes and budgets (seconds)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    args = parser.parse_args(argv)
    quick = args.quick
    defaults = {
        "kappas": [1.0, 100.0] if quick else [1.0, 10.0, 100.0, 1e3, 1e4],
        "n": 30 if quick else 60,
        "m": 24 if quick else 50,
        "rank": 3 if quick else 5,
        "budget": 200 if quick else 1000,
        "trust_budget": 20 if quick else 100,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.kappas = sorted(args.kappas)
    if any(k < 1 for k in args.kappas):
        parser.error("--kappas: condition numbers are >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(1)
    skipped: dict[str, str] = {}
    if _quotient_adam() is None:
        skipped["QuotientAdam"] = (
            "QuotientAdam skipped: quotientopt.optim.QuotientAdam is not importable in this checkout."
        )
        print(skipped["QuotientAdam"])
    methods = [m for m in METHODS if m.name not in skipped]
    budgets = {"first_order": args.budget, "trust": args.trust_budget}
    tuned: dict[tuple[str, str], dict[str, float]] = {}
    runs: list[Run] = []
    tuning: list[Run] = []
    details: dict[str, str] = {}
    grid_runs = sum(len(m.grid) for m in methods)
    if args.tune_on == "all":
        total = len(args.problems) * grid_runs * len(args.kappas)
    else:
        total = len(args.problems) * (grid_runs + len(methods) * (len(args.kappas) - 1))
    bar = tqdm(total=total, disable=args.no_progress, desc="low_rank", dynamic_ncols=True)
    wall = time.perf_counter()
    for name in args.problems:
        sweeps: dict[tuple[str, int], list[Run]] = {}  # (method, grid index) -> runs over kappas
        for index, kappa in enumerate(args.kappas):
            problem = make_problem(
                name, kappa, args.n, args.m, args.rank, args.sampling_rate, args.seed
            )
            details[name] = describe(problem)
            for method in methods:
                bar.set_postfix_str(f"{name} kappa={kappa:g} {method.name}")
                if args.tune_on == "all":  # every setting on every kappa
                    for g, hp in enumerate(method.grid):
                        run = run_method(problem, method, hp, budgets, args.max_seconds)
                        sweeps.setdefault((method.name, g), []).append(run)
                        tuning.append(run)
                        bar.update()
                elif index == 0:  # tune on the smallest kappa; its best run is the result
                    best: Run | None = None
                    for hp in method.grid:
                        run = run_method(problem, method, hp, budgets, args.max_seconds)
                        tuning.append(run)
                        bar.update()
                        if best is None or better(run, best):
                            best = run
                    assert best is not None
                    tuned[(name, method.name)] = best.hyperparameters
                    runs.append(best)
                else:
                    hp = tuned[(name, method.name)]
                    runs.append(run_method(problem, method, hp, budgets, args.max_seconds))
                    bar.update()
        if args.tune_on == "all":
            for method in methods:
                g = min(
                    range(len(method.grid)),
                    key=lambda g, method=method: worst_case_key(sweeps[(method.name, g)]),
                )
                tuned[(name, method.name)] = method.grid[g]
                runs.extend(sweeps[(method.name, g)])
    bar.close()
    info = {
        "n": args.n,
        "m": args.m,
        "r": args.rank,
        "budgets": budgets,
        "max_seconds": args.max_seconds,
        "skipped": skipped,
        "problem_details": details,
    }
    info["tuning"] = (
        "the setting of the 4-point grid with the best worst case over all kappas (most kappas "
        "reached, then fewest iterations in the worst case), per problem"
        if args.tune_on == "all"
        else f"best of a 4-point grid on kappa = {args.kappas[0]:g}, then fixed"
    )
    text = markdown(runs, args.problems, args.kappas, methods, tuned, info)
    data = {
        "tolerance": TOL,
        "problems": args.problems,
        "kappas": args.kappas,
        "n": args.n,
        "m": args.m,
        "rank": args.rank,
        "sampling_rate": args.sampling_rate,
        "seed": args.seed,
        "quick": args.quick,
        "budgets": budgets,
        "max_seconds": args.max_seconds,
        "tuning": (
            "best worst case over all kappas of each method's grid, per problem"
            if args.tune_on == "all"
            else f"best of each method's grid on kappa = {args.kappas[0]:g}, per problem"
        ),
        "methods": [{"name": m.name, "family": m.family, "grid": list(m.grid)} for m in METHODS],
        "skipped": skipped,
        "selected": [
            {"problem": p, "method": meth, "hyperparameters": hp} for (p, meth), hp in tuned.items()
        ],
        "problem_details": details,
        "results": [asdict(r) for r in runs],
        "tuning_runs": [{k: v for k, v in asdict(r).items() if k != "trace"} for r in tuning],
        "total_seconds": time.perf_counter() - wall,
    }
    json_path, md_path = write_report(args.out, "low_rank", text, data)
    print(text)
    print(f"wrote {json_path} and {md_path} ({data['total_seconds']:.0f} s)")
    return data


if __name__ == "__main__":
    main()
