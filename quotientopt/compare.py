"""``quotientopt compare``: train the reference GPT with several optimizers and compare them.

Byte-level language modelling (vocabulary 256, no tokenizer to download) on a text: by default
the Python standard library's own sources, which every machine has offline. Every optimizer
starts from the same initialization and sees the same batches. Under ``logdir`` it writes one
TensorBoard run per optimizer (losses and the symmetry diagnostics of
:class:`~quotientopt.tensorboard.SymmetryMonitor`), ``results.md`` and ``results.json`` (final
validation loss, step time, the summary diagnostics) and ``losses.png`` / ``charges.png``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from quotientopt.models import GPT, GPTConfig
from quotientopt.optim import QuotientAdam, QuotientHamiltonian, QuotientSGD, split_parameters
from quotientopt.tensorboard import SymmetryMonitor


def _groups(params: list[torch.Tensor], heads_lr: float, rest_lr: float) -> list[dict]:
    """Two parameter groups: the quotient sectors (their step is scale-free: it moves the
    products, not the factors) and everything else."""
    heads, rest = split_parameters(params)
    return [{"params": heads, "lr": heads_lr}, {"params": rest, "lr": rest_lr}]


@dataclass(frozen=True)
class Contender:
    """One optimizer of the comparison: the model layout it trains and how it is built."""

    name: str
    description: str
    quotient: bool  # heads on the quotient (True) or the standard layout
    symmetry_breaking: bool
    default_lr: float
    build: Callable[[list[torch.Tensor], float], torch.optim.Optimizer] = field(repr=False)


CONTENDERS = {
    c.name: c
    for c in (
        Contender(
            "sgd",
            "SGD, Nesterov momentum 0.9",
            False,
            False,
            0.3,
            lambda ps, lr: torch.optim.SGD(ps, lr=lr, momentum=0.9, nesterov=True),
        ),
        Contender(
            "adamw",
            "AdamW, betas (0.9, 0.99), weight decay 0.1",
            False,
            False,
            3e-3,
            lambda ps, lr: torch.optim.AdamW(ps, lr=lr, betas=(0.9, 0.99), weight_decay=0.1),
        ),
        Contender(
            "quotient-sgd",
            "QuotientSGD, Nesterov momentum 0.9; heads on the quotient at lr, the rest at 30 lr",
            True,
            False,
            0.01,
            lambda ps, lr: QuotientSGD(
                _groups(ps, lr, 30 * lr), lr=lr, momentum=0.9, nesterov=True
            ),
        ),
        Contender(
            "quotient-adam",
            "QuotientAdam, betas (0.9, 0.99), on the heads at lr (no decay); AdamW on the rest at "
            "lr (its fused step inside QuotientAdam; weight decay 0.1)",
            True,
            False,
            3e-3,
            lambda ps, lr: QuotientAdam(
                [
                    {"params": group["params"], "weight_decay": decay}
                    for group, decay in zip(_groups(ps, lr, lr), (0.0, 0.1), strict=True)
                ],
                lr=lr,
                betas=(0.9, 0.99),
            ),
        ),
        Contender(
            "quotient-hamiltonian",
            "QuotientHamiltonian, friction 3; heads on the quotient at step lr, the rest at 10 lr",
            True,
            False,
            0.03,
            lambda ps, lr: QuotientHamiltonian(_groups(ps, lr, 10 * lr), lr=lr, friction=3.0),
        ),
        Contender(
            "breaking-sgd",
            "SGD, Nesterov momentum 0.9, paper 003's symmetry-breaking biases",
            False,
            True,
            0.3,
            lambda ps, lr: torch.optim.SGD(ps, lr=lr, momentum=0.9, nesterov=True),
        ),
    )
}


@dataclass
class Settings:
    optimizers: tuple[str, ...] = tuple(CONTENDERS)
    steps: int = 1000
    batch_size: int = 16
    block_size: int = 64
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64
    every: int = 25  # monitor interval
    eval_batches: int = 20
    seed: int = 0
    max_bytes: int = 2_000_000
    learning_rates: dict[str, float] = field(default_factory=dict)

    def validate(self) -> None:
        """Raise ``ValueError`` with a one-line message for nonsense settings."""
        unknown = [name for name in self.optimizers if name not in CONTENDERS]
        if unknown:
            raise ValueError(
                f"unknown optimizer {unknown[0]!r}; choose from {', '.join(CONTENDERS)}"
            )
        if not self.optimizers:
            raise ValueError("no optimizer to compare; pass at least one to --optimizers")
        for name in (
            "steps",
            "batch_size",
            "block_size",
            "n_layer",
            "n_head",
            "n_embd",
            "every",
            "eval_batches",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"--{name.replace('_', '-')} must be a positive integer, got {value!r}"
                )
        if self.n_embd % self.n_head:
            raise ValueError(
                f"--n-embd ({self.n_embd}) must be divisible by --n-head ({self.n_head})"
            )
        if self.n_embd // self.n_head < 2:
            raise ValueError("the head dimension --n-embd / --n-head must be at least 2")
        for name, lr in self.learning_rates.items():
            if name not in CONTENDERS:
                raise ValueError(
                    f"--lr names unknown optimizer {name!r}; choose from {', '.join(CONTENDERS)}"
                )
            if not (math.isfinite(lr) and lr > 0):
                raise ValueError(f"--lr for {name} must be a positive number, got {lr!r}")


def split_corpus(text: str, block_size: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """UTF-8 bytes, 90/10 train/validation split by position; checks there is enough of each."""
    data = torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()
    cut = int(0.9 * len(data))
    train, val = data[:cut], data[cut:]
    need = block_size + 1
    if len(val) <= need or len(train) <= need * batch_size:
        raise ValueError(
            f"the text holds {len(data):,} bytes, too few for --block-size {block_size} and --batch-size "
            f"{batch_size} (need more than {need * batch_size / 0.9:,.0f}); pass a longer --data file or smaller sizes"
        )
    return train, val


def batches(data: torch.Tensor, block_size: int, batch_size: int, gen: torch.Generator, device):
    starts = torch.randint(len(data) - block_size - 1, (batch_size,), generator=gen)
    x = torch.stack([data[s : s + block_size] for s in starts.tolist()])
    y = torch.stack([data[s + 1 : s + 1 + block_size] for s in starts.tolist()])
    return x.to(device), y.to(device)


@torch.no_grad()
def evaluate(model: GPT, val: torch.Tensor, settings: Settings, device) -> float:
    model.eval()
    gen = torch.Generator().manual_seed(12345)  # the same validation batches for every optimizer
    losses = [
        model(*batches(val, settings.block_size, settings.batch_size, gen, device))[1].item()
        for _ in range(settings.eval_batches)
    ]
    model.train()
    return sum(losses) / len(losses)


def train_one(
    name: str,
    train: torch.Tensor,
    val: torch.Tensor,
    settings: Settings,
    logdir: Path,
    device,
    progress,
) -> dict:
    contender = CONTENDERS[name]
    lr = settings.learning_rates.get(name, contender.default_lr)
    config = GPTConfig(
        block_size=settings.block_size,
        vocab_size=256,
        n_layer=settings.n_layer,
        n_head=settings.n_head,
        n_embd=settings.n_embd,
        quotient=contender.quotient,
        symmetry_breaking=contender.symmetry_breaking,
    )
    torch.manual_seed(settings.seed)  # the same initialization for every optimizer
    model = GPT(config).to(device)
    optimizer = contender.build(list(model.parameters()), lr)
    probe_gen = torch.Generator().manual_seed(12345)  # attention patterns on one fixed batch
    probe = batches(val, settings.block_size, 2, probe_gen, device)[0]
    monitor = SymmetryMonitor(
        model, optimizer, logdir / name, every=settings.every, probe=probe, loss_every=1
    )
    gen = torch.Generator().manual_seed(settings.seed + 1)  # the same batches for every optimizer
    losses, elapsed = [], 0.0
    bar = progress(range(settings.steps), desc=f"{name:>20}", leave=True)
    for step in bar:
        x, y = batches(train, settings.block_size, settings.batch_size, gen, device)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        _, loss = model(x, y)
        loss.backward()
        optimizer.step()
        elapsed += time.perf_counter() - start
        value = loss.item()
        monitor.log_loss(value)
        losses.append(value)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{value:.3f}")
    val_loss = evaluate(model, val, settings, device)
    monitor._scalar("loss/val", val_loss)
    summary = {
        tag.removeprefix("summary/"): points[-1][1]
        for tag, points in monitor.history.items()
        if tag.startswith("summary/")
    }
    charges = monitor.history.get("summary/charge_drift", [])
    monitor.close({"optimizer": name, "lr": lr})
    return {
        "optimizer": name,
        "description": contender.description,
        "lr": lr,
        "final_train_loss": sum(losses[-10:]) / len(losses[-10:]),
        "val_loss": val_loss,
        "step_ms": 1e3 * elapsed / settings.steps,
        "diagnostics": summary,
        "losses": losses,
        "charge_drift": charges,
    }


def write_report(results: list[dict], settings: Settings, logdir: Path, source: str) -> None:
    """results.json, results.md, losses.png and charges.png; each written to a temporary name
    and renamed, so a file is either complete or absent."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def atomic_write(path: Path, text: str) -> None:
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)

    atomic_write(
        logdir / "results.json",
        json.dumps({"settings": asdict(settings), "data": source, "results": results}, indent=2)
        + "\n",
    )
    rows = [
        "| optimizer | lr | val loss | train loss (last 10) | step (ms) | charge drift | vertical fraction (Euclidean) | vertical fraction (preconditioned) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        d = r["diagnostics"]
        rows.append(
            f"| {r['optimizer']} | {r['lr']:g} | {r['val_loss']:.4f} | {r['final_train_loss']:.4f} | {r['step_ms']:.1f} | "
            f"{d.get('charge_drift', float('nan')):.3g} | {d.get('vertical_fraction_euclidean', float('nan')):.3g} | "
            f"{d.get('vertical_fraction_preconditioned', float('nan')):.3g} |"
        )
    header = (
        f"Byte-level GPT ({settings.n_layer} layers, {settings.n_head} heads, width {settings.n_embd}, context "
        f"{settings.block_size}), {settings.steps} steps of batch {settings.batch_size}, seed {settings.seed}, on {source}. "
        f"Validation: {settings.eval_batches} fixed batches of the last 10% of the text. One seed: differences "
        "smaller than the seed-to-seed spread (not measured here) mean nothing."
    )
    atomic_write(logdir / "results.md", header + "\n\n" + "\n".join(rows) + "\n")
    for filename, key, ylabel, log in (
        ("losses.png", "losses", "training loss (25-step moving average)", False),
        ("charges.png", "charge_drift", "charge drift ||C - C0|| / (||Q0|| + ||P0||)", True),
    ):
        fig, ax = plt.subplots(figsize=(7, 4))
        for r in results:
            series = r[key]
            if key == "losses":  # a 25-step moving average; the raw curve is too noisy to compare
                window = min(25, len(series))
                smooth = torch.tensor(series).unfold(0, window, 1).mean(1).tolist()
                ax.plot(range(window - 1, len(series)), smooth, label=r["optimizer"], linewidth=1.2)
            elif series:
                ax.plot(
                    [s for s, _ in series],
                    [max(v, 1e-12) for _, v in series],
                    label=r["optimizer"],
                    marker=".",
                )
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        if log:
            ax.set_yscale("log")
        ax.legend()
        fig.tight_layout()
        tmp = logdir / (filename + ".tmp.png")
        fig.savefig(tmp, dpi=120)
        plt.close(fig)
        tmp.replace(logdir / filename)


def run(
    text: str,
    source: str,
    settings: Settings,
    logdir: Path,
    device: str | None = None,
    progress=None,
) -> list[dict]:
    """Validate, then train every optimizer and write the report. Returns the results."""
    settings.validate()
    train, val = split_corpus(text, settings.block_size, settings.batch_size)
    if progress is None:
        from tqdm.auto import tqdm as progress
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    logdir.mkdir(parents=True, exist_ok=True)
    results = [
        train_one(name, train, val, settings, logdir, device, progress)
        for name in settings.optimizers
    ]
    write_report(results, settings, logdir, source)
    return results
