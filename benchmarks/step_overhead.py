"""Time one optimizer step at GPT-2-small shapes and print the ratios to torch's optimizers.

Parameters: 12 layers x 12 heads, width 768, head dimension 64. The attention heads are two
``FactorQuotient`` sectors of shape (layers, heads, 2 * 768, 64) (QK and VO); MLP, embedding and
LayerNorm tensors are plain parameters (124M parameters in all). Gradients are fixed random
tensors, so only ``optimizer.step()`` is timed. The optimizers run interleaved, one step each per
round (these machines are noisy), and the mean step time over the timed rounds is reported: a
mean, not a median, because QuotientSGD with ``refresh_every=8`` has two kinds of steps (the
default 8 warm-up and 16 timed rounds hold whole refresh intervals; the table counts the
refreshes).

    python benchmarks/step_overhead.py                 # CPU, default sizes
    python benchmarks/step_overhead.py --device cuda   # on a GPU

Writes ``benchmarks/results/step_overhead-<device>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
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
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)

    params = gpt2_small_parameters(
        args.layers, args.heads, args.width, args.head_dim, args.vocab, 1024, args.device, dtype
    )
    n_params = sum(p.numel() for p in params)
    n_heads = sum(p.numel() for p in params[:2])
    # each optimizer gets its own copy of the parameters (same values, same gradients)
    copies = {}

    def clone():
        out = []
        for p in params:
            q = p.detach().clone()
            q = (
                geoopt.ManifoldParameter(q, manifold=p.manifold)
                if hasattr(p, "manifold")
                else torch.nn.Parameter(q)
            )
            q.grad = p.grad.clone()
            out.append(q)
        return out

    makers = {
        "torch SGD-momentum (foreach)": lambda ps: torch.optim.SGD(
            ps, lr=1e-3, momentum=0.9, foreach=True
        ),
        "torch AdamW (foreach)": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True),
        "QuotientSGD momentum": lambda ps: QuotientSGD(ps, lr=1e-3, momentum=0.9),
        "QuotientSGD momentum, refresh_every=8": lambda ps: QuotientSGD(
            ps, lr=1e-3, momentum=0.9, refresh_every=8
        ),
        "QuotientAdam (rest: fused AdamW)": lambda ps: QuotientAdam(ps, lr=1e-3),
        "QuotientHamiltonian": lambda ps: QuotientHamiltonian(ps, lr=1e-3),
    }
    optimizers = {}
    for name, make in makers.items():
        copies[name] = clone()
        optimizers[name] = make(copies[name])
    times: dict[str, list[float]] = {name: [] for name in makers}
    refreshes = dict.fromkeys(makers, 0)
    for round_index in range(args.warmup + args.rounds):
        for name, optimizer in optimizers.items():
            before = refresh_marks(optimizer)
            synchronize(args.device)
            start = time.perf_counter()
            optimizer.step()
            synchronize(args.device)
            if round_index >= args.warmup:
                times[name].append(time.perf_counter() - start)
                refreshes[name] += before != refresh_marks(optimizer)
    mean = {name: statistics.mean(t) for name, t in times.items()}
    state_bytes = {name: optimizer_state_bytes(optimizer) for name, optimizer in optimizers.items()}
    base, adamw = mean["torch SGD-momentum (foreach)"], mean["torch AdamW (foreach)"]
    rows = [
        {
            "optimizer": name,
            "mean_ms": 1e3 * m,
            "vs_sgd_momentum": m / base,
            "vs_adamw": m / adamw,
            "state_mib": state_bytes[name] / 2**20,
            "metric_refreshes": refreshes[name]
            if isinstance(optimizers[name], QuotientSGD)
            else None,
        }
        for name, m in mean.items()
    ]
    environment = {
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "dtype": args.dtype,
        "parameters": n_params,
        "head_parameters": n_heads,
        "rounds": args.rounds,
    }
    command = "python benchmarks/step_overhead.py " + " ".join(
        f"--{k.replace('_', '-')} {v}"
        for k, v in vars(args).items()
        if k != "out" and parser.get_default(k) != v
    )
    lines = [
        f"Step time at GPT-2-small shapes ({n_params / 1e6:.1f}M parameters, {n_heads / 1e6:.1f}M in "
        f"the heads), {environment['device']}, {environment['threads']} threads, torch {torch.__version__}, "
        f"{args.dtype}, mean of {args.rounds} interleaved rounds after {args.warmup} warm-up "
        f"rounds. Command: `{command.strip()}`",
        "",
        "| optimizer | step (ms) | / SGD-momentum | / AdamW | state (MiB) | metric refreshes |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['optimizer']} | {r['mean_ms']:.1f} | {r['vs_sgd_momentum']:.2f} "
        f"| {r['vs_adamw']:.2f} | {r['state_mib']:.0f} "
        f"| {'' if r['metric_refreshes'] is None else r['metric_refreshes']} |"
        for r in rows
    ]
    report = "\n".join(lines)
    print(report)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "cpu" if args.device == "cpu" else "cuda"
    (out / f"step_overhead-{tag}.md").write_text(report + "\n")
    (out / f"step_overhead-{tag}.json").write_text(
        json.dumps(
            {"command": command.strip(), "environment": environment, "results": rows}, indent=2
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
