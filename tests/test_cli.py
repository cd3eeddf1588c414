"""The command line: the demo runs and reports, bad input exits 2 with a one-line error."""

from __future__ import annotations

import re

import pytest

from quotientopt.cli import main
from quotientopt.data import read_text_file


def test_demo_reports_invariance_and_progress(capsys, tmp_path):
    text = "".join(f"def f{i}(x):\n    return x * {i} + 1\n" for i in range(400))
    path = tmp_path / "corpus.txt"
    path.write_text(text)
    assert main(["demo", "--data", str(path), "--rank", "3", "--steps", "60"]) == 0
    out = capsys.readouterr().out
    drift = float(re.search(r"quotient: final products .* differ by (\S+)", out).group(1))
    assert drift < 1e-10
    quotient_rows = [line for line in out.splitlines() if line.startswith("quotient  (")]
    gaps = [float(cell) for cell in quotient_rows[0].split()[-3:-1]]
    assert gaps[-1] < gaps[0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["demo", "--rank", "0"], "positive integer"),
        (["demo", "--rank", "200"], "--rank must be below"),
        (["demo", "--steps", "x"], "positive integer"),
        (["demo", "--condition", "0.5"], "condition number"),
        (["demo", "--data", "/no/such/file"], "does not exist"),
    ],
)
def test_bad_arguments_exit_2(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_data_files_are_named(tmp_path):
    binary = tmp_path / "blob.bin"
    binary.write_bytes(b"\x00\x01" * 1000)
    with pytest.raises(ValueError, match="looks binary"):
        read_text_file(binary)
    short = tmp_path / "short.txt"
    short.write_text("too short")
    with pytest.raises(ValueError, match="fewer than the 1000 needed"):
        read_text_file(short)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("é".encode("latin-1") * 2000)
    with pytest.raises(ValueError, match="not UTF-8"):
        read_text_file(latin)


def test_audit_command_prints_the_table(capsys):
    assert (
        main(
            [
                "audit",
                "--n-layer",
                "2",
                "--n-head",
                "2",
                "--n-embd",
                "16",
                "--rope",
                "--n-kv-head",
                "1",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "QK" in out and "VO" in out and "h.1.attn" in out


def test_audit_command_bad_sizes_and_paths(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["audit", "--n-embd", "10", "--n-head", "4"])
    assert exit_info.value.code == 2 and "divisible" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["audit", "--hf", str(tmp_path / "missing")])
    assert (
        exit_info.value.code == 2 and "cannot load a Hugging Face model" in capsys.readouterr().err
    )


def test_audit_command_reads_a_local_hugging_face_model(capsys, tmp_path):
    from transformers import GPT2Config, GPT2Model

    GPT2Model(
        GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16)
    ).save_pretrained(tmp_path)
    assert main(["audit", "--hf", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "GPT2Attention" in out and "redundant dimensions" in out
