"""examples/fsdp_train.py under torchrun: 2 CPU processes train and save a DCP checkpoint, and one
process resumes from it with the other placement (the checkpoint is resharded)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def torchrun(processes: int, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
    command += ["--standalone", str(ROOT / "examples" / "fsdp_train.py"), *args]
    # its own session, so that a timeout ends the workers too
    process = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise
    assert process.returncode == 0, stdout + stderr
    # torch's overwrite warning, once per rank per save, is replaced by one line on rank 0
    assert "Detected an existing checkpoint" not in stderr, stderr
    return stdout


def test_fsdp_example_trains_saves_and_resumes_on_another_world_size(tmp_path):
    checkpoint = str(tmp_path / "checkpoint")
    first = torchrun(2, "--steps", "4", "--batch", "4", "--checkpoint", checkpoint)
    assert f"saved {checkpoint} at step 4" in first
    losses = [float(x) for x in re.findall(r"loss (\d+\.\d+)", first)]
    assert losses and all(0 < x < 10 for x in losses)
    second = torchrun(
        1, "--steps", "6", "--batch", "4", "--checkpoint", checkpoint, "--placement", "rows"
    )
    assert f"resumed from {checkpoint} at step 4 on 1 processes" in second
    assert f"saved {checkpoint} at step 6 (replaced the checkpoint that was there)" in second
