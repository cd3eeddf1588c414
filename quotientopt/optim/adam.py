r"""QuotientAdam: Adam-type adaptivity for the heads whose trajectory of products is exactly
independent of the factorization (in the spirit of LoRA-RITE, Yen et al., ICLR 2025).

Why Adam breaks the symmetry: its second moment is elementwise in the coordinates of :math:`A` and
:math:`B`, and those coordinates are the arbitrary factorization. The construction below keeps
every adaptive statistic in a frame that only rotates under a re-factorization.

**Frames.** For :math:`Z = [A; B]` let :math:`P = B^\top B = L_P L_P^\top` and
:math:`Q = A^\top A = L_Q L_Q^\top` (lower Cholesky factors). Then :math:`U_B = B L_P^{-\top}` and
:math:`U_A = A L_Q^{-\top}` are orthonormal bases of the column spaces of :math:`B` and :math:`A`.
Under :math:`Z \mapsto (A G, B G^{-\top})` the Cholesky factors become
:math:`G^{-1} L_P O_P` and :math:`G^\top L_Q O_Q` with orthogonal :math:`O_P, O_Q`, and the frames
rotate: :math:`U_B \mapsto U_B O_P`, :math:`U_A \mapsto U_A O_Q`.

**Unmagnified gradients** (the gradient of :math:`W = AB^\top` seen through the frame, with
:math:`E = \nabla_W f`):

.. math:: \bar G_A = \nabla_A f \, L_P^{-\top} = E\, U_B, \qquad
          \bar G_B = \nabla_B f \, L_Q^{-\top} = E^\top U_A  \qquad (n \times k,\ m \times k).

**Moments in the frame** (one side shown; :math:`t` counts steps):

.. math::

    M_t &= \beta_1 M_{t-1} + (1 - \beta_1) \bar G_t, \qquad
    V_t = \beta_2 V_{t-1} + (1 - \beta_2) \bar G_t^\top \bar G_t \quad (k \times k), \\
    S_t &= \frac{M_t}{1 - \beta_1^t}
           \Big( \big(\tfrac{V_t}{1 - \beta_2^t}\big)^{1/2} + \epsilon I \Big)^{-1}, \qquad
    A_{t+1} = A_t - \eta\, S_t L_P^{-1} \quad (\text{so } \Delta W = -\eta\, S_t U_B^\top),

and likewise :math:`B_{t+1} = B_t - \eta S^B_t L_Q^{-1}`. The matrix root acts on the ``k x k``
second moment, so adaptivity mixes directions only inside the frame, where it is a rotation.

**Transport between frames.** After the step the frames move to those of :math:`Z_{t+1}`; the
moments follow by the projection :math:`T = U_+^\top U = L_{P_+}^{-1} B_+^\top B\, L_P^{-\top}`:

.. math:: M \leftarrow M T^\top, \qquad
          V \leftarrow T V T^\top + \frac{\operatorname{tr} V - \operatorname{tr}(T V T^\top)}{k} I .

The second term puts the trace that the projection dropped back isotropically (LoRA-RITE's
"escaped mass" in its simplest invariant form), so a rotating subspace never makes the
preconditioner smaller and the step larger.

**Invariance.** Every quantity above transforms as :math:`\bar G \mapsto \bar G O`,
:math:`M \mapsto M O`, :math:`V \mapsto O^\top V O`, :math:`T \mapsto O_+^\top T O`, and the matrix
function commutes with :math:`O`; hence :math:`S_t L_P^{-1} \mapsto S_t L_P^{-1} G` and the products
:math:`A_t B_t^\top` do not depend on the representative the run starts from (in exact
arithmetic; tested to 1e-10 in float64 at ``cond(G) = 1000``).

**Weight decay** is decoupled (as AdamW) and has a quotient meaning: ``"product"`` scales the point
by :math:`1 - \eta\lambda` (the Riemannian gradient of :math:`\tfrac12\|AB^\top\|_F^2` in the
preconditioned metric, so :math:`W \mapsto (1-\eta\lambda)^2 W`), ``"nuclear"`` steps along the
Riemannian gradient of :math:`\|AB^\top\|_*`. Neither is the representative-dependent factor decay.

State per head: :math:`M` (``(n + m) x k``, the size of the parameter), two ``k x k`` second
moments and a step count: :math:`(n + m)k + 2k^2` numbers against AdamW's :math:`2(n + m)k`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch
from torch.optim.adam import adam as torch_adam

from quotientopt.distributed import steps_local_shards
from quotientopt.linalg import compute_dtype, sym_funm
from quotientopt.manifolds.protocol import HeadGeometry
from quotientopt.optim._base import (
    NONFINITE_POLICIES,
    HealthMixin,
    KeepStateDtypes,
    Momentum,
    WriteLog,
    check_choice,
    check_number,
    found_nonfinite,
    geometry_of,
    is_quotient_parameter,
    manifold_of,
    where_heads,
)
from quotientopt.optim.sgd import WEIGHT_DECAY_MODES


def adam_root(v: torch.Tensor, eps: float) -> torch.Tensor:
    r""":math:`(V^{1/2} + \epsilon I)^{-1}` for symmetric PSD ``v`` of shape ``(..., k, k)``.

    Through the eigendecomposition, so it commutes with every rotation of the frame:
    :math:`f(O^\top V O) = O^\top f(V) O`. Negative rounding-level eigenvalues are clamped to 0.
    """
    return sym_funm(v, lambda lam: 1.0 / (lam.clamp_min(0).sqrt() + eps))


def trace_preserving_transport(v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    r""":math:`T V T^\top + \frac{\mathrm{tr}\, V - \mathrm{tr}(T V T^\top)}{k} I` (``(..., k, k)``)."""
    moved = t @ v @ t.transpose(-1, -2)
    lost = v.diagonal(dim1=-2, dim2=-1).sum(-1) - moved.diagonal(dim1=-2, dim2=-1).sum(-1)
    k = v.shape[-1]
    return moved + (lost / k)[..., None, None] * torch.eye(k, dtype=v.dtype, device=v.device)


def right_solve_upper(x: torch.Tensor, r: torch.Tensor, *, upper: bool = True) -> torch.Tensor:
    r""":math:`X R^{-1}` for triangular ``r`` (``(..., k, k)``), backward stable."""
    return torch.linalg.solve_triangular(r, x, upper=upper, left=False)


class Frames(NamedTuple):
    r"""Orthonormal frames of a factor pair: thin QR factorizations :math:`A = U_A R_A`,
    :math:`B = U_B R_B` (``U`` of shape ``(..., rows, k)``, ``R`` upper triangular ``k x k``), in
    float32 or better, and a per-head flag ``ok``.

    Householder QR is backward stable, so the frames are orthonormal to working precision and
    their error is of order :math:`\varepsilon\,\kappa(B)`, against :math:`\varepsilon\,\kappa(B)^2`
    for frames built from the Gram's Cholesky factor (which cost the invariance two digits at
    :math:`\kappa(G) = 10^3`). Any frame works for the invariance, whatever the sign convention of
    the QR: two orthonormal bases of one column space differ by an orthogonal matrix.
    """

    u_a: torch.Tensor
    r_a: torch.Tensor
    u_b: torch.Tensor
    r_b: torch.Tensor
    scale: torch.Tensor  # (..., 2): the largest squared column norm of A and of B
    ok: torch.Tensor  # (...,): both factors finite and of full column rank to working precision

    @classmethod
    def of(cls, a: torch.Tensor, b: torch.Tensor, reference: Frames | None = None) -> Frames:
        """The frames of ``(a, b)``; ``reference`` (the previous point's) flags a factor that
        collapsed in one step, as :func:`quotientopt.linalg.spd_cholesky_flagged` does."""
        dtype = compute_dtype(a.dtype)
        u_a, r_a = torch.linalg.qr(a.to(dtype))
        u_b, r_b = torch.linalg.qr(b.to(dtype))
        r = torch.stack((r_a, r_b), dim=-3)
        scale = (r * r).sum(-2).amax(-1)  # column norms of A, B are those of R_A, R_B
        if reference is not None:
            scale = torch.maximum(scale, reference.scale)
        k = a.shape[-1]
        pivots = torch.diagonal(r, dim1=-2, dim2=-1) ** 2
        regular = pivots.amin(-1) > 4 * k * torch.finfo(dtype).eps * scale
        ok = (regular & torch.isfinite(r).flatten(-3).all(-1)[..., None]).all(-1)
        return cls(u_a, r_a, u_b, r_b, scale, ok)


class QuotientAdam(KeepStateDtypes, HealthMixin, torch.optim.Optimizer):
    r"""Adam on the head quotients, exactly invariant under re-factorization (see the module docs).

    Args:
        params: parameters or parameter groups, as for ``torch.optim.AdamW``.
        lr: learning rate :math:`\eta`.
        betas: :math:`(\beta_1, \beta_2)`, each in ``[0, 1)``.
        eps: :math:`\epsilon > 0`, added to the square root of the second moment.
        weight_decay: decoupled decay :math:`\lambda \ge 0`. On quotient parameters its meaning is
            set by ``weight_decay_mode`` (``"product"`` or ``"nuclear"``, as in
            :class:`~quotientopt.optim.QuotientSGD`); on other parameters it is AdamW's.
        weight_decay_mode: ``"product"`` or ``"nuclear"``.
        maximize: maximize the objective instead.
        on_nonfinite: ``"skip"`` (default, no host synchronisation), ``"warn"`` or ``"raise"``,
            as in :class:`~quotientopt.optim.QuotientSGD`: a NaN/Inf gradient skips the whole step,
            a head update that would lose rank skips that head (its factors, moments and step
            count are kept).

    Quotient parameters (``geoopt.ManifoldParameter`` on
    :class:`~quotientopt.manifolds.FactorQuotient`) take the invariant step, batched over every
    head of the tensor with its ``k x k`` algebra in float32 or better (moments are stored in that
    dtype); parameters on other geoopt manifolds take geoopt's ``RiemannianAdam`` step; plain
    tensors take torch's fused AdamW step. The frames come from the factors' own Grams, so the
    manifold's ``metric`` does not enter the step (its ``damping`` does, through the Grams).

    The eigendecomposition of the ``k x k`` second moments (``torch.linalg.eigh``) checks
    convergence on CUDA, which is one host synchronisation per quotient tensor and step.
    """

    # restored in float32 or better by load_state_dict (KeepStateDtypes)
    full_precision_state = ("exp_avg", "exp_avg_sq", "step")

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        weight_decay_mode: str = "product",
        maximize: bool = False,
        on_nonfinite: str = "skip",
    ) -> None:
        check_number("lr", lr, 0.0, float("inf"))
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"invalid betas: {betas!r}; expected a pair (beta1, beta2)")
        check_number("betas[0]", betas[0], 0.0, 1.0, high_open=True)
        check_number("betas[1]", betas[1], 0.0, 1.0, high_open=True)
        check_number("eps", eps, 0.0, float("inf"), low_open=True)
        check_number("weight_decay", weight_decay, 0.0, float("inf"))
        check_choice("weight_decay_mode", weight_decay_mode, WEIGHT_DECAY_MODES)
        check_choice("on_nonfinite", on_nonfinite, NONFINITE_POLICIES)
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            weight_decay_mode=weight_decay_mode,
            maximize=maximize,
        )
        super().__init__(params, defaults)
        self.on_nonfinite = on_nonfinite
        self._log = WriteLog()
        self._init_health()

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._log = WriteLog()
        if not hasattr(self, "_nonfinite_steps"):
            self._init_health()

    def momentum(self, p: torch.Tensor) -> Momentum | None:
        r"""The first moment at ``p`` as the tangent vector it moves the point along: for head
        parameters :math:`(M_A R_B^{-\top}, M_B R_A^{-\top})` (the frame coordinates mapped back
        to the factors, before the second-moment preconditioning; it transforms as
        :math:`v \mapsto v G`), for the others AdamW's Euclidean ``exp_avg``. None before the
        first step."""
        exp_avg = self.state[p].get("exp_avg") if p in self.state else None
        if exp_avg is None:
            return None
        geometry = geometry_of(p)
        if geometry is None:
            return Momentum(exp_avg, "covector")
        frames = self._frames(p, geometry)
        m_a, m_b = geometry.factors(exp_avg)
        vector = torch.cat(
            (
                right_solve_upper(m_a, frames.r_b.mT, upper=False),
                right_solve_upper(m_b, frames.r_a.mT, upper=False),
            ),
            dim=-2,
        )
        return Momentum(vector.to(p.dtype), "vector")

    # ----------------------------------------------------------------------------- helpers
    def _frames(self, p: torch.Tensor, manifold: HeadGeometry) -> Frames:
        """The frames of ``p``: cached from the previous step while ``p`` is unmodified."""
        cached = self._log.get(p, "frames")
        if cached is not None and not self._log.modified_elsewhere(p):
            return cached
        return Frames.of(*manifold.factors(p.detach()))

    def _quotient_update(self, p: torch.Tensor, grad: torch.Tensor, group: dict, keep):
        """Candidate point, moments, step count and frames for one FactorQuotient tensor
        (nothing written to ``p`` or its state)."""
        manifold = geometry_of(p)
        if manifold.is_row_sharded:
            raise ValueError(
                "QuotientAdam needs whole factors for its orthonormal frames, but this manifold's "
                "rows are sharded (row_reduce is set); use QuotientSGD for row-sharded sectors"
            )
        z = p.detach()
        dtype = compute_dtype(z.dtype)
        beta1, beta2 = group["betas"]
        lr, eps = group["lr"], group["eps"]
        frames = self._frames(p, manifold)
        state = self.state[p]
        batch, k = z.shape[:-2], z.shape[-1]
        if "exp_avg" in state:
            exp_avg, exp_avg_sq, step = state["exp_avg"], state["exp_avg_sq"], state["step"]
        else:
            exp_avg = torch.zeros(z.shape, dtype=dtype, device=z.device)
            exp_avg_sq = torch.zeros((*batch, 2, k, k), dtype=dtype, device=z.device)
            step = torch.zeros(batch, dtype=dtype, device=z.device)

        # unmagnified gradients: grad_A R_B^{-1} = E U_B and grad_B R_A^{-1} = E^T U_A
        grad_a, grad_b = (x.to(dtype) for x in manifold.factors(grad))
        if group["maximize"]:
            grad_a, grad_b = -grad_a, -grad_b
        unmagnified = (right_solve_upper(grad_a, frames.r_b), right_solve_upper(grad_b, frames.r_a))
        exp_avg_a, exp_avg_b = manifold.factors(exp_avg)
        m_a = torch.lerp(exp_avg_a, unmagnified[0], 1 - beta1)
        m_b = torch.lerp(exp_avg_b, unmagnified[1], 1 - beta1)
        v = torch.lerp(exp_avg_sq, torch.stack([g.mT @ g for g in unmagnified], dim=-3), 1 - beta2)
        new_step = step + 1
        bias1 = (1 - beta1**new_step)[..., None, None, None]
        bias2 = (1 - beta2**new_step)[..., None, None, None]
        # a head with a non-finite moment (NaN/Inf gradient, or a rank-deficient frame) is
        # discarded below; give eigh a harmless matrix there, or it fails to converge
        finite = frames.ok & torch.isfinite(v).flatten(-3).all(-1)
        eye = torch.eye(k, dtype=dtype, device=z.device)
        root = adam_root(torch.where(finite[..., None, None, None], v / bias2, eye), eps) / bias1
        # the step in the frame, S = M root, mapped back to the factors: dA = S_A R_B^{-T}
        delta_a = right_solve_upper(m_a @ root[..., 0, :, :], frames.r_b.mT, upper=False)
        delta_b = right_solve_upper(m_b @ root[..., 1, :, :], frames.r_a.mT, upper=False)
        new = z.to(dtype)
        if group["weight_decay"]:
            decay = lr * group["weight_decay"]
            if group["weight_decay_mode"] == "product":
                new = new * (1 - decay)  # the preconditioned Riemannian gradient of |AB^T|^2 / 2
            else:
                unchecked = manifold.grams(z, check=False)  # bad heads are caught below
                new = new - decay * manifold.decay_rgrad(z, "nuclear", unchecked).to(dtype)
        new = (new - lr * torch.cat((delta_a, delta_b), dim=-2)).to(z.dtype)

        new_frames = Frames.of(*manifold.factors(new), reference=frames)
        ok = frames.ok & new_frames.ok & keep
        # transport into the frames of the new point: T = U_+^T U (k x k, per side)
        t_a, t_b = new_frames.u_b.mT @ frames.u_b, new_frames.u_a.mT @ frames.u_a
        m_new = torch.cat((m_a @ t_a.mT, m_b @ t_b.mT), dim=-2)
        v_new = trace_preserving_transport(v, torch.stack((t_a, t_b), dim=-3))
        old = (exp_avg, exp_avg_sq, step)
        return new, (m_new, v_new, new_step), old, (new_frames, frames), ok

    def _manifold_update(self, p: torch.Tensor, grad: torch.Tensor, group: dict):
        """geoopt RiemannianAdam's step for a parameter on another geoopt manifold (nothing written)."""
        manifold = p.manifold
        z = p.detach()
        beta1, beta2 = group["betas"]
        state = self.state[p]
        if group["maximize"]:
            grad = -grad
        if group["weight_decay"]:
            grad = grad.add(z, alpha=group["weight_decay"])
        rgrad = manifold.egrad2rgrad(z, grad)
        exp_avg = state.get("exp_avg", torch.zeros_like(z))
        exp_avg_sq = state.get("exp_avg_sq", torch.zeros_like(manifold.component_inner(z, rgrad)))
        step = state.get("step", torch.zeros((), device=z.device)) + 1
        exp_avg = torch.lerp(exp_avg, rgrad, 1 - beta1)
        exp_avg_sq = torch.lerp(exp_avg_sq, manifold.component_inner(z, rgrad), 1 - beta2)
        denom = (exp_avg_sq / (1 - beta2**step)).sqrt().add_(group["eps"])
        direction = exp_avg / (1 - beta1**step) / denom
        new, exp_avg = manifold.retr_transp(z, -group["lr"] * direction, exp_avg)
        return new, (exp_avg, exp_avg_sq, step)

    # -------------------------------------------------------------------------------- step
    @steps_local_shards
    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """Perform one optimization step (``closure`` re-evaluates the model and returns the loss)."""
        loss, grads = self._closure_and_grads(closure)
        if not grads:
            return loss
        nonfinite = found_nonfinite(grads)

        # phase 1: every quotient and manifold update, computed and checked, nothing written
        pending = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                keep = nonfinite[p.device] == 0
                if is_quotient_parameter(p):
                    pending.append(("quotient", p, *self._quotient_update(p, p.grad, group, keep)))
                elif manifold_of(p) is not None:
                    new, moments = self._manifold_update(p, p.grad, group)
                    pending.append(("manifold", p, new, moments, None, None, keep))
        self._enforce_policy(nonfinite, [ok for kind, *_, ok in pending if kind == "quotient"])

        # phase 2: write
        for kind, p, new, moments, old, frames, ok in pending:
            state = self.state[p]
            if kind == "manifold":
                exp_avg, exp_avg_sq, step = moments
                state["exp_avg"] = torch.where(ok, exp_avg, state.get("exp_avg", 0 * exp_avg))
                state["exp_avg_sq"] = torch.where(
                    ok, exp_avg_sq, state.get("exp_avg_sq", 0 * exp_avg_sq)
                )
                state["step"] = torch.where(ok, step, step - 1)
                p.copy_(torch.where(ok, new, p))
                continue
            for name, value, previous in zip(
                ("exp_avg", "exp_avg_sq", "step"), moments, old, strict=True
            ):
                state[name] = where_heads(ok, value, previous)
            where_heads(ok, new, p.detach(), out=p.detach())
            new_frames, old_frames = frames
            kept = Frames(
                *(where_heads(ok, x, y) for x, y in zip(new_frames, old_frames, strict=True))
            )
            self._log.put(p, "frames", kept)
            self._log.record(p)
            self._count(self._rank_skips, p.device, (~ok & (nonfinite[p.device] == 0)).sum())

        for group in self.param_groups:
            plain = [p for p in group["params"] if p.grad is not None and manifold_of(p) is None]
            for device in {p.device for p in plain}:
                params = [p for p in plain if p.device == device]
                for p in params:
                    state = self.state[p]
                    if "step" not in state:
                        state["step"] = torch.zeros((), dtype=torch.float32, device=device)
                        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                        state["exp_avg_sq"] = torch.zeros_like(
                            p, memory_format=torch.preserve_format
                        )
                beta1, beta2 = group["betas"]
                torch_adam(
                    params,
                    [p.grad for p in params],
                    [self.state[p]["exp_avg"] for p in params],
                    [self.state[p]["exp_avg_sq"] for p in params],
                    [],
                    [self.state[p]["step"] for p in params],
                    fused=True,
                    found_inf=nonfinite[device],
                    decoupled_weight_decay=True,
                    amsgrad=False,
                    beta1=beta1,
                    beta2=beta2,
                    lr=group["lr"],
                    weight_decay=group["weight_decay"],
                    eps=group["eps"],
                    maximize=group["maximize"],
                )
        for device, flag in nonfinite.items():
            self._count(self._nonfinite_steps, device, flag)
        return loss
