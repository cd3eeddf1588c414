"""transformers.Trainer with quotientopt: a converted tiny GPT-2 (built from a config, no download)
trains with a quotient optimizer, saves and resumes from its own checkpoint, and the shipped
SymmetryCallback writes the symmetry diagnostics to TensorBoard."""

from __future__ import annotations

import math

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from quotientopt.integrations.trainer import SymmetryCallback
from quotientopt.nn import convert
from quotientopt.optim import QuotientAdam, QuotientSGD, geometry_of, split_parameters

STEPS, SAVE_AT = 6, 3


def tiny_gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=4,
        vocab_size=64,
        n_positions=16,
        bos_token_id=0,
        eos_token_id=0,
    )
    return convert(GPT2LMHeadModel(config))


class Tokens(torch.utils.data.Dataset):
    def __init__(self) -> None:
        # learnable: every token is followed by the next one modulo 8
        self.ids = (torch.arange(32)[:, None] + torch.arange(16)) % 8

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def optimizer_for(name: str, model: torch.nn.Module):
    heads, rest = split_parameters(model.parameters())
    assert heads and all(geometry_of(p) is not None for p in heads)
    groups = [{"params": heads, "lr": 0.05 if name == "sgd" else 3e-3}, {"params": rest}]
    if name == "sgd":
        optimizer = QuotientSGD(groups, lr=0.3, momentum=0.9, nesterov=True)
    else:
        optimizer = QuotientAdam(groups, lr=3e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    return optimizer, scheduler


def run(tmp_path, name: str, resume: str | None = None, callbacks=()) -> Trainer:
    model = tiny_gpt2()
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=STEPS,
        per_device_train_batch_size=4,
        save_steps=SAVE_AT,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=Tokens(),
        optimizers=optimizer_for(name, model),
        callbacks=list(callbacks),
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def parameters(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.named_parameters()}


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_trainer_trains_saves_and_resumes(tmp_path, name):
    """The Trainer steps the quotient optimizer (the loss falls, the heads move), saves
    checkpoints with its state, and a run resumed from the step-3 checkpoint ends on the
    uninterrupted run's parameters bitwise."""
    start = {k: v.detach().clone() for k, v in tiny_gpt2().named_parameters()}
    whole = run(tmp_path / "whole", name)
    losses = [e["loss"] for e in whole.state.log_history if "loss" in e]
    assert len(losses) == STEPS and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0], losses
    final = parameters(whole)
    heads = [k for k in final if k.endswith((".qk", ".vo"))]
    assert heads and all(not torch.equal(final[k], start[k]) for k in heads)
    checkpoint = tmp_path / "whole" / "out" / f"checkpoint-{SAVE_AT}"
    assert (checkpoint / "optimizer.pt").exists()
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=False)
    assert saved["state"], "the checkpoint holds no optimizer state"

    resumed = run(tmp_path / "whole", name, resume=str(checkpoint))
    assert resumed.state.global_step == STEPS
    for key, value in parameters(resumed).items():
        assert torch.equal(value, final[key]), key


def test_symmetry_callback_writes_the_charges(tmp_path):
    """SymmetryCallback attaches SymmetryMonitor to the Trainer's model and optimizer: the charge
    scalars of every sector and the summary charge drift are in the event files, finite, at the
    logged steps, together with the Trainer's loss."""
    logdir = tmp_path / "tb"
    callback = SymmetryCallback(logdir, every=2)
    run(tmp_path, "sgd", callbacks=[callback])
    assert callback.monitor is None  # closed at the end of training
    events = EventAccumulator(str(logdir))
    events.Reload()
    scalars = events.Tags()["scalars"]
    charges = [t for t in scalars if t.startswith("charge_norm/")]
    assert len(charges) == 4, scalars  # 2 layers x (QK, VO)
    drift = events.Scalars("summary/charge_drift")
    assert [e.step for e in drift] == [0, 2, 4]
    assert all(math.isfinite(e.value) for e in drift) and drift[-1].value > 0
    for tag in charges:
        assert all(math.isfinite(e.value) and e.value > 0 for e in events.Scalars(tag))
    assert len(events.Scalars("loss/train")) == STEPS


def test_symmetry_callback_checks_every():
    with pytest.raises(ValueError, match="every must be an int >= 1"):
        SymmetryCallback(every=0)
