"""MkDocs hook: serve MathJax from the pip package ``django-static-mathjax`` (MathJax 3.2.2,
Apache-2.0, no dependencies) instead of a CDN, so the site renders its maths offline.

The package installs MathJax's files as ``mathjax/static/mathjax/``; this hook adds the parts the
site needs (the ``tex-mml-chtml`` bundle, its fonts, the TeX extensions it autoloads, the menu and
the accessibility extensions it loads on demand) to the build under ``javascripts/mathjax/``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File

PACKAGE = "django-static-mathjax"
TARGET = "javascripts/mathjax"
PARTS = ("tex-mml-chtml.js", "output/chtml/fonts/woff-v2", "input/tex/extensions", "ui", "a11y")


def mathjax_root() -> Path:
    """MathJax's ``es5`` folder inside the installed package, or a PluginError naming the fix."""
    spec = importlib.util.find_spec("mathjax")
    for location in (spec.submodule_search_locations or []) if spec else []:
        root = Path(location) / "static" / "mathjax" / "es5"
        if (root / "tex-mml-chtml.js").is_file():
            return root
    raise PluginError(
        f"the docs serve MathJax from the pip package {PACKAGE}, which is not installed; "
        f"pip install {PACKAGE} (it is in quotientopt's 'docs' and 'test' extras)"
    )


def on_files(files, config):
    root = mathjax_root()
    for part in PARTS:
        path = root / part
        for source in sorted(path.rglob("*")) if path.is_dir() else [path]:
            if source.is_file():
                uri = f"{TARGET}/{source.relative_to(root).as_posix()}"
                files.append(File.generated(config, uri, abs_src_path=str(source)))
    license_file = root.parent / "LICENSE"
    if license_file.is_file():
        files.append(File.generated(config, f"{TARGET}/LICENSE", abs_src_path=str(license_file)))
    return files
