"""SymmetryMonitor and attention patterns: what reaches TensorBoard, read back with its own reader."""

from __future__ import annotations

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from quotientopt.models import GPT, GPTConfig
from quotientopt.optim import QuotientSGD
from quotientopt.tensorboard import SymmetryMonitor, attention_patterns

SMALL = {"n_layer": 2, "n_embd": 32, "n_head": 4, "block_size": 16}


def true_patterns(model, idx, quotient):
    """Layer 0's attention weights, computed the long way."""
    attention = model.h[0].attn
    x = model.h[0].ln_1(model.wte(idx) + model.wpe(torch.arange(idx.shape[1])))
    if quotient:
        return attention.attn(
            x, x, x, need_weights=True, is_causal=True, average_attn_weights=False
        )[1]
    q, k, _ = attention.c_attn(x).split(SMALL["n_embd"], dim=2)
    q, k = (t.view(*idx.shape, 4, -1).transpose(1, 2) for t in (q, k))
    scores = (q @ k.transpose(-1, -2)) / (q.shape[-1] ** 0.5)
    causal = torch.ones(idx.shape[1], idx.shape[1], dtype=torch.bool).triu(1)
    return scores.masked_fill(causal, float("-inf")).softmax(-1)


@pytest.mark.parametrize("quotient", [False, True])
def test_attention_patterns_match_the_model(quotient):
    torch.manual_seed(0)
    model = GPT(GPTConfig(quotient=quotient, **SMALL)).eval()
    idx = torch.randint(0, 256, (2, 10))
    patterns = attention_patterns(model, idx)
    assert len(patterns) == SMALL["n_layer"]
    first = patterns[next(iter(patterns))]
    assert (first.float() - true_patterns(model, idx, quotient)).abs().max() < 1e-5


def test_attention_patterns_of_a_torch_multihead_attention():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2)
    model = nn.Sequential()
    model.add_module("attention", mha)
    x = torch.randn(5, 3, 8)
    model.forward = lambda x: mha(x, x, x)[0]
    patterns = attention_patterns(model, x)
    assert (
        patterns["attention"].float() - mha(x, x, x, average_attn_weights=False)[1]
    ).abs().max() < 1e-5


def test_monitor_logs_what_it_promises(tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**SMALL))
    optimizer = QuotientSGD(model.parameters(), lr=0.05, momentum=0.9)
    idx = torch.randint(0, 256, (8, 17))
    monitor = SymmetryMonitor(
        model, optimizer, tmp_path, every=5, per_head=True, histogram_every=10, probe=idx[:2, :-1]
    )
    for _ in range(20):
        optimizer.zero_grad()
        _, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        optimizer.step()
        monitor.log_loss(loss)
    monitor.close({"optimizer": "quotient-sgd", "lr": 0.05})
    events = EventAccumulator(str(tmp_path), size_guidance={"images": 0, "histograms": 0})
    events.Reload()
    scalars = events.Tags()["scalars"]
    for tag in (
        "loss/train",
        "summary/charge_drift",
        "summary/momentum_map_metric",
        "summary/vertical_fraction_euclidean",
        "summary/vertical_fraction_preconditioned",
        "summary/cond_product",
        "summary/effective_rank",
        "summary/attention_entropy",
        "charge_drift/h.0.attn.attn.QK/head0",
    ):
        assert tag in scalars, tag
    assert [e.step for e in events.Scalars("summary/charge_drift")] == [0, 5, 10, 15]
    # QuotientSGD moves horizontally in the preconditioned metric, and its momentum map is 0
    assert max(e.value for e in events.Scalars("summary/vertical_fraction_preconditioned")) < 1e-6
    assert max(e.value for e in events.Scalars("summary/momentum_map_metric")) < 1e-5
    assert events.Tags()["histograms"] and events.Tags()["images"]
    assert len(monitor.optimizer._optimizer_step_pre_hooks) == 0  # close() removed its hooks


def test_monitor_needs_attention_and_a_sane_interval(tmp_path):
    model = nn.Linear(3, 3)
    with pytest.raises(ValueError, match="found no attention module"):
        SymmetryMonitor(model, torch.optim.SGD(model.parameters(), lr=0.1), tmp_path)
    gpt = GPT(GPTConfig(**SMALL))
    with pytest.raises(ValueError, match="every must be an int >= 1"):
        SymmetryMonitor(gpt, torch.optim.SGD(gpt.parameters(), lr=0.1), tmp_path, every=0)


def test_monitoring_does_not_change_the_training_run(tmp_path):
    """The probe forward pass runs in eval mode: it must not consume the random numbers that
    paper 003's resampled biases (or dropout) draw during training."""
    finals = []
    for monitored in (False, True):
        torch.manual_seed(0)
        model = GPT(GPTConfig(symmetry_breaking=True, dropout=0.1, **SMALL))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        idx = torch.randint(0, 256, (4, 17), generator=torch.Generator().manual_seed(1))
        if monitored:
            monitor = SymmetryMonitor(
                model, optimizer, tmp_path, every=1, histogram_every=1, probe=idx[:1, :-1]
            )
        for _ in range(6):
            optimizer.zero_grad()
            _, loss = model(idx[:, :-1], idx[:, 1:])
            loss.backward()
            optimizer.step()
        if monitored:
            monitor.close()
        finals.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*finals, strict=True))


def test_losses_are_averaged_over_a_window(tmp_path):
    model = GPT(GPTConfig(**SMALL))
    monitor = SymmetryMonitor(
        model, torch.optim.SGD(model.parameters(), lr=0.1), tmp_path, loss_every=4
    )
    for value in range(1, 10):
        monitor.log_loss(torch.tensor(float(value)))
    assert [v for _, v in monitor.history["loss/train"]] == [
        2.5,
        6.5,
    ]  # the 9th waits for its window
    with pytest.raises(ValueError, match="loss_every"):
        SymmetryMonitor(model, torch.optim.SGD(model.parameters(), lr=0.1), tmp_path, loss_every=0)


def test_monitor_survives_a_diverging_run(tmp_path):
    """Per-head values beyond 1e20 (a run blowing up) reach the scalars, not the histograms, whose
    TensorFlow-style buckets stop at 1e20 (tensorboard's writer raises 'histogram is empty')."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**SMALL))
    with torch.no_grad():
        for block in model.h:
            for p in block.attn.parameters():
                p.mul_(1e12)  # charges ~1e22
    optimizer = QuotientSGD(model.parameters(), lr=0.0)
    monitor = SymmetryMonitor(model, optimizer, tmp_path, every=1, histogram_every=1)
    idx = torch.randint(0, 256, (2, 9))
    optimizer.zero_grad()
    model(idx[:, :-1], idx[:, 1:])[1].backward()
    optimizer.step()
    monitor.close({"optimizer": "quotient-sgd", "lr": 0.0})
    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    events.Reload()
    assert events.Scalars("summary/charge_norm")[-1].value > 1e20
