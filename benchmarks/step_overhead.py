"""Time one optimizer step at GPT-2-small shapes and print the ratios to torch's optimizers.

Parameters: 12 layers x 12 heads, width 768, head dimension 64. The attention heads are two
``FactorQuotient`` sectors of shape (layers, heads, 2 * 768, 64) (QK and VO); MLP, embedding and
LayerNorm tensors are plain parameters (124M parameters in all). Gradients are fixed random
tensors, so only ``optimizer.step()`` is timed.

Baselines. torch's SGD-momentum and AdamW step *plain* ``nn.Parameter`` copies of every tensor
(identical shapes and values): stepping the two head sectors as ``geoopt.ManifoldParameter``
(a tensor subclass) sends torch's foreach kernels through ``__torch_function__`` and made the old
baseline about twice as slow (the row "torch SGD-momentum (foreach, ManifoldParameter heads)"
shows it). Each baseline is run as ``foreach`` and ``fused`` and the faster one on this device is
the reference of the ratios (the other is listed).

Muon (issue 13). torch's ``Muon`` steps only 2-D matrices, so its rows use a second layout of the
same model: the attention as 4 * layers plain matrices W_Q, W_K, W_V (d x heads * k, the heads'
blocks of the sectors side by side) and W_O (heads * k x d), with the sectors' values and
gradients (as many numbers as the sectors; the MLP and rest tensors are the same). Seven rows:
torch Muon on the attention matrices; QuotientMuon on the two head sectors (its default
``head_norm="all-heads"`` with its default ``polar="newton-schulz"``, whose precision policy
picks the bfloat16 iteration on X where bfloat16 matmuls are fast, the float32 Gram iteration
elsewhere; each route forced with ``polar="newton-schulz-bf16"`` and ``"newton-schulz-float32"``;
and ``"per-head"``); torch Muon on the attention and MLP matrices with fused AdamW on the rest
(embeddings, LayerNorms, biases); and QuotientMuon on the sectors and, with torch Muon's
functional step, on the same MLP matrices, with the same fused AdamW (``muon_and_adamw``'s
split). Options are ``compare.MUON_OPTIONS``. Targets: QuotientMuon's default / torch Muon on
the attention <= 1 (issue 24), per-head <= 0.25 (issue 13), the whole QuotientMuon optimizer /
torch Muon + AdamW <= 1. ``--only Muon`` times these rows (and the SGD-momentum references).
The header names the CPU model and whether it has bfloat16 matrix units (AVX512-BF16 or AMX;
``quotientopt.optim.muon.bfloat16_matmul_is_fast``).

Timing. Every optimizer is timed alone (its warm-up and timed steps back to back) and interleaved
(one step of each per round, which spreads the machine's load over all of them; these 2-core
machines are shared). The table gives the median step time of each; the ratios use the
interleaved medians. QuotientSGD with ``refresh_every=8`` has two kinds of steps: its row also
gives the mean, and the rounds hold whole refresh intervals.

Memory. "peak extra" is the largest amount of memory a step allocates beyond what was allocated
before it (work tensors, new state): on CUDA ``torch.cuda.max_memory_allocated`` minus the
allocation before the step; on CPU the running sum, in time order, of the memory that
``torch.profiler`` (``profile_memory=True``) attributes to each op of one step after warm-up (its
own allocations net of its frees, and the frees between ops; a temporary that lives and dies
inside one op is not counted). "state" is the
bytes of the optimizer's state tensors; "work buffers" the bytes of the full-size temporaries that
QuotientSGD, QuotientAdam and QuotientHamiltonian allocate once and reuse on every step (outside
the state; a fresh allocation of that size is paged in on every step on a CPU).

Floor. The same run also times the pieces that any step of each quotient algorithm must pay
beyond torch's fused kernel: the non-finite check of every gradient and the algorithm's number
of full-size ``(rows x k) @ (k x k)`` passes over the heads (``PASSES``, counted from the
optimizers' docstrings), each at the measured time of one batched pass. The floor table gives
reference + check + passes x pass as a ratio to the reference, next to the measured ratio: a
target below the floor cannot be met by removing overhead, only by a cheaper algorithm or other
hardware.

    python benchmarks/step_overhead.py                 # CPU, default sizes
    python benchmarks/step_overhead.py --device cuda   # on a GPU
    python benchmarks/step_overhead.py --only Muon     # the Muon rows only
    python benchmarks/step_overhead.py --skip Muon     # all but the Muon rows (CPUs without
                                                       # fast bfloat16: seconds per matrix)

Writes ``benchmarks/results/step_overhead-<device>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _report sits next to this file
import geoopt
import torch
from _report import cpu_model

from quotientopt.compare import MUON_OPTIONS
from quotientopt.manifolds import FactorQuotient
from quotientopt.optim import (
    HybridOptimizer,
    QuotientAdam,
    QuotientHamiltonian,
    QuotientMuon,
    QuotientSGD,
)
from quotientopt.optim.muon import bfloat16_matmul_is_fast, polar_route


def gpt2_small_parameters(layers, heads, width, head_dim, vocab, context, device, dtype):
    """The model's tensors, with fixed random gradients, as a dict of lists: ``"sectors"``, the
    attention heads as two ``FactorQuotient`` sectors (layers, heads, 2 * width, head_dim) (QK and
    VO, rows ``[A; B]``); ``"matrices"``, the same attention weights as 4 * layers plain matrices
    (W_Q, W_K, W_V: the heads' A or B blocks side by side, (width, heads * head_dim); W_O: the VO
    sector's B blocks stacked, (heads * head_dim, width)), with the same values and gradients;
    ``"mlp"``, the blocks' 2-D MLP matrices; ``"rest"``, embeddings, LayerNorm gains and biases."""
    gen = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape, scale=0.02):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    manifold = FactorQuotient(width, width)
    sectors = [
        geoopt.ManifoldParameter(randn(layers, heads, 2 * width, head_dim), manifold=manifold)
        for _ in ("qk", "vo")
    ]
    mlp = []
    rest = [torch.nn.Parameter(randn(vocab, width)), torch.nn.Parameter(randn(context, width))]
    for _ in range(layers):
        mlp += [torch.nn.Parameter(randn(width, 4 * width))]
        rest += [torch.nn.Parameter(randn(4 * width))]
        mlp += [torch.nn.Parameter(randn(4 * width, width))]
        rest += [torch.nn.Parameter(randn(width)) for _ in range(5)]  # LayerNorms, biases
    for p in sectors + mlp + rest:
        p.grad = randn(*p.shape, scale=1e-3)

    def side_by_side(blocks: torch.Tensor) -> torch.Tensor:
        """(layers, heads, width, head_dim) -> (layers, width, heads * head_dim)."""
        return blocks.permute(0, 2, 1, 3).reshape(layers, width, heads * head_dim)

    def attention_matrices(value: torch.Tensor) -> list[torch.Tensor]:
        qk, vo = value
        q, k, v, o = (
            side_by_side(x)
            for x in (
                qk[..., :width, :],
                qk[..., width:, :],
                vo[..., :width, :],
                vo[..., width:, :],
            )
        )
        per_layer = zip(q, k, v, o.transpose(-1, -2), strict=True)
        return [w.contiguous() for layer in per_layer for w in layer]

    matrices = [torch.nn.Parameter(w) for w in attention_matrices([s.detach() for s in sectors])]
    for w, g in zip(matrices, attention_matrices([s.grad for s in sectors]), strict=True):
        w.grad = g
    assert sum(p.numel() for p in matrices) == sum(p.numel() for p in sectors)
    return {"sectors": sectors, "matrices": matrices, "mlp": mlp, "rest": rest}


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in the optimizer's state (moments, buffers, step counts, the Grams
    QuotientSGD keeps), nested dicts included."""

    def size(value) -> int:
        if isinstance(value, torch.Tensor):
            return value.numel() * value.element_size()
        if isinstance(value, dict):
            return sum(size(item) for item in value.values())
        return 0

    if isinstance(optimizer, HybridOptimizer):  # its ``state`` view hides the rest's state
        return sum(optimizer_state_bytes(part) for part in optimizer.optimizers)
    return sum(size(state) for state in optimizer.state.values())


def refresh_marks(optimizer: torch.optim.Optimizer) -> list:
    """QuotientSGD's scheduled refresh steps: they change exactly when a step refreshed the
    metric (with ``refresh_every=1``, on every step)."""
    if not isinstance(optimizer, QuotientSGD):
        return []
    return [state.get("next_refresh", state.get("step")) for state in optimizer.state.values()]


ROUTE_TEXT = {
    "bf16-x": "torch Muon's bfloat16 Newton-Schulz on the n x Hk matrix X",
    "newton-schulz": "the float32 Newton-Schulz on the Hk x Hk Gram",
}


def target_text(target: float | None) -> str:
    return "" if target is None else f"<= {target:g}x"


def matches(name: str, texts: str) -> bool:
    """Whether ``name`` contains one of the comma-separated ``texts`` (case-insensitive)."""
    return any(t.strip().lower() in name.lower() for t in texts.split(",") if t.strip())


def work_buffer_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the reused work buffers an optimizer keeps outside its state (QuotientSGD,
    QuotientAdam, QuotientHamiltonian: full-size temporaries that are allocated once)."""
    if isinstance(optimizer, HybridOptimizer):
        return sum(work_buffer_bytes(part) for part in optimizer.optimizers)
    total = 0
    for log in (getattr(optimizer, "_log", None), getattr(optimizer, "_work", None)):
        for value in getattr(log, "_derived", {}).values():
            values = value if isinstance(value, tuple) else (value,)
            total += sum(
                t.numel() * t.element_size() for t in values if isinstance(t, torch.Tensor)
            )
    scratches = getattr(optimizer, "_scratches", {})  # QuotientHamiltonian's kinetic-energy chunks
    total += sum(t.numel() * t.element_size() for t in scratches.values())
    return total


#: full-size ``(rows x k) @ (k x k)`` or Gram passes over the heads that each exact step needs
#: (the docstrings of the optimizers count them)
PASSES = {
    "QuotientSGD momentum": 4,  # rgrad, Gram of the new point, cross, vertical correction
    "QuotientSGD momentum, refresh_every=8": 1,  # rgrad with the stale Grams
    "QuotientAdam (rest: fused AdamW)": 7,  # see quotientopt/optim/adam.py, "Cost"
    "QuotientHamiltonian": 4,  # per flow: raise, V^T V, Y S, Gram (one factor each)
    "QuotientHamiltonian, diagnostics=False": 4,
}


def floor_parts(model: dict, rounds: int, device: str) -> dict[str, float]:
    """Median seconds of the pieces every quotient step must pay on top of torch's fused kernel:
    the non-finite check of every gradient (``found_nonfinite``), one batched
    ``(rows x k) @ (k x k)`` product over every head into a reused buffer, and one batched Gram
    ``X^T X`` pass."""
    from quotientopt.optim._base import found_nonfinite

    grads = [p.grad for name in ("sectors", "mlp", "rest") for p in model[name]]
    sectors = [p.detach() for p in model["sectors"]]
    k = sectors[0].shape[-1]
    mats = [torch.eye(k, device=device).expand(*s.shape[:-2], k, k) for s in sectors]
    outs = [torch.empty_like(s) for s in sectors]

    def product():
        for s, m, o in zip(sectors, mats, outs, strict=True):
            torch.matmul(s, m, out=o)

    def gram():
        for s in sectors:
            s.unflatten(-2, (2, -1)).mT @ s.unflatten(-2, (2, -1))

    parts = {"check": lambda: found_nonfinite(grads), "product": product, "gram": gram}
    times: dict[str, list[float]] = {name: [] for name in parts}
    for index in range(rounds + 2):
        for name, run in parts.items():
            synchronize(device)
            start = time.perf_counter()
            run()
            synchronize(device)
            if index >= 2:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_extra_bytes(optimizer: torch.optim.Optimizer, device: str) -> int:
    """The most memory one ``optimizer.step()`` holds beyond what was allocated before it (see
    the module docstring for how, per device)."""
    if device.startswith("cuda"):
        synchronize(device)
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        optimizer.step()
        synchronize(device)
        return torch.cuda.max_memory_allocated() - before
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
        optimizer.step()
    # every op's own (self) allocations net of its frees, and the frees outside ops ("[memory]"),
    # in the order they happened; transients that live and die inside one op are not counted
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    running = peak = 0
    for e in events:
        running += e.self_cpu_memory_usage
        peak = max(peak, running)
    return peak


def profile(makers, clone, args) -> None:
    """Write the top operators of one step of each optimizer (``--profile N``)."""
    lines = [
        f"Top {args.profile} operators by self time of one step (torch.profiler, {args.device}, "
        f"{torch.get_num_threads()} threads, after one warm-up step); shares of the step's total "
        "self time.",
        "",
    ]
    for name, (layout, make) in makers.items():
        optimizer = make(clone(layout))
        optimizer.step()
        synchronize(args.device)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            optimizer.step()
            synchronize(args.device)
        averages = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in averages)
        lines += [f"**{name}** (total {total / 1e3:.0f} ms)", ""]
        lines += ["| operator | calls | self (ms) | share |", "|---|---:|---:|---:|"]
        lines += [
            f"| `{e.key}` | {e.count} | {e.self_cpu_time_total / 1e3:.1f} "
            f"| {100 * e.self_cpu_time_total / total:.0f}% |"
            for e in averages[: args.profile]
        ]
        lines.append("")
        del optimizer
    report = "\n".join(lines)
    print(report)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "cpu" if args.device == "cpu" else "cuda"
    (out / f"step_overhead-profile-{tag}.md").write_text(report)


MUON_ATTENTION = "torch Muon, attention (d x d)"
QUOTIENT_MUON_ATTENTION = "QuotientMuon, attention sectors"
QUOTIENT_MUON_PER_HEAD = "QuotientMuon head_norm=per-head, attention sectors"
QUOTIENT_MUON_BF16 = "QuotientMuon polar=newton-schulz-bf16, attention sectors"
QUOTIENT_MUON_FLOAT32 = "QuotientMuon polar=newton-schulz-float32, attention sectors"
MUON_WHOLE = "torch Muon + AdamW (whole model)"
QUOTIENT_MUON_WHOLE = "QuotientMuon + Muon MLP + AdamW (whole model)"

TARGETS = {  # name: (reference, factor), from issue 14; the Muon rows from issues 13 and 24
    "QuotientSGD momentum": ("SGD-momentum", 1.6),
    "QuotientAdam (rest: fused AdamW)": ("AdamW", 1.3),
    "QuotientHamiltonian": ("SGD-momentum", 2.0),
    "QuotientHamiltonian, diagnostics=False": ("SGD-momentum", 2.0),
    QUOTIENT_MUON_ATTENTION: ("Muon, attention", 1.0),  # issue 24: the default <= torch Muon
    QUOTIENT_MUON_PER_HEAD: ("Muon, attention", 0.25),
    QUOTIENT_MUON_WHOLE: ("Muon + AdamW", 1.0),
}
REFERENCES = {  # reference: its rows; the faster one on this device is the reference
    "SGD-momentum": ("torch SGD-momentum (foreach)", "torch SGD-momentum (fused)"),
    "AdamW": ("torch AdamW (foreach)", "torch AdamW (fused)"),
    "Muon, attention": (MUON_ATTENTION,),
    "Muon + AdamW": (MUON_WHOLE,),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument(
        "--only",
        default="",
        metavar="TEXT[,TEXT...]",
        help="time only the optimizers whose name contains one of the TEXTs (case-insensitive), "
        "besides the "
        "torch SGD-momentum references and the references of their targets (e.g. Muon: the four "
        "Muon rows); the targets and ratios of what is not timed are left out",
    )
    parser.add_argument(
        "--skip",
        default="",
        metavar="TEXT[,TEXT...]",
        help="leave out the optimizers whose name contains one of the TEXTs (case-insensitive), "
        "e.g. 'Muon' on a CPU without fast bfloat16 matmuls, where torch's Muon takes seconds "
        "per matrix",
    )
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="instead of timing: profile one step of each optimizer (torch.profiler, after one "
        "warm-up step) and write its N most expensive operators by self time",
    )
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: torch.cuda.is_available() is False on this machine")

    model = gpt2_small_parameters(
        args.layers, args.heads, args.width, args.head_dim, args.vocab, 1024, args.device, dtype
    )
    n_params = sum(p.numel() for name in ("sectors", "mlp", "rest") for p in model[name])
    n_heads = sum(p.numel() for p in model["sectors"])

    def clone(layout: str) -> list[torch.nn.Parameter]:
        """A copy of the parameters (same values, same gradients), attention first, then the MLP
        matrices, then the rest. ``layout``: ``"sectors"``, the heads as ``ManifoldParameter``
        sectors; ``"plain"``, the same sectors as ``nn.Parameter``; ``"matrices"``, the attention
        as plain matrices (W_Q, W_K, W_V, W_O of each layer), for torch's Muon."""
        attention = model["matrices" if layout == "matrices" else "sectors"]
        out = []
        for p in attention + model["mlp"] + model["rest"]:
            q = p.detach().clone()
            if hasattr(p, "manifold") and layout == "sectors":
                q = geoopt.ManifoldParameter(q, manifold=p.manifold)
            else:
                q = torch.nn.Parameter(q)
            q.grad = p.grad.clone()
            out.append(q)
        return out

    def split(ps: list) -> tuple[list, list, list]:
        """A ``clone``'s attention, MLP matrices and rest (the last two are the same tensors in
        every layout)."""
        n_mlp, n_rest = len(model["mlp"]), len(model["rest"])
        attention_end = len(ps) - n_mlp - n_rest
        return ps[:attention_end], ps[attention_end:-n_rest], ps[-n_rest:]

    def muon_and_adamw(muon: torch.optim.Optimizer, ps: list) -> HybridOptimizer:
        """``muon`` and fused AdamW on the rest (the same AdamW in both whole-model Muon rows)."""
        return HybridOptimizer(muon, torch.optim.AdamW(split(ps)[2], lr=1e-3, fused=True))

    def torch_muon(matrices: list) -> torch.optim.Muon:
        return torch.optim.Muon(matrices, lr=0.02, **MUON_OPTIONS)

    def quotient_muon(heads: list, matrices: list, **options) -> QuotientMuon:
        """QuotientMuon as ``quotientopt.optim.muon_and_adamw`` groups it (heads at 0.2x lr, the
        MLP matrices on torch Muon's functional step)."""
        groups = [{"params": heads, "lr": 0.2 * 0.02}] + (
            [{"params": matrices}] if matrices else []
        )
        return QuotientMuon(groups, lr=0.02, **MUON_OPTIONS, **options)

    sgd = dict(lr=1e-3, momentum=0.9)
    makers = {
        "torch SGD-momentum (foreach)": (
            "plain",
            lambda ps: torch.optim.SGD(ps, **sgd, foreach=True),
        ),
        "torch SGD-momentum (fused)": ("plain", lambda ps: torch.optim.SGD(ps, **sgd, fused=True)),
        "torch SGD-momentum (foreach, ManifoldParameter heads)": (
            "sectors",
            lambda ps: torch.optim.SGD(ps, **sgd, foreach=True),
        ),
        "torch AdamW (foreach)": ("plain", lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True)),
        "torch AdamW (fused)": ("plain", lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True)),
        "QuotientSGD momentum": ("sectors", lambda ps: QuotientSGD(ps, lr=1e-3, momentum=0.9)),
        "QuotientSGD momentum, refresh_every=8": (
            "sectors",
            lambda ps: QuotientSGD(ps, lr=1e-3, momentum=0.9, refresh_every=8),
        ),
        "QuotientAdam (rest: fused AdamW)": ("sectors", lambda ps: QuotientAdam(ps, lr=1e-3)),
        "QuotientHamiltonian": ("sectors", lambda ps: QuotientHamiltonian(ps, lr=1e-3)),
        "QuotientHamiltonian, diagnostics=False": (
            "sectors",
            lambda ps: QuotientHamiltonian(ps, lr=1e-3, diagnostics=False),
        ),
        MUON_ATTENTION: ("matrices", lambda ps: torch_muon(split(ps)[0])),
        QUOTIENT_MUON_ATTENTION: ("sectors", lambda ps: quotient_muon(split(ps)[0], [])),
        QUOTIENT_MUON_PER_HEAD: (
            "sectors",
            lambda ps: quotient_muon(split(ps)[0], [], head_norm="per-head"),
        ),
        QUOTIENT_MUON_BF16: (
            "sectors",
            lambda ps: quotient_muon(split(ps)[0], [], polar="newton-schulz-bf16"),
        ),
        QUOTIENT_MUON_FLOAT32: (
            "sectors",
            lambda ps: quotient_muon(split(ps)[0], [], polar="newton-schulz-float32"),
        ),
        MUON_WHOLE: (
            "matrices",
            lambda ps: muon_and_adamw(torch_muon(split(ps)[0] + split(ps)[1]), ps),
        ),
        QUOTIENT_MUON_WHOLE: (
            "sectors",
            lambda ps: muon_and_adamw(quotient_muon(split(ps)[0], split(ps)[1]), ps),
        ),
    }
    if args.only:
        selected = {n for n in makers if matches(n, args.only)}
        kept = set(REFERENCES["SGD-momentum"]).union(
            *(REFERENCES[TARGETS[n][0]] for n in selected if n in TARGETS)
        )
        makers = {n: m for n, m in makers.items() if n in selected | kept}
    if args.skip:
        makers = {n: m for n, m in makers.items() if not matches(n, args.skip)}
    if args.profile:
        makers = {n: m for n, m in makers.items() if "ManifoldParameter" not in n}
        profile(makers, clone, args)
        return
    optimizers = {name: make(clone(layout)) for name, (layout, make) in makers.items()}

    def timed_step(name: str, optimizer, record: bool, times, refreshes) -> None:
        before = refresh_marks(optimizer)
        synchronize(args.device)
        start = time.perf_counter()
        optimizer.step()
        synchronize(args.device)
        if record:
            times[name].append(time.perf_counter() - start)
            refreshes[name] += before != refresh_marks(optimizer)

    alone: dict[str, list[float]] = {name: [] for name in makers}
    for name, optimizer in optimizers.items():  # each alone, back to back
        for round_index in range(args.warmup + args.rounds):
            timed_step(name, optimizer, round_index >= args.warmup, alone, dict.fromkeys(makers, 0))
    times: dict[str, list[float]] = {name: [] for name in makers}
    refreshes = dict.fromkeys(makers, 0)
    for _ in range(args.rounds):  # interleaved, already warm
        for name, optimizer in optimizers.items():
            timed_step(name, optimizer, True, times, refreshes)
    peak = {name: peak_extra_bytes(opt, args.device) for name, opt in optimizers.items()}
    median = {name: statistics.median(t) for name, t in times.items()}
    state_bytes = {name: optimizer_state_bytes(optimizer) for name, optimizer in optimizers.items()}
    work_bytes = {name: work_buffer_bytes(optimizer) for name, optimizer in optimizers.items()}
    del optimizers  # the floor's pieces run on a machine with the optimizers' memory returned
    parts = floor_parts(model, args.rounds, args.device) if set(PASSES) & set(makers) else {}
    references = {
        reference: min(timed, key=median.get)
        for reference, names in REFERENCES.items()
        if (timed := [name for name in names if name in median])
    }
    base = median[references["SGD-momentum"]]
    adamw = median[references["AdamW"]] if "AdamW" in references else float("nan")
    rows = [
        {
            "optimizer": name,
            "median_ms": 1e3 * m,
            "alone_median_ms": 1e3 * statistics.median(alone[name]),
            "mean_ms": 1e3 * statistics.mean(times[name]),
            "vs_sgd_momentum": m / base,
            "vs_adamw": m / adamw,
            "state_mib": state_bytes[name] / 2**20,
            "work_mib": work_bytes[name] / 2**20,
            "peak_extra_mib": peak[name] / 2**20,
            "metric_refreshes": refreshes[name] if "QuotientSGD" in name else None,
        }
        for name, m in median.items()
    ]
    checks = []
    for name, (reference, factor) in TARGETS.items():
        if name not in median or reference not in references:
            continue
        ratio = median[name] / median[references[reference]]
        checks.append(
            {
                "optimizer": name,
                "reference": references[reference],
                "ratio": ratio,
                "target": factor,
                "met": ratio <= factor,
            }
        )
    floors = []
    if parts:
        one_pass = min(parts["product"], parts["gram"])
        for name, passes in PASSES.items():
            if name not in median:
                continue
            reference, target = TARGETS.get(name, ("SGD-momentum", None))
            ref_time = median[references[reference]]
            floor = ref_time + parts["check"] + passes * one_pass
            floors.append(
                {
                    "optimizer": name,
                    "reference": references[reference],
                    "passes": passes,
                    "floor_ms": 1e3 * floor,
                    "floor_ratio": floor / ref_time,
                    "measured_ratio": median[name] / ref_time,
                    "target": target,
                }
            )
    environment = {
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        "cpu": cpu_model(),
        "bf16_matrix_units": bfloat16_matmul_is_fast(torch.device(args.device)),
        "default_polar_route": polar_route(
            "newton-schulz", model["sectors"][0].detach(), row_sharded=False
        ),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "dtype": args.dtype,
        "parameters": n_params,
        "head_parameters": n_heads,
        "rounds": args.rounds,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    command = "python benchmarks/step_overhead.py " + " ".join(
        f"--{k.replace('_', '-')} {v}"
        for k, v in vars(args).items()
        if k != "out" and parser.get_default(k) != v
    )
    lines = [
        f"Step time at GPT-2-small shapes ({n_params / 1e6:.1f}M parameters, {n_heads / 1e6:.1f}M in "
        f"the heads), {environment['device']} ({environment['cpu']}; bf16 matrix units: "
        f"{'yes' if environment['bf16_matrix_units'] else 'no'}, so QuotientMuon's default "
        f"polar runs {ROUTE_TEXT[environment['default_polar_route']]}), "
        f"{environment['threads']} threads, torch "
        f"{torch.__version__}, {args.dtype}; median of {args.rounds} steps, interleaved and alone, "
        f"after {args.warmup} warm-up steps; load average at the end "
        f"{environment['load_average']}. Command: `{command.strip()}`",
        "",
        "| optimizer | step, interleaved (ms) | step, alone (ms) | / SGD-momentum | / AdamW "
        "| state (MiB) | work buffers (MiB) | peak extra per step (MiB) | metric refreshes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['optimizer']} | {r['median_ms']:.1f} | {r['alone_median_ms']:.1f} "
        f"| {r['vs_sgd_momentum']:.2f} | {r['vs_adamw']:.2f} | {r['state_mib']:.0f} "
        f"| {r['work_mib']:.0f} | {r['peak_extra_mib']:.0f} "
        f"| {'' if r['metric_refreshes'] is None else r['metric_refreshes']} |"
        for r in rows
    ]
    lines += ["", "| target | measured | |", "|---|---:|---|"]
    lines += [
        f"| {c['optimizer']} <= {c['target']:g}x {c['reference']} | {c['ratio']:.2f}x "
        f"| {'met' if c['met'] else 'MISSED'} |"
        for c in checks
    ]
    if floors:
        lines += [
            "",
            f"Floor: what any step of the algorithm must pay on this device, measured in the same "
            f"run: the reference's fused step, the non-finite check of every gradient "
            f"({1e3 * parts['check']:.1f} ms) and its full-size passes over the heads at "
            f"{1e3 * one_pass:.1f} ms each (one batched (rows x k) @ (k x k) product: "
            f"{1e3 * parts['product']:.1f} ms; one batched Gram pass: {1e3 * parts['gram']:.1f} "
            f"ms; the faster of the two), with no k x k work and no elementwise pass of its own.",
            "",
            "| optimizer | full-size passes | floor (ms) | floor / reference | measured / reference "
            "| target |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {f['optimizer']} | {f['passes']} | {f['floor_ms']:.0f} | {f['floor_ratio']:.2f}x "
            f"| {f['measured_ratio']:.2f}x | {target_text(f['target'])} |"
            for f in floors
        ]
    report = "\n".join(lines)
    print(report)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "cpu" if args.device == "cpu" else "cuda"
    (out / f"step_overhead-{tag}.md").write_text(report + "\n")
    (out / f"step_overhead-{tag}.json").write_text(
        json.dumps(
            {
                "command": command.strip(),
                "environment": environment,
                "references": references,
                "results": rows,
                "targets": checks,
                "floor_parts_ms": {name: 1e3 * t for name, t in parts.items()},
                "floors": floors,
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
