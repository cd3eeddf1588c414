"""SymmetryMonitor and attention patterns: what reaches TensorBoard, read back with its own reader."""

from __future__ import annotations

import math

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from quotientopt.manifolds import FactorQuotient
from quotientopt.models import GPT, GPTConfig
from quotientopt.nn import QuotientMultiheadAttention, export
from quotientopt.optim import QuotientAdam, QuotientHamiltonian, QuotientSGD
from quotientopt.tensorboard import SymmetryMonitor, attention_patterns, metric_momentum_alignment

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
        "charge_drift/h.0.attn.QK/head0",
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


# ------------------------------------------------------------ issue 12 fault 3, issue 16 5-6
def attention_problem(dtype=torch.float64):
    """A quotient attention module, a batch and a loss of its output (GL(k)-invariant)."""
    torch.manual_seed(0)
    module = QuotientMultiheadAttention(16, 2, batch_first=True).to(dtype)
    x = torch.randn(4, 6, 16, dtype=dtype)
    target = torch.randn(4, 6, 16, dtype=dtype)

    def loss():
        return (module(x, x, x, need_weights=False)[0] - target).square().mean()

    return module, loss


def train(monitor, optimizer, loss, steps):
    for _ in range(steps):
        optimizer.zero_grad()
        value = loss()
        value.backward()
        optimizer.step()
        monitor.log_loss(value)


def adam_momentum_maps(tmp_path, lr):
    module, loss = attention_problem()
    optimizer = QuotientAdam(module.parameters(), lr=lr)
    monitor = SymmetryMonitor(module, optimizer, tmp_path / str(lr), every=1)
    train(monitor, optimizer, loss, 6)
    monitor.close()
    assert "summary/momentum_map_skew" not in monitor.history
    return torch.tensor([v for _, v in monitor.history["summary/momentum_map_metric"]])


def test_quotient_adam_momentum_map_is_read_as_the_tangent_vector_it_is(tmp_path):
    """Issue 12, fault 3: QuotientAdam's exp_avg lives in frame coordinates; read as a Euclidean
    momentum it gave a momentum map of ~0.5 on a GL(k)-invariant loss. Asked through
    ``momentum_of`` it is a tangent vector, horizontal at the point where each gradient was
    taken: at the current point its momentum map is only the drift of the frames since, O(lr)
    (0 in the continuum limit)."""
    small, large = adam_momentum_maps(tmp_path, 1e-4), adam_momentum_maps(tmp_path, 1e-3)
    assert len(small) == 6  # logged after every step
    assert small.max() < 1e-3
    ratio = large / small
    assert ((ratio > 8) & (ratio < 12)).all(), ratio  # proportional to the step size


def test_torch_adam_on_quotient_heads_has_a_vertical_momentum(tmp_path):
    """The same loss under torch's Adam (a Euclidean first moment): its skew momentum map is far
    from 0, so the measure above can fail."""
    module, loss = attention_problem()
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-2)
    monitor = SymmetryMonitor(module, optimizer, tmp_path, every=1)
    train(monitor, optimizer, loss, 4)
    monitor.close()
    assert "summary/momentum_map_metric" not in monitor.history
    assert max(v for _, v in monitor.history["summary/momentum_map_skew"]) > 0.05


def test_metric_momentum_measure_separates_horizontal_from_vertical():
    """``metric_momentum_alignment``: 0 for a horizontal tangent vector, > 0 for a generic one,
    and at most 1."""
    manifold = FactorQuotient(5, 4)
    torch.manual_seed(1)
    z = torch.randn(3, 9, 2, dtype=torch.float64)
    v = torch.randn(3, 9, 2, dtype=torch.float64)
    generic = metric_momentum_alignment(manifold, z, v)
    horizontal = metric_momentum_alignment(manifold, z, manifold.proju(z, v))
    assert generic.shape == (3,)
    assert (generic > 1e-3).all() and (generic <= 1 + 1e-12).all()
    assert horizontal.abs().max() < 1e-12


def test_close_writes_the_last_partial_loss_window(tmp_path):
    """Issue 16, fault 5: 25 steps with loss_every=10 wrote steps 1-20 only."""
    module, loss = attention_problem()
    optimizer = torch.optim.SGD(module.parameters(), lr=1e-2)
    monitor = SymmetryMonitor(module, optimizer, tmp_path, every=10, loss_every=10)
    losses = []
    for _ in range(25):
        optimizer.zero_grad()
        value = loss()
        value.backward()
        optimizer.step()
        monitor.log_loss(value)
        losses.append(float(value.detach()))
    monitor.close()
    written = monitor.history["loss/train"]
    assert [step for step, _ in written] == [10, 20, 25]
    assert written[-1][1] == pytest.approx(sum(losses[20:]) / 5, rel=1e-6)
    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("loss/train")] == [10, 20, 25]


@pytest.mark.parametrize("optimizer_class", [QuotientSGD, torch.optim.SGD])
def test_diagnostics_survive_non_finite_weights(tmp_path, optimizer_class):
    """Issue 16: a diverging run (NaN and Inf in the heads) is logged as NaN, never raises
    (eigh on NaN raised LinAlgError and aborted `quotientopt compare`)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**SMALL))
    optimizer = optimizer_class(model.parameters(), lr=1e-2, momentum=0.9)
    idx = torch.randint(0, 256, (2, 9))
    monitor = SymmetryMonitor(
        model, optimizer, tmp_path, every=1, histogram_every=1, probe=idx[:1, :-1]
    )
    for step in range(3):
        optimizer.zero_grad()
        model(idx[:, :-1], idx[:, 1:])[1].backward()
        if step == 2:
            with torch.no_grad():  # layer 0 diverges; layer 1 stays healthy
                for p in model.h[0].attn.parameters():
                    p.view(-1)[:5] = float("nan")
                    p.view(-1)[5:7] = float("inf")
        optimizer.step()
        monitor.log_loss(torch.tensor(float("nan")))
    summary = monitor.log_diagnostics()
    monitor.close()
    assert math.isnan(summary["charge_drift"]) or math.isinf(summary["charge_drift"])
    for tag in ("charge_drift", "cond_product", "vertical_fraction_euclidean"):
        values = dict(monitor.history[f"{tag}/h.1.attn.QK"])
        assert all(math.isfinite(v) for v in values.values()), tag  # the healthy layer
        broken = dict(monitor.history[f"{tag}/h.0.attn.QK"])
        assert not math.isfinite(broken[2]), tag


def run_tags(tmp_path, name, optimizer_of, **config):
    """The scalar and image tags of a short monitored run of the reference GPT."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**SMALL, **config))
    optimizer = optimizer_of(model)
    idx = torch.randint(0, 256, (4, 9))
    monitor = SymmetryMonitor(
        model, optimizer, tmp_path / name, every=2, histogram_every=2, probe=idx[:1, :-1]
    )
    for _ in range(4):
        optimizer.zero_grad()
        _, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        optimizer.step()
        monitor.log_loss(loss)
    monitor.close()
    events = EventAccumulator(str(tmp_path / name), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    return set(events.Tags()["scalars"]), set(events.Tags()["images"])


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def test_tags_are_the_same_for_every_flavour_of_an_architecture(tmp_path):
    """Issue 16, fault 6: sector tags come from the registry, so runs of the same architecture
    overlay in TensorBoard whether the heads are quotient or standard, whatever the optimizer,
    and symmetry-breaking runs log attention images too."""
    runs = {
        "standard": run_tags(tmp_path, "standard", sgd, quotient=False),
        "quotient": run_tags(tmp_path, "quotient", sgd, quotient=True),
        "breaking": run_tags(tmp_path, "breaking", sgd, quotient=False, symmetry_breaking=True),
        "breaking-quotient": run_tags(
            tmp_path, "breaking-quotient", sgd, quotient=True, symmetry_breaking=True
        ),
    }
    reference_scalars, reference_images = runs["standard"]
    assert "charge_drift/h.0.attn.QK" in reference_scalars
    assert reference_images == {"attention/h.0.attn", "attention/h.1.attn"}
    for name, (scalars, images) in runs.items():
        assert scalars == reference_scalars, name
        assert images == reference_images, name
    hamiltonian, _ = run_tags(
        tmp_path, "hamiltonian", lambda m: QuotientHamiltonian(m.parameters(), lr=1e-2)
    )
    per_sector = {tag for tag in reference_scalars if ".attn." in tag}
    momentum_free = {tag for tag in per_sector if not tag.startswith("momentum_map")}
    assert momentum_free <= hamiltonian
    assert {t.split("/", 1)[1] for t in hamiltonian if ".attn." in t} == {
        t.split("/", 1)[1] for t in per_sector
    }


@pytest.mark.parametrize(
    "variant",
    [{"rope": True}, {"qk_norm": True}, {"symmetry_breaking": True}, {"n_kv_head": 2}],
    ids=["rope", "qk_norm", "breaking", "gqa"],
)
def test_attention_patterns_follow_rope_qk_norm_and_breaking(variant):
    """The registry's pattern recipe applies QK-norm, RoPE and paper 003's query bias (at its
    evaluation value) as the module does: the patterns equal the quotient module's own weights,
    and the standard layout gives the same (the images of breaking-sgd runs, issue 16)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(quotient=True, **SMALL, **variant)).eval()
    idx = torch.randint(0, 256, (2, 10))
    x = model.wte(idx)
    if model.wpe is not None:
        x = x + model.wpe(torch.arange(idx.shape[1]))
    x = model.h[0].ln_1(x)
    with torch.no_grad():
        truth = model.h[0].attn.attn(
            x, x, x, need_weights=True, is_causal=True, average_attn_weights=False
        )[1]
    patterns = attention_patterns(model, idx)
    assert sorted(patterns) == ["h.0.attn", "h.1.attn"]
    assert (patterns["h.0.attn"].float() - truth).abs().max() < 1e-5
    standard = export(model)
    assert (attention_patterns(standard, idx)["h.0.attn"] - patterns["h.0.attn"]).abs().max() < 1e-5
