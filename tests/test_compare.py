"""`quotientopt compare` end to end on a tiny setting, and its bad-input handling."""

from __future__ import annotations

import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from quotientopt.cli import main
from quotientopt.compare import CONTENDERS

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
    out = capsys.readouterr().out
    assert f"tensorboard --logdir {logdir}" in out
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
        (["--lr", "adamw=-1"], "must be a positive number"),
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
