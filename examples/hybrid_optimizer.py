"""Train the reference GPT with the hybrid optimizer, an LR schedule, and a checkpoint to resume from.

``HybridOptimizer.for_parameters`` gives the attention sectors (``ManifoldParameter``s) to
QuotientSGD and every other parameter to torch's AdamW; the result is one ``torch.optim.Optimizer``,
so a torch LR scheduler drives both, and ``state_dict`` / ``load_state_dict`` save and restore
both. A run interrupted halfway and resumed from its checkpoint ends bitwise where an uninterrupted
run ends. The text is this file's own source (byte-level), so nothing is downloaded.

    python examples/hybrid_optimizer.py [--steps 40]
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import torch

from quotientopt.models import GPT, GPTConfig
from quotientopt.optim import HybridOptimizer, QuotientSGD

CONFIG = GPTConfig(n_layer=2, n_head=4, n_embd=32, block_size=32)
PARTS = ("model", "optimizer", "scheduler")
TEXT = torch.tensor(list(Path(__file__).read_bytes()))


def batch(step: int, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of the text; the same windows for the same step, however the run started."""
    gen = torch.Generator().manual_seed(step)
    start = torch.randint(len(TEXT) - CONFIG.block_size - 1, (size, 1), generator=gen)
    windows = TEXT[start + torch.arange(CONFIG.block_size + 1)]
    return windows[:, :-1], windows[:, 1:]


def setup(total_steps: int) -> tuple[GPT, HybridOptimizer, torch.optim.lr_scheduler.LRScheduler]:
    torch.manual_seed(0)
    model = GPT(CONFIG)
    optimizer = HybridOptimizer.for_parameters(
        model.parameters(),
        heads=lambda ps: QuotientSGD(ps, lr=0.05, momentum=0.9),
        rest=lambda ps: torch.optim.AdamW(ps, lr=3e-3, weight_decay=0.01),
    )  # one scheduler for both: it scales every group's lr
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    return model, optimizer, scheduler


def train(
    model: GPT,
    optimizer: HybridOptimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    steps: range,
) -> list[float]:
    losses = []
    for step in steps:
        optimizer.zero_grad()
        _, loss = model(*batch(step))
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    return losses


def main(steps: int = 40) -> dict[str, float | bool]:
    model, optimizer, scheduler = setup(steps)
    losses = train(model, optimizer, scheduler, range(steps))
    print(f"uninterrupted: loss {losses[0]:.3f} -> {losses[-1]:.3f} in {steps} steps")

    half = steps // 2
    first = setup(steps)
    train(*first, range(half))
    checkpoint = io.BytesIO()  # a file on disk in real life
    torch.save({n: part.state_dict() for n, part in zip(PARTS, first, strict=True)}, checkpoint)
    checkpoint.seek(0)
    state = torch.load(checkpoint)
    resumed = setup(steps)  # a fresh process would rebuild everything, then load
    for name, part in zip(PARTS, resumed, strict=True):
        part.load_state_dict(state[name])
    train(*resumed, range(half, steps))
    pairs = list(zip(model.parameters(), resumed[0].parameters(), strict=True))
    identical = all(torch.equal(a, b) for a, b in pairs)
    gap = max((a - b).abs().max().item() for a, b in pairs)
    print(f"stopped at step {half}, resumed from the checkpoint: bitwise identical {identical}")
    return {"first_loss": losses[0], "last_loss": losses[-1], "identical": identical, "gap": gap}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    main(parser.parse_args().steps)
