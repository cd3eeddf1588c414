"""Every code block of the README runs as it stands (pasted into a fresh interpreter)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```$", re.DOTALL | re.MULTILINE)


def blocks(language: str) -> list[str]:
    return [code for lang, code in BLOCK.findall(README.read_text()) if lang == language]


def test_the_readme_has_the_blocks_this_test_runs():
    assert len(blocks("python")) >= 3
    assert len(blocks("bash")) >= 1
    assert {lang for lang, _ in BLOCK.findall(README.read_text())} <= {"python", "bash"}


@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_python_block_runs(index, tmp_path):
    """Each block in its own interpreter, in an empty folder (what it writes lands there)."""
    code = blocks("python")[index]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"README python block {index} failed:\n{code}\n{result.stderr}"


def test_bash_blocks_name_existing_scripts_and_parse():
    """The two commands (`bash scripts/compare.sh`, `bash scripts/test.sh`) set up a venv and run
    the whole suite, so they are not rerun from inside it (scripts/test.sh is what CI runs): here
    every command must be `bash <existing script>` and every script must parse (`bash -n`)."""
    for code in blocks("bash"):
        for line in code.splitlines():
            command = line.split("#")[0].strip()
            if not command:
                continue
            words = command.split()
            assert words[0] == "bash" and len(words) == 2, command
            script = ROOT / words[1]
            assert script.is_file(), command
            assert subprocess.run(["bash", "-n", str(script)]).returncode == 0, command


def test_the_docs_serve_their_maths_renderer_from_a_package_not_a_cdn():
    """mkdocs.yml loads no script from the network; the hook finds MathJax's bundle and fonts in
    the installed django-static-mathjax package (a missing package fails the build, naming it)."""
    import yaml

    sys.path.insert(0, str(ROOT / "docs" / "_ext"))
    try:
        from mathjax_offline import mathjax_root
    finally:
        sys.path.pop(0)

    config = yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=yaml.BaseLoader)
    scripts = config["extra_javascript"]
    assert "javascripts/mathjax/tex-mml-chtml.js" in scripts
    assert not [s for s in scripts if "://" in s], scripts
    assert "docs/_ext/mathjax_offline.py" in config["hooks"]
    root = mathjax_root()
    assert (root / "tex-mml-chtml.js").stat().st_size > 100_000
    assert len(list((root / "output/chtml/fonts/woff-v2").glob("*.woff"))) >= 20
