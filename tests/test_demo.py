"""`cellrank demo`: the whole product on simulated data, and the report it writes."""

from __future__ import annotations

import re

from cellrank_fm.demo import QUICK, run_demo


def _numbers(report: str) -> str:
    """The report without its wall-clock figures, which differ from run to run."""
    report = re.sub(r"took \d+ s", "took - s", report)
    return re.sub(r"# \d+ s", "# - s", report)


def test_quick_demo_writes_a_report_with_plots_and_repeats_with_the_same_seed(tmp_path):
    first = run_demo(tmp_path / "a", seed=3, size=QUICK, quiet=True)
    text = first.read_text()
    for heading in ("## Tokenization", "## Pretraining", "## Cell-state classification",
                    "## Which genes decide each state", "## In silico deletion", "## Commands run"):
        assert heading in text
    # Every image the report shows exists and is a PNG.
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert len(images) >= 5
    for rel in images:
        assert (first.parent / rel).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", rel
    html = first.with_suffix(".html").read_text()
    assert html.count("<img ") == len(images) and "<table>" in html
    # Both classifiers and the baseline reported figures; the perturbation table lists the drivers.
    assert len(re.findall(r"\| (cell_state|condition) \| (cellrank|logistic)", text)) == 4
    assert text.count("| yes |") >= 6  # the drivers as a set, and one by one
    second = run_demo(tmp_path / "b", seed=3, size=QUICK, quiet=True)
    assert _numbers(second.read_text().replace(str(tmp_path / "b"), "OUT")) == \
        _numbers(text.replace(str(tmp_path / "a"), "OUT"))
