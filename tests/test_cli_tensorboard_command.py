"""Issue 26 (newcomer): compare prints a TensorBoard command that works as printed."""

import shlex
import shutil
import sys
from pathlib import Path

from quotientopt.cli import tensorboard_command


def test_tensorboard_command_runs_as_printed(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # tensorboard not on PATH, as after setup.sh
    words = shlex.split(tensorboard_command(Path("runs/x y")))
    assert words[-2:] == ["--logdir", "runs/x y"]
    program = words[0]
    assert program == sys.executable or Path(program).is_file()
    assert shutil.which(program) is not None or Path(program).is_absolute()
