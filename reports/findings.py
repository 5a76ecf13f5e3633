"""Findings: the paper's claims checked on this run, from `samplescope.analysis.findings`."""

from __future__ import annotations

import logging
import textwrap
from collections.abc import Iterator
from typing import Any

from matplotlib.figure import Figure

from samplescope.errors import SamplescopeError
from samplescope.reports._data import ReportData
from samplescope.reports._page import add_caption, new_page, note
from samplescope.reports._section import Section

__all__ = ["SECTION", "run_findings"]

logger = logging.getLogger(__name__)

_MARK = {True: "passed", False: "failed", None: "n/a"}
_CONTROLS = (("per_param", "per parameter"), ("same_period", "same epoch"),
             ("input_norm", "input norm"))


def run_findings(trace: Any) -> tuple[list[Any], list[str]] | None:
    """(findings, headline sentences) from the analysis layer, or None if it has none."""
    try:
        from samplescope.analysis.findings import findings, headlines
    except ImportError:
        return None
    results = findings(trace)
    return results, headlines(trace, results)


def _pages(data: ReportData) -> Iterator[Figure]:
    fig = new_page("Findings: the paper's claims on this run", caption_lines=3)
    try:
        found = run_findings(data.trace)
    except SamplescopeError as exc:
        note(fig, f"No findings: {exc}")
        yield fig
        return
    if found is None:
        note(fig, "This installation of samplescope has no findings module.")
        yield fig
        return
    results, headlines = found
    y = 0.87
    for line in headlines:
        text = "\n   ".join(textwrap.wrap(line, 125))
        fig.text(0.05, y, "•  " + text, ha="left", va="top", fontsize=10.5)
        y -= 0.026 * (text.count("\n") + 1) + 0.012
    y -= 0.025
    for result in results:
        y = _claim(fig, result, y)
    add_caption(fig, (
        "Each claim of Gao & Jojic is tested on raw importance sums, then under controls: "
        "per parameter (importance divided by the layer's size), same epoch (compared within "
        "each epoch, since gradients shrink over training) and input norm (input-layer "
        "importance divided by ‖x‖²+1). 'supported' holds raw and under every control that "
        "applies; 'raw sums only' fails a control; 'inconclusive' means too little data."
    ))
    yield fig


def _claim(fig: Figure, result: Any, y: float) -> float:
    fig.text(0.05, y, result.verdict.upper(), ha="left", va="top", fontsize=10,
             fontweight="bold", color="black" if result.verdict == "supported" else "0.35")
    statement = "\n".join(textwrap.wrap(result.statement, 125))
    fig.text(0.18, y, statement, ha="left", va="top", fontsize=10)
    y -= 0.024 * (statement.count("\n") + 1) + 0.004
    controls = ", ".join(f"{label}: {_MARK[result.controls.get(key)]}"
                         for key, label in _CONTROLS)
    detail = "\n".join(textwrap.wrap(f"{result.explanation}  Controls — {controls}.", 140))
    fig.text(0.18, y, detail, ha="left", va="top", fontsize=8.5, color="0.3")
    return y - 0.021 * (detail.count("\n") + 1) - 0.022


SECTION = Section("findings", "Findings: the paper's claims on this run", _pages)
