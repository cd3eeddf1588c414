r"""Log the symmetry diagnostics of a training run to TensorBoard.

>>> monitor = SymmetryMonitor(model, optimizer, "runs/adamw", every=50)
>>> for batch in data:
...     loss = model(batch).loss
...     loss.backward()
...     optimizer.step()          # the monitor hooks into step(): nothing else to call
...     optimizer.zero_grad()
...     monitor.log_loss(loss)     # optional: the training loss, and the energy of Hamiltonian runs
>>> monitor.close()

Every ``every`` steps it snapshots the attention sectors before ``optimizer.step()`` and, after
it, logs per sector (mean over heads; ``per_head=True`` adds every head):

* ``charge_norm`` and ``charge_drift`` of :math:`C = A^T A - B^T B`, the drift
  :math:`\|C - C_0\| / (\|A_0^T A_0\| + \|B_0^T B_0\|)` relative to the starting Grams;
* ``momentum_map/skew`` (optimizers with a Euclidean momentum: torch SGD's buffer, Adam's first
  moment) or ``momentum_map/metric`` (quotientopt's optimizers: the pairing of their velocity
  with the orbit in the preconditioned metric), relative to the momentum's size;
* ``vertical_fraction/euclidean`` and ``vertical_fraction/preconditioned`` of the update;
* ``cond_product``, ``cond_gram_a``, ``cond_gram_b``, ``effective_rank``: conditioning;
* with a ``probe`` input: ``attention_entropy`` and attention-pattern images (every histogram step);

plus ``summary/...`` averages over all sectors (the tags to compare runs on), histograms of the
per-head values, ``energy`` for :class:`~quotientopt.optim.QuotientHamiltonian`, and a custom-scalars
layout that puts the same quantity of every run on one chart.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter

from quotientopt.optim import HybridOptimizer, QuotientHamiltonian, QuotientSGD
from quotientopt.symmetry import (
    charge,
    conditioning,
    find_sectors,
    momentum_map,
    velocity_momentum_map,
    vertical_fraction,
)

__all__ = ["SymmetryMonitor"]

MOMENTUM_KEYS = ("momentum_buffer", "velocity", "exp_avg")
LAYOUT = {
    "symmetry": {
        "charge drift": ["Multiline", [r"summary/charge_drift"]],
        "momentum map": ["Multiline", [r"summary/momentum_map.*"]],
        "vertical fraction": ["Multiline", [r"summary/vertical_fraction.*"]],
        "conditioning": ["Multiline", [r"summary/cond_product", r"summary/effective_rank"]],
    },
    "training": {"loss": ["Multiline", [r"loss/.*"]], "energy": ["Multiline", [r"energy"]]},
}


def _owner(optimizer: torch.optim.Optimizer, p: torch.Tensor) -> torch.optim.Optimizer:
    if isinstance(optimizer, HybridOptimizer):
        for child in optimizer.optimizers:
            if any(p is q for g in child.param_groups for q in g["params"]):
                return child
    return optimizer


def _causal_at(model: torch.nn.Module, path: str) -> bool | None:
    """:func:`_causal` for the module at ``path``; a quotient module inside the reference GPT's
    attention wrapper is causal like the wrapper."""
    from quotientopt.models.gpt import QuotientCausalSelfAttention

    module = model.get_submodule(path) if path else model
    parent_path = path.rpartition(".")[0]
    parent = model.get_submodule(parent_path) if path and parent_path else (model if path else None)
    if isinstance(parent, QuotientCausalSelfAttention):
        return _causal(parent)
    return _causal(module)


def _causal(module: torch.nn.Module) -> bool | None:
    """True for causal self-attention, False for unmasked attention, None if the patterns cannot
    be computed from the factors alone (RoPE, QK-norm, symmetry breaking)."""
    from quotientopt.models.gpt import CausalSelfAttention, QuotientCausalSelfAttention
    from quotientopt.nn import QuotientMultiheadAttention

    config = getattr(module, "config", None)
    if isinstance(module, (CausalSelfAttention, QuotientCausalSelfAttention)):
        return None if (config.rope or config.qk_norm or config.symmetry_breaking) else True
    if isinstance(module, QuotientMultiheadAttention):
        return None if (module.rope or module.qk_norm or module.breaking is not None) else False
    if isinstance(module, torch.nn.MultiheadAttention):
        return False
    return None


@torch.no_grad()
def attention_patterns(model: torch.nn.Module, probe) -> dict[str, torch.Tensor]:
    """Attention weights ``(batch, heads, length, length)`` of every self-attention module that
    :func:`find_sectors` reads, recomputed from its QK factors on the input that ``model(probe)``
    feeds it (causal for the reference GPT; unmasked for ``MultiheadAttention``, whose masks are
    not known here). Modules with RoPE, QK-norm or symmetry-breaking biases are left out."""
    sectors = {s.path: s for s in find_sectors(model) if s.kind == "QK"}
    inputs: dict[str, torch.Tensor] = {}
    hooks = []
    for path in sectors:
        module = model.get_submodule(path) if path else model
        if _causal_at(model, path) is None:
            continue

        def grab(mod, args, path=path):
            x = args[0]
            if not getattr(mod, "batch_first", True) and x.dim() == 3:
                x = x.transpose(0, 1)
            inputs[path] = x.detach()

        hooks.append(module.register_forward_pre_hook(grab))
    was_training = model.training
    model.eval()  # no dropout, no resampled biases: the probe must not consume the training RNG
    try:
        model(*probe) if isinstance(probe, tuple) else model(probe)
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    patterns = {}
    for path, x in inputs.items():
        a, b = sectors[path].pair()
        k = sectors[path].head_dim
        heads = a.shape[0] * (a.shape[1] // b.shape[1]) if a.shape[1] != b.shape[1] else a.shape[0]
        a = a.reshape(heads, -1, k)
        b = b.repeat_interleave(heads // b.shape[0], 0)
        x = x.to(a.dtype)
        if a.shape[1] == x.shape[-1] + 1:  # bias rows
            x = torch.cat((x, torch.ones_like(x[..., :1])), dim=-1)
        q = torch.einsum("bld,hdk->bhlk", x, a)
        key = torch.einsum("bld,hdk->bhlk", x, b)
        scores = q @ key.transpose(-1, -2) / k**0.5
        if _causal_at(model, path):
            length = scores.shape[-1]
            scores = scores.masked_fill(
                torch.ones(length, length, dtype=torch.bool).triu(1), float("-inf")
            )
        patterns[path] = scores.softmax(-1)
    return patterns


class SymmetryMonitor:
    """See the module docstring. ``logdir_or_writer``: a folder for a new ``SummaryWriter`` or a
    writer to use; ``every``: log every this many optimizer steps (>= 1); ``histogram_every``:
    histograms every this many steps (default ``10 * every``); ``probe``: model input(s) on which
    the attention entropy and pattern images are computed at every histogram step (see
    :func:`attention_patterns`); ``loss_every``: losses are averaged over and written every this
    many :meth:`log_loss` calls (default 10)."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        logdir_or_writer: str | Path | SummaryWriter,
        every: int = 50,
        *,
        per_head: bool = False,
        histogram_every: int | None = None,
        probe: tuple | torch.Tensor | None = None,
        loss_every: int = 10,
    ) -> None:
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"SymmetryMonitor: every must be an int >= 1, got {every!r}")
        self.model, self.optimizer, self.every, self.per_head = model, optimizer, every, per_head
        self.histogram_every = histogram_every or 10 * every  # histograms cost half of a log
        self.probe = probe
        if not isinstance(loss_every, int) or loss_every < 1:
            raise ValueError(f"SymmetryMonitor: loss_every must be an int >= 1, got {loss_every!r}")
        self.loss_every = loss_every
        self.writer = (
            logdir_or_writer
            if isinstance(logdir_or_writer, SummaryWriter)
            else SummaryWriter(str(logdir_or_writer))
        )
        self.sectors = find_sectors(model)
        if not self.sectors:
            raise ValueError(
                "SymmetryMonitor: found no attention module in the model (supported: torch "
                "MultiheadAttention, quotientopt's modules, the reference GPT, HF GPT-2 and BERT)"
            )
        self.initial = {}  # charge and Gram scale ||A^T A|| + ||B^T B|| at the start
        for s in self.sectors:
            a, b = s.pair()
            scale = torch.linalg.matrix_norm(a.double().mT @ a.double()) + torch.linalg.matrix_norm(
                b.double().mT @ b.double()
            )
            self.initial[s.name] = (charge(a, b), scale)
        self.steps = 0
        self.last_loss: float | None = None
        self._loss_window: dict[str, tuple[torch.Tensor | None, int]] = {}
        self.history: dict[str, list[tuple[int, float]]] = defaultdict(list)
        self._snapshot: dict[int, torch.Tensor] | None = None
        self.writer.add_custom_scalars(LAYOUT)
        self._hooks = [
            optimizer.register_step_pre_hook(lambda *_: self._before_step()),
            optimizer.register_step_post_hook(lambda *_: self._after_step()),
        ]

    # ---------------------------------------------------------------------------- hooks
    def _due(self) -> bool:
        return self.steps % self.every == 0

    def _before_step(self) -> None:
        if self._due():
            self._snapshot = {id(p): p.detach().clone() for s in self.sectors for p in s.parameters}

    def _after_step(self) -> None:
        if self._snapshot is not None:
            self.log_diagnostics(self._snapshot)
            self._snapshot = None
        self.steps += 1

    # ---------------------------------------------------------------------------- logging
    def _scalar(self, tag: str, value: float) -> None:
        self.writer.add_scalar(tag, value, self.steps)
        self.history[tag].append((self.steps, value))

    def _momentum(self, sector) -> tuple[str, torch.Tensor] | None:
        p0 = sector.parameters[0]
        owner = _owner(self.optimizer, p0)
        state = owner.state.get(p0, {})
        key = next(
            (k for k in MOMENTUM_KEYS if k in state and isinstance(state[k], torch.Tensor)), None
        )
        if key is None:
            return None
        pair = sector.pair(lambda p: owner.state.get(p, {}).get(key))
        if pair is None:
            return None
        a, b = sector.pair()
        metric = sector.manifold is not None and isinstance(
            owner, (QuotientSGD, QuotientHamiltonian)
        )
        j = velocity_momentum_map(a, b, *pair) if metric else momentum_map(a, b, *pair)
        scale = (
            momentum_map(a, b, *pair).abs().amax((-1, -2)) if metric else j.abs().amax((-1, -2))
        ).clamp_min(1e-300)
        if metric:
            return "metric", j.abs().amax((-1, -2)) / scale
        return "skew", (0.5 * (j - j.mT)).abs().amax((-1, -2)) / scale

    @torch.no_grad()
    def log_diagnostics(self, snapshot: dict[int, torch.Tensor] | None = None) -> dict[str, float]:
        """Compute and log every diagnostic now; ``snapshot`` (parameter id -> value before the
        step) adds the vertical fractions of the update. Returns the summary values."""
        totals: dict[str, list[float]] = defaultdict(list)
        for sector in self.sectors:
            a, b = sector.pair()
            values: dict[str, torch.Tensor] = {}
            c = charge(a, b)
            c0, scale = self.initial[sector.name]
            values["charge_norm"] = torch.linalg.matrix_norm(c)
            values["charge_drift"] = torch.linalg.matrix_norm(c - c0) / scale.clamp_min(1e-300)
            momentum = self._momentum(sector)
            if momentum is not None:
                values[f"momentum_map_{momentum[0]}"] = momentum[1]
            if snapshot is not None:
                before = sector.pair(lambda p: snapshot[id(p)])
                d_a, d_b = a - before[0], b - before[1]
                for metric in ("euclidean", "preconditioned"):
                    values[f"vertical_fraction_{metric}"] = vertical_fraction(
                        *before, d_a, d_b, metric
                    )
            values.update(conditioning(a, b))
            for key, per_head in values.items():
                mean = float(per_head.mean())
                self._scalar(f"{key}/{sector.name}", mean)
                totals[key].append(mean)
                if self.per_head:
                    for h, v in enumerate(per_head.tolist()):
                        self._scalar(f"{key}/{sector.name}/head{h}", v)
                if self.steps % self.histogram_every == 0:
                    # tensorboard's TensorFlow-style buckets end at 1e20: larger values (a run
                    # blowing up) would leave every bucket empty, which its writer rejects
                    finite = per_head[torch.isfinite(per_head) & (per_head.abs() < 1e20)]
                    if finite.numel():
                        self.writer.add_histogram(f"{key}/{sector.name}", finite, self.steps)
        if self.probe is not None and self.steps % self.histogram_every == 0:
            for path, weights in attention_patterns(self.model, self.probe).items():
                entropy = (
                    -(weights * weights.clamp_min(1e-30).log()).sum(-1).mean((0, 2))
                )  # per head
                self._scalar(f"attention_entropy/{path}", float(entropy.mean()))
                totals["attention_entropy"].append(float(entropy.mean()))
                image = weights[0] / weights[0].amax((-1, -2), keepdim=True).clamp_min(1e-30)
                self.writer.add_images(
                    f"attention/{path}", image[:, None], self.steps, dataformats="NCHW"
                )
        summary = {key: sum(v) / len(v) for key, v in totals.items()}
        for key, value in summary.items():
            self._scalar(f"summary/{key}", value)
        if isinstance(self.optimizer, QuotientHamiltonian) and self.last_loss is not None:
            self._scalar("energy", float(self.optimizer.kinetic_energy()) + self.last_loss)
        return summary

    def log_loss(self, loss: torch.Tensor | float, tag: str = "train") -> None:
        """Record a loss. It is averaged over ``loss_every`` calls on the device and written then
        (one synchronisation per ``loss_every`` steps; reading and writing a scalar every step cost
        about 3% of a small model's training time). For QuotientHamiltonian the loss of every
        step is read, since the energy needs it."""
        value = loss.detach() if isinstance(loss, torch.Tensor) else torch.tensor(float(loss))
        if isinstance(self.optimizer, QuotientHamiltonian):
            self.last_loss = float(value)
        total, count = self._loss_window.get(tag, (None, 0))
        total, count = (value if total is None else total + value), count + 1
        if count >= self.loss_every:
            mean = float(total) / count
            if tag == "train" and not isinstance(self.optimizer, QuotientHamiltonian):
                self.last_loss = mean
            self._scalar(f"loss/{tag}", mean)
            self._loss_window.pop(tag, None)
        else:
            self._loss_window[tag] = (total, count)

    def close(self, hparams: dict | None = None) -> None:
        """Write ``hparams`` with the final summary values, flush and close the writer."""
        if hparams:
            metrics = {
                f"final/{tag}": points[-1][1]
                for tag, points in self.history.items()
                if tag.startswith(("summary/", "loss/"))
            }
            self.writer.add_hparams(hparams, metrics, run_name=".")
        for hook in self._hooks:
            hook.remove()
        self.writer.flush()
        self.writer.close()
