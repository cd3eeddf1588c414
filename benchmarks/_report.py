"""What every benchmark writes: the exact command, the environment, machine-readable results and a
short markdown table, side by side under one results folder.

    from _report import environment, command_line, write_report
    write_report(out_dir, "kappa_sweep", markdown, {"results": rows, ...})

writes ``<out_dir>/kappa_sweep.json`` (with ``command`` and ``environment`` added) and
``<out_dir>/kappa_sweep.md`` (the markdown preceded by the command and environment line).
"""

from __future__ import annotations

import json
import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``'s "model name" on Linux, else ``platform``'s)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: str | torch.device = "cpu") -> dict[str, Any]:
    """Where a number was measured: device, CPU, threads, torch/python versions, date (UTC)."""
    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {
        "device": name,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def command_line() -> str:
    """The command that is running, as a user would type it from the repository root."""
    script = Path(sys.argv[0])
    try:
        script = script.resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        pass
    return " ".join(["python", str(script), *sys.argv[1:]])


def write_report(
    out_dir: str | Path,
    name: str,
    markdown: str,
    data: dict[str, Any],
    *,
    device: str | torch.device = "cpu",
) -> tuple[Path, Path]:
    """Write ``<name>.json`` and ``<name>.md`` under ``out_dir`` (created) and return their paths.

    Each file is written to a temporary name first and renamed, so a run that is interrupted never
    leaves a half-written report.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = environment(device)
    command = command_line()
    header = (
        f"Command: `{command}`  \n"
        f"Environment: {env['device']} ({env['cpu']}, {env['cpu_count']} cores, "
        f"{env['torch_threads']} torch threads), torch {env['torch']}, python {env['python']}, "
        f"{env['date']}.\n\n"
    )
    payload = {"command": command, "environment": env, **data}
    paths = []
    for suffix, text in (
        (".json", json.dumps(payload, indent=2, default=float) + "\n"),
        (".md", header + markdown.rstrip() + "\n"),
    ):
        path = out_dir / f"{name}{suffix}"
        tmp = path.with_suffix(suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
        paths.append(path)
    return paths[0], paths[1]
