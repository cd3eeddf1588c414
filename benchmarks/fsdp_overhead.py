"""Cost of one optimizer step under FSDP2 (``fully_shard``) on 2 ranks, quotient vs torch optimizers.

GPT-2-small tensor shapes (width 768, 12 heads of dimension 64; each layer's QK and VO sectors
``(12, 1536, 64)`` on ``FactorQuotient(768, 768)``, MLP ``768 x 3072`` and back, LayerNorm vectors),
``--layers`` layers and a ``--vocab x 768`` embedding, every layer and then the root sharded with
``quotientopt.distributed.fully_shard`` on a 1-D mesh of all ranks (gloo on CPUs). Gradients are
fixed random DTensors with the parameters' placements, so only ``optimizer.step()`` is timed:
mean step time over ``--rounds`` steps after ``--warmup`` steps, the slowest rank's, for each
optimizer in turn (one model in memory at a time), over ``--passes`` passes in alternating order;
the reported time is the mean over the passes.

Contenders: torch ``SGD`` with momentum 0.9 and ``AdamW``, each with ``foreach=True`` and with
``fused=True`` (AdamW's fused kernel runs on DTensors; SGD's has no DTensor sharding strategy and
raises, the crash the FSDP2 issue reported, which the table shows); QuotientSGD
(``refresh_every`` 1 and 8) and QuotientAdam with the head axis sharded (FSDP2's default
``Shard(0)``: no communication in the step), and QuotientSGD with the sector rows sharded
(``Shard(1)``: the ``k x k`` Grams are all-reduced). The quotient optimizers step the plain
tensors too (torch's fused kernels on the local shards). QuotientMuon steps the heads with fused
AdamW on the rest: ``head_norm="per-head"`` with the head axis sharded, its default
``"all-heads"`` with the rows sharded (the ``Hk x Hk`` Gram is all-reduced) and with the head
axis sharded (the whitened ``X`` is all-gathered, issue 26.7). ``muon_and_adamw`` at its defaults
(issue 26.7) adds the MLP matrices to QuotientMuon at 5x the heads' lr (torch Muon's step with
the update all-gathered for the bfloat16 Newton-Schulz; on a CPU without bfloat16 units that is
tens of seconds per matrix, so ``--only`` can leave it out). A last row times
:func:`quotientopt.distributed.local_shards` alone (local views in, DTensor state out).

    python benchmarks/fsdp_overhead.py                           # spawns 2 gloo ranks
    python benchmarks/fsdp_overhead.py --layers 12 --vocab 50257 # the whole GPT-2 small

Writes ``benchmarks/results/fsdp_overhead-cpu.{json,md}`` and prints the table with ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _report sits next to this file
import geoopt
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _report import cpu_model
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard

from quotientopt.distributed import fully_shard, local_shards
from quotientopt.manifolds import FactorQuotient
from quotientopt.optim import (
    HybridOptimizer,
    QuotientAdam,
    QuotientMuon,
    QuotientSGD,
    split_parameters,
)

WIDTH, HEADS, HEAD_DIM = 768, 12, 64


class Layer(nn.Module):
    """The parameters of one GPT-2-small block (no forward: only the step is timed)."""

    def __init__(self, gen: torch.Generator) -> None:
        super().__init__()
        manifold = FactorQuotient(WIDTH, WIDTH)

        def randn(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=gen) * 0.02

        self.qk = geoopt.ManifoldParameter(randn(HEADS, 2 * WIDTH, HEAD_DIM), manifold=manifold)
        self.vo = geoopt.ManifoldParameter(randn(HEADS, 2 * WIDTH, HEAD_DIM), manifold=manifold)
        self.fc = nn.Parameter(randn(4 * WIDTH, WIDTH))
        self.fc_bias = nn.Parameter(randn(4 * WIDTH))
        self.proj = nn.Parameter(randn(WIDTH, 4 * WIDTH))
        self.vectors = nn.ParameterList(nn.Parameter(randn(WIDTH)) for _ in range(5))


class Model(nn.Module):
    def __init__(self, layers: int, vocab: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.wte = nn.Parameter(torch.randn(vocab, WIDTH, generator=gen) * 0.02)
        self.wpe = nn.Parameter(torch.randn(1024, WIDTH, generator=gen) * 0.02)
        self.h = nn.ModuleList(Layer(gen) for _ in range(layers))


def rows(p: nn.Parameter) -> Shard | None:
    return Shard(1) if getattr(p, "manifold", None) is not None else None


def muon_heads(head_norm: str):
    """QuotientMuon on the heads, torch's fused AdamW on the rest (the plain matrices included)."""
    return lambda groups: HybridOptimizer(
        QuotientMuon(groups[0]["params"], lr=4e-3, head_norm=head_norm),
        torch.optim.AdamW(groups[1]["params"], lr=1e-3, fused=True),
    )


def muon_and_adamw_defaults(groups):
    """``muon_and_adamw``'s split and defaults: QuotientMuon on the heads (0.2x lr) and on the MLP
    matrices (lr 0.02, sharded: gathered whole), fused AdamW on the rest."""
    matrices = [p for p in groups[1]["params"] if p.dim() == 2 and WIDTH * 4 in p.shape]
    rest = [p for p in groups[1]["params"] if not any(p is q for q in matrices)]
    muon = QuotientMuon(
        [{"params": groups[0]["params"], "lr": 0.2 * 0.02}, {"params": matrices}], lr=0.02
    )
    return HybridOptimizer(muon, torch.optim.AdamW(rest, lr=0.02, fused=True))


CONTENDERS = {
    "sgd-momentum (foreach)": (
        "heads",
        lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9, foreach=True),
    ),
    "adamw (foreach)": ("heads", lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True)),
    "quotient-sgd": ("heads", lambda ps: QuotientSGD(ps, lr=1e-3, momentum=0.9)),
    "quotient-sgd refresh_every=8": (
        "heads",
        lambda ps: QuotientSGD(ps, lr=1e-3, momentum=0.9, refresh_every=8),
    ),
    "quotient-adam": ("heads", lambda ps: QuotientAdam(ps, lr=1e-3)),
    "quotient-sgd, rows sharded": ("rows", lambda ps: QuotientSGD(ps, lr=1e-3, momentum=0.9)),
    "quotient-muon per-head + adamw (fused)": ("heads", muon_heads("per-head")),
    "quotient-muon all-heads + adamw (fused), rows sharded": ("rows", muon_heads("all-heads")),
    "quotient-muon all-heads + adamw (fused), heads sharded (X gathered)": (
        "heads",
        muon_heads("all-heads"),
    ),
    "muon_and_adamw defaults (X and MLP updates gathered)": ("heads", muon_and_adamw_defaults),
}
FUSED = {
    "sgd-momentum (fused)": (
        "heads",
        lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9, fused=True),
    ),
    "adamw (fused)": ("heads", lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True)),
}


def build(args: argparse.Namespace, placement: str) -> nn.Module:
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    model = Model(args.layers, args.vocab)
    fn = rows if placement == "rows" else None
    for layer in model.h:
        fully_shard(layer, mesh=mesh, shard_placement_fn=fn)
    fully_shard(model, mesh=mesh, shard_placement_fn=fn)
    gen = torch.Generator().manual_seed(1 + dist.get_rank())
    for p in model.parameters():
        local = torch.randn(p.to_local().shape, generator=gen) * 1e-3
        p.grad = DTensor.from_local(
            local, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride()
        )
    return model


def time_steps(optimizer: torch.optim.Optimizer, warmup: int, rounds: int) -> float:
    for _ in range(warmup):
        optimizer.step()
    times = []
    for _ in range(rounds):
        dist.barrier()
        start = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - start)
    mean = torch.tensor(sum(times) / len(times), dtype=torch.float64)
    dist.all_reduce(mean, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
    return float(mean)


BOOKKEEPING = "of which DTensor bookkeeping (quotient-sgd)"


def time_swap(optimizer: torch.optim.Optimizer, rounds: int) -> float:
    """What :func:`quotientopt.distributed.local_shards` costs alone: parameters swapped for
    their local views and the state unwrapped and wrapped as DTensors again."""
    start = time.perf_counter()
    for _ in range(rounds):
        with local_shards(optimizer):
            pass
    mean = torch.tensor((time.perf_counter() - start) / rounds, dtype=torch.float64)
    dist.all_reduce(mean, op=dist.ReduceOp.MAX)
    return float(mean)


def worker(rank: int, init_file: str, args: argparse.Namespace, out: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=args.world
    )
    torch.set_num_threads(args.threads)
    contenders = dict(CONTENDERS, **(FUSED if args.fused else {}))
    if args.only:  # the torch references always run: the ratios need them
        wanted = [text.strip().lower() for text in args.only.split(",")]
        contenders = {
            name: c
            for name, c in contenders.items()
            if name.startswith(("sgd-momentum (foreach)", "adamw"))
            or any(text in name.lower() for text in wanted)
        }
    results: dict[str, list[float] | str] = {name: [] for name in contenders}
    for index in range(args.passes):
        order = list(contenders) if index % 2 == 0 else list(contenders)[::-1]
        for name in order:
            if isinstance(results[name], str):  # failed in an earlier pass
                continue
            placement, make = contenders[name]
            model = build(args, placement)
            heads, rest = split_parameters(model.parameters())
            optimizer = make([{"params": heads}, {"params": rest}])
            try:
                results[name].append(time_steps(optimizer, args.warmup, args.rounds))
                if name == "quotient-sgd":
                    results.setdefault(BOOKKEEPING, []).append(time_swap(optimizer, args.rounds))
            except (NotImplementedError, RuntimeError) as error:  # torch's fused kernels
                results[name] = f"fails: {type(error).__name__}: {str(error).splitlines()[0]}"
            del model, optimizer
            if rank == 0:
                print(f"pass {index}: {name} done", flush=True)
    if rank == 0:
        torch.save(results, out)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--passes", type=int, default=2)
    parser.add_argument(
        "--no-fused", dest="fused", action="store_false", help="leave torch's fused kernels out"
    )
    parser.add_argument(
        "--only",
        default="",
        metavar="TEXT[,TEXT...]",
        help="time only the contenders whose name contains a TEXT (and the torch references)",
    )
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "results.pt")
        mp.spawn(worker, args=(str(Path(tmp) / "init"), args, out), nprocs=args.world, join=True)
        raw = torch.load(out)
    times = {k: sum(v) / len(v) for k, v in raw.items() if isinstance(v, list)}
    sgd = min(v for k, v in times.items() if k.startswith("sgd-momentum"))
    adamw = min(v for k, v in times.items() if k.startswith("adamw"))
    lines = [
        f"FSDP2 step on {args.world} gloo ranks ({args.threads} thread(s) each), GPT-2-small "
        f"shapes, {args.layers} layers, vocab {args.vocab}; mean of {args.passes} passes x "
        f"{args.rounds} steps; {cpu_model()}, torch {torch.__version__}",
        "",
        "Ratios to the fastest torch SGD-momentum and AdamW that run under this sharding.",
        "",
        "| optimizer | step (ms) | / sgd-momentum | / adamw |",
        "|---|---:|---:|---:|",
    ]
    for name, value in raw.items():
        if isinstance(value, str):
            lines.append(f"| {name} | {value} | | |")
        else:
            t = times[name]
            lines.append(f"| {name} | {1e3 * t:.1f} | {t / sgd:.2f} | {t / adamw:.2f} |")
    table = "\n".join(lines)
    print(table)
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "fsdp_overhead-cpu.md").write_text(table + "\n")
    record = {"args": vars(args), "passes": raw, "mean_seconds": times}
    (folder / "fsdp_overhead-cpu.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


if __name__ == "__main__":
    main()
