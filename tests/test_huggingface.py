"""Hugging Face GPT-2 and BERT attention converted to quotient twins: same function, masks and
padding included, both attention kernels, a round trip back, GL(k) invariance, and training."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel
from transformers.models.bert.modeling_bert import BertAttention
from transformers.models.gpt2.modeling_gpt2 import GPT2Attention

from quotientopt.nn import convert, export
from quotientopt.nn.huggingface import QuotientBertAttention, QuotientGPT2Attention, register
from quotientopt.optim import HybridOptimizer, QuotientSGD
from quotientopt.symmetry import audit, find_sectors
from quotientopt.tensorboard import attention_patterns
from tests.helpers import matrix_with_condition, rng

IMPLEMENTATIONS = ["eager", "sdpa"]
VOCAB, LENGTH = 50, 7


def gpt2(implementation: str = "eager", seed: int = 0, **overrides) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=4,
        vocab_size=VOCAB,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        attn_implementation=implementation,
        **overrides,
    )
    return GPT2LMHeadModel(config).eval()


def bert(implementation: str = "eager", seed: int = 0, **overrides) -> BertModel:
    torch.manual_seed(seed)
    config = BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=VOCAB,
        max_position_embeddings=32,
        attn_implementation=implementation,
        **overrides,
    )
    return BertModel(config).eval()


def inputs(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Three sequences: unpadded, right-padded and left-padded."""
    ids = torch.randint(1, VOCAB, (3, LENGTH), generator=rng(seed))
    mask = torch.ones(3, LENGTH, dtype=torch.long)
    mask[1, 4:] = 0
    mask[2, :2] = 0
    return ids, mask


def max_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    return (x - y).abs().max().item()


def test_transformers_version_is_the_supported_one():
    assert int(transformers.__version__.split(".")[0]) >= 5
    register()  # idempotent


# ------------------------------------------------------------------------------- equivalence
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_gpt2_converts_and_exports_computing_the_same_function(implementation):
    model = gpt2(implementation)
    ids, mask = inputs()
    with torch.no_grad():
        before = model(ids, attention_mask=mask).logits
        unmasked = model(ids).logits
    original = model.transformer.h[0].attn.c_attn.weight.detach().clone()
    assert convert(model) is model
    assert all(isinstance(block.attn, QuotientGPT2Attention) for block in model.transformer.h)
    with torch.no_grad():
        assert max_diff(model(ids, attention_mask=mask).logits, before) <= 1e-5
        assert max_diff(model(ids).logits, unmasked) <= 1e-5
        assert max_diff(model(ids, attention_mask=mask, use_cache=False).logits, before) <= 1e-5
    export(model)
    assert all(type(block.attn) is GPT2Attention for block in model.transformer.h)
    assert max_diff(model.transformer.h[0].attn.c_attn.weight, original) <= 1e-6
    with torch.no_grad():
        assert max_diff(model(ids, attention_mask=mask).logits, before) <= 1e-5


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("decoder", [False, True])
def test_bert_converts_and_exports_computing_the_same_function(implementation, decoder):
    model = bert(implementation, is_decoder=decoder)
    ids, mask = inputs()
    with torch.no_grad():
        before = model(ids, attention_mask=mask, use_cache=False).last_hidden_state
    convert(model)
    assert all(isinstance(layer.attention, QuotientBertAttention) for layer in model.encoder.layer)
    assert model.encoder.layer[0].attention.is_causal == decoder
    with torch.no_grad():
        after = model(ids, attention_mask=mask, use_cache=False).last_hidden_state
    assert max_diff(after, before) <= 1e-5
    export(model)
    assert all(type(layer.attention) is BertAttention for layer in model.encoder.layer)
    with torch.no_grad():
        again = model(ids, attention_mask=mask, use_cache=False).last_hidden_state
    assert max_diff(again, before) <= 1e-5


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_dropout_in_training_mode_matches_draw_for_draw(implementation):
    ids, mask = inputs()
    for model, output in (
        (gpt2(implementation), "logits"),
        (bert(implementation), "last_hidden_state"),
    ):
        model.train()  # the configs' default dropout 0.1 everywhere
        torch.manual_seed(5)
        before = getattr(model(ids, attention_mask=mask), output)
        convert(model)
        torch.manual_seed(5)
        after = getattr(model(ids, attention_mask=mask), output)
        assert max_diff(after, before) <= 1e-5


def test_attention_weights_are_returned_and_recorded_as_by_the_originals():
    ids, mask = inputs()
    for model in (gpt2("eager"), bert("eager")):
        with torch.no_grad():
            before = model(ids, attention_mask=mask, output_attentions=True).attentions
            convert(model)
            after = model(ids, attention_mask=mask, output_attentions=True).attentions
        assert len(after) == len(before) == 2
        for a, b in zip(after, before, strict=True):
            assert a.shape == (3, 4, LENGTH, LENGTH)
            assert max_diff(a, b) <= 1e-5


def test_gpt2_generation_with_the_key_value_cache_is_unchanged():
    model = gpt2("sdpa")
    prompt = torch.randint(1, VOCAB, (2, 4), generator=rng(3))
    settings = {"max_new_tokens": 6, "do_sample": False, "attention_mask": torch.ones_like(prompt)}
    with torch.no_grad():
        before = model.generate(prompt, **settings)
        convert(model)
        after = model.generate(prompt, **settings)
    assert torch.equal(after, before)


def test_geometry_options_reach_the_sectors_and_keep_the_function():
    model = bert()
    ids, mask = inputs()
    with torch.no_grad():
        before = model(ids, attention_mask=mask).last_hidden_state
        convert(model, qk_geometry="orthogonal", vo_geometry="orthogonal")
        after = model(ids, attention_mask=mask).last_hidden_state
    assert model.encoder.layer[0].attention.attn.qk_geometry == "orthogonal"
    assert max_diff(after, before) <= 1e-5


# ---------------------------------------------------------------------------------- symmetry
@torch.no_grad()
def act_on_every_head(module, gen: torch.Generator) -> None:
    """A random well-conditioned GL(k) re-factorization of both sectors of ``module.attn``."""
    attn = module.attn
    for point, manifold in ((attn.qk, attn.qk_manifold), (attn.vo, attn.vo_manifold)):
        g = matrix_with_condition((attn.num_heads,), attn.head_dim, attn.head_dim, 5.0, gen, None)
        point.copy_(manifold.act(point.double(), g).to(point.dtype))


def test_gl_refactorization_of_converted_layers_leaves_the_models_unchanged():
    gen = rng(7)
    ids, mask = inputs()
    model = convert(gpt2())
    with torch.no_grad():
        before = model(ids, attention_mask=mask).logits
        act_on_every_head(model.transformer.h[1].attn, gen)
        assert max_diff(model(ids, attention_mask=mask).logits, before) <= 1e-4
        model.transformer.h[1].attn.attn.vo.mul_(3.0)  # not a group action: the function moves
        assert max_diff(model(ids, attention_mask=mask).logits, before) > 1e-3
    model = convert(bert())
    with torch.no_grad():
        before = model(ids, attention_mask=mask).last_hidden_state
        act_on_every_head(model.encoder.layer[0].attention, gen)
        assert max_diff(model(ids, attention_mask=mask).last_hidden_state, before) <= 1e-4


# ---------------------------------------------------------------------------------- training
def test_converted_gpt2_trains_with_the_hybrid_optimizer():
    model = convert(gpt2("sdpa", seed=2)).train()
    ids = torch.randint(1, VOCAB, (2, 8), generator=rng(4))
    start = model.transformer.h[0].attn.attn.qk.detach().clone()
    optimizer = HybridOptimizer.for_parameters(
        model.parameters(),
        heads=lambda ps: QuotientSGD(ps, lr=0.05, momentum=0.9),
        rest=lambda ps: torch.optim.AdamW(ps, lr=1e-3),
    )
    losses = []
    for _ in range(150):  # AdamW at 1e-3 moves GPT-2's small embeddings slowly
        loss = model(ids, labels=ids, use_cache=False).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    assert max_diff(model.transformer.h[0].attn.attn.qk, start) > 1e-3  # the heads trained too


# ------------------------------------------------------------------------------- unsupported
def test_gpt2_cross_attention_is_refused_naming_the_module_and_leaving_the_model():
    model = gpt2(add_cross_attention=True)
    with pytest.raises(ValueError, match=r"transformer\.h\.0\.crossattention.*cross-attention"):
        convert(model)
    assert all(type(block.attn) is GPT2Attention for block in model.transformer.h)


def test_unsupported_configurations_and_options_are_refused():
    with pytest.raises(ValueError, match=r"transformer\.h\.0\.attn.*reorder_and_upcast_attn"):
        convert(gpt2(reorder_and_upcast_attn=True))
    model = bert()
    with pytest.raises(ValueError, match=r"encoder\.layer\.0\.attention.*rope"):
        convert(model, rope=True)
    assert all(type(layer.attention) is BertAttention for layer in model.encoder.layer)
    with pytest.raises(ValueError, match="fixed-rank"):
        convert(model, qk_geometry="fixed-rank")
    twin = convert(model).encoder.layer[0].attention
    x = torch.randn(1, 3, 32)
    with pytest.raises(NotImplementedError, match="head_mask"):
        twin(x, head_mask=torch.ones(4))
    with pytest.raises(NotImplementedError, match="cross-attention"):
        twin(x, encoder_hidden_states=x)


def test_without_transformers_register_asks_for_it(monkeypatch):
    import importlib.util
    import sys

    import quotientopt.nn.huggingface as installed

    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now fails
    spec = importlib.util.spec_from_file_location("_hf_without_transformers", installed.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(ImportError, match="pip install transformers"):
        module.register()


# ------------------------------------------------------------------- the attention registry
@pytest.mark.parametrize("converted", [False, True])
def test_registry_reads_gpt2_at_the_attention_path_with_its_true_patterns(converted):
    """The standard and the converted GPT-2 have the same sector names and the monitor's
    attention patterns equal the model's own (eager, output_attentions=True): causal, scaled
    as the layer scales."""
    model = gpt2()
    if converted:
        model = convert(model)
    names = [s.name for s in find_sectors(model)]
    assert names == [f"transformer.h.{i}.{kind}" for i in (0, 1) for kind in ("attn.QK", "attn.VO")]
    assert [row.path for row in audit(model).rows if row.sector == "QK"] == [
        "transformer.h.0.attn",
        "transformer.h.1.attn",
    ]
    ids = torch.randint(1, VOCAB, (2, LENGTH), generator=rng(3))
    with torch.no_grad():
        truth = model(ids, output_attentions=True).attentions
    patterns = attention_patterns(model, ids)
    assert sorted(patterns) == ["transformer.h.0.attn", "transformer.h.1.attn"]
    for layer, weights in enumerate(truth):
        assert max_diff(patterns[f"transformer.h.{layer}.attn"].float(), weights) < 1e-5


def test_hugging_face_types_register_without_importing_the_twins():
    """A fresh interpreter: importing quotientopt's layers imports neither transformers nor the
    reference GPT; once the user has a transformers model, the registry finds its attention
    without `import quotientopt.nn.huggingface`."""
    code = """
import sys
import quotientopt.nn, quotientopt.symmetry, quotientopt.tensorboard
assert "transformers" not in sys.modules, "quotientopt imported transformers"
assert "quotientopt.models" not in sys.modules, "quotientopt.nn imported quotientopt.models"
from transformers import GPT2Config, GPT2LMHeadModel
model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=11, n_positions=8))
assert "quotientopt.nn.huggingface" not in sys.modules
from quotientopt.symmetry import find_sectors
assert [s.name for s in find_sectors(model)] == ["transformer.h.0.attn.QK", "transformer.h.0.attn.VO"]
from quotientopt.nn import convert
assert type(convert(model).transformer.h[0].attn).__name__ == "QuotientGPT2Attention"
print("ok")
"""
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
