"""Language-modelling benchmark: the reference GPT trained by every optimizer on a fixed token
budget, each optimizer's learning rate tuned on a stated grid, the best one run on several seeds.

    python benchmarks/language_model.py                      # the default, all optimizers
    python benchmarks/language_model.py --optimizers adamw quotient-sgd --seeds 3 --steps 200
    python benchmarks/language_model.py --data PATH/TO/TEXT.txt          # any UTF-8 text file
    python benchmarks/language_model.py --preset shakespeare-char-cpu --data ../shared/data/tinyshakespeare.txt

Options: ``--optimizers`` (a subset of :data:`METHODS`), ``--seeds N`` (final runs on seeds
1..N), ``--steps`` (final runs), ``--grid-steps`` (tuning runs; 0 skips tuning), ``--grid
NAME=LR,LR,...`` / ``--lr NAME=LR`` (replace a grid / pin an lr), model and batch sizes,
``--schedule``, ``--workers``, ``--out`` (default ``benchmarks/results``); for the Muon family
``--ratio NAME=R`` (attention/head lr over MLP lr of ``muon``, ``muon-split-qkv``, ``muon-per-head``,
``quotient-muon``; defaults 1, 1, 1, 0.2), ``--ratio-grid NAME=R,R,...`` (tune that ratio jointly
with the lr: every (lr, ratio) pair runs on seed 0), ``--option KEY=VALUE`` (options of
``quotient-muon``'s ``muon_and_adamw``, e.g. ``polar=eigh``, ``head_norm=per-head step=tangent``,
``head_weight_decay=1.0``; listed in the report) and ``--first-seed`` (ablations on the tuning seed
0).

**Default.** The embedded corpus (the Python standard library's own sources, 2 MB, UTF-8 bytes,
vocabulary 256; :func:`quotientopt.data.stdlib_text`), 90/10 train/validation split by position;
a GPT of 2 layers, 4 heads, width 64, context 64 (120,576 parameters); batch 16, constant learning
rate, no warmup, no clipping. Token budget: 400 steps x batch 16 x context 64 = 409,600 tokens per
run, for the tuning runs and the final runs alike.

**Tuning.** Each optimizer's lr is tuned on seed 0 over its grid in :data:`METHODS` (four values a
factor 2 apart, placed so that a wider 400-step scan's best value lies inside), by final validation
loss. The best lr then runs on 5 fresh seeds (1..5, not the tuning seed, so the reported mean
carries no selection bias); the table gives the mean and sample std of their final validation
losses. Hybrids tune one lr with a fixed, stated ratio for their other part: quotient-sgd the heads
at lr and the rest at 30 lr (as ``quotientopt compare``), quotient-sgd-adamw the rest at 0.3 lr,
quotient-hamiltonian at 10 lr, quotient-adam at 1 lr; muon uses one lr for both parts (Muon's
``match_rms_adamw`` scaling makes that meaningful). Validation loss: mean cross-entropy (nats per
token) over ``--eval-batches`` (20) fixed random batches of the validation text, the same batches
for every optimizer, seed and step (:func:`quotientopt.compare.evaluate`).

**Cost.** 10 optimizers x (4 tuning + 5 final) runs of 400 steps, in a pool of ``--workers``
processes (default ``min(2, os.cpu_count())``) with one torch thread each: tiny GPTs run fastest
single-threaded. A run's result depends only on its job (initialization ``torch.manual_seed(seed)``,
training batches from a generator seeded ``1000 + seed``), not on which worker runs it. About
10 minutes on an idle 2-core CPU, about 20 when other work shares it (measured before the tenth,
quotient-sgd-lazy, was added; see the report).

Writes ``<out>/language_model.{json,md,png}`` (``language_model-<preset>.*`` with a preset): the
table (optimizer, best lr, validation loss mean +- std over the seeds, median step time, bytes of
optimizer state: the tensors in ``optimizer.state``, both parts of a hybrid), the grids, and the
mean validation loss against step with a +-1 std band, one line per optimizer.

**Preset** ``shakespeare-char-cpu``: nanoGPT's CPU recipe for shakespeare_char (4 layers, 4 heads,
width 128, context 64, batch 12, 2000 iterations, dropout 0, no biases, AdamW lr 1e-3 with 100
warmup iterations and cosine decay to 1e-4 at iteration 2000, betas (0.9, 0.99), weight decay 0.1
on tensors of >= 2 dims only, gradient clipping 1.0, the file's character vocabulary (65), 90/10
split by position, validation on 200 batches as the config's ``eval_iters``), no tuning: AdamW at
nanoGPT's lr 1e-3, muon, quotient-muon, quotient-adam and quotient-sgd at their default lrs (the
``lr`` column of :data:`METHODS`), 3 seeds each. nanoGPT's README reports "a loss of only 1.88" for
AdamW; the report puts ours next to it. On the 2-core development VM an AdamW run took 3-5
minutes, a muon or quotient-muon run 35-40 (torch Muon's Newton-Schulz runs in bfloat16, slow on
that CPU): plan hours for the 15 runs, or pass ``--optimizers``.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from quotientopt.compare import CONTENDERS, Settings, adamw, batches, evaluate, split_corpus
from quotientopt.data import read_text_file, stdlib_text
from quotientopt.models import GPT, GPTConfig
from quotientopt.optim import HybridOptimizer, QuotientSGD
from quotientopt.optim.muon import muon_and_adamw

try:  # being written alongside this benchmark; skipped with a note while it is missing
    from quotientopt.optim import QuotientAdam
except ImportError:
    QuotientAdam = None

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # _report sits next to this file; needed when imported from a test
    sys.path.insert(0, str(HERE))
from _report import write_report  # noqa: E402

NANOGPT_REFERENCE = 1.88  # nanoGPT README, shakespeare_char on CPU (the recipe of the preset)


# --------------------------------------------------------------------------- the optimizers


@dataclass(frozen=True)
class Setup:
    """Everything a run needs besides optimizer, learning rate and seed (sent to the workers)."""

    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64
    block_size: int = 64
    batch_size: int = 16
    vocab_size: int = 256
    bias: bool = True
    dropout: float = 0.0
    eval_batches: int = 20
    eval_every: int = 40  # validation-curve interval of the final runs
    schedule: str = "constant"  # or "cosine": linear warmup, cosine decay to min_lr_ratio x lr
    warmup: int = 0
    min_lr_ratio: float = 0.1
    grad_clip: float = 0.0  # clip the global gradient norm to this (0: off)
    nanogpt_adamw: bool = False  # "adamw" decays tensors of >= 2 dims only, as nanoGPT does
    # (name, ratio): the attention/head lr over the MLP lr of the Muon family (DEFAULT_RATIOS)
    ratios: tuple[tuple[str, float], ...] = ()
    # (name, value): QuotientMuon options of quotient-muon (head_scale, polar) for ablations
    options: tuple[tuple[str, str], ...] = ()

    def ratio(self, name: str) -> float:
        return dict(self.ratios).get(name, DEFAULT_RATIOS.get(name, 1.0))


def _adamw(params: list[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    """``quotientopt compare``'s AdamW: betas (0.9, 0.99), weight decay 0.1 on every tensor."""
    return adamw(params, lr)


def _plain(name: str) -> Callable[[GPT, float, Setup], torch.optim.Optimizer]:
    """A contender of ``quotientopt compare``, built exactly as there."""
    return lambda model, lr, setup: CONTENDERS[name].build(model, lr)


def _build_adamw(model: GPT, lr: float, setup: Setup) -> torch.optim.Optimizer:
    if not setup.nanogpt_adamw:
        return _adamw(list(model.parameters()), lr)
    params = list(model.parameters())  # nanoGPT's configure_optimizers: no decay on 1-D tensors
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.99))


#: default attention (or head) lr / MLP lr of the Muon family (``--ratio NAME=R`` overrides)
DEFAULT_RATIOS = {"muon": 1.0, "muon-split-qkv": 1.0, "muon-per-head": 1.0, "quotient-muon": 0.2}
MUON_KW = dict(weight_decay=0.1, momentum=0.95, nesterov=True, adjust_lr_fn="match_rms_adamw")


def _build_muon(model: GPT, lr: float, setup: Setup) -> torch.optim.Optimizer:
    """torch.optim.Muon on the 2-D matrices inside the blocks, AdamW on the rest (embeddings,
    biases, LayerNorms), both at ``lr``: Muon's ``match_rms_adamw`` scaling makes its update RMS
    match AdamW's, so one learning rate serves both. The attention matrices run at
    ``setup.ratio("muon")`` x lr (1 by default)."""
    named = [(n, p) for n, p in model.named_parameters() if p.dim() == 2 and n.startswith("h.")]
    attention = [p for n, p in named if ".attn." in n]
    mlp = [p for n, p in named if ".attn." not in n]
    ids = {id(p) for _, p in named}
    rest = [p for p in model.parameters() if id(p) not in ids]
    groups = [{"params": mlp}, {"params": attention, "lr": setup.ratio("muon") * lr}]
    muon = torch.optim.Muon(groups, lr=lr, **MUON_KW)
    return HybridOptimizer(muon, _adamw(rest, lr))


class BlockMuon(torch.optim.Optimizer):
    """torch Muon's own step (its functional ``muon``) on blocks of each parameter:
    ``blocks(p)`` lists the indices (``p[index]`` is a 2-D view) that each step as one matrix,
    with a momentum buffer of the same view. A Python loop over blocks: a baseline, not a fast
    path."""

    def __init__(
        self,
        params: list[torch.Tensor],
        lr: float,
        blocks: Callable[[torch.Tensor], list[Any]],
    ) -> None:
        super().__init__(params, dict(lr=lr, **MUON_KW))
        self.blocks = blocks

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> None:
        from torch.optim import _muon

        for group in self.param_groups:
            params, grads, bufs = [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                for index in self.blocks(p):
                    params.append(p.detach()[index])
                    grads.append(p.grad[index])
                    bufs.append(state["momentum_buffer"][index])
            kw = {key: group[key] for key in MUON_KW}
            _muon.muon(
                params,
                grads,
                bufs,
                lr=group["lr"],
                ns_coefficients=_muon_defaults()[0],
                ns_steps=_muon_defaults()[1],
                eps=_muon_defaults()[2],
                has_complex=False,
                **kw,
            )


def head_factor_blocks(p: torch.Tensor) -> list[tuple[int, slice]]:
    """Each head's two factors of a sector ``(heads, n + m, k)``: ``n x k`` and ``m x k``."""
    n = p.manifold.n
    return [(h, rows) for h in range(p.shape[0]) for rows in (slice(None, n), slice(n, None))]


def thirds(p: torch.Tensor) -> list[slice]:
    """The query, key and value rows of a fused ``(3 d) x d`` projection."""
    d = p.shape[0] // 3
    return [slice(0, d), slice(d, 2 * d), slice(2 * d, 3 * d)]


def _muon_defaults() -> tuple[tuple[float, float, float], int, float]:
    from torch.optim import _muon

    return (_muon.DEFAULT_A, _muon.DEFAULT_B, _muon.DEFAULT_C), _muon.DEFAULT_NS_STEPS, _muon.EPS


def _hidden_matrices(model: GPT) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(the blocks' plain 2-D matrices, everything else that is not a head parameter)."""
    heads = {id(p) for p in model.parameters() if getattr(p, "manifold", None) is not None}
    named = [(n, p) for n, p in model.named_parameters() if id(p) not in heads]
    hidden = [p for n, p in named if p.dim() == 2 and n.startswith("h.")]
    ids = {id(p) for p in hidden}
    return hidden, [p for _, p in named if id(p) not in ids]


def _build_muon_split_qkv(model: GPT, lr: float, setup: Setup) -> torch.optim.Optimizer:
    """As ``muon``, but the fused query/key/value projection steps as three ``d x d`` matrices
    (BlockMuon), as modded-nanogpt orthogonalizes them, not as one ``3d x d`` matrix."""
    named = [(n, p) for n, p in model.named_parameters() if p.dim() == 2 and n.startswith("h.")]
    fused = [p for n, p in named if n.endswith(".attn.c_attn.weight")]
    projection = [p for n, p in named if n.endswith(".attn.c_proj.weight")]
    mlp = [p for n, p in named if ".attn." not in n]
    ids = {id(p) for _, p in named}
    rest = [p for p in model.parameters() if id(p) not in ids]
    ratio = setup.ratio("muon-split-qkv")
    muon = torch.optim.Muon(
        [{"params": mlp}, {"params": projection, "lr": ratio * lr}], lr=lr, **MUON_KW
    )
    inner = HybridOptimizer(BlockMuon(fused, ratio * lr, thirds), muon)
    return HybridOptimizer(inner, _adamw(rest, lr))


def _build_muon_per_head(model: GPT, lr: float, setup: Setup) -> torch.optim.Optimizer:
    """The per-head peer: torch Muon on each head's two factors separately (no whitening by the
    partner factor) at ``ratio`` x lr, torch Muon on the MLP matrices and AdamW on the rest at
    lr."""
    heads = [p for p in model.parameters() if getattr(p, "manifold", None) is not None]
    hidden, rest = _hidden_matrices(model)
    inner = HybridOptimizer(
        BlockMuon(heads, setup.ratio("muon-per-head") * lr, head_factor_blocks),
        torch.optim.Muon(hidden, lr=lr, **MUON_KW),
    )
    return HybridOptimizer(inner, _adamw(rest, lr))


def _build_quotient_muon(model: GPT, lr: float, setup: Setup) -> torch.optim.Optimizer:
    """quotientopt.optim.muon_and_adamw: QuotientMuon on the heads at ``ratio`` x lr and (torch
    Muon's own step) on the MLP matrices at lr, AdamW (betas (0.9, 0.99), weight decay 0.1) on
    the rest at lr."""
    return muon_and_adamw(
        model,
        lr,
        head_lr=setup.ratio("quotient-muon") * lr,
        adamw_betas=(0.9, 0.99),
        **{key: _option_value(value) for key, value in setup.options},
    )


def _option_value(text: str) -> Any:
    """An ``--option`` value: an int or float where the text is one (``ns_steps=6``,
    ``head_weight_decay=1.0``), else the text (``head_norm=per-head``)."""
    for number in (int, float):
        try:
            return number(text)
        except ValueError:
            pass
    return text


QSGD_ADAMW_RATIO = 0.3  # AdamW's lr for the rest / QuotientSGD's lr for the heads
QADAM_RATIO = 1.0  # AdamW's lr for the rest / QuotientAdam's lr for the heads


def _build_quotient_sgd_adamw(model: GPT, lr: float, setup: Setup) -> torch.optim.Optimizer:
    return HybridOptimizer.for_parameters(
        model.parameters(),
        heads=lambda ps: QuotientSGD(ps, lr=lr, momentum=0.9, nesterov=True),
        rest=lambda ps: _adamw(ps, QSGD_ADAMW_RATIO * lr),
    )


def _build_quotient_sgd_lazy(model: GPT, lr: float, setup: Setup) -> torch.optim.Optimizer:
    """quotient-sgd (as in ``quotientopt compare``) with the lazily refreshed metric."""
    optimizer = CONTENDERS["quotient-sgd"].build(list(model.parameters()), lr)
    for group in optimizer.param_groups:
        group["refresh_every"] = 8
    return optimizer


def _build_quotient_adam(model: GPT, lr: float, setup: Setup) -> torch.optim.Optimizer:
    if QuotientAdam is None:
        raise RuntimeError("quotientopt.optim.QuotientAdam is not importable")
    return HybridOptimizer.for_parameters(
        model.parameters(),
        heads=lambda ps: QuotientAdam(ps, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0),
        rest=lambda ps: _adamw(ps, QADAM_RATIO * lr),
    )


@dataclass(frozen=True)
class Method:
    """One optimizer of the benchmark: the model layout it trains, its lr grid and its builder."""

    name: str
    description: str
    quotient: bool  # attention heads as quotient ManifoldParameters (else nanoGPT's layout)
    symmetry_breaking: bool  # paper 003's unlearned query/value biases
    lr: float  # the lr used without tuning (--grid-steps 0)
    grid: tuple[float, ...]  # the learning rates tried on seed 0
    build: Callable[[GPT, float, Setup], torch.optim.Optimizer] = field(repr=False)


ADAMW_TEXT = "AdamW (betas (0.9, 0.99), weight decay 0.1)"

METHODS = {
    m.name: m
    for m in (
        Method(
            "sgd",
            CONTENDERS["sgd"].description,
            False,
            False,
            0.2,
            (0.05, 0.1, 0.2, 0.4),
            _plain("sgd"),
        ),
        Method(
            "adamw",
            CONTENDERS["adamw"].description,
            False,
            False,
            2e-3,
            (5e-4, 1e-3, 2e-3, 4e-3),
            _build_adamw,
        ),
        Method(
            "muon",
            "torch.optim.Muon (momentum 0.95, Nesterov, weight decay 0.1, adjust_lr_fn="
            f"match_rms_adamw) on the blocks' 2-D matrices (attention at the table's ratio x lr, "
            f"default 1), {ADAMW_TEXT} on the rest at lr",
            False,
            False,
            1.6e-2,
            (4e-3, 8e-3, 1.6e-2, 3.2e-2),
            _build_muon,
        ),
        Method(
            "muon-split-qkv",
            "torch.optim.Muon's step as muon, but on the query, key and value projections as three "
            "d x d matrices instead of the fused 3d x d one (attention at the table's ratio x lr, "
            f"default 1), {ADAMW_TEXT} on the rest at lr",
            False,
            False,
            1.6e-2,
            (4e-3, 8e-3, 1.6e-2, 3.2e-2),
            _build_muon_split_qkv,
        ),
        Method(
            "muon-per-head",
            "torch.optim.Muon's step on each head's factors separately (the quotient layout, no "
            "whitening by the partner factor; at the table's ratio x lr, default 1) and on the "
            f"blocks' other 2-D matrices, {ADAMW_TEXT} on the rest at lr",
            True,
            False,
            1.6e-2,
            (4e-3, 8e-3, 1.6e-2, 3.2e-2),
            _build_muon_per_head,
        ),
        Method(
            "quotient-muon",
            "QuotientMuon (momentum 0.95, Nesterov, weight decay 0.1, rms head scale, "
            "Newton-Schulz polar, all heads in one spectral norm) on the heads at the table's "
            "ratio x lr (default 0.2), torch Muon's step on the blocks' other "
            f"2-D matrices and {ADAMW_TEXT} on the rest at lr (quotientopt.optim.muon_and_adamw)",
            True,
            False,
            1.6e-2,
            (4e-3, 8e-3, 1.6e-2, 3.2e-2),
            _build_quotient_muon,
        ),
        Method(
            "breaking-sgd",
            CONTENDERS["breaking-sgd"].description,
            False,
            True,
            0.1,
            (0.05, 0.1, 0.2, 0.4),
            _plain("breaking-sgd"),
        ),
        Method(
            "breaking-adamw",
            CONTENDERS["adamw"].description + ", paper 003's symmetry-breaking biases",
            False,
            True,
            1e-3,
            (5e-4, 1e-3, 2e-3, 4e-3),
            _build_adamw,
        ),
        Method(
            "quotient-sgd",
            CONTENDERS["quotient-sgd"].description,
            True,
            False,
            2.5e-3,
            (1.25e-3, 2.5e-3, 5e-3, 1e-2),
            _plain("quotient-sgd"),
        ),
        Method(
            "quotient-sgd-lazy",
            CONTENDERS["quotient-sgd"].description
            + "; metric refreshed adaptively, at most every 8 steps (refresh_every=8)",
            True,
            False,
            2.5e-3,
            (1.25e-3, 2.5e-3, 5e-3, 1e-2),
            _build_quotient_sgd_lazy,
        ),
        Method(
            "quotient-sgd-adamw",
            f"QuotientSGD (Nesterov momentum 0.9) on the heads at lr, {ADAMW_TEXT} on the rest at "
            f"{QSGD_ADAMW_RATIO:g} lr",
            True,
            False,
            5e-3,
            (2.5e-3, 5e-3, 1e-2, 2e-2),
            _build_quotient_sgd_adamw,
        ),
        Method(
            "quotient-hamiltonian",
            CONTENDERS["quotient-hamiltonian"].description,
            True,
            False,
            0.06,
            (0.015, 0.03, 0.06, 0.12),
            _plain("quotient-hamiltonian"),
        ),
        Method(
            "quotient-adam",
            "QuotientAdam (betas (0.9, 0.999), eps 1e-8, no weight decay) on the heads at lr, "
            f"{ADAMW_TEXT} on the rest at {QADAM_RATIO:g} lr",
            True,
            False,
            4e-3,
            (2e-3, 4e-3, 8e-3, 1.6e-2),
            _build_quotient_adam,
        ),
    )
}


# --------------------------------------------------------------------------- one run


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the tensors in ``optimizer.state`` (both parts of a :class:`HybridOptimizer`)."""

    def size(obj: Any) -> int:
        if isinstance(obj, torch.Tensor):
            return obj.numel() * obj.element_size()
        if isinstance(obj, dict):
            return sum(size(v) for v in obj.values())
        if isinstance(obj, (list, tuple)):
            return sum(size(v) for v in obj)
        return 0

    parts = optimizer.optimizers if isinstance(optimizer, HybridOptimizer) else (optimizer,)
    return sum(size(state) for part in parts for state in part.state.values())


def lr_factor(step: int, steps: int, setup: Setup) -> float:
    """nanoGPT's ``get_lr`` as a multiplier of the base lr (1 for the constant schedule)."""
    if setup.schedule == "constant":
        return 1.0
    if step < setup.warmup:
        return (step + 1) / (setup.warmup + 1)
    ratio = (step - setup.warmup) / max(1, steps - setup.warmup)
    coeff = 0.5 * (1.0 + math.cos(math.pi * min(1.0, ratio)))
    return setup.min_lr_ratio + coeff * (1.0 - setup.min_lr_ratio)


@dataclass(frozen=True)
class Job:
    method: str
    lr: float
    seed: int
    steps: int
    curve: bool  # evaluate every setup.eval_every steps (else only at the end)
    ratio: float | None = None  # attention/head lr over MLP lr (None: the setup's)


_DATA: dict[str, torch.Tensor] = {}


def _init_worker(train: torch.Tensor, val: torch.Tensor) -> None:
    torch.set_num_threads(1)
    _DATA["train"], _DATA["val"] = train, val


def run_job(job: Job, setup: Setup, train: torch.Tensor, val: torch.Tensor) -> dict[str, Any]:
    """Train one GPT and return its validation losses, step times and optimizer state size."""
    method = METHODS[job.method]
    config = GPTConfig(
        block_size=setup.block_size,
        vocab_size=setup.vocab_size,
        n_layer=setup.n_layer,
        n_head=setup.n_head,
        n_embd=setup.n_embd,
        dropout=setup.dropout,
        bias=setup.bias,
        quotient=method.quotient,
        symmetry_breaking=method.symmetry_breaking,
    )
    if job.ratio is not None:
        setup = replace(setup, ratios=(*setup.ratios, (job.method, job.ratio)))
    torch.manual_seed(job.seed)
    model = GPT(config)
    optimizer = method.build(model, job.lr, setup)
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    eval_settings = Settings(
        batch_size=setup.batch_size, block_size=setup.block_size, eval_batches=setup.eval_batches
    )
    gen = torch.Generator().manual_seed(1000 + job.seed)
    curve: list[tuple[int, float]] = []
    times: list[float] = []
    train_losses: list[float] = []
    for step in range(job.steps + 1):
        if job.curve and (step % setup.eval_every == 0 or step == job.steps):
            curve.append((step, evaluate(model, val, eval_settings, "cpu")))
        if step == job.steps:
            break
        factor = lr_factor(step, job.steps, setup)
        for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
            group["lr"] = base * factor
        x, y = batches(train, setup.block_size, setup.batch_size, gen, "cpu")
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        _, loss = model(x, y)
        loss.backward()
        if setup.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), setup.grad_clip)
        optimizer.step()
        times.append(time.perf_counter() - start)
        train_losses.append(loss.item())
        if not math.isfinite(train_losses[-1]):
            break  # diverged: no point in training on
    val_loss = curve[-1][1] if curve and curve[-1][0] == job.steps else float("nan")
    if not job.curve and len(train_losses) == job.steps:
        val_loss = evaluate(model, val, eval_settings, "cpu")
    return {
        **asdict(job),
        "val_loss": val_loss if math.isfinite(val_loss) else float("inf"),
        "train_loss_last10": sum(train_losses[-10:]) / max(1, len(train_losses[-10:])),
        "curve": curve,
        "step_ms_median": 1e3 * statistics.median(times) if times else float("nan"),
        "optimizer_state_bytes": state_bytes(optimizer),
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def _worker_job(job: Job, setup: Setup) -> dict[str, Any]:
    return run_job(job, setup, _DATA["train"], _DATA["val"])


def run_all(
    jobs: Sequence[Job],
    setup: Setup,
    pool: ProcessPoolExecutor | None,
    train: torch.Tensor,
    val: torch.Tensor,
    label: str,
) -> list[dict[str, Any]]:
    """Run ``jobs`` (in the pool, or here one after another) and return results in job order."""
    start = time.perf_counter()
    results: list[dict[str, Any] | None] = [None] * len(jobs)

    def report(i: int, result: dict[str, Any], done: int) -> None:
        results[i] = result
        job = jobs[i]
        print(
            f"  [{label} {done}/{len(jobs)}, {time.perf_counter() - start:6.0f} s] {job.method} "
            f"lr={job.lr:g}{'' if job.ratio is None else f' ratio={job.ratio:g}'} "
            f"seed={job.seed}: val loss {result['val_loss']:.4f}, "
            f"{result['step_ms_median']:.1f} ms/step",
            flush=True,
        )

    if pool is None:
        for i, job in enumerate(jobs):
            report(i, run_job(job, setup, train, val), i + 1)
    else:
        futures = {pool.submit(_worker_job, job, setup): i for i, job in enumerate(jobs)}
        for done, future in enumerate(as_completed(futures), 1):
            report(futures[future], future.result(), done)
    return [r for r in results if r is not None]


# --------------------------------------------------------------------------- the report


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, std


def describe(name: str, setup: Setup) -> str:
    text = METHODS[name].description
    if METHODS[name].build is _build_adamw and setup.nanogpt_adamw:
        text += " on tensors of >= 2 dims only, none on biases and gains (nanoGPT)"
    if name == "quotient-muon" and setup.options:  # --option overrides the text above
        text += "; options: " + ", ".join(f"{key}={value}" for key, value in setup.options)
    return text


def summarize(
    names: Sequence[str],
    tuning: list[dict[str, Any]],
    finals: list[dict[str, Any]],
    best: dict[str, float],
    setup: Setup,
) -> list[dict[str, Any]]:
    rows = []
    for name in names:
        runs = [r for r in finals if r["method"] == name]
        losses = [r["val_loss"] for r in runs]
        mean, std = _mean_std(losses)
        grid = {
            r["lr"]: r["val_loss"] for r in tuning if r["method"] == name and r["ratio"] is None
        }
        lrs = sorted(grid)
        ratio_grid = sorted(
            [r["lr"], r["ratio"], r["val_loss"]]
            for r in tuning
            if r["method"] == name and r["ratio"] is not None
        )
        ratio = runs[0]["ratio"] if runs[0]["ratio"] is not None else setup.ratio(name)
        steps = [s for s, _ in runs[0]["curve"]]
        curve_mean, curve_std = [], []
        for k in range(len(steps)):
            points = [r["curve"][k][1] for r in runs if len(r["curve"]) > k]
            m, s = _mean_std(points)
            curve_mean.append(m)
            curve_std.append(s)
        rows.append(
            {
                "optimizer": name,
                "description": describe(name, setup),
                "best_lr": best[name],
                "grid": [[lr, grid[lr]] for lr in lrs],
                "best_at_grid_edge": _at_edge(best[name], ratio, lrs, ratio_grid),
                "ratio": ratio if name in DEFAULT_RATIOS else None,
                "ratio_grid": ratio_grid,
                "seeds": [r["seed"] for r in runs],
                "val_losses": losses,
                "val_loss_mean": mean,
                "val_loss_std": std,
                "train_loss_last10_mean": statistics.fmean(r["train_loss_last10"] for r in runs),
                "step_ms_median": statistics.median(r["step_ms_median"] for r in runs),
                "optimizer_state_bytes": runs[0]["optimizer_state_bytes"],
                "parameters": runs[0]["parameters"],
                "curve_steps": steps,
                "curve_mean": curve_mean,
                "curve_std": curve_std,
            }
        )
    return rows


def _at_edge(lr: float, ratio: float, lrs: list[float], ratio_grid: list[list[float]]) -> bool:
    """Whether the chosen lr (or, on a 2-D grid, the chosen ratio) is the first or last tried."""
    if ratio_grid:
        lrs = sorted({point[0] for point in ratio_grid})
        ratios = sorted({point[1] for point in ratio_grid})
        return (len(lrs) > 1 and lr in (lrs[0], lrs[-1])) or (
            len(ratios) > 1 and ratio in (ratios[0], ratios[-1])
        )
    return len(lrs) > 1 and lr in (lrs[0], lrs[-1])


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for row in rows:
        steps = row["curve_steps"]
        mean = torch.tensor(row["curve_mean"])
        std = torch.tensor(row["curve_std"])
        (line,) = ax.plot(steps, mean, label=row["optimizer"], linewidth=1.3)
        ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    finite = [v for row in rows for v in row["curve_mean"][1:] if math.isfinite(v)]
    if finite:  # the first points (ln vocab) would squash the interesting part
        low, high = min(finite), max(finite)
        ax.set_ylim(low - 0.05 * (high - low + 1e-3), high + 0.05 * (high - low + 1e-3))
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats/token), mean ± std over seeds")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def markdown(rows: list[dict[str, Any]], info: dict[str, Any], preset: str | None, png: str) -> str:
    s = info["setup"]
    tokens = info["steps"] * s["batch_size"] * s["block_size"]
    n_seeds = len(info["seeds"])
    tuned = info["grid_steps"] > 0
    lines = [
        f"# Language modelling: {info['data']}",
        "",
        f"GPT: {s['n_layer']} layers, {s['n_head']} heads, width {s['n_embd']}, context "
        f"{s['block_size']}, vocabulary {s['vocab_size']} ({info['vocab']}), dropout {s['dropout']:g}, "
        f"{'biases' if s['bias'] else 'no biases'}, {rows[0]['parameters']:,} parameters. "
        f"Token budget per final run: {info['steps']} steps x batch {s['batch_size']} x context "
        f"{s['block_size']} = {tokens:,} tokens. Schedule: {info['schedule_text']}. "
        f"Validation loss: mean cross-entropy (nats/token) on {s['eval_batches']} fixed batches of "
        f"the last 10% of the text (90/10 split by position), the same for every run.",
        "",
    ]
    if tuned:
        lines.append(
            f"Learning rate tuned on seed 0 over the grid below ({info['grid_steps']} steps per "
            f"point, by final validation loss); the best lr then ran {info['steps']} steps on "
            f"{n_seeds} fresh seeds {info['seeds']} (not the tuning seed). Std: sample standard "
            "deviation over those seeds. Hybrids tune one lr with a fixed ratio for the other part "
            "(see the descriptions)."
        )
    else:
        lines.append(
            f"No tuning: each optimizer ran at its stated lr on seeds {info['seeds']}."
            + (" Std: sample standard deviation over the seeds." if n_seeds > 1 else "")
        )
    lines.append("")
    ref = preset == "shakespeare-char-cpu"
    head = "| optimizer | best lr | val loss mean ± std (n seeds) | step time (ms, median) | optimizer state (MiB) |"
    rule = "|---|---:|---:|---:|---:|"
    if ref:
        head += " nanoGPT reference val loss |"
        rule += "---:|"
    lines += [head, rule]
    for row in sorted(rows, key=lambda r: r["val_loss_mean"]):
        ratio = "" if row["ratio"] is None else f" (attention {row['ratio']:g} x lr)"
        line = (
            f"| {row['optimizer']} | {row['best_lr']:g}{ratio} | {row['val_loss_mean']:.4f} ± "
            f"{row['val_loss_std']:.4f} ({len(row['seeds'])}) | {row['step_ms_median']:.1f} | "
            f"{row['optimizer_state_bytes'] / 2**20:.3f} |"
        )
        if ref:
            line += f" {NANOGPT_REFERENCE:.2f} |" if row["optimizer"] == "adamw" else " |"
        lines.append(line)
    if tuned:
        lines += [
            "",
            "Learning-rate grids (seed 0, validation loss; * = chosen; `lr x r`: lr with the "
            "attention/heads at r x lr):",
            "",
        ]
        lines += ["| optimizer | grid |", "|---|---|"]
        for row in rows:
            cells = ", ".join(
                f"{lr:g}: {loss:.4f}{'*' if lr == row['best_lr'] else ''}"
                for lr, loss in row["grid"]
            ) or ", ".join(
                f"{lr:g} x {ratio:g}: {loss:.4f}"
                f"{'*' if (lr, ratio) == (row['best_lr'], row['ratio']) else ''}"
                for lr, ratio, loss in row["ratio_grid"]
            )
            edge = " (best at the grid's edge: the optimum may lie outside)"
            lines.append(
                f"| {row['optimizer']} | {cells}{edge if row['best_at_grid_edge'] else ''} |"
            )
    lines += ["", "Optimizers:", ""]
    lines += [f"- **{row['optimizer']}**: {row['description']}" for row in rows]
    if ref:
        lines += [
            "",
            "The preset follows nanoGPT's CPU recipe for shakespeare_char (`python train.py "
            "config/train_shakespeare_char.py --device=cpu --compile=False --eval_iters=20 "
            "--log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 "
            "--max_iters=2000 --lr_decay_iters=2000 --dropout=0.0`), for which nanoGPT's README "
            f'reports "a loss of only {NANOGPT_REFERENCE}" (the validation loss it prints at '
            "iteration 2000, one run); here validation averages 200 fixed batches (the config's "
            "eval_iters) rather than the command line's 20 random ones. The model matches nanoGPT's "
            "(pre-LayerNorm, GELU, tied embeddings, learned positions, no biases, GPT-2 init).",
        ]
    lines += [
        "",
        f"Step time: median wall time of zero_grad + forward + backward + step, one torch thread "
        f"per run, up to {info['workers']} runs in parallel, so it includes the machine's load at the "
        f"time (whole benchmark: {info['wall_seconds'] / 60:.1f} min). Optimizer state: bytes of "
        "the tensors in optimizer.state (both parts of a hybrid), after training.",
        "",
        f"![mean validation loss against step]({png})",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- the command line

PRESETS: dict[str, dict[str, Any]] = {
    "shakespeare-char-cpu": {
        "optimizers": ["adamw", "muon", "quotient-muon", "quotient-adam", "quotient-sgd"],
        "seeds": 3,
        "steps": 2000,
        "grid_steps": 0,
        "n_layer": 4,
        "n_head": 4,
        "n_embd": 128,
        "block_size": 64,
        "batch_size": 12,
        "bias": False,
        "vocab": "compact",
        "eval_batches": 200,
        "eval_every": 250,
        "schedule": "cosine",
        "warmup": 100,
        "min_lr_ratio": 0.1,
        "grad_clip": 1.0,
        "nanogpt_adamw": True,
        "lr": ["adamw=1e-3"],
    }
}

DEFAULTS: dict[str, Any] = {
    "optimizers": list(METHODS),
    "seeds": 5,
    "steps": 400,
    "grid_steps": 400,
    "n_layer": 2,
    "n_head": 4,
    "n_embd": 64,
    "block_size": 64,
    "batch_size": 16,
    "bias": True,
    "vocab": "bytes",
    "eval_batches": 20,
    "eval_every": 40,
    "schedule": "constant",
    "warmup": 0,
    "min_lr_ratio": 0.1,
    "grad_clip": 0.0,
    "nanogpt_adamw": False,
    "lr": [],
}


def _named_values(
    parser: argparse.ArgumentParser,
    option: str,
    items: Sequence[str],
    names: Sequence[str] | dict[str, Any],
    several: bool,
) -> dict[str, Any]:
    """``{name: value}`` from ``NAME=NUMBER`` items, or (``several``) ``{name: sorted tuple of
    positive numbers}`` from ``NAME=NUMBER,NUMBER,...`` items; a parser error names a bad one."""
    parsed: dict[str, Any] = {}
    for item in items:
        name, _, text = item.partition("=")
        if name not in names:
            parser.error(f"{option} names {name!r}; choose from {', '.join(names)}")
        try:
            value = tuple(sorted(float(v) for v in text.split(","))) if several else float(text)
        except ValueError:
            parser.error(
                f"{option} {item!r}: expected NAME=NUMBER{',NUMBER,...' if several else ''}"
            )
        if several and min(value) <= 0:
            parser.error(f"{option} {item!r}: the values must be positive")
        parsed[name] = value
    return parsed


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    add = parser.add_argument
    add("--preset", choices=sorted(PRESETS), help="a published configuration (see the docstring)")
    add("--data", help="a UTF-8 text file (default: the embedded standard-library corpus)")
    add("--optimizers", nargs="+", choices=list(METHODS), help="default: all")
    add("--seeds", type=int, help="final runs per optimizer, on seeds 1..N (default 5)")
    add(
        "--first-seed",
        type=int,
        default=1,
        help="final runs on seeds F..F+N-1 (default 1; "
        "0 = the tuning seed, for ablations of a pinned lr)",
    )
    add("--steps", type=int, help="training steps of a final run (default 400)")
    add("--grid-steps", type=int, help="steps of a tuning run; 0: no tuning (default 400)")
    add("--lr", nargs="+", metavar="NAME=LR", help="pin an optimizer's lr (skips its tuning)")
    add("--grid", nargs="+", metavar="NAME=LR,LR,...", help="replace an optimizer's lr grid")
    add("--n-layer", type=int)
    add("--n-head", type=int)
    add("--n-embd", type=int)
    add("--block-size", type=int, help="context length")
    add("--batch-size", type=int)
    add("--vocab", choices=["bytes", "compact"], help="bytes: 256; compact: the bytes in the text")
    add("--eval-batches", type=int, help="validation batches per estimate (default 20)")
    add("--eval-every", type=int, help="steps between points of the validation curve")
    add("--schedule", choices=["constant", "cosine"])
    add("--warmup", type=int)
    add("--grad-clip", type=float)
    add(
        "--ratio",
        nargs="+",
        metavar="NAME=R",
        default=[],
        help="attention/head lr over MLP lr for muon, muon-split-qkv, muon-per-head, quotient-muon",
    )
    add(
        "--ratio-grid",
        nargs="+",
        metavar="NAME=R,R,...",
        default=[],
        help="tune the attention/head lr ratio of the Muon family jointly with "
        "the lr (every pair runs on seed 0)",
    )
    add(
        "--option",
        nargs="+",
        metavar="KEY=VALUE",
        default=[],
        help="options of quotient-muon's muon_and_adamw (head_norm=per-head, polar=eigh, "
        "head_weight_decay=1)",
    )
    add("--workers", type=int, default=min(2, os.cpu_count() or 1))
    add("--out", default=str(HERE / "results"), help="results folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    merged = {**DEFAULTS, **(PRESETS[args.preset] if args.preset else {})}
    for key, value in merged.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    for key in ("seeds", "steps", "n_layer", "n_head", "n_embd", "block_size", "batch_size"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be a positive integer")
    if args.grid_steps < 0 or args.eval_batches < 1 or args.eval_every < 1 or args.workers < 0:
        parser.error("--grid-steps, --workers must be >= 0 and --eval-batches, --eval-every >= 1")
    if args.n_embd % args.n_head:
        parser.error("--n-embd must be divisible by --n-head")
    args.pinned = _named_values(parser, "--lr", args.lr, METHODS, several=False)
    args.grids = _named_values(parser, "--grid", args.grid or [], METHODS, several=True)
    args.ratios = tuple(
        _named_values(parser, "--ratio", args.ratio, DEFAULT_RATIOS, several=False).items()
    )
    args.ratio_grids = _named_values(
        parser, "--ratio-grid", args.ratio_grid, DEFAULT_RATIOS, several=True
    )
    args.options = tuple(tuple(item.split("=", 1)) for item in args.option)
    if any(len(o) != 2 for o in args.options):
        parser.error("--option expects KEY=VALUE")
    return args


def load_tokens(
    args: argparse.Namespace,
) -> tuple[torch.Tensor, torch.Tensor, int, str, str]:
    """(train, val, vocab size, data description, vocabulary description)."""
    if args.data:
        text, source = read_text_file(args.data), Path(args.data).name
    else:
        text, source = stdlib_text(), "the embedded corpus (Python standard library sources, 2 MB)"
    train, val = split_corpus(text, args.block_size, args.batch_size)
    if args.vocab == "bytes":
        return train, val, 256, source, "UTF-8 bytes"
    # the bytes occurring in the text, renumbered: nanoGPT's character vocabulary for ASCII text
    present = torch.unique(torch.cat((train, val)))
    table = torch.full((256,), -1, dtype=torch.long)
    table[present] = torch.arange(len(present))
    return (
        table[train],
        table[val],
        len(present),
        source,
        "the distinct bytes of the text (= its characters when it is ASCII)",
    )


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    wall = time.perf_counter()
    names = list(dict.fromkeys(args.optimizers))
    if "quotient-adam" in names and QuotientAdam is None:
        print("note: quotientopt.optim.QuotientAdam is not importable; skipping quotient-adam")
        names.remove("quotient-adam")
    if not names:
        raise SystemExit("no optimizer left to run")
    train, val, vocab_size, source, vocab_text = load_tokens(args)
    setup = Setup(
        n_layer=args.n_layer,
        n_head=args.n_head,
        n_embd=args.n_embd,
        block_size=args.block_size,
        batch_size=args.batch_size,
        vocab_size=vocab_size,
        bias=args.bias,
        eval_batches=args.eval_batches,
        eval_every=args.eval_every,
        schedule=args.schedule,
        warmup=args.warmup,
        min_lr_ratio=args.min_lr_ratio,
        grad_clip=args.grad_clip,
        nanogpt_adamw=args.nanogpt_adamw,
        ratios=args.ratios,
        options=args.options,
    )
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    tune = {
        n: args.grids.get(n, METHODS[n].grid)
        for n in names
        if args.grid_steps > 0 and n not in args.pinned
    }
    ratio_grids = {n: args.ratio_grids.get(n, (None,)) for n in tune}
    print(
        f"{len(names)} optimizers on {source}: "
        f"{sum(len(g) * len(ratio_grids[n]) for n, g in tune.items())} tuning runs of "
        f"{args.grid_steps} steps, then {len(names) * len(seeds)} runs of {args.steps} steps; "
        f"{args.workers} workers",
        flush=True,
    )
    pool = None
    if args.workers > 1:
        pool = ProcessPoolExecutor(
            args.workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(train, val),
        )
    else:
        torch.set_num_threads(1)
    try:
        jobs = [
            Job(n, lr, 0, args.grid_steps, curve=False, ratio=ratio)
            for n, grid in tune.items()
            for lr in grid
            for ratio in ratio_grids[n]
        ]
        tuning = run_all(jobs, setup, pool, train, val, "tune") if jobs else []
        best, best_ratio = {}, {}
        for n in names:
            if n in tune:
                runs = [r for r in tuning if r["method"] == n]
                chosen = min(runs, key=lambda r: (r["val_loss"], r["lr"], r["ratio"] or 0.0))
                best[n], best_ratio[n] = chosen["lr"], chosen["ratio"]
            else:
                best[n] = args.pinned.get(n, METHODS[n].lr)
        jobs = [
            Job(n, best[n], seed, args.steps, curve=True, ratio=best_ratio.get(n))
            for n in names
            for seed in seeds
        ]
        finals = run_all(jobs, setup, pool, train, val, "final")
    finally:
        if pool is not None:
            pool.shutdown()
    rows = summarize(names, tuning, finals, best, setup)
    name = "language_model" + (f"-{args.preset}" if args.preset else "")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    schedule_text = (
        "constant lr"
        if setup.schedule == "constant"
        else f"{setup.warmup} warmup steps, cosine decay to {setup.min_lr_ratio:g} x lr at the last step"
    )
    if setup.grad_clip > 0:
        schedule_text += f", gradient norm clipped to {setup.grad_clip:g}"
    info = {
        "data": source,
        "vocab": vocab_text,
        "preset": args.preset,
        "setup": asdict(setup),
        "steps": args.steps,
        "grid_steps": args.grid_steps,
        "seeds": seeds,
        "tokens_per_run": args.steps * setup.batch_size * setup.block_size,
        "workers": args.workers,
        "schedule_text": schedule_text,
        "wall_seconds": time.perf_counter() - wall,
    }
    png = f"{name}.png"
    title = (
        f"{source}: {setup.n_layer}x{setup.n_embd} GPT, {info['tokens_per_run']:,} tokens, "
        f"{len(seeds)} seed{'s' if len(seeds) != 1 else ''}"
    )
    plot(rows, out / png, title)
    data = {**info, "rows": rows, "tuning_runs": tuning, "final_runs": finals}
    if args.preset == "shakespeare-char-cpu":
        data["nanogpt_reference_val_loss"] = NANOGPT_REFERENCE
    json_path, md_path = write_report(out, name, markdown(rows, info, args.preset, png), data)
    print(markdown(rows, info, args.preset, png).split("\n\n![")[0])
    print(f"\nwrote {json_path}, {md_path}, {out / png} in {info['wall_seconds']:.0f} s")
    return data


if __name__ == "__main__":
    main()
