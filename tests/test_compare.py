"""`quotientopt compare` end to end on a tiny setting, and its bad-input handling."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from quotientopt.cli import main
from quotientopt.compare import (
    CONTENDERS,
    TUNE_FACTORS,
    Contender,
    Settings,
    figure_title,
    trailing_mean,
)

TINY = [
    "--steps",
    "12",
    "--every",
    "4",
    "--n-layer",
    "1",
    "--n-embd",
    "16",
    "--n-head",
    "2",
    "--block-size",
    "16",
    "--batch-size",
    "4",
]


def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(
        "".join(f"def function_{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(300))
    )
    return path


def test_compare_writes_runs_tables_and_plots(tmp_path, capsys):
    logdir = tmp_path / "runs"
    assert main(["compare", "--data", str(corpus(tmp_path)), "--logdir", str(logdir), *TINY]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert f"tensorboard --logdir {logdir}" in out
    names = list(CONTENDERS)  # issue 26: the overall progress names the optimizer of how many
    for i, name in enumerate(names, start=1):
        assert f"optimizer {i} of {len(names)}: {name}" in captured.err
    for name in CONTENDERS:
        events = EventAccumulator(str(logdir / name))
        events.Reload()
        tags = events.Tags()["scalars"]
        assert "loss/train" in tags and "loss/val" in tags, name
        assert "summary/charge_drift" in tags and "summary/vertical_fraction_euclidean" in tags, (
            name
        )
        assert len(events.Scalars("loss/train")) == 12
    results = json.loads((logdir / "results.json").read_text())["results"]
    assert [r["optimizer"] for r in results] == list(CONTENDERS)
    by_name = {r["optimizer"]: r["diagnostics"] for r in results}
    # the quotient optimizers move horizontally in their metric, SGD in the Euclidean one
    assert by_name["quotient-sgd"]["vertical_fraction_preconditioned"] < 1e-6
    assert (
        by_name["sgd"]["vertical_fraction_euclidean"]
        < 0.05
        < by_name["quotient-sgd"]["vertical_fraction_euclidean"]
    )
    assert (logdir / "results.md").read_text().count("\n| ") == len(CONTENDERS) + 1
    for image in ("losses.png", "charges.png"):
        assert (logdir / image).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--optimizers", "sgd,lion"], "unknown optimizer 'lion'"),
        (["--lr", "adamw"], "--lr expects NAME=VALUE"),
        (
            ["--lr", "adamw=-1"],
            "invalid --lr for adamw: -1.0; expected a finite number in [0, inf)",
        ),
        (["--n-embd", "10", "--n-head", "3"], "must be divisible"),
        (["--steps", "0"], "positive integer"),
        (["--data", "/no/such/file.txt"], "does not exist"),
        (["--block-size", "100000"], "too few for --block-size"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(args, message, tmp_path, capsys):
    logdir = tmp_path / "runs"
    data = [] if "--data" in args else ["--data", str(corpus(tmp_path))]
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", *data, "--logdir", str(logdir), *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1]
    assert not logdir.exists()


def test_unwritable_or_nonempty_logdir(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", "--data", str(corpus(tmp_path)), "--logdir", str(blocker / "sub"), *TINY])
    assert exit_info.value.code == 2 and "cannot write to --logdir" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", "--data", str(corpus(tmp_path)), "--logdir", str(tmp_path), *TINY])
    assert exit_info.value.code == 2 and "not an empty folder" in capsys.readouterr().err


def test_binary_data_file(tmp_path, capsys):
    blob = tmp_path / "blob.bin"
    blob.write_bytes(bytes(range(256)) * 50)
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", "--data", str(blob), "--logdir", str(tmp_path / "runs"), *TINY])
    assert exit_info.value.code == 2 and "looks binary" in capsys.readouterr().err


def strict_json(path):
    """results.json must be valid JSON: no NaN or Infinity literals."""

    def reject(name):
        raise AssertionError(f"{path} holds {name}")

    return json.loads(path.read_text(), parse_constant=reject)


def test_a_diverging_run_is_marked_and_the_others_go_on(tmp_path, capsys):
    """Huge learning rates: SGD's loss blows up; QuotientSGD's first step leaves non-finite
    weights while the monitor's diagnostics are due (--every 1: they raise on NaN inside
    optimizer.step()); AdamW must still run."""
    logdir = tmp_path / "runs"
    args = [*TINY, "--every", "1", "--optimizers", "sgd,quotient-sgd,adamw"]
    args += ["--lr", "sgd=1e4", "--lr", "quotient-sgd=1e38"]
    assert main(["compare", "--data", str(corpus(tmp_path)), "--logdir", str(logdir), *args]) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    results = {r["optimizer"]: r for r in strict_json(logdir / "results.json")["results"]}
    for name in ("sgd", "quotient-sgd"):
        r = results[name]
        assert r["status"] == "diverged", r
        assert 1 <= r["diverged_at"] <= 12 and r["val_loss"] is None
        assert all(math.isfinite(v) for v in r["losses"])
        assert f"{name} diverged at step {r['diverged_at']}" in captured.err
    assert results["adamw"]["status"] == "ok" and results["adamw"]["diverged_at"] is None
    assert len(results["adamw"]["losses"]) == 12 and math.isfinite(results["adamw"]["val_loss"])
    table = (logdir / "results.md").read_text()
    assert table.count("**diverged** at step") == 2
    assert "exceeded 3x its first value" in table
    for image in ("losses.png", "charges.png"):
        assert (logdir / image).read_bytes()[:4] == b"\x89PNG"


def test_learning_rate_origin_is_printed_with_the_rates(tmp_path, capsys):
    logdir = tmp_path / "runs"
    args = [*TINY, "--optimizers", "sgd,adamw", "--lr", "adamw=0.01"]
    assert main(["compare", "--data", str(corpus(tmp_path)), "--logdir", str(logdir), *args]) == 0
    out = capsys.readouterr().out
    assert "| sgd | 0.3 (default) |" in out and "| adamw | 0.01 (--lr) |" in out
    assert "tuned on the default corpus" in out and "not on this text" in out and "--tune" in out


def test_tune_picks_the_best_lr_of_the_grid_on_the_users_text(tmp_path, capsys):
    logdir = tmp_path / "runs"
    args = [*TINY, "--optimizers", "sgd,adamw", "--tune", "--tune-steps", "6"]
    assert main(["compare", "--data", str(corpus(tmp_path)), "--logdir", str(logdir), *args]) == 0
    out = capsys.readouterr().out
    results = strict_json(logdir / "results.json")["results"]
    for r in results:
        default = CONTENDERS[r["optimizer"]].default_lr
        trials = r["tune_trials"]
        assert [t["lr"] for t in trials] == pytest.approx([default * f for f in TUNE_FACTORS])
        finished = [t for t in trials if t["train_loss_last10"] is not None]
        assert finished, trials
        best = min(finished, key=lambda t: t["train_loss_last10"])
        assert r["lr"] == best["lr"] and r["lr_source"] == "tuned"
        assert f"| {r['optimizer']} | {r['lr']:.3g} (tuned) |" in out
    assert "picked by `--tune`" in out


def test_loss_curve_average_starts_at_step_one_and_titles_name_the_corpus():
    assert trailing_mean([4.0, 2.0, 3.0, 7.0], window=2) == [4.0, 3.0, 2.5, 5.0]
    assert len(trailing_mean([1.0] * 50)) == 50
    title = figure_title(Settings(steps=50, tune=True, tune_steps=20), "/some/dir/README.md")
    assert "README.md" in title and "50 steps of batch 16" in title and "seed 0" in title
    assert "--tune (20 steps each)" in title


class RaisingSGD(torch.optim.SGD):
    """SGD whose third step raises as the monitor's diagnostics do on NaN weights (eigh), after
    making the weights non-finite (``poison``) or leaving them finite."""

    def __init__(self, params, lr, poison):
        super().__init__(params, lr=lr)
        self.calls, self.poison = 0, poison

    def step(self, closure=None):
        self.calls += 1
        if self.calls == 3:
            if self.poison:
                with torch.no_grad():
                    for group in self.param_groups:
                        for p in group["params"]:
                            p.fill_(float("nan"))
            raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")
        return super().step(closure)


def test_a_step_that_raises_marks_only_its_run(tmp_path, capsys, monkeypatch):
    for name, poison in (("nan-sgd", True), ("broken-sgd", False)):
        monkeypatch.setitem(
            CONTENDERS,
            name,
            Contender(
                name,
                "test double",
                False,
                False,
                0.1,
                lambda model, lr, poison=poison: RaisingSGD(model.parameters(), lr, poison),
            ),
        )
    logdir = tmp_path / "runs"
    args = [*TINY, "--optimizers", "nan-sgd,broken-sgd,adamw"]
    assert main(["compare", "--data", str(corpus(tmp_path)), "--logdir", str(logdir), *args]) == 0
    err = capsys.readouterr().err
    results = {r["optimizer"]: r for r in strict_json(logdir / "results.json")["results"]}
    assert results["nan-sgd"]["status"] == "diverged" and results["nan-sgd"]["diverged_at"] == 4
    assert results["broken-sgd"]["status"] == "failed"
    assert results["broken-sgd"]["error"] == (
        "step 3: LinAlgError: linalg.eigh: The algorithm failed to converge"
    )
    assert "broken-sgd failed at step 3" in err
    assert results["adamw"]["status"] == "ok" and len(results["adamw"]["losses"]) == 12
    table = (logdir / "results.md").read_text()
    assert "| nan-sgd | 0.1 (default) | **diverged** at step 4 |" in table
    assert "**failed** at step 3: LinAlgError" in table


def test_without_matplotlib_the_tables_are_written_and_the_plots_extra_named(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    logdir = tmp_path / "runs"
    args = [*TINY, "--optimizers", "adamw"]
    assert main(["compare", "--data", str(corpus(tmp_path)), "--logdir", str(logdir), *args]) == 0
    captured = capsys.readouterr()
    assert "pip install 'quotientopt[plots]'" in captured.err
    assert "results.md, results.json to" in captured.out and "losses.png" not in captured.out
    assert (logdir / "results.json").is_file() and not (logdir / "losses.png").exists()
