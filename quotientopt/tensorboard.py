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
* the momentum map of the optimizer's momentum, which the monitor asks for
  (:func:`~quotientopt.optim.momentum_of`: the optimizer's own ``momentum(p)``, or torch's
  ``momentum_buffer``/``exp_avg``): ``momentum_map_skew`` for a Euclidean momentum
  (``"covector"``: torch SGD's buffer, Adam's first moment), the skew part of
  :math:`A^\top m_A - m_B^\top B` relative to the whole; ``momentum_map_metric`` for a tangent
  vector of the sector's head geometry (``"vector"``: QuotientSGD's buffer, QuotientAdam's first
  moment, QuotientHamiltonian's velocity), the geometry's own ``momentum_map`` as
  :func:`metric_momentum_alignment` (0 exactly when the momentum is horizontal);
* ``vertical_fraction/euclidean`` and ``vertical_fraction/preconditioned`` of the update;
* ``cond_product``, ``cond_gram_a``, ``cond_gram_b``, ``effective_rank``: conditioning;
* with a ``probe`` input: ``attention_entropy`` and attention-pattern images (every histogram step);

plus ``summary/...`` averages over all sectors (the tags to compare runs on), histograms of the
per-head values, ``energy`` (kinetic plus the last loss) for optimizers with a
``kinetic_energy()`` method (:class:`~quotientopt.optim.QuotientHamiltonian`), and a
custom-scalars layout that puts the same quantity of every run on one chart.

Sectors are found through the attention registry (:mod:`quotientopt.nn.adapters`) and named
by the outermost registered attention module (``charge_drift/h.0.attn.QK``), so the tags are the
same for the standard and the quotient layout of one architecture and for every optimizer: runs
overlay. Non-finite weights (a diverging run) are logged as NaN for the heads concerned; the
monitor never raises on them.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter

from quotientopt.manifolds.protocol import HeadGeometry
from quotientopt.nn.adapters import PatternRecipe, Sector, attention_modules, registered_types
from quotientopt.nn.rope import apply_rope, rms_normalize
from quotientopt.optim import momentum_of
from quotientopt.symmetry import (
    charge,
    conditioning,
    find_sectors,
    momentum_map,
    vertical_fraction,
)

__all__ = ["SymmetryMonitor", "attention_patterns", "metric_momentum_alignment"]

LAYOUT = {
    "symmetry": {
        "charge drift": ["Multiline", [r"summary/charge_drift"]],
        "momentum map": ["Multiline", [r"summary/momentum_map.*"]],
        "vertical fraction": ["Multiline", [r"summary/vertical_fraction.*"]],
        "conditioning": ["Multiline", [r"summary/cond_product", r"summary/effective_rank"]],
    },
    "training": {"loss": ["Multiline", [r"loss/.*"]], "energy": ["Multiline", [r"energy"]]},
}


# ------------------------------------------------------------------------ non-finite guards
def _finite_groups(*tensors: torch.Tensor) -> torch.Tensor:
    """Per group (leading dimension) of ``(groups, rows, k)`` tensors: whether every entry and
    every entry of the float64 Gram :math:`X^T X` is finite (huge finite weights overflow it)."""
    ok = torch.ones(tensors[0].shape[0], dtype=torch.bool, device=tensors[0].device)
    for t in tensors:
        t = t.detach().double()
        ok &= torch.isfinite(t).flatten(1).all(-1) & torch.isfinite(t.mT @ t).flatten(1).all(-1)
    return ok


def _benign(t: torch.Tensor, ok: torch.Tensor, zero: bool = False) -> torch.Tensor:
    """``t`` (groups, rows, k) with the groups where ``ok`` is False replaced by a well-conditioned
    stand-in (row ``i`` the unit vector ``e_{i mod k}``: any ``k`` consecutive rows have full
    rank, so both factors of a stacked pair do; zeros with ``zero``), so that the linear algebra
    of the healthy groups can run; their results are masked afterwards."""
    if bool(ok.all()):
        return t
    rows, k = t.shape[-2:]
    eye = torch.eye(k, dtype=t.dtype, device=t.device)
    stand_in = torch.zeros_like(t[0]) if zero else eye[torch.arange(rows, device=t.device) % k]
    return torch.where(ok[:, None, None], t, stand_in.expand_as(t))


_WARNED: set[str] = set()


def _guarded(
    keys: tuple[str, ...], ok: torch.Tensor, compute: Callable[[], dict[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """``compute()`` with the values of groups where ``ok`` is False set to NaN; a linear-algebra
    failure left over (non-converging ``eigh`` on finite but extreme input) gives NaN for every
    group of this diagnostic and one warning, never an exception: a diverging run must not
    abort the training loop that logs it."""
    try:
        values = compute()
    except torch.linalg.LinAlgError as error:
        name = ", ".join(keys)
        if name not in _WARNED:
            _WARNED.add(name)
            warnings.warn(
                f"SymmetryMonitor: {name} could not be computed ({error}); logged as NaN. "
                "The weights are probably diverging: lower the learning rate.",
                RuntimeWarning,
                stacklevel=4,
            )
        return {key: torch.full(ok.shape, torch.nan, dtype=torch.float64) for key in keys}
    return {key: torch.where(ok.to(v.device), v, torch.nan) for key, v in values.items()}


# ------------------------------------------------------------------------------- momentum
def metric_momentum_alignment(
    geometry: HeadGeometry, z: torch.Tensor, v: torch.Tensor
) -> torch.Tensor:
    r"""How far a tangent vector ``v`` at ``z`` (both ``(groups, n + m, k)``) leans along the
        orbit, per group, in ``[0, 1]``, through the geometry's own momentum map :math:`J`
        (``geometry.momentum_map``, the ``k x k`` matrix with :math:`g(v, V(E)) = \langle J,
        E
    angle_F`): the cosine in the metric between ``v`` and the orbit direction
        :math:`V(J) = (A J, -B J^\top)` that :math:`J` points along,

        .. math:: \frac{g(v, V(J))}{\|v\|_g \|V(J)\|_g} = \frac{\|J\|_F^2}{\|v\|_g \|V(J)\|_g}.

        It is 0 exactly when ``v`` is horizontal, scale-free (relative to the size of ``v`` and of
        the orbit) and unchanged by the group. Groups with ``v = 0`` give 0. Computed in ``z``'s
        dtype (pass float64 for a measurement)."""
    grams = geometry.grams(z, check=False)  # rank-deficient heads give NaN, not an exception
    j = geometry.momentum_map(z, v, grams=grams)
    w = geometry.right_multiply(z, j, -j.mT)
    numerator = geometry.inner(z, v, w, grams=grams)
    denominator = geometry.inner(z, v, v, grams=grams) * geometry.inner(z, w, w, grams=grams)
    denominator = denominator.clamp_min(0).sqrt()
    return torch.where(
        denominator > 0,
        numerator.abs() / denominator.clamp_min(1e-300),
        torch.zeros_like(numerator),
    )


# ------------------------------------------------------------------------------- patterns
def _recompute(recipe: PatternRecipe, sector: Sector, x: torch.Tensor) -> torch.Tensor:
    """Attention weights ``(batch, heads, length, length)`` of ``recipe`` from the QK sector's
    factors and the module's input ``x`` (batch, length, E)."""
    a, b = sector.pair()
    k = sector.head_dim
    heads = a.shape[0] * (a.shape[1] // b.shape[1]) if a.shape[1] != b.shape[1] else a.shape[0]
    a = a.reshape(heads, -1, k)
    b = b.repeat_interleave(heads // b.shape[0], 0)
    x = x.to(a.dtype)
    if a.shape[1] == x.shape[-1] + 1:  # bias rows
        x = torch.cat((x, torch.ones_like(x[..., :1])), dim=-1)
    q = torch.einsum("bld,hdk->bhlk", x, a)
    key = torch.einsum("bld,hdk->bhlk", x, b)
    if recipe.qk_norm:
        q, key = rms_normalize(q), rms_normalize(key)
    if recipe.rope:
        q, key = apply_rope(q, recipe.rope_base), apply_rope(key, recipe.rope_base)
    if recipe.breaking is not None:  # called in eval mode: the biases at their evaluation value
        q = q + recipe.breaking(q)[0]
    scaling = k**-0.5 if recipe.scaling is None else recipe.scaling
    scores = q @ key.transpose(-1, -2) * scaling
    if recipe.causal:
        length = scores.shape[-1]
        mask = torch.ones(length, length, dtype=torch.bool, device=scores.device).triu(1)
        scores = scores.masked_fill(mask, float("-inf"))
    return scores.softmax(-1)


@torch.no_grad()
def attention_patterns(model: torch.nn.Module, probe) -> dict[str, torch.Tensor]:
    """Attention weights ``(batch, heads, length, length)`` of every self-attention module in the
    attention registry (:mod:`quotientopt.nn.adapters`), keyed by its path, recomputed from its
    QK factors on the input that ``model(probe)`` feeds it (in eval mode), following the
    adapter's :class:`~quotientopt.nn.PatternRecipe`: causal for the reference GPT and GPT-2,
    RoPE, QK-norm and paper 003's query bias applied as the module applies them; masks passed at
    call time (padding, ``MultiheadAttention``'s ``attn_mask``) are not known here. Modules
    whose adapter gives no recipe (composite or fixed-rank QK sectors, cross-attention) are left
    out."""
    found: dict[str, tuple[PatternRecipe, Sector]] = {}
    for path, module, adapter in attention_modules(model, "patterns"):
        recipe = adapter.patterns(module)
        qk = [s for s in adapter.sectors(path, module) if s.kind == "QK"] if adapter.sectors else []
        if recipe is not None and qk:
            found[path] = (recipe, qk[0])
    inputs: dict[str, torch.Tensor] = {}
    hooks = []
    for path, (recipe, _) in found.items():

        def grab(mod, args, kwargs, path=path, batch_first=recipe.batch_first):
            x = args[0] if args else kwargs.get("hidden_states", kwargs.get("query"))
            if not batch_first and x.dim() == 3:
                x = x.transpose(0, 1)
            inputs[path] = x.detach()

        module = model.get_submodule(path) if path else model
        hooks.append(module.register_forward_pre_hook(grab, with_kwargs=True))
    was_training = model.training
    model.eval()  # no dropout, no resampled biases: the probe must not consume the training RNG
    try:
        model(*probe) if isinstance(probe, tuple) else model(probe)
        return {path: _recompute(*found[path], x) for path, x in inputs.items()}
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()


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
            supported = ", ".join(t.__name__ for t in registered_types("sectors"))
            raise ValueError(
                f"SymmetryMonitor: found no attention module in the model (registered: "
                f"{supported}). Import the module that registers yours (quotientopt.models for "
                "the reference GPT), or register its type with "
                "quotientopt.nn.register_attention(..., sectors=...)"
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

    def _momentum(self, sector: Sector) -> dict[str, torch.Tensor]:
        """``{"momentum_map_metric" or "momentum_map_skew": (groups,)}`` of the optimizer's
        momentum on ``sector``, asked through :func:`~quotientopt.optim.momentum_of`; empty when
        there is none (yet) or its kind does not fit the sector. Non-finite groups give NaN."""
        moments = [momentum_of(self.optimizer, p) for p in sector.parameters]
        if any(m is None for m in moments):
            return {}
        kinds = {m.kind for m in moments}
        if kinds == {"vector"} and sector.manifold is not None:
            if len(moments) == 1:
                z = sector.parameters[0].detach().double()
                v = moments[0].tensor.detach().double()
            else:  # a pair read from several parameters (LoRA's lora_B, lora_A): z = [A; B]
                by_id = {id(p): m.tensor for p, m in zip(sector.parameters, moments, strict=True)}
                z = torch.cat(sector.pair(), dim=-2).double()
                v = torch.cat(sector.pair(lambda p: by_id[id(p)]), dim=-2).double()
            ok = _finite_groups(z, v)
            z, v = _benign(z, ok), _benign(v, ok, zero=True)
            return _guarded(
                ("momentum_map_metric",),
                ok,
                lambda: {"momentum_map_metric": metric_momentum_alignment(sector.manifold, z, v)},
            )
        if kinds != {"covector"}:
            return {}
        by_id = {id(p): m.tensor for p, m in zip(sector.parameters, moments, strict=True)}
        (a, b), (m_a, m_b) = sector.pair(), sector.pair(lambda p: by_id[id(p)])
        ok = _finite_groups(a, b, m_a, m_b)
        a, b, m_a, m_b = (
            _benign(a, ok),
            _benign(b, ok),
            _benign(m_a, ok, True),
            _benign(m_b, ok, True),
        )

        def skew_share() -> dict[str, torch.Tensor]:
            j = momentum_map(a, b, m_a, m_b)
            scale = j.abs().amax((-1, -2)).clamp_min(1e-300)
            return {"momentum_map_skew": (0.5 * (j - j.mT)).abs().amax((-1, -2)) / scale}

        return _guarded(("momentum_map_skew",), ok, skew_share)

    @torch.no_grad()
    def log_diagnostics(self, snapshot: dict[int, torch.Tensor] | None = None) -> dict[str, float]:
        """Compute and log every diagnostic now; ``snapshot`` (parameter id -> value before the
        step) adds the vertical fractions of the update. Returns the summary values."""
        totals: dict[str, list[float]] = defaultdict(list)
        for sector in self.sectors:
            a, b = sector.pair()
            ok = _finite_groups(a, b)
            a, b = _benign(a, ok), _benign(b, ok)
            c0, scale = self.initial[sector.name]

            def charges(a=a, b=b, c0=c0, scale=scale) -> dict[str, torch.Tensor]:
                c = charge(a, b)
                return {
                    "charge_norm": torch.linalg.matrix_norm(c),
                    "charge_drift": torch.linalg.matrix_norm(c - c0) / scale.clamp_min(1e-300),
                }

            values = _guarded(("charge_norm", "charge_drift"), ok, charges)
            values.update(self._momentum(sector))
            if snapshot is not None:
                before = sector.pair(lambda p: snapshot[id(p)])
                moved = ok & _finite_groups(*before)
                start = (_benign(before[0], moved), _benign(before[1], moved))
                step = (
                    _benign(a - start[0], moved, zero=True),
                    _benign(b - start[1], moved, zero=True),
                )
                for metric in ("euclidean", "preconditioned"):
                    key = f"vertical_fraction_{metric}"
                    values.update(
                        _guarded(
                            (key,),
                            moved,
                            lambda metric=metric, key=key, start=start, step=step: {
                                key: vertical_fraction(*start, *step, metric)
                            },
                        )
                    )
            values.update(
                _guarded(
                    ("cond_product", "effective_rank", "cond_gram_a", "cond_gram_b"),
                    ok,
                    lambda a=a, b=b: conditioning(a, b),
                )
            )
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
                image = image.nan_to_num(0.0)  # a diverged layer: a blank image, not a crash
                self.writer.add_images(
                    f"attention/{path}", image[:, None], self.steps, dataformats="NCHW"
                )
        summary = {key: sum(v) / len(v) for key, v in totals.items()}
        for key, value in summary.items():
            self._scalar(f"summary/{key}", value)
        kinetic_energy = self._kinetic_energy()
        if kinetic_energy is not None and self.last_loss is not None:
            self._scalar("energy", float(kinetic_energy()) + self.last_loss)
        return summary

    def log_loss(self, loss: torch.Tensor | float, tag: str = "train") -> None:
        """Record a loss. It is averaged over ``loss_every`` calls on the device and written then
        (one synchronisation per ``loss_every`` steps; reading and writing a scalar every step cost
        about 3% of a small model's training time). For an optimizer with ``kinetic_energy()``
        (QuotientHamiltonian) the loss of every step is read, since the energy needs it. A last
        partial window is written by :meth:`close`."""
        value = loss.detach() if isinstance(loss, torch.Tensor) else torch.tensor(float(loss))
        if self._kinetic_energy() is not None:
            self.last_loss = float(value)
        total, count = self._loss_window.get(tag, (None, 0))
        total, count = (value if total is None else total + value), count + 1
        if count >= self.loss_every:
            mean = float(total) / count
            if tag == "train" and self._kinetic_energy() is None:
                self.last_loss = mean
            self._scalar(f"loss/{tag}", mean)
            self._loss_window.pop(tag, None)
        else:
            self._loss_window[tag] = (total, count)

    def _flush_losses(self) -> None:
        """Write the partial loss windows (fewer than ``loss_every`` calls) at the current step."""
        for tag, (total, count) in list(self._loss_window.items()):
            if total is not None and count:
                self._scalar(f"loss/{tag}", float(total) / count)
        self._loss_window.clear()

    def _kinetic_energy(self) -> Callable[[], torch.Tensor] | None:
        """The optimizer's ``kinetic_energy()`` method (documented by
        :class:`~quotientopt.optim.QuotientHamiltonian`: the total kinetic energy of the last
        step), or None for an optimizer without one."""
        method = getattr(self.optimizer, "kinetic_energy", None)
        return method if callable(method) else None

    def close(self, hparams: dict | None = None) -> None:
        """Write the last partial loss window, ``hparams`` with the final summary values, flush
        and close the writer."""
        self._flush_losses()
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
