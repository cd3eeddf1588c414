"""Measure what SymmetryMonitor costs: training time with and without it, side by side.

Two identical copies of the reference GPT (the `quotientopt compare` default size unless told
otherwise) train on the same random byte batches; blocks of ``--block`` steps alternate between
the plain copy and the monitored one (and which of the two goes first) (monitor every ``--every`` steps), so machine noise hits both.

    python benchmarks/monitor_overhead.py [--optimizer adamw|quotient-sgd] [--steps 600] [--every 50]

Writes ``benchmarks/results/monitor_overhead.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from quotientopt.compare import CONTENDERS
from quotientopt.models import GPT, GPTConfig
from quotientopt.tensorboard import SymmetryMonitor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd", "quotient-sgd"])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--block", type=int, default=50)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--n-layer", type=int, default=2)
    parser.add_argument("--n-embd", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    contender = CONTENDERS[args.optimizer]
    config = GPTConfig(
        block_size=args.block_size,
        n_layer=args.n_layer,
        n_head=4,
        n_embd=args.n_embd,
        quotient=contender.quotient,
    )
    runs = {}
    for name in ("plain", "monitored"):
        torch.manual_seed(0)
        model = GPT(config)
        runs[name] = {
            "model": model,
            "optimizer": contender.build(model, contender.default_lr),
            "seconds": 0.0,
        }
    logdir = tempfile.mkdtemp(prefix="monitor-overhead-")
    monitor = SymmetryMonitor(
        runs["monitored"]["model"], runs["monitored"]["optimizer"], logdir, every=args.every
    )
    gen = torch.Generator().manual_seed(1)
    data = [
        torch.randint(0, 256, (args.batch_size, args.block_size + 1), generator=gen)
        for _ in range(args.steps)
    ]
    for block_index, start in enumerate(range(0, args.steps, args.block)):
        order = ["plain", "monitored"] if block_index % 2 == 0 else ["monitored", "plain"]
        for name, run in ((n, runs[n]) for n in order):  # alternate who goes first
            model, optimizer = run["model"], run["optimizer"]
            begin = time.perf_counter()
            for idx in data[start : start + args.block]:
                optimizer.zero_grad(set_to_none=True)
                _, loss = model(idx[:, :-1], idx[:, 1:])
                loss.backward()
                optimizer.step()
                if name == "monitored":
                    monitor.log_loss(loss)
            run["seconds"] += time.perf_counter() - begin
    monitor.close()
    plain, monitored = runs["plain"]["seconds"], runs["monitored"]["seconds"]
    overhead = monitored / plain - 1
    command = "python benchmarks/monitor_overhead.py " + " ".join(
        f"--{k.replace('_', '-')} {v}"
        for k, v in vars(args).items()
        if k != "out" and parser.get_default(k) != v
    )
    report = (
        f"SymmetryMonitor overhead, {args.optimizer}, GPT {args.n_layer} layers width {args.n_embd}, "
        f"{args.steps} steps, monitor every {args.every}, {torch.get_num_threads()} threads, torch {torch.__version__}.\n"
        f"Command: `{command}`\n\n| run | seconds | ms / step |\n|---|---:|---:|\n"
        f"| plain | {plain:.2f} | {1e3 * plain / args.steps:.2f} |\n"
        f"| monitored | {monitored:.2f} | {1e3 * monitored / args.steps:.2f} |\n\n"
        f"Overhead: {100 * overhead:+.1f}% of training time (target < 5%).\n"
    )
    print(report)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = f"monitor_overhead-{args.optimizer}"
    (out / f"{tag}.md").write_text(report)
    (out / f"{tag}.json").write_text(
        json.dumps(
            {"command": command, "plain_s": plain, "monitored_s": monitored, "overhead": overhead},
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
