r"""Every docstring of the package renders as written: no control character in it.

A TeX docstring that is not a raw string turns ``\times``, ``\varepsilon``, ``\frac`` and
``\approx`` into a tab, a vertical tab, a form feed and a bell, and the API site then shows
``imes``, ``arepsilon``, ``rac`` and ``pprox`` (issue 26). The docstrings are read as the site's
generator (griffe) reads them: the evaluated string literal of each module, class and function,
found by parsing the source, so that nested and private definitions count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "quotientopt"
SOURCES = sorted(PACKAGE.rglob("*.py"))
DEFINITIONS = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def control_characters(text: str) -> list[str]:
    """The control characters of ``text`` other than a newline, as their escapes."""
    return [repr(c) for c in text if (ord(c) < 32 and c != "\n") or ord(c) == 127]


def docstrings(path: Path) -> list[tuple[str, str]]:
    """``(where, docstring)`` for each documented definition of one source file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, DEFINITIONS):
            text = ast.get_docstring(node, clean=False)
            if text is not None:
                where = f"{path.relative_to(PACKAGE.parent)}:{getattr(node, 'lineno', 1)}"
                found.append((where, text))
    return found


def test_the_package_has_docstrings_to_check():
    assert len(SOURCES) > 20
    assert sum(len(docstrings(path)) for path in SOURCES) > 300


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_control_character_in_a_docstring(path: Path):
    bad = {where: control_characters(text) for where, text in docstrings(path)}
    bad = {where: chars for where, chars in bad.items() if chars}
    assert not bad, f"docstrings with control characters (make them raw strings, r'''...'''): {bad}"


def test_the_check_catches_a_tex_docstring_that_is_not_raw():
    source = 'def f():\n    """:math:`a \\times b \\approx \\varepsilon`"""\n'
    tree = ast.parse(source)
    text = ast.get_docstring(tree.body[0], clean=False)
    assert control_characters(text) == ["'\\t'", "'\\x07'", "'\\x0b'"]
    raw = ast.get_docstring(ast.parse(source.replace('"""', 'r"""', 1)).body[0], clean=False)
    assert control_characters(raw) == []
