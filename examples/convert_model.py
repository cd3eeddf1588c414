"""Convert an existing model's attention to quotient heads, train it, and export it back.

``quotientopt.nn.convert`` swaps every supported attention module (here: the
``torch.nn.MultiheadAttention`` inside a ``torch.nn.TransformerEncoder`` and, if ``transformers``
is installed, Hugging Face's ``GPT2Attention``) for a quotient twin computing the same function.
The model then trains with the hybrid optimizer (QuotientSGD on the heads, AdamW on the rest), and
``quotientopt.nn.export`` turns it back into the original module types, again without changing
the function. The tiny GPT-2 is built from a config: nothing is downloaded.

    python examples/convert_model.py [--steps 30]
"""

from __future__ import annotations

import argparse
import importlib.util
from collections.abc import Callable

import torch
from torch import nn

from quotientopt.nn import convert, export
from quotientopt.optim import HybridOptimizer, QuotientSGD, split_parameters

Forward = Callable[[nn.Module], torch.Tensor]


def round_trip(model: nn.Module, forward: Forward, loss_of: Forward, steps: int) -> dict:
    """Convert ``model``, train it for ``steps``, export it; the output gaps and the losses."""
    with torch.no_grad():
        before = forward(model.eval())
        convert(model)
        converted = forward(model)
    optimizer = HybridOptimizer.for_parameters(
        model.parameters(),
        heads=lambda ps: QuotientSGD(ps, lr=0.05, momentum=0.9),
        rest=lambda ps: torch.optim.AdamW(ps, lr=3e-3),
    )
    model.train()
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = loss_of(model)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    with torch.no_grad():
        trained = forward(model.eval())
        sectors = len(split_parameters(model.parameters())[0])
        export(model)
        exported = forward(model)
    return {
        "sectors": sectors,
        "convert_diff": (converted - before).abs().max().item(),
        "export_diff": (exported - trained).abs().max().item(),
        "left_quotient": len(split_parameters(model.parameters())[0]),
        "first_loss": losses[0],
        "last_loss": losses[-1],
    }


def encoder_case() -> tuple[nn.Module, Forward, Forward]:
    layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
    x, y = torch.randn(16, 10, 32), torch.randn(16, 10, 32)
    return model, lambda m: m(x), lambda m: nn.functional.mse_loss(m(x), y)


def gpt2_case() -> tuple[nn.Module, Forward, Forward]:
    from transformers import GPT2Config, GPT2LMHeadModel

    tiny = dict(n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=32, bos_token_id=0)
    no_dropout = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    config = GPT2Config(**tiny, **no_dropout, eos_token_id=0)
    ids = torch.randint(0, 64, (4, 16))
    return (
        GPT2LMHeadModel(config),
        lambda m: m(ids, use_cache=False).logits,
        lambda m: m(ids, labels=ids, use_cache=False).loss,
    )


def main(steps: int = 30) -> dict[str, dict]:
    torch.manual_seed(0)
    cases = {"TransformerEncoder": encoder_case}
    if importlib.util.find_spec("transformers") is not None:
        cases["GPT-2 (transformers)"] = gpt2_case
    results = {}
    for name, build in cases.items():
        results[name] = r = round_trip(*build(), steps=steps)
        print(
            f"{name:21s} {r['sectors']} quotient sectors | output gap after convert "
            f"{r['convert_diff']:.1e}, after export {r['export_diff']:.1e} | "
            f"loss {r['first_loss']:.3f} -> {r['last_loss']:.3f} in {steps} steps"
        )
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    main(parser.parse_args().steps)
