"""``quotientopt --help`` answers without importing torch (it took seconds: torch was imported
before the arguments were parsed)."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import sys
from quotientopt.cli import main
try:
    main({argv!r})
except SystemExit as exit:
    assert exit.code == 0, exit.code
heavy = sorted(name for name in ("torch", "geoopt", "numpy") if name in sys.modules)
print(",".join(heavy))
"""


@pytest.mark.parametrize(
    "argv", [["--help"], ["compare", "--help"], ["audit", "--help"], ["demo", "--help"]]
)
def test_help_imports_no_torch(argv):
    done = subprocess.run(
        [sys.executable, "-c", PROBE.format(argv=argv)], capture_output=True, text=True, check=True
    )
    assert done.stdout.splitlines()[-1] == "", f"--help imported {done.stdout.splitlines()[-1]}"


def test_lazy_subpackages_and_the_table_agree_with_the_builders():
    import quotientopt
    from quotientopt import compare, contenders

    assert quotientopt.manifolds.FactorQuotient is not None  # loaded on first use
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        quotientopt.nope  # noqa: B018
    assert list(compare.CONTENDERS) == list(contenders.SPECS)
    for name, contender in compare.CONTENDERS.items():
        assert contender.default_lr == contenders.SPECS[name].default_lr
        assert callable(contender.build)
