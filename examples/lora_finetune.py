"""Fine-tune a (tiny, config-built) Llama with LoRA on the GL(r) quotient, next to PEFT's AdamW.

``quotientopt.lora.create_quotient_optimizer`` takes a PEFT model and returns one
``torch.optim.Optimizer``: every LoRA pair ``(lora_B, lora_A)`` is stepped as a sector of
``FactorQuotient(out, in)`` with ``k = r``, everything else trainable with AdamW. The PEFT model
stays a PEFT model: ``merge_and_unload`` gives a plain model computing the same function.

The example shows three things, on this file's own bytes (nothing is downloaded):

1. QuotientAdam and AdamW both train the adapters from PEFT's ``B = 0`` start;
2. invariance: from a full-rank start and the same start re-factorized by a condition-1000
   ``G`` (``B -> B G``, ``A -> G^{-1} A``, the same model), QuotientAdam ends with the same
   products ``B A`` (to rounding), AdamW does not;
3. ``merge_and_unload`` equals the adapted model's logits.

    python examples/lora_finetune.py [--steps 30]
    python examples/lora_finetune.py --time   # step times, AdamW against QuotientAdam
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from quotientopt.lora import create_quotient_optimizer
from quotientopt.optim import QuotientAdam

TEXT = torch.tensor(list(Path(__file__).read_bytes()))
BLOCK = 32


def batch(step: int, size: int = 8) -> torch.Tensor:
    """Random windows of the text, the same for the same step."""
    gen = torch.Generator().manual_seed(step)
    start = torch.randint(len(TEXT) - BLOCK, (size, 1), generator=gen)
    return TEXT[start + torch.arange(BLOCK)]


def base_model() -> LlamaForCausalLM:
    """A 2-layer Llama with hidden size 32, the stand-in for a pretrained model."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config)


def lora_model(init_lora_weights: bool = True):
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        lora_dropout=0.0,
        init_lora_weights=init_lora_weights,  # True: PEFT's B = 0 start
    )
    torch.manual_seed(1)
    return get_peft_model(base_model(), config)


def train(model, optimizer: torch.optim.Optimizer, steps: int) -> list[float]:
    losses = []
    for step in range(steps):
        ids = batch(step)
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def pairs(model) -> list[tuple[torch.nn.Parameter, torch.nn.Parameter]]:
    """``(lora_B.weight, lora_A.weight)`` of every adapted layer."""
    return [
        (m.lora_B["default"].weight, m.lora_A["default"].weight)
        for m in model.modules()
        if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})
    ]


def products(model) -> list[torch.Tensor]:
    return [b.detach() @ a.detach() for b, a in pairs(model)]


@torch.no_grad()
def refactorize(model, cond: float = 1000.0) -> None:
    """``B -> B G``, ``A -> G^{-1} A`` with one condition-``cond`` ``G`` per pair."""
    gen = torch.Generator().manual_seed(2)
    for b, a in pairs(model):
        r = a.shape[0]
        q1, _ = torch.linalg.qr(torch.randn(r, r, generator=gen, dtype=torch.float64))
        q2, _ = torch.linalg.qr(torch.randn(r, r, generator=gen, dtype=torch.float64))
        s = torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), r, dtype=torch.float64)
        g = q1 @ torch.diag(s) @ q2
        b.copy_(b.double() @ g)
        a.copy_(torch.linalg.solve(g, a.double()))


def invariance_gap(make_optimizer, steps: int) -> float:
    """Largest product difference after ``steps`` from a start and its re-factorized twin."""
    torch.set_default_dtype(torch.float64)
    try:
        plain = lora_model(init_lora_weights=False)  # random B and A: a full-rank start
        twisted = copy.deepcopy(plain)
        refactorize(twisted)
        for model in (plain, twisted):
            train(model, make_optimizer(model), steps)
        return max(
            (p - q).abs().max().item()
            for p, q in zip(products(plain), products(twisted), strict=True)
        )
    finally:
        torch.set_default_dtype(torch.float32)


def main(steps: int = 30) -> dict[str, float]:
    quotient = lambda m: create_quotient_optimizer(m, QuotientAdam, lr=3e-3)  # noqa: E731
    adamw = lambda m: torch.optim.AdamW(  # noqa: E731
        [p for p in m.parameters() if p.requires_grad], lr=3e-3
    )
    results: dict[str, float] = {}
    for name, make in (("QuotientAdam", quotient), ("AdamW", adamw)):
        model = lora_model()
        losses = train(model, make(model), steps)
        results[f"{name} first loss"], results[f"{name} last loss"] = losses[0], losses[-1]
        results[f"{name} invariance gap"] = invariance_gap(make, steps)
        if name == "QuotientAdam":
            ids = batch(10_000)
            model.eval()
            with torch.no_grad():
                adapted = model(input_ids=ids).logits
                merged = model.merge_and_unload()(input_ids=ids).logits
            results["merge_and_unload diff"] = (adapted - merged).abs().max().item()
    return results


def timing(steps: int = 25) -> dict[str, float]:
    """Median milliseconds (after 5 warm-up steps, one CPU thread) of a full training step
    with AdamW and with QuotientAdam, and of QuotientAdam's pairing overhead: copying the
    gradients into the sectors and the factors back (``gather_grad`` + ``push``)."""
    torch.set_num_threads(1)
    ids = batch(0)
    results = {}

    def median(ts: list[float]) -> float:
        return 1e3 * sorted(ts)[len(ts) // 2]

    for name, make in (
        (
            "AdamW",
            lambda m: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=3e-3),
        ),
        ("QuotientAdam", lambda m: create_quotient_optimizer(m, QuotientAdam, lr=3e-3)),
    ):
        model = lora_model()
        optimizer = make(model)
        full, copies = [], []
        for _ in range(steps):
            t0 = time.perf_counter()
            loss = model(input_ids=ids, labels=ids).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            full.append(time.perf_counter() - t0)
            if name == "QuotientAdam":
                t0 = time.perf_counter()
                for bundle in optimizer.bundles:
                    bundle.gather_grad()
                    bundle.push()
                copies.append(time.perf_counter() - t0)
        results[f"{name} step ms"] = median(full[5:])
        if copies:
            results["QuotientAdam pairing copies ms"] = median(copies[5:])
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--time", action="store_true", help="time the steps instead")
    args = parser.parse_args()
    for key, value in (timing() if args.time else main(args.steps)).items():
        print(f"{key:>30}: {value:.3g}")
