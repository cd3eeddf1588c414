"""The non-finite-gradient policy and the per-head health counters of the quotient optimizers."""

from __future__ import annotations

import warnings

import torch


class HealthMixin:
    """Counters of skipped updates, kept as device tensors (no synchronisation while stepping).

    ``nonfinite_steps``: steps skipped because a gradient held NaN/Inf (all parameters kept).
    ``rank_skips``: head updates skipped because they would have left a head rank-deficient or
    non-finite (that head's factors and momentum kept).
    """

    def _init_health(self) -> None:
        self._nonfinite_steps: dict[torch.device, torch.Tensor] = {}
        self._rank_skips: dict[torch.device, torch.Tensor] = {}

    def _closure_and_grads(self, closure) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """Evaluate ``closure`` (with gradients enabled) and list the parameters' gradients."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grads = [
            p.grad for group in self.param_groups for p in group["params"] if p.grad is not None
        ]
        if any(g.is_sparse for g in grads):
            raise ValueError(
                f"{type(self).__name__} does not support sparse gradients; use dense gradients"
            )
        return loss, grads

    def _enforce_policy(self, nonfinite: dict, head_flags: list[torch.Tensor]) -> None:
        """Apply ``on_nonfinite`` (``warn`` / ``raise``; ``skip`` does nothing) to a non-finite
        gradient and to the heads whose flag in ``head_flags`` is False (rank loss; heads of a step
        already skipped for a non-finite gradient do not count twice)."""
        if self.on_nonfinite == "skip":
            return
        any_nonfinite = torch.stack(list(nonfinite.values())).amax() > 0
        lost = (
            torch.cat([(~ok & ~any_nonfinite).flatten() for ok in head_flags])
            if head_flags
            else torch.zeros(0, dtype=torch.bool)
        )
        self._apply_policy(self.on_nonfinite, any_nonfinite, lost, "the quotient parameters")

    @torch.compiler.disable
    def _warn_if_rank_deficient(self, deficient: torch.Tensor) -> None:
        """Warn once per optimizer that ``deficient.sum()`` heads start rank-deficient and take
        the regularized step (``grams(..., regularize=True)``). Reads one number on the host:
        callers call it on a tensor's first step only."""
        if getattr(self, "_warned_rank_deficient", False):
            return
        count = int(deficient.sum())
        if count:
            self._warned_rank_deficient = True
            warnings.warn(
                f"{type(self).__name__}: {count} head(s) start rank-deficient (a zero or "
                "low-rank factor, e.g. a zero-initialized output projection). The quotient "
                "metric is singular there, so they take a regularized step (P + delta I) until "
                "they reach full rank; the exact invariance holds on full-rank heads only.",
                RuntimeWarning,
                stacklevel=4,
            )

    def _count(self, store: dict, device: torch.device, amount: torch.Tensor) -> None:
        if device not in store:
            store[device] = torch.zeros((), dtype=torch.int64, device=device)
        store[device] += amount.to(torch.int64)

    def nonfinite_steps(self) -> int:
        """How many steps were skipped for a NaN/Inf gradient (synchronises)."""
        return int(sum(int(v) for v in self._nonfinite_steps.values()))

    def rank_skips(self) -> int:
        """How many head updates were skipped for rank loss (synchronises)."""
        return int(sum(int(v) for v in self._rank_skips.values()))

    def _apply_policy(
        self, policy: str, nonfinite: torch.Tensor, bad_heads: torch.Tensor, name: str
    ) -> None:
        """``warn`` and ``raise`` synchronise once per call; ``skip`` never does."""
        if policy == "skip":
            return
        n_bad = int(bad_heads.sum())
        problems = []
        if bool(nonfinite):
            problems.append("a gradient holds NaN or Inf")
        if n_bad:
            problems.append(
                f"{n_bad} head update(s) of {name} would lose rank or become non-finite"
            )
        if not problems:
            return
        message = (
            f"{type(self).__name__}: {' and '.join(problems)}; the step was not applied to them. "
            "Fix: lower the learning rate, clip gradients, or check the loss for overflow."
        )
        if policy == "raise":
            raise ValueError(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)
