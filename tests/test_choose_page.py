"""The decision page (docs/how-to/choose.md) is linked from the README and the site, and the
protocol losses it cites are the ones the protocol benchmark recorded."""

from __future__ import annotations

import json
import re
from pathlib import Path
from statistics import mean

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "how-to" / "choose.md"


def test_the_page_is_linked_from_the_readme_and_the_site_nav():
    assert "(docs/how-to/choose.md)" in (ROOT / "README.md").read_text()
    assert "how-to/choose.md" in (ROOT / "mkdocs.yml").read_text()


def test_cited_protocol_losses_are_the_recorded_final_runs():
    runs = json.loads((ROOT / "benchmarks/results/protocol/protocol.json").read_text())["runs"]
    final = {}
    for run in runs:
        if run["kind"] != "tune":
            final.setdefault((run["method"], run["budget"]), []).append(run["val_loss"])
    text = PAGE.read_text()
    cited = re.search(
        r"AdaMuon was lowest at 200 and 400 steps \(([\d.]+), ([\d.]+)\); "
        r"quotient-muon ([\d.]+) and ([\d.]+), split-QKV Muon ([\d.]+) and ([\d.]+)",
        text,
    )
    assert cited, "the page no longer cites the protocol's losses in the form this test reads"
    expected = [
        ("adamuon", 200),
        ("adamuon", 400),
        ("quotient-muon", 200),
        ("quotient-muon", 400),
        ("muon-split-qkv", 200),
        ("muon-split-qkv", 400),
    ]
    for value, key in zip(cited.groups(), expected, strict=True):
        assert f"{mean(final[key]):.4f}" == value, (key, value)
    for budget in (200, 400):  # "lowest" is true of every method's recorded final mean
        losses = {m: mean(v) for (m, b), v in final.items() if b == budget}
        assert min(losses, key=losses.get) == "adamuon", losses
