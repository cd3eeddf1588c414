"""quotientopt.lora with PEFT's and transformers' own machinery: gradient checkpointing, bf16,
adapter switching, Trainer resume from a checkpoint, and the B = 0 start under a cond-1000
re-factorization (tiny float64 Llama from tests/test_lora.py; nothing is downloaded)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # the tiny model and helpers of test_lora.py

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from peft import LoraConfig, get_peft_model  # noqa: E402
from test_lora import (  # noqa: E402
    QUOTIENT,
    base_model,
    batches,
    largest_difference,
    lora_model,
    make_optimizer,
    products,
    refactorize,
    train,
)

from quotientopt.lora import create_quotient_optimizer  # noqa: E402
from quotientopt.optim import QuotientAdam, QuotientMuon, QuotientSGD  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the rank-deficient start


@pytest.mark.parametrize("name", list(QUOTIENT))
def test_zero_start_is_invariant_under_any_refactorization(name):
    """PEFT's B = 0 start re-factorized by a cond-1000 G (A -> G^{-1} A; B G = 0): the first
    step floors only the singular Gram (B's), so B's step uses A's exact Gram and is
    GL(r)-equivariant, and the creation-time choice of A with orthogonal rows leaves the two
    starts an orthogonal G apart; the products after 8 float64 steps agree to 1e-10."""
    data = batches(8)
    runs = []
    for refactor in (False, True):
        model = lora_model(init=True)
        if refactor:
            refactorize(model)
        train(model, make_optimizer(name, model), data)
        runs.append(products(model))
    assert largest_difference(runs[1], runs[0]) < 1e-10


def test_gradient_checkpointing_changes_nothing():
    """The same steps with model.gradient_checkpointing_enable(): the same factors."""
    runs = []
    for checkpointing in (False, True):
        model = lora_model(second=False)
        if checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
            assert model.base_model.model.model.gradient_checkpointing
        model.train()
        train(model, create_quotient_optimizer(model, QuotientMuon, lr=0.02), batches(4))
        runs.append(products(model))
    assert largest_difference(runs[1], runs[0]) < 1e-12


def test_reentrant_checkpointing_with_input_grads():
    """PEFT's recipe for reentrant checkpointing (enable_input_require_grads) trains too."""
    model = lora_model(init=True, second=False)
    model.enable_input_require_grads()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.train()
    assert all(float(p.abs().max()) == 0 for p in products(model))  # B = 0
    train(model, create_quotient_optimizer(model, QuotientAdam, lr=3e-3), batches(3))
    assert all(float(p.abs().max()) > 0 for p in products(model))


def test_bf16_model_trains_close_to_float32():
    """A bf16 PEFT model (bf16 factors, bf16 sectors; the r x r algebra in float32): 10 steps
    stay finite, lower the loss, and the products stay within bf16's reach of the float32 run's."""
    data = batches(10)
    runs, losses = [], []
    for dtype in (torch.float32, torch.bfloat16):
        model = get_peft_model(
            base_model().to(dtype),
            LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
            autocast_adapter_dtype=False,  # PEFT would keep float32 adapters on a bf16 base
        )
        optimizer = create_quotient_optimizer(model, QuotientAdam, lr=3e-3)
        assert all(s.dtype == dtype for s in optimizer.sectors)
        x = data[0]
        first = float(model(input_ids=x, labels=x).loss.detach())
        train(model, optimizer, data)
        losses.append((first, float(model(input_ids=x, labels=x).loss.detach())))
        runs.append([p.float() for p in products(model)])
    assert all(torch.isfinite(p).all() for p in runs[1])
    assert losses[1][1] < losses[1][0]
    assert largest_difference(runs[1], runs[0]) < 0.1


def test_adapter_switching_moves_only_the_active_adapter():
    """Two adapters of one shape (so one sector tensor holds both); after set_adapter("other")
    only "other" gets gradients: its factors move, "default"'s stay bit-identical, also through
    the optimizer's momentum, and switching back moves "default" again."""
    model = get_peft_model(base_model(), LoraConfig(r=2, target_modules=["q_proj", "o_proj"]))
    model.add_adapter("other", LoraConfig(r=2, target_modules=["q_proj", "o_proj"]))
    model.base_model.set_adapter(["default", "other"])
    optimizer = create_quotient_optimizer(model, QuotientSGD, lr=0.05, momentum=0.9)
    assert len(optimizer.sectors) == 1  # both adapters in one (pairs, out + in, r) tensor
    train(model, optimizer, batches(3))  # momentum on both

    def factors(adapter: str) -> list[torch.Tensor]:  # frozen ones too (lora_pairs skips them)
        found = [
            p.detach().clone()
            for n, p in model.named_parameters()
            if ".lora_" in n and n.endswith(f".{adapter}.weight")
        ]
        assert len(found) == 8  # 2 layers x (q, o) x (A, B)
        return found

    model.set_adapter("other")  # PEFT freezes "default" (requires_grad False, no gradient)
    default, other = factors("default"), factors("other")
    train(model, optimizer, batches(3, seed=2))
    assert all(torch.equal(p, q) for p, q in zip(factors("default"), default, strict=True))
    assert all(not torch.equal(p, q) for p, q in zip(factors("other"), other, strict=True))

    model.set_adapter("default")
    default = factors("default")
    train(model, optimizer, batches(2, seed=3))
    assert all(not torch.equal(p, q) for p, q in zip(factors("default"), default, strict=True))


def test_trainer_resume_equals_uninterrupted(tmp_path):
    """transformers.Trainer with our optimizer and a scheduler: 6 steps in one go, and 3 steps
    + checkpoint + a new Trainer resumed from it (adapter, optimizer and scheduler restored by
    the Trainer) for 3 more: the same factors, from a full-rank start (so the creation-time
    balancing of the resumed optimizer must not undo the checkpoint's factors)."""
    pytest.importorskip("accelerate")
    from torch.utils.data import Dataset
    from transformers import Trainer, TrainingArguments, get_cosine_schedule_with_warmup

    class Tokens(Dataset):
        rows = torch.cat(batches(6))

        def __len__(self) -> int:
            return len(self.rows)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"input_ids": self.rows[i], "labels": self.rows[i]}

    def run(out: str, resume: str | None = None, max_steps: int = 6) -> list[torch.Tensor]:
        model = lora_model(second=False)
        optimizer = create_quotient_optimizer(model, QuotientAdam, lr=3e-3)
        scheduler = get_cosine_schedule_with_warmup(optimizer, 1, 6)
        args = TrainingArguments(
            output_dir=str(tmp_path / out),
            per_device_train_batch_size=2,
            max_steps=6,
            save_strategy="steps",
            save_steps=3,
            report_to=[],
            use_cpu=True,
            seed=0,
            data_seed=0,
        )
        trainer = Trainer(
            model=model, args=args, train_dataset=Tokens(), optimizers=(optimizer, scheduler)
        )
        trainer.train(resume_from_checkpoint=resume)
        return products(model)

    uninterrupted = run("a")
    resumed = run("b", resume=str(tmp_path / "a" / "checkpoint-3"))
    assert largest_difference(resumed, uninterrupted) < 1e-12


@pytest.mark.parametrize(
    ("name", "tag"),
    [
        ("quotient-sgd", "momentum_map_metric"),
        ("quotient-adam", "momentum_map_metric"),
        ("quotient-muon", "momentum_map_skew"),
        ("adamw", "momentum_map_skew"),
    ],
)
def test_monitor_logs_momentum_maps_per_adapted_module(tmp_path, name, tag):
    """SymmetryMonitor on a PEFT model: charges, vertical fractions and the momentum map for
    each of the 10 adapted modules. QuotientSGD's momentum is horizontal (its metric momentum
    map vanishes to rounding); AdamW's Euclidean momentum has a clear skew share."""
    from quotientopt.tensorboard import SymmetryMonitor

    model = lora_model()
    optimizer = make_optimizer(name, model)
    monitor = SymmetryMonitor(model, optimizer, tmp_path, every=1)
    train(model, optimizer, batches(3))
    monitor.close()

    def last(prefix: str) -> dict[str, float]:
        return {
            t.split("/", 1)[1]: h[-1][1]
            for t, h in monitor.history.items()
            if t.startswith(prefix + "/")
        }

    for prefix in ("charge_norm", "vertical_fraction_preconditioned", tag):
        values = last(prefix)
        assert len(values) == 10 and all(".LoRA." in n for n in values), prefix
        assert all(v == v for v in values.values()), prefix  # not NaN
    if name == "quotient-sgd":
        assert max(last(tag).values()) < 1e-12
    if name == "adamw":
        assert min(last(tag).values()) > 1e-2
