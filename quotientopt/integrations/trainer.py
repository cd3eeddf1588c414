"""A Hugging Face ``TrainerCallback`` that attaches :class:`~quotientopt.tensorboard.SymmetryMonitor`.

>>> trainer = Trainer(
...     model=model,  # e.g. a GPT-2 converted with quotientopt.nn.convert
...     args=TrainingArguments(output_dir="out", logging_steps=10),
...     train_dataset=data,
...     optimizers=(optimizer, scheduler),
...     callbacks=[SymmetryCallback(every=10)],
... )
>>> trainer.train()

The monitor is created when training begins (on the main process only), on the model and the
optimizer that the ``Trainer`` steps, and writes to ``logdir`` (default: ``<logging_dir>/symmetry``,
or ``<output_dir>/symmetry`` when the arguments have no logging folder). It hooks
``optimizer.step()`` as it does in a plain loop, so its step count is the optimizer's; the
``Trainer``'s logged training loss is passed on as ``loss/train``. On a resumed run the step count
starts at the checkpoint's global step, and the charge drift is measured from the resumed point.
Needs ``transformers`` (and ``accelerate``, which its ``Trainer`` needs).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from quotientopt.tensorboard import SymmetryMonitor

__all__ = ["SymmetryCallback"]


def _innermost(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer under accelerate's ``AcceleratedOptimizer`` wrappers (which keep the wrapped
    one as ``.optimizer``), whose state and step hooks the monitor reads."""
    while not type(optimizer).__module__.startswith("quotientopt") and isinstance(
        getattr(optimizer, "optimizer", None), torch.optim.Optimizer
    ):
        optimizer = optimizer.optimizer
    return optimizer


class SymmetryCallback(TrainerCallback):
    """Watch the head symmetry of a model trained by ``transformers.Trainer`` in TensorBoard.

    Args:
        logdir: where the monitor writes its events (default: ``<logging_dir>/symmetry``).
        every: log the diagnostics every this many optimizer steps (>= 1).
        **monitor_options: passed on to :class:`~quotientopt.tensorboard.SymmetryMonitor`
            (``per_head``, ``histogram_every``, ``probe``; ``loss_every`` defaults to 1 here,
            since the ``Trainer`` already averages the loss over its ``logging_steps``).

    ``monitor`` is the running :class:`~quotientopt.tensorboard.SymmetryMonitor` (None before
    training starts and on processes other than the main one).
    """

    def __init__(
        self, logdir: str | os.PathLike | None = None, every: int = 50, **monitor_options: Any
    ) -> None:
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"SymmetryCallback: every must be an int >= 1, got {every!r}")
        self.logdir, self.every = logdir, every
        self.monitor_options = {"loss_every": 1, **monitor_options}
        self.monitor: SymmetryMonitor | None = None

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: torch.nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        **kwargs: Any,
    ) -> None:
        if not state.is_world_process_zero:
            return
        if model is None or optimizer is None:
            raise ValueError(
                "SymmetryCallback needs the model and the optimizer at on_train_begin; "
                "transformers.Trainer passes both"
            )
        logdir = self.logdir
        if logdir is None:
            logdir = Path(getattr(args, "logging_dir", None) or args.output_dir) / "symmetry"
        if self.monitor is not None:
            self.monitor.close()
        self.monitor = SymmetryMonitor(
            model, _innermost(optimizer), logdir, self.every, **self.monitor_options
        )
        self.monitor.steps = state.global_step

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        loss = (logs or {}).get("loss")
        if self.monitor is not None and isinstance(loss, (int, float)) and math.isfinite(loss):
            self.monitor.log_loss(float(loss))

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.monitor is not None:
            self.monitor.close()
            self.monitor = None
