"""quotientopt.lora: PEFT LoRA pairs stepped on the GL(r) quotient (float64, a tiny Llama built
from a config: nothing is downloaded)."""

from __future__ import annotations

import warnings

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.optimizers import create_loraplus_optimizer, create_riemannian_optimizer  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from quotientopt.lora import create_quotient_optimizer, lora_pairs  # noqa: E402
from quotientopt.optim import QuotientAdam, QuotientMuon, QuotientSGD  # noqa: E402

VOCAB = 48
QUOTIENT = {
    "quotient-muon": (QuotientMuon, {"lr": 2e-3}),
    "quotient-adam": (QuotientAdam, {"lr": 1e-3}),
    "quotient-sgd": (QuotientSGD, {"lr": 0.01, "momentum": 0.9}),
}


def base_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).double()


def lora_model(init: bool | str = False, second: bool = True) -> PeftModel:
    """Two trainable adapters (one rsLoRA, rank 4 and 3) on attention and MLP projections."""
    model = get_peft_model(
        base_model(),
        LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj", "down_proj"],
            init_lora_weights=init,
        ),
    )
    if second:
        model.add_adapter(
            "second",
            LoraConfig(
                r=3,
                lora_alpha=6,
                use_rslora=True,
                target_modules=["k_proj", "o_proj"],
                init_lora_weights=init,
            ),
        )
        model.base_model.set_adapter(["default", "second"])
    return model


def batches(steps: int, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (2, 10), generator=g) for _ in range(steps)]


def refactorize(model: PeftModel, cond: float = 1000.0, seed: int = 3) -> None:
    """Every pair to (B G, G^{-1} A) with a random G of condition number ``cond``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pair in lora_pairs(model):
            r = pair.rank
            u = torch.linalg.qr(torch.randn(r, r, generator=g, dtype=torch.float64)).Q
            v = torch.linalg.qr(torch.randn(r, r, generator=g, dtype=torch.float64)).Q
            s = torch.logspace(0, torch.log10(torch.tensor(cond)).item(), r, dtype=torch.float64)
            big = u @ torch.diag(s) @ v.T
            pair.b.copy_(pair.b @ big)
            pair.a.copy_(torch.linalg.solve(big, pair.a))


def products(model: PeftModel) -> list[torch.Tensor]:
    return [(p.b @ p.a).detach().clone() for p in lora_pairs(model)]


def train(model, optimizer, data, scheduler=None) -> None:
    for x in data:
        model(input_ids=x, labels=x).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if scheduler is not None:
            scheduler.step()


def largest_difference(p: list[torch.Tensor], q: list[torch.Tensor]) -> float:
    return max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(p, q, strict=True))


def make_optimizer(name: str, model: PeftModel) -> torch.optim.Optimizer:
    if name in QUOTIENT:
        cls, options = QUOTIENT[name]
        return create_quotient_optimizer(model, cls, **options)
    if name == "adamw":
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    if name == "lora+":
        return create_loraplus_optimizer(model, torch.optim.AdamW, lr=3e-3, loraplus_lr_ratio=16)
    if name == "riemannian":
        return create_riemannian_optimizer(model, torch.optim.AdamW, lr=3e-3)
    raise AssertionError(name)


def test_pairs_cover_every_adapter():
    model = lora_model()
    pairs = lora_pairs(model)
    # 2 layers x (q, v, down) for "default" + 2 x (k, o) for "second"
    assert len(pairs) == 10
    assert {p.adapter for p in pairs} == {"default", "second"}
    optimizer = create_quotient_optimizer(model, QuotientMuon, lr=0.02)
    assert sum(s.shape[0] for s in optimizer.sectors) == 10


@pytest.mark.parametrize("name", [*QUOTIENT, "adamw", "lora+", "riemannian"])
def test_products_do_not_depend_on_the_factorization(name):
    """50 steps from a cond-1000 re-factorization of every adapter: the quotient optimizers'
    products agree with the plain start to 1e-10; AdamW, LoRA+ and PEFT's Riemannian AdamW
    differ by more than 1e-3."""
    data = batches(50)
    runs = []
    for refactor in (False, True):
        model = lora_model()
        if refactor:
            refactorize(model)
        train(model, make_optimizer(name, model), data)
        runs.append(products(model))
    difference = largest_difference(runs[1], runs[0])
    if name in QUOTIENT:
        assert difference < 1e-10, difference
    else:
        assert difference > 1e-3, difference


@pytest.mark.parametrize("name", list(QUOTIENT))
def test_zero_start_leaves_the_function_and_reaches_full_rank(name):
    """PEFT's B = 0 start: the first (regularized) step gives every B full column rank, and the
    step is invariant under an orthogonal re-factorization (B = 0 -> A = Q^T A)."""
    data = batches(6)
    runs = []
    for orthogonal in (False, True):
        model = lora_model(init=True)
        assert all(float(p.b.abs().max()) == 0 for p in lora_pairs(model))
        if orthogonal:
            g = torch.Generator().manual_seed(5)
            with torch.no_grad():
                for pair in lora_pairs(model):
                    q = torch.linalg.qr(torch.randn(pair.rank, pair.rank, generator=g).double()).Q
                    pair.a.copy_(q.T @ pair.a)
        optimizer = make_optimizer(name, model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the rank-deficient warning
            train(model, optimizer, data[:1])
        for pair in lora_pairs(model):
            assert int(torch.linalg.matrix_rank(pair.b)) == pair.rank
        train(model, optimizer, data[1:])
        runs.append(products(model))
    assert largest_difference(runs[1], runs[0]) < 1e-10


def test_save_load_resume_equals_uninterrupted(tmp_path):
    data = batches(12)
    model = lora_model(init=True, second=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        optimizer = create_quotient_optimizer(model, QuotientAdam, lr=3e-3)
        train(model, optimizer, data)
    uninterrupted = products(model)

    model = lora_model(init=True, second=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        optimizer = create_quotient_optimizer(model, QuotientAdam, lr=3e-3)
        train(model, optimizer, data[:6])
    model.save_pretrained(tmp_path / "adapter")
    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")
    del model, optimizer

    resumed = PeftModel.from_pretrained(base_model(), tmp_path / "adapter", is_trainable=True)
    optimizer = create_quotient_optimizer(resumed, QuotientAdam, lr=3e-3)
    optimizer.load_state_dict(torch.load(tmp_path / "optimizer.pt", weights_only=False))
    train(resumed, optimizer, data[6:])
    assert largest_difference(products(resumed), uninterrupted) < 1e-12


def test_merge_and_unload_equals_the_adapted_model():
    model = lora_model(init=True, second=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        train(model, create_quotient_optimizer(model, QuotientMuon, lr=0.02), batches(10))
    x = batches(1, seed=9)[0]
    with torch.no_grad():
        adapted = model(input_ids=x).logits
        base = base_model()(input_ids=x).logits
        merged = model.merge_and_unload()(input_ids=x).logits
    assert float((adapted - base).abs().max()) > 1e-3  # training changed the model
    assert float((merged - adapted).abs().max()) < 1e-5


def test_external_write_is_picked_up():
    """Loading other adapter weights between steps (a write into the PEFT parameters) is copied
    into the optimizer's sectors before the next step."""
    model = lora_model(second=False)
    optimizer = create_quotient_optimizer(model, QuotientSGD, lr=0.05)
    train(model, optimizer, batches(2))
    pair = lora_pairs(model)[0]
    with torch.no_grad():
        pair.b.mul_(2.0)
        pair.a.mul_(0.5)
    expected = (pair.b @ pair.a).detach().clone()
    x = batches(1, seed=4)[0]
    model(input_ids=x, labels=x).loss.backward()
    for p in model.parameters():
        if p.grad is not None:
            p.grad.zero_()
    optimizer.step()  # zero gradients: the quotient step leaves the (re-scaled) pair in place
    assert torch.allclose(pair.b @ pair.a, expected, atol=1e-12, rtol=0)


def test_bad_input_gets_one_clear_error():
    model = lora_model(second=False)
    with pytest.raises(ValueError, match="must be one of QuotientMuon"):
        create_quotient_optimizer(model, torch.optim.AdamW, lr=1e-3)
    with pytest.raises(ValueError, match="no trainable LoRA pair"):
        create_quotient_optimizer(base_model(), QuotientMuon, lr=1e-3)
    dora = get_peft_model(base_model(), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ValueError, match="DoRA"):
        create_quotient_optimizer(dora, QuotientMuon, lr=1e-3)


def test_other_trainable_parameters_get_adamw():
    model = get_peft_model(
        base_model(),
        LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]),
    )
    optimizer = create_quotient_optimizer(model, QuotientMuon, lr=0.02, rest_lr=1e-3)
    assert isinstance(optimizer.rest, torch.optim.AdamW)
    assert optimizer.param_groups[-1]["lr"] == 1e-3
    head = [p for n, p in model.named_parameters() if "modules_to_save" in n and p.requires_grad]
    before = [p.detach().clone() for p in head]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        train(model, optimizer, batches(2))
    assert all(float((p - q).abs().max()) > 0 for p, q in zip(head, before, strict=True))


def test_trainer_and_symmetry_callback(tmp_path):
    pytest.importorskip("accelerate")
    from torch.utils.data import Dataset
    from transformers import Trainer, TrainingArguments, get_cosine_schedule_with_warmup

    from quotientopt.integrations.trainer import SymmetryCallback

    class Tokens(Dataset):
        def __init__(self) -> None:
            self.rows = torch.cat(batches(4))

        def __len__(self) -> int:
            return len(self.rows)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"input_ids": self.rows[i], "labels": self.rows[i]}

    model = lora_model(init=True, second=False)
    optimizer = create_quotient_optimizer(model, QuotientMuon, lr=0.02)
    scheduler = get_cosine_schedule_with_warmup(optimizer, 1, 4)
    callback = SymmetryCallback(logdir=tmp_path / "tb", every=1)
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=2,
        max_steps=4,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
    )
    before = products(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=Tokens(),
            optimizers=(optimizer, scheduler),
            callbacks=[callback],
        )
        trainer.train()
    assert largest_difference(products(model), before) > 0
    history = callback.monitor.history if callback.monitor is not None else None
    assert history is None  # closed at the end of training; the events are on disk
    events = list((tmp_path / "tb").rglob("events.out.tfevents.*"))
    assert events


def test_monitor_reports_every_adapted_module(tmp_path):
    from quotientopt.tensorboard import SymmetryMonitor

    model = lora_model(second=True)
    optimizer = create_quotient_optimizer(model, QuotientSGD, lr=0.05, momentum=0.9)
    monitor = SymmetryMonitor(model, optimizer, tmp_path, every=1)
    train(model, optimizer, batches(3))
    names = {tag.split("/", 1)[1] for tag in monitor.history if tag.startswith("charge_norm/")}
    assert len(names) == 10 and all(".LoRA." in n for n in names)
    for prefix in ("charge_drift/", "vertical_fraction_preconditioned/"):
        values = [v for t, h in monitor.history.items() if t.startswith(prefix) for _, v in h]
        assert values and all(v == v for v in values)  # present and not NaN
    monitor.close()
