"""Watch the head symmetry of an AdamW baseline in TensorBoard with SymmetryMonitor.

The standard (unconverted) reference GPT trains with torch's AdamW, and, for contrast, with plain
SGD from the same start. ``SymmetryMonitor`` hooks each optimizer's ``step()`` and logs, per layer
and sector, the charge ``A^T A - B^T B`` and its drift and the share of each update that moves along
the symmetry orbits (``vertical_fraction``), plus ``summary/...`` averages. SGD's update is the
gradient, which is orthogonal to the orbits, so its Euclidean vertical fraction stays at rounding
level; Adam's per-coordinate scaling breaks the symmetry and moves along them.

    python examples/monitor_adamw.py [--logdir runs/monitor-adamw] [--steps 30]
    tensorboard --logdir runs/monitor-adamw
"""

from __future__ import annotations

import argparse
from pathlib import Path
from statistics import fmean

import torch

from quotientopt.models import GPT, GPTConfig
from quotientopt.tensorboard import SymmetryMonitor

CONFIG = GPTConfig(n_layer=2, n_head=4, n_embd=32, block_size=32, quotient=False)
OPTIMIZERS = {
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=3e-3),
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.3),
}
TAGS = ("summary/charge_drift", "summary/vertical_fraction_euclidean")


def run(name: str, logdir: Path, steps: int, every: int) -> dict[str, float]:
    """Train one optimizer, logging to ``logdir / name``; the mean of each of ``TAGS``."""
    torch.manual_seed(0)
    model = GPT(CONFIG)
    optimizer = OPTIMIZERS[name](model.parameters())
    monitor = SymmetryMonitor(model, optimizer, logdir / name, every=every, loss_every=every)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        tokens = torch.randint(CONFIG.vocab_size, (8, CONFIG.block_size + 1), generator=gen)
        optimizer.zero_grad()
        _, loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        optimizer.step()  # the monitor logs the diagnostics in its step hooks
        monitor.log_loss(loss)
    monitor.close({"optimizer": name})
    return {tag: fmean(value for _, value in monitor.history[tag]) for tag in TAGS}


def main(logdir: str | Path = "runs/monitor-adamw", steps: int = 30, every: int = 5) -> dict:
    results = {name: run(name, Path(logdir), steps, every) for name in OPTIMIZERS}
    for name, values in results.items():
        print(f"{name:6s}", "  ".join(f"{tag} {value:.2e}" for tag, value in values.items()))
    print(f"tensorboard --logdir {logdir}")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logdir", default="runs/monitor-adamw")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    main(args.logdir, args.steps)
