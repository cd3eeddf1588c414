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
bytes of the optimizer's state tensors.

    python benchmarks/step_overhead.py                 # CPU, default sizes
    python benchmarks/step_overhead.py --device cuda   # on a GPU

Writes ``benchmarks/results/step_overhead-<device>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import geoopt
import torch

from quotientopt.manifolds import FactorQuotient
from quotientopt.optim import QuotientAdam, QuotientHamiltonian, QuotientSGD


def gpt2_small_parameters(layers, heads, width, head_dim, vocab, context, device, dtype):
    gen = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape, scale=0.02):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    manifold = FactorQuotient(width, width)
    sectors = [
        geoopt.ManifoldParameter(randn(layers, heads, 2 * width, head_dim), manifold=manifold)
        for _ in ("qk", "vo")
    ]
    plain = [torch.nn.Parameter(randn(vocab, width)), torch.nn.Parameter(randn(context, width))]
    for _ in range(layers):
        plain += [
            torch.nn.Parameter(randn(width, 4 * width)),
            torch.nn.Parameter(randn(4 * width)),
            torch.nn.Parameter(randn(4 * width, width)),
            torch.nn.Parameter(randn(width)),
            torch.nn.Parameter(randn(width)),  # LayerNorm gains and biases, attention biases
            torch.nn.Parameter(randn(width)),
            torch.nn.Parameter(randn(width)),
            torch.nn.Parameter(randn(width)),
        ]
    params = sectors + plain
    for p in params:
        p.grad = randn(*p.shape, scale=1e-3)
    return params


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in the optimizer's state (moments, buffers, step counts, the Grams
    QuotientSGD keeps), nested dicts included."""

    def size(value) -> int:
        if isinstance(value, torch.Tensor):
            return value.numel() * value.element_size()
        if isinstance(value, dict):
            return sum(size(item) for item in value.values())
        return 0

    return sum(size(state) for state in optimizer.state.values())


def refresh_marks(optimizer: torch.optim.Optimizer) -> list:
    """QuotientSGD's scheduled refresh steps: they change exactly when a step refreshed the
    metric (with ``refresh_every=1``, on every step)."""
    if not isinstance(optimizer, QuotientSGD):
        return []
    return [state.get("next_refresh", state.get("step")) for state in optimizer.state.values()]


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
    for name, (plain, make) in makers.items():
        optimizer = make(clone(plain))
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


TARGETS = {  # name: (reference, factor), from issue 14
    "QuotientSGD momentum": ("SGD-momentum", 1.6),
    "QuotientAdam (rest: fused AdamW)": ("AdamW", 1.3),
    "QuotientHamiltonian": ("SGD-momentum", 2.0),
    "QuotientHamiltonian, diagnostics=False": ("SGD-momentum", 2.0),
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
        metavar="TEXT",
        help="time only the optimizers whose name contains TEXT (case-insensitive), besides the "
        "torch SGD-momentum references (AdamW's too when TEXT matches their names, e.g. Adam); "
        "the targets and ratios of what is not timed are left out",
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

    params = gpt2_small_parameters(
        args.layers, args.heads, args.width, args.head_dim, args.vocab, 1024, args.device, dtype
    )
    n_params = sum(p.numel() for p in params)
    n_heads = sum(p.numel() for p in params[:2])

    def clone(plain: bool = False):
        """A copy of the parameters (same values, same gradients); ``plain``: every tensor an
        ``nn.Parameter``, for torch's own optimizers."""
        out = []
        for p in params:
            q = p.detach().clone()
            if hasattr(p, "manifold") and not plain:
                q = geoopt.ManifoldParameter(q, manifold=p.manifold)
            else:
                q = torch.nn.Parameter(q)
            q.grad = p.grad.clone()
            out.append(q)
        return out

    sgd = dict(lr=1e-3, momentum=0.9)
    makers = {
        "torch SGD-momentum (foreach)": (True, lambda ps: torch.optim.SGD(ps, **sgd, foreach=True)),
        "torch SGD-momentum (fused)": (True, lambda ps: torch.optim.SGD(ps, **sgd, fused=True)),
        "torch SGD-momentum (foreach, ManifoldParameter heads)": (
            False,
            lambda ps: torch.optim.SGD(ps, **sgd, foreach=True),
        ),
        "torch AdamW (foreach)": (True, lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True)),
        "torch AdamW (fused)": (True, lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True)),
        "QuotientSGD momentum": (False, lambda ps: QuotientSGD(ps, lr=1e-3, momentum=0.9)),
        "QuotientSGD momentum, refresh_every=8": (
            False,
            lambda ps: QuotientSGD(ps, lr=1e-3, momentum=0.9, refresh_every=8),
        ),
        "QuotientAdam (rest: fused AdamW)": (False, lambda ps: QuotientAdam(ps, lr=1e-3)),
        "QuotientHamiltonian": (False, lambda ps: QuotientHamiltonian(ps, lr=1e-3)),
        "QuotientHamiltonian, diagnostics=False": (
            False,
            lambda ps: QuotientHamiltonian(ps, lr=1e-3, diagnostics=False),
        ),
    }
    if args.only:
        references_kept = ("torch SGD-momentum (foreach)", "torch SGD-momentum (fused)")
        makers = {
            n: m
            for n, m in makers.items()
            if n in references_kept or args.only.lower() in n.lower()
        }
    if args.profile:
        makers = {n: m for n, m in makers.items() if "ManifoldParameter" not in n}
        profile(makers, clone, args)
        return
    optimizers = {name: make(clone(plain)) for name, (plain, make) in makers.items()}

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
    references = {
        "SGD-momentum": min(
            ("torch SGD-momentum (foreach)", "torch SGD-momentum (fused)"), key=median.get
        ),
    }
    adamw_rows = [
        name for name in ("torch AdamW (foreach)", "torch AdamW (fused)") if name in median
    ]
    if adamw_rows:
        references["AdamW"] = min(adamw_rows, key=median.get)
    base = median[references["SGD-momentum"]]
    adamw = median[references["AdamW"]] if adamw_rows else float("nan")
    rows = [
        {
            "optimizer": name,
            "median_ms": 1e3 * m,
            "alone_median_ms": 1e3 * statistics.median(alone[name]),
            "mean_ms": 1e3 * statistics.mean(times[name]),
            "vs_sgd_momentum": m / base,
            "vs_adamw": m / adamw,
            "state_mib": state_bytes[name] / 2**20,
            "peak_extra_mib": peak[name] / 2**20,
            "metric_refreshes": refreshes[name]
            if isinstance(optimizers[name], QuotientSGD)
            else None,
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
    environment = {
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        "cpu": platform.processor() or platform.machine(),
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
        f"the heads), {environment['device']}, {environment['threads']} threads, torch "
        f"{torch.__version__}, {args.dtype}; median of {args.rounds} steps, interleaved and alone, "
        f"after {args.warmup} warm-up steps; load average at the end "
        f"{environment['load_average']}. Command: `{command.strip()}`",
        "",
        "| optimizer | step, interleaved (ms) | step, alone (ms) | / SGD-momentum | / AdamW "
        "| state (MiB) | peak extra per step (MiB) | metric refreshes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['optimizer']} | {r['median_ms']:.1f} | {r['alone_median_ms']:.1f} "
        f"| {r['vs_sgd_momentum']:.2f} | {r['vs_adamw']:.2f} | {r['state_mib']:.0f} "
        f"| {r['peak_extra_mib']:.0f} "
        f"| {'' if r['metric_refreshes'] is None else r['metric_refreshes']} |"
        for r in rows
    ]
    lines += ["", "| target | measured | |", "|---|---:|---|"]
    lines += [
        f"| {c['optimizer']} <= {c['target']:g}x {c['reference']} | {c['ratio']:.2f}x "
        f"| {'met' if c['met'] else 'MISSED'} |"
        for c in checks
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
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
