"""What the quotient optimizers share: hyperparameter checks, the split of parameters by kind
(through the geometry protocol, :mod:`quotientopt.manifolds.protocol`), what a momentum is, the
non-finite-gradient rule and the per-head health counters."""

from __future__ import annotations

import functools
import warnings
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any, Literal, NamedTuple

import torch

from quotientopt.distributed import _alias as local_alias
from quotientopt.distributed import (
    is_dtensor,
    nonfinite_on_any_rank,
    steps_local_shards,
)
from quotientopt.linalg import compute_dtype
from quotientopt.manifolds.protocol import HeadGeometry, RowSharded
from quotientopt.optim._guard import check_declared_geometries
from quotientopt.optim._health import HealthMixin
from quotientopt.optim._params import (  # noqa: F401 (importable from _base, as before)
    NONFINITE_POLICIES,
    check_choice,
    check_number,
    geometry_of,
    is_quotient_parameter,
    manifold_of,
)
from quotientopt.optim._state import (  # noqa: F401 (importable from _base, as before)
    KeepStateDtypes,
    _restore,
    _restored_already,
    held_state,
    own_loaded_state,
)
from quotientopt.optim._updates import (  # noqa: F401 (importable from _base, as before)
    Direction,
    HeadUpdate,
    PlainBatch,
    _merged,
    rebalance,
    where_heads,
    write_update,
)


class Momentum(NamedTuple):
    r"""An optimizer's momentum at one parameter, as :meth:`momentum` methods report it.

    ``tensor`` has the parameter's shape. ``kind`` says how it pairs with the orbit directions
    :math:`V(\Omega) = (A\Omega, -B\Omega^\top)` of a factor pair:

    * ``"covector"``: a Euclidean momentum (torch SGD's buffer, Adam's first moment, a plain
      tensor's): momentum map :math:`A^\top m_A - m_B^\top B`, of which only the skew part is a
      Noether charge of a Euclidean kinetic energy;
    * ``"vector"``: a tangent vector of the parameter's head geometry (a velocity): momentum map
      ``geometry.momentum_map(z, tensor)``, the metric pairing, zero exactly when horizontal.
    """

    tensor: torch.Tensor
    kind: Literal["covector", "vector"]


#: the state entries that hold a Euclidean momentum in torch's own optimizers
TORCH_MOMENTUM_KEYS = ("momentum_buffer", "exp_avg")


def momentum_of(optimizer: torch.optim.Optimizer, p: torch.Tensor) -> Momentum | None:
    """What ``optimizer``'s momentum at ``p`` is: its own answer when it has a ``momentum(p)``
    method (every optimizer of this package does), else torch's convention (``momentum_buffer``
    of SGD, ``exp_avg`` of Adam/AdamW, read as Euclidean covectors); None when there is none."""
    ask = getattr(optimizer, "momentum", None)
    if callable(ask):
        return ask(p)
    state = optimizer.state.get(p, {})
    for key in TORCH_MOMENTUM_KEYS:
        value = state.get(key)
        if isinstance(value, torch.Tensor) and value.shape == p.shape:
            return Momentum(value, "covector")
    return None


def found_nonfinite(grads: list[torch.Tensor]) -> dict[torch.device, torch.Tensor]:
    """Per device, a 0-dim float tensor that is 1 if any gradient holds NaN/Inf, else 0, computed by
    one fused kernel per device and dtype with no host synchronisation (AMP's check); for the
    local shards of DTensor parameters, 1 if any rank's shard holds one."""
    by_device: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = defaultdict(list)
    for g in grads:
        by_device[(g.device, g.dtype)].append(g)
    flags: dict[torch.device, torch.Tensor] = {}
    for (device, _), group in by_device.items():
        flag = torch.zeros((), device=device, dtype=torch.float32)
        inv_scale = torch.ones((), device=device, dtype=torch.float32)
        torch._amp_foreach_non_finite_check_and_unscale_(group, flag, inv_scale)
        flags[device] = torch.maximum(flags[device], flag) if device in flags else flag
    return nonfinite_on_any_rank(flags)


def eager_step(step):
    """Decorator for a quotient optimizer's ``step``: it runs eagerly even inside
    ``torch.compile(optimizer.step)`` (a graph break), so compiling gives the eager result.

    Why: dynamo traces the step correctly (``tests/test_interface.py`` compiles the undecorated
    kernels with the ``aot_eager`` backend), but inductor, the default backend, miscompiled it in
    torch 2.13: with two sectors of one shape, the compiled QuotientSGD step wrote one sector's
    update into the other (difference 2.39 after one step). A wrong step is worse than an
    uncompiled one; compiling therefore gains nothing for these optimizers today
    (``benchmarks/compile_step.py`` measures it)."""
    return torch.compiler.disable(step)


ZERO_SECTOR_SEED = 20261126


@torch.compiler.disable
def leave_zero_sectors(p: torch.Tensor, geometry: HeadGeometry, seed: int) -> torch.Tensor:
    r"""Move every all-zero sector of the head parameter ``p`` (``(..., n + m, k)``) to
    :math:`(A, B) = (U, 0)`, with :math:`U` (``n x k``) orthonormal columns drawn from a private
    generator seeded with ``seed``; returns the per-sector mask of the sectors moved.

    At :math:`A = B = 0` the product :math:`W = A B^\top` has zero gradients in both factors
    (:math:`\nabla_A f = E B`, :math:`\nabla_B f = E^\top A`), so no gradient method ever moves
    it. :math:`(U, 0)` lies in the same fibre of the product map (:math:`U 0^\top = 0`), so the
    model computes exactly the same function, and there :math:`\nabla_B f = E^\top U \ne 0`: the
    regularized step (``grams(..., regularize=True)``) gives :math:`B` full rank at once. The
    move is not a group action (the orbit of :math:`0` is a point); it is the one place where an
    optimizer leaves the orbit, once, at a point where the quotient is not a manifold.
    Under a geometry whose product does not determine the output (a key bias rotated by RoPE
    with a zero key projection), the function changes; see ``docs/optimizers.md``.

    Reads one flag on the host; callers call it on a parameter's first step only."""
    a, _ = geometry.factors(p)
    zero = p.abs().amax(dim=(-2, -1)) == 0
    if not bool(zero.any()):
        return zero
    generator = torch.Generator(device=p.device).manual_seed(seed)
    gaussian = torch.randn(
        a.shape, generator=generator, device=p.device, dtype=compute_dtype(p.dtype)
    )
    frame = torch.linalg.qr(gaussian).Q  # (..., n, k), orthonormal columns
    a[zero] = frame[zero].to(a.dtype)
    return zero


def leaves_zero_sectors(step):
    """Decorator for a quotient optimizer's ``step``: before a head parameter's first step
    (empty state), :func:`leave_zero_sectors` moves its all-zero sectors off the zero point and
    the optimizer warns. Row-sharded sectors are left alone (their rows live on several
    ranks; gather them, or start them non-zero)."""

    @functools.wraps(step)
    def wrapper(self: torch.optim.Optimizer, closure: Any = None) -> Any:
        # parameters already looked at, by id (a weak reference guards against a reused id)
        checked: dict[int, weakref.ref] = self.__dict__.setdefault("_zero_sectors_checked", {})
        for group in self.param_groups:
            for p in group["params"]:
                seen = checked.get(id(p))
                if (seen is not None and seen() is p) or self.state.get(p) or not p.requires_grad:
                    continue
                checked[id(p)] = weakref.ref(p)  # once per parameter, even one never stepped
                geometry = geometry_of(p)
                if geometry is None or isinstance(geometry, RowSharded):
                    continue
                lifted = self.__dict__.setdefault("_zero_sectors_lifted", 0)
                moved = leave_zero_sectors(p.detach(), geometry, ZERO_SECTOR_SEED + lifted)
                count = int(moved.sum())
                if count:
                    self._zero_sectors_lifted = lifted + 1
                    warnings.warn(
                        f"{type(self).__name__}: {count} head sector(s) are all zero, where no "
                        "gradient moves them; each was moved to (A, B) = (U, 0) with orthonormal "
                        "random U, which leaves the model's function unchanged, so that it trains",
                        RuntimeWarning,
                        stacklevel=3,
                    )
        return step(self, closure)

    return wrapper


def optimizer_step(step):
    """The decorators that every quotient optimizer's ``step`` carries: no autograd,
    FSDP2's local shards (:func:`~quotientopt.distributed.steps_local_shards`), all-zero sectors
    moved off the zero point before their first step (:func:`leaves_zero_sectors`) and an eager
    step inside ``torch.compile`` (:func:`eager_step`)."""
    return eager_step(steps_local_shards(torch.no_grad()(leaves_zero_sectors(step))))


class ChecksParameters:
    """``add_param_group`` (which ``torch.optim.Optimizer.__init__`` calls for every group)
    checks each new parameter with the optimizer's ``_check_parameter``."""

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)  # type: ignore[misc]
        check_declared_geometries(self.param_groups[-1]["params"], type(self).__name__)  # type: ignore[attr-defined]
        for p in self.param_groups[-1]["params"]:  # type: ignore[attr-defined]
            self._check_parameter(p)  # type: ignore[attr-defined]


class WriteLog:
    """What this optimizer knows about each parameter's current data: the version of the tensor
    it wrote last (``p._version`` and the storage), and values derived from that data (Grams,
    frames, work buffers) that stay valid until something else writes to the parameter.

    Its methods run eagerly under ``torch.compile`` (dynamo can trace neither tensor versions nor
    dicts keyed by tensors reliably: a traced lookup returned another parameter's entry), so a
    compiled step takes exactly the eager decisions.
    """

    def __init__(self) -> None:
        self._written: dict[torch.Tensor, tuple[int, int]] = {}
        self._derived: dict[tuple[torch.Tensor, str], Any] = {}

    @torch.compiler.disable
    def record(self, p: torch.Tensor) -> None:
        """Note that this optimizer has just written ``p``."""
        self._written[p] = (p._version, p.data_ptr())

    @torch.compiler.disable
    def modified_elsewhere(self, p: torch.Tensor) -> bool:
        """Whether something other than this optimizer wrote ``p`` since :meth:`record`
        (False for a parameter never recorded)."""
        written = self._written.get(p)
        return written is not None and written != (p._version, p.data_ptr())

    @torch.compiler.disable
    def forget(self, params: Iterable[torch.Tensor]) -> None:
        """Treat ``params`` and every parameter recorded so far as written elsewhere
        (:meth:`modified_elsewhere` is True until its next :meth:`record`): for writes that leave
        no trace in ``p._version``, such as ``p.data``."""
        for p in [*self._written, *params]:
            self._written[p] = (-1, -1)

    @torch.compiler.disable
    def get(self, p: torch.Tensor, key: str) -> Any:
        """The value stored under ``key`` for ``p``, or None."""
        return self._derived.get((p, key))

    @torch.compiler.disable
    def put(self, p: torch.Tensor, key: str, value: Any) -> None:
        self._derived[(p, key)] = value


def work_buffers(
    log: WriteLog,
    p: torch.Tensor,
    count: int,
    dtype: torch.dtype | None = None,
    *,
    key: str = "work",
    shape: torch.Size | None = None,
) -> tuple[torch.Tensor, ...]:
    """``count`` tensors of ``shape`` (default ``p``'s) and ``dtype`` (default ``p``'s) on ``p``'s
    device, kept in ``log`` under ``key`` and reused on every step for a step's full-size
    temporaries (candidate points, gradients, momenta, velocities): on a CPU a fresh allocation
    of this size is paged in on first touch, which cost about as much as the arithmetic on it.
    Not part of ``state_dict``."""
    dtype = p.dtype if dtype is None else dtype
    shape = p.shape if shape is None else shape
    buffers = log.get(p, key)
    if (
        buffers is None
        or len(buffers) < count
        or buffers[0].shape != shape
        or buffers[0].dtype != dtype
        or buffers[0].device != p.device
    ):
        buffers = tuple(torch.empty(shape, dtype=dtype, device=p.device) for _ in range(count))
        log.put(p, key, buffers)
    return buffers


def _fused_kernel_is_exact(p: torch.Tensor) -> bool:
    """Whether torch's fused SGD kernel (``torch.optim.sgd.sgd(..., fused=True)``) computes
    torch.optim.SGD's step for ``p``: for float32/float64 everywhere, and for every dtype on CUDA.
    torch 2.13's fused CPU kernel writes wrong momentum buffers for bfloat16/float16
    (``tests/test_quotient_sgd.py::test_reduced_precision_plain_tensors_step_as_torch_sgd``), and
    no other device's reduced-precision kernel is tested here, so those tensors take the
    single-tensor step, which is exact by construction (the same operations, the same roundings)."""
    return p.device.type == "cuda" or p.dtype in (torch.float32, torch.float64)


class QuotientOptimizer(ChecksParameters, KeepStateDtypes, HealthMixin, torch.optim.Optimizer):
    """What every quotient optimizer is: a ``torch.optim.Optimizer`` (param_groups, state_dict,
    hooks, schedulers) with state kept in its dtypes, the non-finite policy ``on_nonfinite`` and
    the health counters, and one ``step``:

    1. evaluate the closure (if any) with gradients enabled;
    2. ``nonfinite``: per device, a 0-dim flag that a gradient holds NaN/Inf (no host sync);
    3. ``self._step(nonfinite, loss)``: the one step loop (below);
    4. count the skipped step in ``nonfinite_steps``.

    The step loop (:meth:`_step`), the same for every optimizer:

    a. for each parameter with a gradient, in its group's order: a head parameter goes to the
       optimizer's head kernel (:meth:`_head_update`), a parameter on another geoopt manifold to
       :meth:`_manifold_update`; each returns a :class:`HeadUpdate` (nothing written) or a
       :class:`Direction` for torch's own kernel. Each head sector is one call, batched over its
       heads (sectors are not stacked: that would copy every point, gradient and state tensor);
    b. the non-finite and rank policy, once, over every head's ``ok`` flag;
    c. write each update head by head (:func:`write_update`) and count the rank skips;
    d. hand the plain tensors, and the directions, to torch's functional kernels
       (:meth:`_plain_step`, one call per group and device);
    e. :meth:`_stepped` for each head parameter (step counts, caches, rebalancing).

    A subclass gives its head kernel and plain step (or, for an update that couples whole
    groups, its own ``_step``) and, where it refuses some parameters, ``_check_parameter(p)``
    (called for every parameter as it is added); ``needs_closure = True`` where the update needs
    the loss value."""

    needs_closure = False

    def __init__(
        self, params: Any, defaults: dict[str, Any], *, on_nonfinite: str = "skip"
    ) -> None:
        check_choice("on_nonfinite", on_nonfinite, NONFINITE_POLICIES)
        self.on_nonfinite = on_nonfinite
        self._init_health()
        super().__init__(params, defaults)

    def __getstate__(self) -> dict[str, Any]:
        """torch's (defaults, state, param_groups) plus the policy and the health counters, so
        that ``copy.deepcopy`` and pickling give an optimizer that steps (work logs and caches
        are rebuilt)."""
        state = super().__getstate__()
        state["on_nonfinite"] = self.on_nonfinite
        state["_nonfinite_steps"] = self._nonfinite_steps
        state["_rank_skips"] = self._rank_skips
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if not hasattr(self, "_nonfinite_steps"):
            self._init_health()
        if not hasattr(self, "on_nonfinite"):  # pickled before the policy was saved
            self.on_nonfinite = "skip"

    def invalidate(self) -> None:
        """Recompute everything derived from the parameters' values (Grams, frames) at the next
        step. Call it after writing parameters in a way their version counter does not see
        (through ``p.data``); in-place writes under ``torch.no_grad()`` are detected already.
        (``load_state_dict`` trusts the loaded Grams and frames to be those of the parameters'
        current values, as a resume needs; call this after it when they are not.)"""
        log = self.__dict__.get("_log")
        if log is not None:
            params = [p for group in self.param_groups for p in group["params"]]
            log.forget([*params, *(local_alias(p) for p in params if is_dtensor(p))])

    @staticmethod
    def _check_parameter(p: torch.Tensor) -> None:
        """Raise a ``ValueError`` for a parameter this optimizer cannot step (default: none)."""

    # ------------------------------------------------------------------------ the step loop
    def _head_update(
        self, p: torch.Tensor, geometry: HeadGeometry, group: dict, keep: torch.Tensor
    ) -> HeadUpdate | Direction:
        """The optimizer's head kernel at ``p`` (its state read, nothing written); ``keep``: a
        0-dim bool, False when the step is withheld for a non-finite gradient."""
        raise NotImplementedError(f"{type(self).__name__} has no head kernel")

    def _manifold_update(self, p: torch.Tensor, group: dict, keep: torch.Tensor) -> HeadUpdate:
        """The update of a parameter on another geoopt manifold (default: refused at
        ``add_param_group`` by ``_check_parameter``)."""
        raise NotImplementedError(f"{type(self).__name__} does not step {p.manifold!r}")

    def _plain_step(self, group: dict, batch: PlainBatch) -> None:
        """torch's functional kernel on ``batch.params`` (:class:`PlainBatch`; one device)."""
        raise NotImplementedError(f"{type(self).__name__} has no plain step")

    def _stepped(self, p: torch.Tensor, group: dict, update: HeadUpdate | Direction) -> None:
        """After everything was written: the head parameter ``p``'s bookkeeping (default none)."""

    def _group_update(
        self, group: dict, loss: torch.Tensor | None, nonfinite: dict
    ) -> list[tuple[torch.Tensor, HeadUpdate]] | None:
        """For an update that couples a whole group (one speed, one norm; QuotientECD): one
        :class:`HeadUpdate` per parameter with a gradient, each with a 0-dim ``ok``; None
        (default): the group's parameters step one by one. Its head updates enter the policy,
        not the rank-skip count (``ok`` is the whole group's)."""
        return None

    def _step(self, nonfinite: dict[torch.device, torch.Tensor], loss: torch.Tensor | None) -> None:
        """The one step loop (see the class docstring)."""
        proposed: list[tuple[torch.Tensor, bool, bool, HeadUpdate]] = []  # p, head, counted
        plain: dict[tuple[int, torch.device, bool], list] = defaultdict(list)
        stepped: list[tuple[torch.Tensor, dict, HeadUpdate | Direction]] = []
        for index, group in enumerate(self.param_groups):
            coupled = self._group_update(group, loss, nonfinite)
            if coupled is not None:
                proposed += [(p, geometry_of(p) is not None, False, u) for p, u in coupled]
                continue
            for p in group["params"]:
                if p.grad is None:
                    continue
                keep = nonfinite[p.device] == 0
                geometry, update = geometry_of(p), None
                if geometry is not None:
                    update = self._head_update(p, geometry, group, keep)
                    stepped.append((p, group, update))
                elif manifold_of(p) is not None:
                    update = self._manifold_update(p, group, keep)
                if isinstance(update, HeadUpdate):
                    proposed.append((p, geometry is not None, geometry is not None, update))
                else:
                    plain[(index, p.device, update is not None)].append((p, update))
        self._enforce_policy(nonfinite, [u.ok for _, is_head, _, u in proposed if is_head])
        for p, _, counted, update in proposed:
            write_update(self.state[p], p, update)
            if counted:
                lost = ~update.ok & (nonfinite[p.device] == 0)
                self._count(self._rank_skips, p.device, lost.sum())
        for (index, device, along), entries in plain.items():
            params = [p for p, _ in entries]
            directions = [d.tensor for _, d in entries] if along else None
            batch = PlainBatch(params, directions, nonfinite[device])
            self._plain_step(self.param_groups[index], batch)
        for p, group, update in stepped:
            self._stepped(p, group, update)

    @optimizer_step
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """Perform one optimization step (``closure`` re-evaluates the model and returns the loss)."""
        if closure is None and self.needs_closure:
            raise ValueError(
                f"{type(self).__name__} needs the loss value: call optimizer.step(closure) with a "
                "closure that returns the loss"
            )
        loss, grads = self._closure_and_grads(closure)
        if grads:
            nonfinite = found_nonfinite(grads)
            self._step(nonfinite, loss)
            for device, flag in nonfinite.items():
                self._count(self._nonfinite_steps, device, flag)
        return loss
