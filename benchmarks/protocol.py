r"""The field's protocol for optimizer comparisons (issue 24; DESIGN.md section 8): one-pass data,
budget-matched warmup + cosine schedules, the lr tuned per budget, end-of-schedule validation loss
compared, and a steps-to-target speedup.

    nice -n 19 python benchmarks/protocol.py                         # the default ladder
    nice -n 19 python benchmarks/protocol.py --widths 64 --budgets 250 500 1000 --final-seeds 1
    python benchmarks/protocol.py --resume                           # skip the runs already done

**Corpus.** The Python standard library's ``*.py`` files outside test folders (no path component
``test``, ``tests``, ``idle_test``, ``site-packages``), sorted, shuffled by file with
``random.Random(0)``, UTF-8 bytes (vocabulary 256). The first files of that order, up to
``--val-bytes`` (1 MiB), are the held-out validation part; the rest is the training stream.

**One pass.** A run of ``B`` steps reads the training stream in order from its start: step ``t``
takes the ``batch x (context + 1)`` bytes at offset ``t x batch x (context + 1)`` as ``batch`` rows
(inputs = a row without its last byte, targets = without its first). No byte is read twice within
a run; the report gives each run's passes ``B x batch x (context + 1) / len(stream)`` and refuses a
budget that would need more than one pass. All runs read the same stream (the seed sets the
initialization).

**Schedule.** For a budget ``B`` with warmup ``w = max(1, round(warmup_frac x B))``:

.. math::

    f(t) = \frac{t + 1}{w} \ (t < w), \qquad
    f(t) = r + \tfrac12 (1 - r)\Bigl(1 + \cos \pi \frac{t - w}{B - 1 - w}\Bigr) \ (t \ge w),

so the last step taken, ``t = B - 1``, runs at the floor ``r = --min-lr-ratio`` (0.1) times the
base lr: every budget gets its own complete schedule, and only its end is compared.

**Tuning.** Each optimizer's base lr is tuned at each budget and width on the tuning seed 0 over
its default lr times ``--grid-factors`` (0.5, 1, 2: the same grid size for every optimizer); the
best lr then runs on the final seeds ``1..--final-seeds`` (never the tuning seed). The table gives
the mean and sample std of the final runs' end-of-schedule validation loss (mean cross-entropy in
nats per byte over ``--eval-batches`` fixed batches of the validation part).

**Steps to target.** For each budget ``b``, the target is the best peer's mean loss ``L(b)``; the
budget ``b*`` at which quotient-muon reaches it is interpolated on the ladder, linearly in
``log b``, between the two adjacent budgets whose losses bracket ``L(b)``; the speedup is
``b / b*`` (``>= b / b_min`` when quotient-muon beats the target already at the smallest budget,
``< b / b_max`` when it never does: both stated as bounds).

**Output.** ``<out>/protocol.{json,md}`` after every finished run (a killed run keeps what finished;
``--resume`` skips the runs in the json); the cost is estimated up front from timed steps of every
optimizer at every width, and every table names the CPU model and whether it has bf16 matrix
units (the ``avx512_bf16`` / ``amx_bf16`` flags).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import sysconfig
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
from language_model import (  # noqa: E402
    ADAMW_TEXT,
    METHODS,
    Method,
    Setup,
    _adamw,
    _hidden_matrices,
)

from quotientopt.compare import Settings, evaluate  # noqa: E402
from quotientopt.models import GPT, GPTConfig  # noqa: E402
from quotientopt.optim import HybridOptimizer  # noqa: E402

# --------------------------------------------------------------------------- the corpus

TEST_FOLDERS = frozenset({"test", "tests", "idle_test", "site-packages"})


def stdlib_files(root: Path | None = None) -> list[Path]:
    """The standard library's ``*.py`` files outside test folders, sorted, then shuffled by file
    with ``random.Random(0)``."""
    root = Path(sysconfig.get_paths()["stdlib"]) if root is None else root
    files = sorted(
        p
        for p in root.rglob("*.py")
        if not TEST_FOLDERS.intersection(p.relative_to(root).parts[:-1])
    )
    random.Random(0).shuffle(files)
    return files


def one_pass_corpus(
    files: Sequence[Path], val_bytes: int = 1 << 20
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(training stream, validation part, number of validation files): whole files, the first
    ones up to ``val_bytes`` held out, as UTF-8 byte tensors of dtype long."""
    chunks = [p.read_bytes() for p in files]
    n_val, size = 0, 0
    while n_val < len(chunks) and size < val_bytes:
        size += len(chunks[n_val])
        n_val += 1
    if n_val >= len(chunks):
        raise ValueError(f"{len(chunks)} files hold no more than --val-bytes {val_bytes}; lower it")

    def tensor(parts: Sequence[bytes]) -> torch.Tensor:
        return torch.frombuffer(bytearray(b"".join(parts)), dtype=torch.uint8).long()

    return tensor(chunks[n_val:]), tensor(chunks[:n_val]), n_val


class OnePassStream:
    """Step ``t``'s batch is the ``batch x (block + 1)`` bytes at ``t x batch x (block + 1)``;
    records the highest byte read, so ``passes`` is what the run actually consumed."""

    def __init__(self, data: torch.Tensor, batch_size: int, block_size: int) -> None:
        self.data, self.batch_size, self.block_size = data, batch_size, block_size
        self.row = block_size + 1
        self.end = 0  # bytes consumed

    def steps_available(self) -> int:
        return len(self.data) // (self.batch_size * self.row)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = step * self.batch_size * self.row
        stop = start + self.batch_size * self.row
        if stop > len(self.data):
            raise ValueError(
                f"step {step} would read bytes {start:,}..{stop:,} of a {len(self.data):,}-byte "
                f"stream: a second pass; use a smaller budget or batch"
            )
        if start != self.end:
            raise ValueError(f"step {step} reads from {start:,}, the stream is at {self.end:,}")
        self.end = stop
        rows = self.data[start:stop].view(self.batch_size, self.row)
        return rows[:, :-1], rows[:, 1:]

    @property
    def passes(self) -> float:
        return self.end / len(self.data)


# --------------------------------------------------------------------------- the schedule


def warmup_steps(budget: int, warmup_frac: float) -> int:
    return max(1, round(warmup_frac * budget))


def schedule(step: int, budget: int, warmup: int, floor: float) -> float:
    """Linear warmup to 1 over ``warmup`` steps, cosine to ``floor`` at the last step
    ``budget - 1``."""
    if step < warmup:
        return (step + 1) / warmup
    span = max(1, budget - 1 - warmup)
    ratio = min(1.0, (step - warmup) / span)
    return floor + 0.5 * (1.0 - floor) * (1.0 + math.cos(math.pi * ratio))


# --------------------------------------------------------------------------- the peers


def _pytorch_optimizer_muon(cls_name: str, **kw: Any):
    def build(model: GPT, lr: float, setup: Setup) -> torch.optim.Optimizer:
        import pytorch_optimizer

        hidden, rest = _hidden_matrices(model)
        cls = getattr(pytorch_optimizer, cls_name)
        inner = cls([{"params": hidden, "use_muon": True}], lr=lr, **kw)
        return HybridOptimizer(inner, _adamw(rest, lr))

    return build


NORMUON_KW = dict(
    momentum=0.95, beta2=0.95, weight_decay=0.1, nesterov=True, update_scale="match_rms"
)
ADAMUON_KW = dict(betas=(0.9, 0.95), weight_decay=0.1, use_adjusted_lr=True)

PEERS = {
    m.name: m
    for m in (
        Method(
            "normuon",
            "pytorch_optimizer.NorMuon (momentum 0.95, Nesterov, beta2 0.95, weight decay 0.1, "
            "update_scale='match_rms': update RMS 0.2 as Algorithm 1) on the blocks' 2-D "
            f"matrices, {ADAMW_TEXT} on the rest at lr",
            False,
            False,
            1.6e-2,
            (),
            _pytorch_optimizer_muon("NorMuon", **NORMUON_KW),
        ),
        Method(
            "adamuon",
            "pytorch_optimizer.AdaMuon (betas (0.9, 0.95), weight decay 0.1, use_adjusted_lr: "
            f"update RMS 0.2) on the blocks' 2-D matrices, {ADAMW_TEXT} on the rest at lr",
            False,
            False,
            1.6e-2,
            (),
            _pytorch_optimizer_muon("AdaMuon", **ADAMUON_KW),
        ),
    )
}


def _quotient_muon_variant(variant: str | None, head_ratio: float = 0.2, **options: Any):
    """quotient-muon's split (heads at ``head_ratio`` x lr, torch Muon's step on the other 2-D
    matrices at lr, AdamW betas (0.9, 0.99) on the rest) with one of the invariant variants of
    ``quotientopt.optim.muon_variants`` (``variant``) or QuotientMuon ``options`` (ablations)."""

    def build(model: GPT, lr: float, setup: Setup) -> torch.optim.Optimizer:
        from quotientopt.optim import muon_and_adamw
        from quotientopt.optim.muon_variants import variant_muon_and_adamw

        kw = dict(head_lr=head_ratio * lr, adamw_betas=(0.9, 0.99), **options)
        if variant is None:
            return muon_and_adamw(model, lr, **kw)
        return variant_muon_and_adamw(model, lr, variant=variant, **kw)

    return build


_QM = "quotient-muon's split and defaults (heads at 0.2 x lr) with "
#: issue 24's invariant variants and ablations of QuotientMuon (not in the default run)
VARIANT_METHODS = {
    m.name: m
    for m in (
        Method("qmuon-row-norm", _QM + "variant='row-norm' (invariant NorMuon, beta2 0.95)",
               True, False, 1.6e-2, (), _quotient_muon_variant("row-norm")),
        Method("qmuon-product-adam", _QM + "variant='product-adam' (invariant AdaMuon, beta2 0.95)",
               True, False, 1.6e-2, (), _quotient_muon_variant("product-adam")),
        Method("qmuon-inv-damping", _QM + "variant='invariant-damping' (delta 0.01)",
               True, False, 1.6e-2, (), _quotient_muon_variant("invariant-damping")),
        Method("qmuon-per-head", _QM + "head_norm='per-head' (ablation)",
               True, False, 1.6e-2, (), _quotient_muon_variant(None, head_norm="per-head")),
        Method("qmuon-heads-0.5", "quotient-muon with heads at 0.5 x lr (ablation)",
               True, False, 1.6e-2, (), _quotient_muon_variant(None, head_ratio=0.5)),
    )
}  # fmt: skip
ALL = {**METHODS, **PEERS, **VARIANT_METHODS}
DEFAULT_OPTIMIZERS = ("quotient-muon", "muon-split-qkv", "muon", "normuon", "adamuon", "adamw")
OURS = "quotient-muon"


# --------------------------------------------------------------------------- one run


@dataclass(frozen=True)
class Run:
    method: str
    width: int
    budget: int
    lr: float
    seed: int
    kind: str  # "tune" or "final"

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.method}:w{self.width}:b{self.budget}:lr{self.lr:g}:s{self.seed}"


@dataclass(frozen=True)
class Protocol:
    n_layer: int = 2
    n_head: int = 4
    block_size: int = 64
    batch_size: int = 16
    eval_batches: int = 20
    warmup_frac: float = 0.05
    min_lr_ratio: float = 0.1


_DATA: dict[str, torch.Tensor] = {}


def _init_worker(train: torch.Tensor, val: torch.Tensor) -> None:
    torch.set_num_threads(1)
    _DATA["train"], _DATA["val"] = train, val


def build_model(name: str, width: int, proto: Protocol, seed: int) -> GPT:
    method = ALL[name]
    config = GPTConfig(
        block_size=proto.block_size,
        vocab_size=256,
        n_layer=proto.n_layer,
        n_head=proto.n_head,
        n_embd=width,
        dropout=0.0,
        bias=True,
        quotient=method.quotient,
        symmetry_breaking=method.symmetry_breaking,
    )
    torch.manual_seed(seed)
    return GPT(config)


def train_run(
    run: Run, proto: Protocol, train: torch.Tensor, val: torch.Tensor, max_steps: int | None = None
) -> dict[str, Any]:
    """Train one GPT for ``run.budget`` steps on one pass of ``train`` under the budget's
    schedule; return the end-of-schedule validation loss, passes, and step times. ``max_steps``
    stops early (timing only)."""
    model = build_model(run.method, run.width, proto, run.seed)
    optimizer = ALL[run.method].build(model, run.lr, Setup())
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    stream = OnePassStream(train, proto.batch_size, proto.block_size)
    warmup = warmup_steps(run.budget, proto.warmup_frac)
    steps = run.budget if max_steps is None else min(max_steps, run.budget)
    times: list[float] = []
    loss = torch.zeros(())
    start_run = time.perf_counter()
    for step in range(steps):
        factor = schedule(step, run.budget, warmup, proto.min_lr_ratio)
        for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
            group["lr"] = base * factor
        x, y = stream.batch(step)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        _, loss = model(x, y)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
        if step % 50 == 0 and not math.isfinite(loss.item()):
            break
    settings = Settings(
        batch_size=proto.batch_size, block_size=proto.block_size, eval_batches=proto.eval_batches
    )
    finite = math.isfinite(loss.item())
    val_loss = evaluate(model, val, settings, "cpu") if finite else float("inf")
    return {
        **asdict(run),
        "key": run.key,
        "val_loss": val_loss if math.isfinite(val_loss) else float("inf"),
        "passes": stream.passes,
        "steps_taken": len(times),
        "step_ms_median": 1e3 * statistics.median(times) if times else float("nan"),
        "wall_s": time.perf_counter() - start_run,
    }


def _worker(run: Run, proto: Protocol) -> dict[str, Any]:
    return train_run(run, proto, _DATA["train"], _DATA["val"])


# --------------------------------------------------------------------------- the analysis


def best_lr(results: Sequence[dict[str, Any]], method: str, width: int, budget: int) -> float:
    """The tuning seed's lowest end-of-schedule loss at this (method, width, budget)."""
    tuned = [
        r
        for r in results
        if r["kind"] == "tune" and (r["method"], r["width"], r["budget"]) == (method, width, budget)
    ]
    if not tuned:
        raise ValueError(f"no tuning runs for {method} width {width} budget {budget}")
    return min(tuned, key=lambda r: (r["val_loss"], r["lr"]))["lr"]


def steps_to_target(
    budgets: Sequence[int], losses: Sequence[float], target: float
) -> tuple[float, str]:
    """(budget at which ``losses`` (on the ascending ladder ``budgets``) reach ``target``,
    ``"="`` interpolated linearly in log steps, ``"<="`` reached at the smallest budget already,
    ``">"`` not reached on the ladder (the largest budget is then returned))."""
    if list(budgets) != sorted(budgets) or len(budgets) != len(losses):
        raise ValueError("budgets must ascend and match losses one to one")
    if losses[0] <= target:
        return float(budgets[0]), "<="
    for (b0, l0), (b1, l1) in zip(
        zip(budgets, losses, strict=True), zip(budgets[1:], losses[1:], strict=True), strict=False
    ):
        if l0 > target >= l1:
            frac = (l0 - target) / (l0 - l1)
            return math.exp(math.log(b0) + frac * (math.log(b1) - math.log(b0))), "="
    return float(budgets[-1]), ">"


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(
    results: Sequence[dict[str, Any]],
    methods: Sequence[str],
    widths: Sequence[int],
    budgets: Sequence[int],
) -> dict[str, Any]:
    """Per (width, budget, method): tuned lr, final mean/std, passes; per width: speedups."""
    table: dict[str, Any] = {}
    speedups: dict[str, Any] = {}
    for width in widths:
        for budget in budgets:
            for method in methods:
                try:
                    lr = best_lr(results, method, width, budget)
                except ValueError:
                    continue
                finals = [
                    r
                    for r in results
                    if r["kind"] == "final"
                    and (r["method"], r["width"], r["budget"], r["lr"])
                    == (method, width, budget, lr)
                ]
                mean, std = _mean_std([r["val_loss"] for r in finals])
                grid = sorted(
                    (r["lr"], r["val_loss"])
                    for r in results
                    if r["kind"] == "tune"
                    and (r["method"], r["width"], r["budget"]) == (method, width, budget)
                )
                table[f"{method}:w{width}:b{budget}"] = {
                    "method": method, "width": width, "budget": budget, "lr": lr,
                    "at_edge": lr in (grid[0][0], grid[-1][0]) and len(grid) > 1,
                    "mean": mean, "std": std, "seeds": [r["seed"] for r in finals],
                    "passes": max((r["passes"] for r in finals), default=float("nan")),
                    "step_ms": statistics.median(r["step_ms_median"] for r in finals)
                    if finals else float("nan"),
                    "wall_s": [round(r["wall_s"], 1) for r in finals],
                    "grid": grid,
                }  # fmt: skip
        # the ladder: the budgets where ours has final runs (all of them once the script is done)
        ladder = [b for b in budgets if table.get(f"{OURS}:w{width}:b{b}", {}).get("seeds")]
        ours = [table[f"{OURS}:w{width}:b{b}"] for b in ladder]
        if ladder:
            for budget in ladder:
                peers = [
                    table[k]
                    for m in methods
                    if m != OURS and (k := f"{m}:w{width}:b{budget}") in table and table[k]["seeds"]
                ]
                if not peers:
                    continue
                best = min(peers, key=lambda t: t["mean"])
                at, how = steps_to_target(ladder, [o["mean"] for o in ours], best["mean"])
                speedups[f"w{width}:b{budget}"] = {
                    "width": width, "budget": budget, "best_peer": best["method"],
                    "target": best["mean"], "ours_steps": at, "relation": how,
                    "speedup": budget / at, "ladder": ladder,
                }  # fmt: skip
    return {"table": table, "speedups": speedups}


# --------------------------------------------------------------------------- the machine


def cpu_line() -> str:
    """'<model>, N cores, bf16 matrix units: yes (flags) / no'."""
    model, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags.update(value.split())
    except OSError:
        pass
    bf16 = sorted(flags & {"avx512_bf16", "amx_bf16"})
    units = f"yes ({', '.join(bf16)})" if bf16 else "no (neither avx512_bf16 nor amx_bf16)"
    return f"{model}, {os.cpu_count()} logical CPUs, bf16 matrix units: {units}"


# --------------------------------------------------------------------------- the report


def markdown(info: dict[str, Any], summary: dict[str, Any]) -> str:
    lines = [
        "# Optimizer protocol: one pass, budget-matched schedules, lr tuned per budget",
        "",
        f"Command: `{info['command']}`",
        "",
        f"CPU: {info['cpu']}. torch {info['torch']}, {info['workers']} worker(s), one thread each.",
        "",
        f"Corpus: {info['corpus']}",
        "",
        f"Model: GPT {info['proto']['n_layer']} layers x {info['proto']['n_head']} heads, "
        f"context {info['proto']['block_size']}, batch {info['proto']['batch_size']}; warmup "
        f"{info['proto']['warmup_frac']:g} x budget, cosine to {info['proto']['min_lr_ratio']:g} x lr "
        f"at the last step. lr grid: default x {info['grid_factors']} on tuning seed 0; final "
        f"seeds {info['final_seeds']}. Validation: {info['proto']['eval_batches']} fixed batches of "
        "the held-out part, end of schedule.",
        "",
        f"Runs finished: {info['finished']} of {info['planned']}.",
        "",
    ]
    table = summary["table"]
    for width in info["widths"]:
        lines += [
            f"## Width {width}",
            "",
            "| optimizer | budget | tuned lr | val loss (mean ± std) | seeds | passes | ms/step "
            "| seed-0 grid (lr: loss) |",
            "|---|---:|---:|---:|---:|---:|---:|---|",
        ]
        for budget in info["budgets"]:
            rows = [table[k] for m in info["methods"] if (k := f"{m}:w{width}:b{budget}") in table]
            done = [r for r in rows if r["seeds"]]
            best = min((r["mean"] for r in done), default=None)
            for r in rows:
                if r["seeds"]:
                    spread = f" ± {r['std']:.4f}" if len(r["seeds"]) > 1 else " (1 seed, no std)"
                    loss = f"{r['mean']:.4f}{spread}"
                    if r["mean"] == best:
                        loss = f"**{loss}**"
                else:
                    loss = "(tuned, no final run yet)"
                edge = " (edge)" if r["at_edge"] else ""
                lines.append(
                    f"| {r['method']} | {budget} | {r['lr']:g}{edge} | {loss} | "
                    f"{len(r['seeds'])} | {r['passes']:.3f} | {r['step_ms']:.1f} | "
                    + ", ".join(f"{lr:g}: {loss:.4f}" for lr, loss in r["grid"])
                    + " |"
                )
        lines.append("")
        speed = [s for s in summary["speedups"].values() if s["width"] == width]
        if speed:
            lines += [
                f"Steps to target ({OURS} against the best peer at each budget, interpolated in "
                f"log steps on the ladder {speed[0]['ladder']} of finished budgets):",
                "",
                "| budget | best peer | target loss | quotient-muon reaches it at | speedup |",
                "|---:|---|---:|---:|---:|",
            ]
            for s in speed:
                rel = {"=": "", "<=": "<= ", ">": "> "}[s["relation"]]
                ratio = {"=": "", "<=": ">= ", ">": "< "}[s["relation"]]
                lines.append(
                    f"| {s['budget']} | {s['best_peer']} | {s['target']:.4f} | "
                    f"{rel}{s['ours_steps']:.0f} | {ratio}{s['speedup']:.2f}x |"
                )
            lines.append("")
    lines += ["## Optimizers", ""]
    lines += [f"- `{m}`: {ALL[m].description}" for m in info["methods"]]
    lines += ["", "Passes: the fraction of the training stream each final run read (one pass max)."]
    return "\n".join(lines) + "\n"


def write(out: Path, info: dict[str, Any], results: list[dict[str, Any]]) -> None:
    info = {**info, "finished": len(results)}
    summary = summarize(results, info["methods"], info["widths"], info["budgets"])
    out.mkdir(parents=True, exist_ok=True)
    data = {"info": info, "summary": summary, "runs": results}
    (out / "protocol.json").write_text(json.dumps(data, indent=1) + "\n")
    (out / "protocol.md").write_text(markdown(info, summary))


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--optimizers", nargs="+", default=list(DEFAULT_OPTIMIZERS), choices=sorted(ALL))
    add("--widths", type=lambda s: [int(x) for x in s.split(",")], default=[64, 128])
    add("--budgets", type=int, nargs="+", default=[500, 1000, 2000])
    add("--grid-factors", type=float, nargs="+", default=[0.5, 1.0, 2.0])
    add("--final-seeds", type=int, default=3)
    add("--val-bytes", type=int, default=1 << 20)
    add("--workers", type=int, default=min(2, os.cpu_count() or 1))
    add("--eval-batches", type=int, default=20)
    add("--out", type=Path, default=HERE / "results" / "protocol")
    add("--resume", action="store_true")
    add("--estimate-only", action="store_true", help="print the cost estimate and stop")
    add("--rewrite", action="store_true", help="rewrite protocol.md from --out's json and stop")
    return parser.parse_args(argv)


def estimate(
    methods: Sequence[str], widths: Sequence[int], proto: Protocol, train, val, steps: int = 12
) -> dict[tuple[str, int], float]:
    """Median ms per training step of each (method, width), timed here on ``steps`` steps."""
    torch.set_num_threads(1)
    probe = {}
    for width in widths:
        for m in methods:
            run = Run(m, width, 1000, ALL[m].lr, 0, "tune")
            probe[(m, width)] = train_run(run, proto, train, val, max_steps=steps)["step_ms_median"]
    return probe


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.rewrite:
        data = json.loads((args.out / "protocol.json").read_text())
        write(args.out, data["info"], data["runs"])
        return data
    proto = Protocol(eval_batches=args.eval_batches)
    files = stdlib_files()
    train, val, n_val = one_pass_corpus(files, args.val_bytes)
    budgets = sorted(args.budgets)
    stream = OnePassStream(train, proto.batch_size, proto.block_size)
    if budgets[-1] > stream.steps_available():
        raise SystemExit(
            f"--budgets {budgets[-1]} needs more than one pass of the {len(train):,}-byte stream "
            f"({stream.steps_available()} steps fit); lower the budget"
        )
    corpus = (
        f"{len(files)} stdlib `*.py` files outside test folders ({sysconfig.get_paths()['stdlib']}), "
        f"shuffled by file with random.Random(0): validation = the first {n_val} files "
        f"({len(val):,} bytes), training stream = the rest ({len(train):,} bytes, "
        f"{stream.steps_available()} steps of one pass)"
    )
    tune = [
        Run(m, w, b, ALL[m].lr * f, 0, "tune")
        for w in args.widths
        for b in budgets
        for m in args.optimizers
        for f in args.grid_factors
    ]
    n_final = len(args.widths) * len(budgets) * len(args.optimizers) * args.final_seeds
    info = {
        "command": "python benchmarks/protocol.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "cpu": cpu_line(),
        "torch": torch.__version__,
        "workers": args.workers,
        "corpus": corpus,
        "proto": asdict(proto),
        "grid_factors": args.grid_factors,
        "final_seeds": list(range(1, args.final_seeds + 1)),
        "methods": list(args.optimizers),
        "widths": args.widths,
        "budgets": budgets,
        "planned": len(tune) + n_final,
    }
    print(f"CPU: {info['cpu']}\nCorpus: {corpus}", flush=True)
    probe = estimate(args.optimizers, args.widths, proto, train, val)
    per_run = {(m, w): probe[(m, w)] for m in args.optimizers for w in args.widths}
    steps = {k: sum(budgets) * (len(args.grid_factors) + args.final_seeds) for k in per_run}
    total_s = sum(per_run[k] * steps[k] for k in per_run) / 1e3
    for (m, w), ms in sorted(per_run.items()):
        print(f"  {m:>16} width {w}: {ms:6.1f} ms/step (timed here, one thread)")
    print(
        f"Estimated cost: {info['planned']} runs, {total_s / 60:.0f} CPU-minutes of steps, about "
        f"{total_s / 60 / max(1, args.workers):.0f} minutes on {args.workers} idle worker(s)",
        flush=True,
    )
    info["estimate_minutes"] = round(total_s / 60 / max(1, args.workers), 1)
    if args.estimate_only:
        return info
    results: list[dict[str, Any]] = []
    if args.resume and (args.out / "protocol.json").exists():
        results = json.loads((args.out / "protocol.json").read_text())["runs"]
    done = {r["key"] for r in results}
    start = time.perf_counter()

    def execute(runs: list[Run], label: str) -> None:
        todo = [r for r in runs if r.key not in done]
        print(f"{label}: {len(todo)} runs ({len(runs) - len(todo)} already done)", flush=True)
        if not todo:
            return
        with ProcessPoolExecutor(
            args.workers, initializer=_init_worker, initargs=(train, val)
        ) as pool:
            futures = {pool.submit(_worker, r, proto): r for r in todo}
            for future in as_completed(futures):
                result = future.result()
                results.append(result)
                done.add(result["key"])
                write(args.out, info, results)
                print(
                    f"  [{time.perf_counter() - start:6.0f} s] {result['key']}: "
                    f"{result['val_loss']:.4f}, passes {result['passes']:.3f}, "
                    f"{result['wall_s']:.0f} s",
                    flush=True,
                )

    for budget in budgets:  # budget by budget: a killed run keeps whole rungs of the ladder
        execute([r for r in tune if r.budget == budget], f"tuning, budget {budget}")
        final = [
            Run(m, w, budget, best_lr(results, m, w, budget), s, "final")
            for w in args.widths
            for m in args.optimizers
            for s in range(1, args.final_seeds + 1)
        ]
        execute(final, f"final, budget {budget}")
    write(args.out, info, results)
    return {"info": info, "runs": results}


if __name__ == "__main__":
    main()
