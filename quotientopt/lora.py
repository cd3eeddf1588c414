r"""LoRA adapters of a PEFT model trained on the GL(r) quotient.

A LoRA pair adds :math:`\Delta W = s\, B A` to a layer (``lora_B``: ``out x r``, ``lora_A``:
``r x in``, ``s`` the LoRA scaling :math:`\alpha / r`, or :math:`\alpha / \sqrt{r}` with rsLoRA).
The model depends on the pair only through :math:`B A`, which is unchanged by
:math:`B \to B G`, :math:`A \to G^{-1} A` for every :math:`G \in GL(r)`: the symmetry of a head.
:func:`create_quotient_optimizer` steps every pair as one sector of
:class:`~quotientopt.manifolds.FactorQuotient` ``(n=out, m=in)`` with ``k = r``:

.. math::

    Z = \begin{bmatrix} B \\ A^\top \end{bmatrix} \in \mathbb{R}^{(out + in) \times r},
    \qquad Z_A = B,\; Z_B = A^\top,\; Z_A Z_B^\top = B A,

so that the sector symmetry :math:`(Z_A G, Z_B G^{-\top})` is exactly :math:`(B G, G^{-1} A)`.
Pairs of equal shape are stacked into one sector tensor ``(pairs, out + in, r)``, so the
``r x r`` algebra is batched over them. The sector tensors are the optimizer's own copies
(a *paired optimizer over the two parameters*): before a step the gradients of ``lora_B`` and
``lora_A`` are written into the sector's gradient, after it the new factors are written back
into the PEFT parameters. The PEFT model is never changed (``save_pretrained``,
``merge_and_unload``, adapter switching all see plain PEFT parameters); a write into a LoRA
parameter between steps (loading an adapter, say) is noticed through its version counter and
copied into the sector before the next step.

The ``B = 0`` start: PEFT initializes ``B = 0`` and ``A`` random, a rank-deficient sector (not an
all-zero one). At creation such a pair is moved to ``A`` with orthogonal rows (a group action:
every :math:`(0, G^{-1} A)` is the same point), so starts that differ by any ``G`` differ by an
orthogonal one. The first step is the quotient optimizers' *regularized* step
(``FactorQuotient.grams(..., regularize=True)``), which floors only the singular Gram
:math:`B^\top B`: ``B`` moves along :math:`-\nabla_B f\,(A A^\top)^{-1}` (GL(r)-equivariant),
``A``'s gradient is 0 there, and ``B`` has full column rank after it. Exact invariance holds
from the first step on (``tests/test_lora_peft.py``).

Pairs without a gradient in a step (an adapter made inactive by ``set_adapter``) are left as they
are, factors and per-pair optimizer state, as torch leaves a parameter whose ``grad`` is None.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import geoopt
import torch
from torch import nn

from quotientopt.manifolds import FactorQuotient
from quotientopt.manifolds.factor_quotient import balance as balance_pair
from quotientopt.optim import (
    HybridOptimizer,
    Momentum,
    QuotientAdam,
    QuotientMuon,
    QuotientSGD,
    momentum_of,
)

__all__ = [
    "LoraPair",
    "QuotientLoraOptimizer",
    "create_quotient_optimizer",
    "lora_pairs",
    "lora_sectors",
]

QUOTIENT_OPTIMIZERS = (QuotientMuon, QuotientAdam, QuotientSGD)


@dataclass(frozen=True)
class LoraPair:
    """One LoRA pair: ``b @ a.reshape(r, -1)`` is the low-rank update of module ``path``'s
    adapter ``adapter`` (``b``: ``(out, r)`` or ``(out, r, 1, ...)``, ``a``: ``(r, in, ...)``)."""

    path: str
    adapter: str
    a: nn.Parameter
    b: nn.Parameter

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    @property
    def rows(self) -> tuple[int, int]:
        """``(out, in)``: the rows of the sector's two factors."""
        return self.b.shape[0], self.a[0].numel()


def _pair_dicts(module: nn.Module) -> Iterator[tuple[str, Any, Any]]:
    """``(adapter, A, B)`` for every adapter of a PEFT LoRA layer (Linear/Conv: ``lora_A``/
    ``lora_B`` module dicts; Embedding: ``lora_embedding_A``/``lora_embedding_B`` parameters)."""
    for a_name, b_name in (("lora_A", "lora_B"), ("lora_embedding_A", "lora_embedding_B")):
        a_dict, b_dict = getattr(module, a_name, None), getattr(module, b_name, None)
        if not isinstance(a_dict, (nn.ModuleDict, nn.ParameterDict)) or b_dict is None:
            continue
        for adapter in a_dict:
            if adapter not in b_dict:
                continue
            a, b = a_dict[adapter], b_dict[adapter]
            if isinstance(a, nn.Module):
                a, b = a.weight, b.weight
            yield adapter, a, b


def lora_pairs(model: nn.Module) -> list[LoraPair]:
    """Every LoRA pair of ``model`` whose two factors are trainable, in module order."""
    pairs = []
    for path, module in model.named_modules():
        for adapter, a, b in _pair_dicts(module):
            if not (a.requires_grad or b.requires_grad):
                continue
            if not (a.requires_grad and b.requires_grad):
                raise ValueError(
                    f"create_quotient_optimizer: {path} (adapter {adapter!r}) has one factor "
                    "frozen; the quotient steps both factors: make both trainable or neither"
                )
            if b.shape[1] != a.shape[0] or any(d != 1 for d in b.shape[2:]):
                raise ValueError(
                    f"create_quotient_optimizer: {path} adapter {adapter!r} has lora_A "
                    f"{tuple(a.shape)} and lora_B {tuple(b.shape)}, which are not a rank-r pair "
                    "(B: out x r, A: r x in); only LoRA layers whose update is B @ A are supported"
                )
            if getattr(module, "use_dora", {}).get(adapter, False):
                raise ValueError(
                    f"create_quotient_optimizer: {path} (adapter {adapter!r}) uses DoRA, whose "
                    "magnitude vector breaks the GL(r) symmetry of the pair; build the LoRA "
                    "config with use_dora=False, or train this model with a torch optimizer"
                )
            if a.dtype != b.dtype or a.device != b.device:
                raise ValueError(
                    f"create_quotient_optimizer: {path} adapter {adapter!r} has lora_A and "
                    "lora_B of different dtypes or devices; cast the adapter to one dtype"
                )
            pairs.append(LoraPair(path, adapter, a, b))
    return pairs


class _Bundle:
    r"""Pairs of one shape, dtype and device, as one sector tensor ``(pairs, out + in, r)``."""

    def __init__(self, pairs: list[LoraPair], metric: str, balance: bool) -> None:
        self.pairs = pairs
        self.out, self.inp = pairs[0].rows
        first = pairs[0].a
        data = torch.empty(
            len(pairs), self.out + self.inp, pairs[0].rank, dtype=first.dtype, device=first.device
        )
        self.sector = geoopt.ManifoldParameter(
            data, manifold=FactorQuotient(self.out, self.inp, metric=metric)
        )
        self.versions: list[tuple[int, int] | None] = [None] * len(pairs)
        self.pull()
        # the factors as given: a resume (load_state_dict before any step) restores them, since
        # the loaded state belongs to them and not to the balanced representative
        self.unbalanced = self.sector.detach().clone() if balance else None
        if balance:
            self.balance()
            self.push()

    @torch.no_grad()
    def balance(self) -> None:
        r"""Move every pair to a well-conditioned representative of its orbit, a group action
        (the product unchanged):

        - a full-rank pair to the balanced one
          (:func:`~quotientopt.manifolds.factor_quotient.balance`: :math:`B^\top B = A A^\top`);
        - PEFT's start :math:`B = 0` with :math:`A` of rank ``r``: every :math:`(0, G^{-1} A)` is
          the same point, so :math:`A \to c\, Q^\top` with :math:`A^\top = Q R` (QR, positive
          :math:`\operatorname{diag} R`) and :math:`c = \lVert A \rVert_F / \sqrt{r}`: rows
          orthogonal, of the same size on average. Two starts that differ by any ``G`` then
          differ by an orthogonal one, the best-conditioned group element;
        - other rank-deficient pairs stay."""
        z = self.sector.detach()
        work = z.to(torch.promote_types(z.dtype, torch.float32))  # the algebra in fp32 or better
        a, b = work[:, : self.out], work[:, self.out :]  # a = lora_B (out, r), b = lora_A^T
        a_bal, b_bal = balance_pair(a, b)
        s = torch.linalg.svdvals(a_bal.mT @ a_bal)
        full = (s[:, -1] > 1e-12 * s[:, 0])[:, None, None]
        q, r = torch.linalg.qr(b)
        diag = r.diagonal(dim1=-2, dim2=-1)
        rank_r = diag.abs().amin(-1) > 1e-12 * diag.abs().amax(-1)
        zero = ((a.abs().amax((-2, -1)) == 0) & rank_r)[:, None, None]
        c = torch.linalg.matrix_norm(b) / b.shape[-1] ** 0.5
        b_orth = q * torch.sign(diag)[:, None, :] * c[:, None, None]
        z[:, : self.out].copy_(torch.where(full, a_bal, a))
        z[:, self.out :].copy_(torch.where(full, b_bal, torch.where(zero, b_orth, b)))

    @torch.no_grad()
    def pull(self) -> None:
        """Copy the PEFT factors that changed since the last :meth:`push` into the sector."""
        for i, pair in enumerate(self.pairs):
            if self.versions[i] != (pair.a._version, pair.b._version):
                self.sector[i, : self.out].copy_(pair.b.reshape(self.out, -1))
                self.sector[i, self.out :].copy_(pair.a.reshape(pair.rank, -1).mT)

    def gather_grad(self) -> list[int]:
        r"""The sector's gradient :math:`[\nabla_B f; (\nabla_A f)^\top]` (zeros for a factor
        without one; None when no factor of the bundle has one). Returns the pairs with no
        gradient at all (an inactive adapter, say), which the step must leave as they are."""
        grads = [(p.b.grad, p.a.grad) for p in self.pairs]
        idle = [i for i, (gb, ga) in enumerate(grads) if gb is None and ga is None]
        if len(idle) == len(self.pairs):
            self.sector.grad = None
            return idle
        parts = []
        for pair, (gb, ga) in zip(self.pairs, grads, strict=True):
            gb = torch.zeros_like(pair.b) if gb is None else gb
            ga = torch.zeros_like(pair.a) if ga is None else ga
            parts.append(torch.cat([gb.reshape(self.out, -1), ga.reshape(pair.rank, -1).mT]))
        self.sector.grad = torch.stack(parts).to(self.sector.dtype)
        return idle

    def snapshot(self, state: dict[str, Any], idle: list[int]) -> dict[str, torch.Tensor]:
        """Copies of the ``idle`` pairs' rows of the sector and of every per-pair state tensor
        (leading axis the pairs), to put back after a step that must not move them."""
        index = torch.tensor(idle, device=self.sector.device)
        saved = {"": self.sector.detach()[index].clone()}
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.dim() and len(value) == len(self.pairs):
                saved[key] = value[index].clone()
        return saved

    @torch.no_grad()
    def put_back(self, state: dict[str, Any], idle: list[int], saved: dict[str, torch.Tensor]):
        index = torch.tensor(idle, device=self.sector.device)
        self.sector.index_copy_(0, index, saved.pop(""))
        for key, rows in saved.items():
            state[key].index_copy_(0, index, rows)

    @torch.no_grad()
    def restore_unbalanced(self) -> None:
        """Put back the factors as given at creation (before the balancing) for the pairs that
        nobody wrote to since; pairs written to (a checkpoint loaded into the model) keep the
        values written."""
        if self.unbalanced is None:
            return
        untouched = [
            i
            for i, pair in enumerate(self.pairs)
            if self.versions[i] == (pair.a._version, pair.b._version)
        ]
        self.pull()
        for i in untouched:
            self.sector[i].copy_(self.unbalanced[i])
        self.push()
        self.unbalanced = None

    @torch.no_grad()
    def push(self) -> None:
        """Write the sector's factors back into the PEFT parameters."""
        for i, pair in enumerate(self.pairs):
            pair.b.copy_(self.sector[i, : self.out].reshape(pair.b.shape))
            pair.a.copy_(self.sector[i, self.out :].mT.reshape(pair.a.shape))
            self.versions[i] = (pair.a._version, pair.b._version)

    def locate(self, p: torch.Tensor) -> tuple[int, str] | None:
        for i, pair in enumerate(self.pairs):
            if pair.b is p:
                return i, "b"
            if pair.a is p:
                return i, "a"
        return None


class QuotientLoraOptimizer(torch.optim.Optimizer):
    """Steps the LoRA pairs of a PEFT model on the GL(r) quotient (``quotient``, an optimizer
    of the sector tensors) and every other trainable parameter with ``rest`` (see the module
    docstring). Built by :func:`create_quotient_optimizer`. ``param_groups`` are the two
    optimizers' groups (a scheduler sets both); ``state_dict``/``load_state_dict`` round-trip
    both; ``momentum(p)`` answers for a LoRA parameter with its slice of the sector momentum."""

    def __init__(
        self,
        bundles: list[_Bundle],
        quotient: torch.optim.Optimizer,
        rest: torch.optim.Optimizer | None,
    ) -> None:
        self.bundles = bundles
        inner = quotient if rest is None else HybridOptimizer(quotient, rest)
        everything = [p for g in inner.param_groups for p in g["params"]]
        super().__init__(everything, defaults={})
        self.inner, self.quotient, self.rest = inner, quotient, rest
        self.__dict__.pop("_init_groups", None)
        self.state = inner.state

    @property  # type: ignore[override]
    def param_groups(self) -> list[dict[str, Any]]:
        if "inner" not in self.__dict__:  # during torch.optim.Optimizer.__init__
            return self.__dict__.setdefault("_init_groups", [])
        return self.inner.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.__dict__["_init_groups"] = value

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if "inner" not in self.__dict__:
            return super().add_param_group(param_group)
        raise ValueError(
            "QuotientLoraOptimizer: parameter groups are fixed at creation; call "
            "create_quotient_optimizer again after adding adapters"
        )

    @property
    def sectors(self) -> list[geoopt.ManifoldParameter]:
        """The sector tensors ``(pairs, out + in, r)``, one per shape of pair."""
        return [bundle.sector for bundle in self.bundles]

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        kept = []
        for bundle in self.bundles:
            bundle.unbalanced = None
            bundle.pull()
            idle = bundle.gather_grad()
            if idle and len(idle) < len(bundle.pairs):  # torch's rule: no gradient, no step
                state = self.quotient.state[bundle.sector]
                kept.append((bundle, state, idle, bundle.snapshot(state, idle)))
        self.inner.step(None if loss is None else (lambda: loss))
        for bundle, state, idle, saved in kept:
            bundle.put_back(state, idle, saved)
        for bundle in self.bundles:
            bundle.push()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none)
        for bundle in self.bundles:
            for pair in bundle.pairs:
                for p in (pair.a, pair.b):
                    if p.grad is not None:
                        if set_to_none:
                            p.grad = None
                        else:
                            p.grad.zero_()

    def momentum(self, p: torch.Tensor) -> Momentum | None:
        """The momentum at ``p``: for a LoRA factor, its slice of the sector's momentum (the
        same kind), else the momentum that ``rest`` keeps."""
        for bundle in self.bundles:
            where = bundle.locate(p)
            if where is None:
                continue
            m = momentum_of(self.quotient, bundle.sector)
            if m is None:
                return None
            i, which = where
            t = m.tensor[i, : bundle.out] if which == "b" else m.tensor[i, bundle.out :].mT
            return Momentum(t.reshape(p.shape), m.kind)
        return None if self.rest is None else momentum_of(self.rest, p)

    def invalidate(self) -> None:
        if callable(getattr(self.inner, "invalidate", None)):
            self.inner.invalidate()

    def state_dict(self) -> dict[str, Any]:
        return {"inner": self.inner.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if set(state_dict) != {"inner"}:
            raise ValueError(
                "QuotientLoraOptimizer.load_state_dict: expected the dict of "
                f"QuotientLoraOptimizer.state_dict() (key 'inner'), got keys {sorted(state_dict)}"
            )
        for bundle in self.bundles:
            if self.quotient.state:
                bundle.unbalanced = None
            bundle.restore_unbalanced()
            bundle.pull()
        self.inner.load_state_dict(state_dict["inner"])

    def __repr__(self) -> str:
        pairs = sum(len(b.pairs) for b in self.bundles)
        return (
            f"QuotientLoraOptimizer({pairs} LoRA pairs in {len(self.bundles)} sectors, "
            f"quotient={type(self.quotient).__name__}, "
            f"rest={type(self.rest).__name__ if self.rest else None})"
        )


def create_quotient_optimizer(
    model: nn.Module,
    optimizer_cls: type[torch.optim.Optimizer],
    *,
    lr: float,
    rest_optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW,
    rest_lr: float | None = None,
    rest_kwargs: dict[str, Any] | None = None,
    metric: str = "preconditioned",
    balance: bool = True,
    **kwargs: Any,
) -> QuotientLoraOptimizer:
    r"""An optimizer for a PEFT LoRA model (the shape of ``peft.optimizers.create_*_optimizer``):
    every trainable LoRA pair is stepped by ``optimizer_cls(sectors, lr=lr, **kwargs)``
    (:class:`~quotientopt.optim.QuotientMuon`, :class:`~quotientopt.optim.QuotientAdam` or
    :class:`~quotientopt.optim.QuotientSGD`) on the GL(r) quotient, as the sector
    :math:`Z = [B; A^\top]` of ``FactorQuotient(out, in, metric=metric)``; every other trainable
    parameter (biases, DoRA magnitudes, ``modules_to_save``) by
    ``rest_optimizer_cls(params, lr=rest_lr or lr, **rest_kwargs)`` (AdamW by default).

    ``balance`` (default True): move every full-rank pair to its balanced representative once,
    here (a group action: the model's function is unchanged, to rounding). Exact arithmetic does
    not need it; floating point does: at an ill-conditioned representative (a pair re-factorized
    by a cond-1000 ``G``: Grams of condition up to 1e6 times the balanced ones) every step loses
    that many more digits, and 50 float64 steps of the tiny test model then agree with the plain
    start only to 1e-8 (QuotientMuon, lr 2e-3) instead of 1e-12 (``tests/test_lora.py``). A pair
    at PEFT's ``B = 0`` start gets ``A`` with orthogonal rows of the same average size instead
    (module docstring).

    Works with any ``target_modules`` (Linear, Conv with 1 x 1 ``lora_B``, Embedding), rsLoRA
    and several trainable adapters; the PEFT model itself is left as it is.
    """
    pairs = lora_pairs(model)
    if not pairs:
        raise ValueError(
            "create_quotient_optimizer: the model has no trainable LoRA pair (lora_A/lora_B); "
            "pass a model made by peft.get_peft_model(model, LoraConfig(...))"
        )
    if not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, QUOTIENT_OPTIMIZERS)):
        raise ValueError(
            f"create_quotient_optimizer: optimizer_cls must be one of QuotientMuon, QuotientAdam, "
            f"QuotientSGD (quotientopt.optim), got {optimizer_cls!r}; for a torch optimizer use "
            "PEFT's create_loraplus_optimizer or optimizer_cls(model.parameters()) directly"
        )
    groups: dict[tuple, list[LoraPair]] = {}
    for pair in pairs:
        key = (*pair.rows, pair.rank, pair.a.dtype, pair.a.device)
        groups.setdefault(key, []).append(pair)
    bundles = [_Bundle(group, metric, balance) for group in groups.values()]
    quotient = optimizer_cls([b.sector for b in bundles], lr=lr, **kwargs)
    in_pairs = {id(p) for pair in pairs for p in (pair.a, pair.b)}
    others = [p for p in model.parameters() if p.requires_grad and id(p) not in in_pairs]
    rest = None
    if others:
        rest = rest_optimizer_cls(
            others, lr=lr if rest_lr is None else rest_lr, **(rest_kwargs or {})
        )
    return QuotientLoraOptimizer(bundles, quotient, rest)


# ------------------------------------------------------------------ diagnostics (SymmetryMonitor)
def lora_sectors(path: str, module: nn.Module) -> list:
    r"""The sectors of a PEFT LoRA layer for :class:`~quotientopt.tensorboard.SymmetryMonitor`:
    one per adapter, named ``"<path>.LoRA.<adapter>"``, read as the pair
    :math:`(B, A^\top)` (shapes ``(1, out, r)``, ``(1, in, r)``), whose symmetry
    :math:`(B G, A^\top G^{-\top})` is the adapter's. Their geometry is
    ``FactorQuotient(out, in, metric="preconditioned")`` (:func:`create_quotient_optimizer`'s
    default), in which the monitor reads a tangent momentum (QuotientSGD's, QuotientAdam's) as
    ``momentum_map_metric``; a Euclidean one (QuotientMuon's, AdamW's) gives
    ``momentum_map_skew``."""
    from quotientopt.nn.adapters import Sector

    sectors = []
    for adapter, a, b in _pair_dicts(module):
        out, rank = b.shape[0], a.shape[0]

        def read(values, out=out, rank=rank):
            vb, va = values
            return vb.reshape(out, rank)[None], va.reshape(rank, -1).mT[None]

        geometry = FactorQuotient(out, a[0].numel(), metric="preconditioned")
        sectors.append(Sector(path, f"LoRA.{adapter}", 1, rank, (b, a), read, geometry))
    return sectors


def _register_lora_layers() -> None:
    from peft.tuners.lora import layer

    from quotientopt.nn.adapters import register_attention

    for name in ("Linear", "Embedding", "Conv1d", "Conv2d", "Conv3d"):
        module_type = getattr(layer, name, None)
        if isinstance(module_type, type):
            register_attention(module_type, sectors=lora_sectors)


_register_lora_layers()
