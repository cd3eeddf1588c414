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
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from quotientopt.contenders import (
    SPECS,
    TUNE_FACTORS,
    ContenderSpec,
)
from quotientopt.models import GPT, GPTConfig
from quotientopt.optim import (
    HybridOptimizer,
    QuotientAdam,
    QuotientHamiltonian,
    QuotientSGD,
    muon_and_adamw,
    split_parameters,
)
from quotientopt.optim._base import check_number
from quotientopt.tensorboard import SymmetryMonitor


def _groups(model: torch.nn.Module, heads_lr: float, rest_lr: float) -> list[dict]:
    """Two parameter groups: the quotient sectors (their step is scale-free: it moves the
    products, not the factors) and everything else."""
    heads, rest = split_parameters(model.parameters())
    return [{"params": heads, "lr": heads_lr}, {"params": rest, "lr": rest_lr}]


def adamw(params: Iterable[torch.Tensor], lr: float) -> torch.optim.AdamW:
    """The comparison's AdamW: betas (0.9, 0.99), weight decay 0.1 on every tensor."""
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.1)


#: torch Muon's settings in the comparison (its update RMS matched to AdamW's, so one lr serves
#: the matrices and the AdamW part).
MUON_OPTIONS = dict(weight_decay=0.1, momentum=0.95, nesterov=True, adjust_lr_fn="match_rms_adamw")


def muon_and_torch_adamw(model: torch.nn.Module, lr: float) -> HybridOptimizer:
    """``torch.optim.Muon`` on the 2-D matrices inside the transformer blocks (attention and MLP),
    the comparison's AdamW on the rest (embeddings, LayerNorms, biases), both at ``lr``."""
    matrices, rest = [], []
    for name, p in model.named_parameters():
        inside = name.startswith("h.") and p.dim() == 2
        (matrices if inside else rest).append(p)
    return HybridOptimizer(torch.optim.Muon(matrices, lr=lr, **MUON_OPTIONS), adamw(rest, lr))


@dataclass(frozen=True)
class Contender(ContenderSpec):
    """One optimizer of the comparison: its :class:`~quotientopt.contenders.ContenderSpec` and how
    it is built."""

    build: Callable[[torch.nn.Module, float], torch.optim.Optimizer] = field(repr=False)


def _quotient_adam(model: torch.nn.Module, lr: float) -> QuotientAdam:
    heads, rest = _groups(model, lr, lr)
    return QuotientAdam(
        [
            {"params": heads["params"], "weight_decay": 0.0},
            {"params": rest["params"], "weight_decay": 0.1},
        ],
        lr=lr,
        betas=(0.9, 0.99),
    )


def _sgd(model: torch.nn.Module, lr: float) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True)


BUILDERS: dict[str, Callable[[torch.nn.Module, float], torch.optim.Optimizer]] = {
    "sgd": _sgd,
    "adamw": lambda model, lr: adamw(model.parameters(), lr),
    "muon": muon_and_torch_adamw,
    "quotient-muon": lambda model, lr: muon_and_adamw(model, lr, adamw_betas=(0.9, 0.99)),
    "quotient-sgd": lambda model, lr: QuotientSGD(
        _groups(model, lr, 30 * lr), lr=lr, momentum=0.9, nesterov=True
    ),
    "quotient-adam": _quotient_adam,
    "quotient-hamiltonian": lambda model, lr: QuotientHamiltonian(
        _groups(model, lr, 10 * lr), lr=lr, friction=3.0
    ),
    "breaking-sgd": _sgd,  # the biases are in the model (Contender.symmetry_breaking)
}

CONTENDERS = {name: Contender(**asdict(spec), build=BUILDERS[name]) for name, spec in SPECS.items()}


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
    tune: bool = False  # a short lr search per optimizer on this text before the runs
    tune_steps: int = 100  # steps per grid point (at most `steps`)

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
            "tune_steps",
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
            check_number(f"--lr for {name}", lr, 0.0, math.inf)  # the optimizers' own rule


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


#: The ``source`` of the default corpus, as the report names it.
DEFAULT_SOURCE = "the Python standard library's sources"
#: A run has diverged when its training loss is non-finite or exceeds this many times its first
#: value (the loss of the initialization, about ln 256 = 5.5 for bytes).
DIVERGENCE_FACTOR = 3.0


def _model(contender: Contender, settings: Settings, device) -> GPT:
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
    return GPT(config).to(device)


def _finite(model: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    name = type(error).__name__.lstrip("_")  # torch._C._LinAlgError -> LinAlgError
    return f"{name}: {lines[0]}" if lines else name


def _train(model, optimizer, train, settings, steps, device, monitor=None, bar=None) -> dict:
    """``steps`` training steps on the shared batch sequence. Stops at the first step whose loss
    is non-finite or above ``DIVERGENCE_FACTOR`` times the first loss (before stepping on it), and
    when a step leaves non-finite weights (the monitor's diagnostics then raise inside
    ``optimizer.step()``). Returns the finite losses, the time spent and where it diverged."""
    gen = torch.Generator().manual_seed(settings.seed + 1)  # the same batches for every optimizer
    losses: list[float] = []
    elapsed, taken, diverged_at, error = 0.0, 0, None, None
    for step in range(1, steps + 1):
        x, y = batches(train, settings.block_size, settings.batch_size, gen, device)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        _, loss = model(x, y)
        value = loss.item()
        if math.isfinite(value):
            losses.append(value)
            if monitor is not None:
                monitor.log_loss(value)
        if not math.isfinite(value) or value > DIVERGENCE_FACTOR * losses[0]:
            diverged_at = step
            break
        loss.backward()
        try:
            optimizer.step()
            taken += 1
        except RuntimeError as exc:  # torch.linalg.LinAlgError is one
            if _finite(model):
                error = f"step {step}: {_first_line(exc)}"
            else:
                diverged_at = step + 1  # the weights are non-finite from this step's update on
            break
        finally:
            elapsed += time.perf_counter() - start
        if bar is not None:
            bar.update()
            if step % 10 == 0:
                bar.set_postfix(loss=f"{value:.3f}")
    return {
        "losses": losses,
        "elapsed": elapsed,
        "steps_done": max(taken, 1),
        "diverged_at": diverged_at,
        "error": error,
    }


def tune_lr(name: str, train: torch.Tensor, settings: Settings, device) -> tuple[float, list[dict]]:
    """``--tune``: train ``min(tune_steps, steps)`` steps at each lr of the grid (the starting lr
    times :data:`TUNE_FACTORS`) from the shared initialization, without the monitor, and pick the
    lr with the lowest mean training loss over the last 10 of those steps (a diverged trial
    loses). Returns the chosen lr and the trials."""
    contender = CONTENDERS[name]
    base = settings.learning_rates.get(name, contender.default_lr)
    steps = min(settings.tune_steps, settings.steps)
    trials = []
    for factor in TUNE_FACTORS:
        lr = base * factor
        model = _model(contender, settings, device)
        optimizer = contender.build(model, lr)
        out = _train(model, optimizer, train, settings, steps, device)
        ok = out["diverged_at"] is None and out["error"] is None
        tail = out["losses"][-10:]
        trials.append(
            {
                "lr": lr,
                "train_loss_last10": sum(tail) / len(tail) if ok else None,
                "diverged_at": out["diverged_at"],
                "error": out["error"],
            }
        )
    finished = [t for t in trials if t["train_loss_last10"] is not None]
    if not finished:  # every trial diverged: the smallest lr, which the run will mark diverged
        return trials[0]["lr"], trials
    return min(finished, key=lambda t: t["train_loss_last10"])["lr"], trials


def train_one(
    name: str,
    train: torch.Tensor,
    val: torch.Tensor,
    settings: Settings,
    logdir: Path,
    device,
    progress,
    lr: float | None = None,
    lr_source: str | None = None,
) -> dict:
    """Train one optimizer with the monitor attached; a run that diverges (see
    :data:`DIVERGENCE_FACTOR`) or whose step raises stops there and is marked, instead of
    aborting the comparison."""
    contender = CONTENDERS[name]
    if lr is None:
        lr = settings.learning_rates.get(name, contender.default_lr)
        lr_source = "--lr" if name in settings.learning_rates else "default"
    model = _model(contender, settings, device)
    optimizer = contender.build(model, lr)
    probe_gen = torch.Generator().manual_seed(12345)  # attention patterns on one fixed batch
    probe = batches(val, settings.block_size, 2, probe_gen, device)[0]
    monitor = SymmetryMonitor(
        model, optimizer, logdir / name, every=settings.every, probe=probe, loss_every=1
    )
    bar = progress(total=settings.steps, desc=f"{name:>20}", leave=True)
    out = _train(model, optimizer, train, settings, settings.steps, device, monitor, bar)
    bar.close()
    losses, diverged_at, error = out["losses"], out["diverged_at"], out["error"]
    val_loss = None
    if diverged_at is None and error is None:
        val_loss = evaluate(model, val, settings, device)
        if not math.isfinite(val_loss) or val_loss > DIVERGENCE_FACTOR * losses[0]:
            diverged_at, val_loss = settings.steps, None
        else:
            monitor._scalar("loss/val", val_loss)
    summary = {
        tag.removeprefix("summary/"): points[-1][1]
        for tag, points in monitor.history.items()
        if tag.startswith("summary/")
    }
    charges = monitor.history.get("summary/charge_drift", [])
    monitor.close({"optimizer": name, "lr": lr})
    status = "failed" if error else "diverged" if diverged_at is not None else "ok"
    if status != "ok":
        print(
            f"quotientopt: warning: {name} "
            + (f"failed at {error}" if error else f"diverged at step {diverged_at}")
            + f" (lr {lr:g}); the other optimizers go on",
            file=sys.stderr,
        )
    tail = losses[-10:]
    return {
        "optimizer": name,
        "description": contender.description,
        "lr": lr,
        "lr_source": lr_source,
        "status": status,
        "diverged_at": diverged_at,
        "error": error,
        "final_train_loss": sum(tail) / len(tail) if tail else None,
        "val_loss": val_loss,
        "step_ms": 1e3 * out["elapsed"] / out["steps_done"],
        "diagnostics": summary,
        "losses": losses,
        "charge_drift": charges,
    }


def trailing_mean(series: list[float], window: int = 25) -> list[float]:
    """Mean of the last ``min(t, window)`` values at each position ``t = 1, 2, ...``: a moving
    average that starts at the first step."""
    out, total = [], 0.0
    for i, value in enumerate(series):
        total += value
        if i >= window:
            total -= series[i - window]
        out.append(total / min(i + 1, window))
    return out


def _json_safe(value):
    """Non-finite floats (diagnostics of a diverged run) as null: results.json stays valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _cell(value, fmt: str) -> str:
    return "-" if value is None or not math.isfinite(value) else format(value, fmt)


def _source_name(source: str) -> str:
    return Path(source).name if Path(source).is_file() else source


def figure_title(settings: Settings, source: str) -> str:
    """The plots' title: the corpus and the settings."""
    return (
        f"{_source_name(source)}: GPT {settings.n_layer} layers x {settings.n_head} heads, width "
        f"{settings.n_embd}, context {settings.block_size}\n{settings.steps} steps of batch "
        f"{settings.batch_size}, seed {settings.seed}"
        + (f", lrs tuned by --tune ({settings.tune_steps} steps each)" if settings.tune else "")
    )


def write_report(results: list[dict], settings: Settings, logdir: Path, source: str) -> list[str]:
    """results.json, results.md, and with matplotlib (the ``plots`` extra) losses.png and
    charges.png; each written to a temporary name and renamed, so a file is either complete or
    absent. Returns the names written."""

    def atomic_write(path: Path, text: str) -> None:
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)

    atomic_write(
        logdir / "results.json",
        json.dumps(
            _json_safe({"settings": asdict(settings), "data": source, "results": results}),
            indent=2,
            allow_nan=False,
            default=str,
        )
        + "\n",
    )
    rows = [
        "| optimizer | lr | val loss | train loss (last 10) | step (ms) | charge drift | vertical fraction (Euclidean) | vertical fraction (preconditioned) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        d = r["diagnostics"]
        if r["status"] == "diverged":
            val = f"**diverged** at step {r['diverged_at']}"
        elif r["status"] == "failed":
            val = f"**failed** at {r['error']}"
        else:
            val = f"{r['val_loss']:.4f}"
        rows.append(
            f"| {r['optimizer']} | {r['lr']:.3g} ({r['lr_source']}) | {val} | "
            f"{_cell(r['final_train_loss'], '.4f')} | {r['step_ms']:.1f} | "
            f"{_cell(d.get('charge_drift'), '.3g')} | {_cell(d.get('vertical_fraction_euclidean'), '.3g')} | "
            f"{_cell(d.get('vertical_fraction_preconditioned'), '.3g')} |"
        )
    sources = {r["lr_source"] for r in results}
    notes = []
    if "default" in sources:
        notes.append(
            "default: the learning rate was tuned on the default corpus (the Python standard "
            "library's sources; a three-point grid at 200 steps, seed 0)"
            + (
                "."
                if source == DEFAULT_SOURCE
                else ", not on this text; `--tune` searches a short grid on it, `--lr NAME=VALUE` "
                "sets one."
            )
        )
    if "tuned" in sources:
        notes.append(
            f"tuned: picked by `--tune` from {len(TUNE_FACTORS)} lrs (the default times "
            f"{', '.join(f'{f:g}' for f in TUNE_FACTORS)}), {min(settings.tune_steps, settings.steps)} "
            "steps each, lowest training loss over the last 10 steps (trials in results.json)."
        )
    if any(r["status"] == "diverged" for r in results):
        notes.append(
            f"diverged: the training loss became non-finite or exceeded {DIVERGENCE_FACTOR:g}x its "
            "first value; the run stopped there (try a smaller `--lr NAME=VALUE` or `--tune`)."
        )
    header = (
        f"Byte-level GPT ({settings.n_layer} layers, {settings.n_head} heads, width {settings.n_embd}, context "
        f"{settings.block_size}), {settings.steps} steps of batch {settings.batch_size}, seed {settings.seed}, on {source}. "
        f"Validation: {settings.eval_batches} fixed batches of the last 10% of the text. One seed: differences "
        "smaller than the seed-to-seed spread (not measured here) mean nothing."
    )
    atomic_write(
        logdir / "results.md",
        header + "\n\n" + "\n".join(rows) + "\n\n" + "\n\n".join(notes) + "\n",
    )
    written = ["results.md", "results.json"]
    try:
        import matplotlib
    except ImportError:
        return written
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    title = figure_title(settings, source)
    for filename, key, ylabel, caption in (
        (
            "losses.png",
            "losses",
            "training loss (nats per byte)",
            "Mean of the last 25 steps (of all steps so far before step 25). y axis clipped at "
            "1.5x the first loss; x: a diverged run, stopped there.",
        ),
        (
            "charges.png",
            "charge_drift",
            "charge drift (relative)",
            "C = A^T A - B^T B per head (the GL(k) symmetry's conserved quantity under gradient "
            "flow); plotted: ||C(t) - C(0)||_F / (||A0^T A0||_F + ||B0^T B0||_F), mean over heads "
            "and sectors, every --every steps; log scale.",
        ),
    ):
        fig, ax = plt.subplots(figsize=(8, 5))
        top = 0.0
        for r in results:
            label = r["optimizer"] + (f" ({r['status']})" if r["status"] != "ok" else "")
            if key == "losses":
                series = r["losses"]
                if not series:
                    continue
                smooth = trailing_mean(series)
                steps = range(1, len(series) + 1)
                (line,) = ax.plot(steps, smooth, label=label, linewidth=1.2)
                top = max(top, series[0])
                if r["status"] != "ok":
                    ax.plot(len(series), smooth[-1], "x", color=line.get_color(), markersize=9)
            else:
                points = [(s, v) for s, v in r[key] if math.isfinite(v)]
                if points:
                    ax.plot(
                        [s + 1 for s, _ in points],
                        [max(v, 1e-12) for _, v in points],
                        label=label,
                        marker=".",
                    )
        if key == "losses" and top > 0:  # clipped: a diverging curve must not squash the others
            finite = [v for r in results for v in trailing_mean(r["losses"]) if v <= 1.5 * top]
            ax.set_ylim(0.95 * min(finite), 1.5 * top)
        else:
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=9)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        fig.text(0.01, 0.01, caption, fontsize=7, wrap=True)
        fig.tight_layout(rect=(0, 0.05, 1, 1))
        tmp = logdir / (filename + ".tmp.png")
        fig.savefig(tmp, dpi=120)
        plt.close(fig)
        tmp.replace(logdir / filename)
        written.append(filename)
    return written


def run(
    text: str,
    source: str,
    settings: Settings,
    logdir: Path,
    device: str | None = None,
    progress=None,
) -> list[dict]:
    """Validate, optionally tune the learning rates (``settings.tune``), then train every
    optimizer and write the report. Returns the results."""
    settings.validate()
    train, val = split_corpus(text, settings.block_size, settings.batch_size)
    if progress is None:
        from tqdm.auto import tqdm as progress
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    logdir.mkdir(parents=True, exist_ok=True)
    results = []
    for i, name in enumerate(settings.optimizers, start=1):
        print(f"optimizer {i} of {len(settings.optimizers)}: {name}", file=sys.stderr)
        lr, lr_source, trials = None, None, None
        if settings.tune:
            lr, trials = tune_lr(name, train, settings, device)
            lr_source = "tuned"
            print(
                f"{name:>20}: --tune picked lr {lr:.3g} from "
                + ", ".join(
                    f"{t['lr']:.3g}: "
                    + (
                        f"{t['train_loss_last10']:.3f}"
                        if t["train_loss_last10"] is not None
                        else "diverged"
                    )
                    for t in trials
                ),
                file=sys.stderr,
            )
        result = train_one(name, train, val, settings, logdir, device, progress, lr, lr_source)
        if trials is not None:
            result["tune_trials"] = trials
        results.append(result)
    written = write_report(results, settings, logdir, source)
    if "losses.png" not in written:
        print(
            "quotientopt: note: no losses.png / charges.png: matplotlib is not installed; "
            "pip install 'quotientopt[plots]'",
            file=sys.stderr,
        )
    return results
