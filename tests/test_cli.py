"""The command line: the demo runs and reports, bad input exits 2 with a one-line error."""

from __future__ import annotations

import math
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


def test_audit_command_reads_a_local_hugging_face_model(capsys, tmp_path):
    from transformers import GPT2Config, GPT2Model

    GPT2Model(
        GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16)
    ).save_pretrained(tmp_path)
    assert main(["audit", "--hf", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "GPT2Attention" in out and "redundant dimensions" in out


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    from transformers import GPT2Config, GPT2Model

    path = tmp_path_factory.mktemp("gpt2")
    GPT2Model(
        GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16)
    ).save_pretrained(path)
    return path


def one_line_error(args, capsys) -> str:
    """Run the CLI, expect exit 2 and exactly one stderr line with the common prefix."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("quotientopt: error: ")
    return lines[0]


def test_audit_hf_bad_paths_are_one_line_naming_the_file(hf_folder, tmp_path, capsys):
    line = one_line_error(["audit", "--hf", str(hf_folder / "config.json")], capsys)
    assert f"{hf_folder / 'config.json'} is a file" in line and f"--hf {hf_folder}" in line
    line = one_line_error(["audit", "--hf", str(tmp_path / "missing")], capsys)
    assert "missing does not exist" in line and "huggingface.co" not in line
    assert "repo" not in line.lower()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "holds no config.json" in one_line_error(["audit", "--hf", str(empty)], capsys)
    broken = tmp_path / "truncated"
    broken.mkdir()
    (broken / "config.json").write_bytes((hf_folder / "config.json").read_bytes())
    weights = (hf_folder / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    line = one_line_error(["audit", "--hf", str(broken)], capsys)
    assert f"{broken / 'model.safetensors'} is not a complete safetensors file" in line
    (broken / "model.safetensors").unlink()
    assert "no weights" in one_line_error(["audit", "--hf", str(broken)], capsys)
    (broken / "config.json").write_text("{not json")
    assert "config.json is not a readable JSON file" in one_line_error(
        ["audit", "--hf", str(broken)], capsys
    )


@pytest.mark.parametrize(
    ("text", "rank"),
    [("привет мир " * 200, None), ("ab" * 1000, None), ("日本語のテキスト、" * 300, "3")],
)
def test_demo_runs_on_any_script_and_tiny_alphabets(text, rank, tmp_path, capsys):
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    args = ["demo", "--data", str(path), "--steps", "40"] + (["--rank", rank] if rank else [])
    assert main(args) == 0
    out = capsys.readouterr().out
    drift = float(re.search(r"quotient: final products .* differ by (\S+)", out).group(1))
    assert drift < 1e-10
    quotient_row = next(line for line in out.splitlines() if line.startswith("quotient  ("))
    gaps = [float(cell) for cell in quotient_row.split()[-5:-1]]  # steps 0, 10, 30, 40
    assert all(math.isfinite(g) and g >= -1e-9 for g in gaps)
    assert gaps[-1] < gaps[0]


def test_demo_rank_at_or_above_the_texts_rank_is_a_one_line_error(tmp_path, capsys):
    path = tmp_path / "corpus.txt"
    path.write_text("ab" * 1000)
    line = one_line_error(["demo", "--data", str(path), "--rank", "5"], capsys)
    assert "--rank must be below 2" in line and "pass --rank 1 or less" in line
    path.write_text("a" * 2000)
    assert "rank 1" in one_line_error(["demo", "--data", str(path)], capsys)


@pytest.mark.parametrize(
    "args",
    [
        ["frobnicate"],
        ["demo", "--rank", "0"],
        ["compare", "--steps", "x"],
        ["compare", "--lr", "adamw"],
        ["audit", "--n-embd", "10", "--n-head", "4"],
    ],
)
def test_one_error_prefix_for_every_command(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("quotientopt: error: ")
    assert not any(": error:" in line for line in lines[:-1])


def test_top_level_help_has_no_restructuredtext_markup(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "compare" in out and "audit" in out and "demo" in out
    assert "``" not in out and ":class:" not in out and ":func:" not in out
