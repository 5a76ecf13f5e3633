"""Section 2, findings: the paper's claims checked on this run, from
`samplescope.analysis.findings`."""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from matplotlib.figure import Figure

from samplescope.analysis import Trace
from samplescope.errors import SamplescopeError
from samplescope.reports._data import ReportData
from samplescope.reports._page import add_caption, new_page, note
from samplescope.reports._section import Section

__all__ = ["SECTION", "run_findings"]

_MARK = {True: "passed", False: "failed", None: "n/a"}
_CONTROLS = (
    ("per_param", "per parameter"),
    ("same_period", "same epoch"),
    ("input_norm", "input norm"),
)


def run_findings(trace: Trace) -> tuple[list[Any], list[str]]:
    """(findings, headline sentences) of an open trace (`ReportData.findings`)."""
    return ReportData(trace).findings


def _pages(data: ReportData) -> Iterator[Figure]:
    fig = new_page("Findings: the paper's claims on this run", caption_lines=5)
    try:
        results, headlines = data.findings
    except SamplescopeError as exc:
        note(fig, f"No findings: {exc}")
        yield fig
        return
    _draw_blocks(fig, _blocks(results, headlines), top=0.87, bottom=0.26)
    source = results[0].difficulty_source if results else "this run's final loss"
    circular = (
        " (the same run: 'hard samples matter late' is then partly true by construction; "
        "`samplescope findings --difficulty-from OTHER.h5` takes it from another seed's run)"
        if source == "this run's final loss"
        else ""
    )
    add_caption(
        fig,
        (
            "Each claim of Gao & Jojic is an effect size with a 90% bootstrap interval over "
            "samples and a stated minimum effect, measured on raw importance, then under "
            "controls: per parameter (importance divided by the layer's size), same epoch "
            "(compared within each epoch, since gradients shrink over training) and input norm "
            "(input-layer importance divided by ‖x‖²+1, exact only for a linear first layer). "
            "'supported': the raw interval and every applicable control's clear the minimum; "
            "'raw sums only': a control's does not; 'inconclusive': too short, not converged, "
            f"still open, a partial last epoch or too few samples. Difficulty: {source}{circular}."
        ),
    )
    yield fig


@dataclass
class _Block:
    """A run of text on the page: where, how big, and the space it takes below its top."""

    x: float
    text: str
    fontsize: float
    gap: float  # extra space after the block, in figure fractions
    side: str = ""  # a label drawn at the left margin on the block's first line
    style: dict[str, Any] = field(default_factory=dict)

    @property
    def lines(self) -> int:
        return self.text.count("\n") + 1


def _blocks(results: list[Any], headlines: list[str]) -> list[_Block]:
    blocks = [
        _Block(0.05, "•  " + "\n   ".join(textwrap.wrap(line, 125)), 10.5, 0.012)
        for line in headlines
    ]
    if blocks:
        blocks[-1].gap = 0.035
    for result in results:
        controls = ", ".join(
            f"{label}: {_MARK[result.controls.get(key)]}" for key, label in _CONTROLS
        )
        detail = f"{result.explanation}  Controls — {controls}."
        colour = "black" if result.verdict == "supported" else "0.35"
        blocks.append(
            _Block(
                0.18,
                "\n".join(textwrap.wrap(result.statement, 125)),
                10,
                0.005,
                side=result.verdict.upper(),
                style={"side_color": colour},
            )
        )
        blocks.append(
            _Block(0.18, "\n".join(textwrap.wrap(detail, 140)), 8.5, 0.022, style={"color": "0.3"})
        )
    return blocks


def _draw_blocks(fig: Figure, blocks: list[_Block], top: float, bottom: float) -> None:
    """Draw `blocks` top-down, shrinking fonts and spacing together if they would not fit."""
    line_height = 1.5 / 72 / fig.get_figheight()  # figure fraction per point of font size
    needed = sum(b.lines * b.fontsize * line_height + b.gap for b in blocks)
    scale = min(1.0, (top - bottom) / needed) if needed > 0 else 1.0
    y = top
    for block in blocks:
        size = block.fontsize * scale
        if block.side:
            fig.text(
                0.05,
                y,
                block.side,
                ha="left",
                va="top",
                fontsize=size,
                fontweight="bold",
                color=block.style.get("side_color", "black"),
            )
        fig.text(
            block.x,
            y,
            block.text,
            ha="left",
            va="top",
            fontsize=size,
            color=block.style.get("color", "black"),
            linespacing=1.3,
        )
        y -= (block.lines * block.fontsize * line_height + block.gap) * scale


SECTION = Section("findings", "Findings: the paper's claims on this run", _pages)
