"""Section 9, "flags": how well each score finds the samples that /sample_info marks (e.g.
labels flipped on purpose), as precision and recall. Only for traces with such flags."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
from matplotlib.figure import Figure

from samplescope.reports._data import ReportData
from samplescope.reports._page import add_caption, draw_table, new_page
from samplescope.reports._section import Section

__all__ = ["SECTION"]

# Precision–recall curves drawn per page: the best scores by average precision.
CURVES = 6


def _missing(data: ReportData) -> str | None:
    if data.flag_columns:
        return None
    return "needs boolean /sample_info columns (e.g. flipped labels), which this trace lacks"


def _pages(data: ReportData) -> Iterator[Figure]:
    for flag in data.flag_columns:
        quality = data.flag_quality(flag)
        k = int(quality["k"][0]) if quality.height else 0
        fig = new_page(f"Scores against the known flag '{flag}'", caption_lines=4)
        grid = fig.add_gridspec(1, 2, width_ratios=[1, 1.1], wspace=0.25)
        curves = fig.add_subplot(grid[0, 0])
        shades = np.linspace(0.05, 0.65, max(min(CURVES, quality.height), 1))
        styles = ("-", "--", ":", "-.")
        for i, name in enumerate(quality["score"].head(CURVES).to_list()):
            precision, recall = data.flag_curve(flag, name)
            curves.plot(
                recall,
                precision,
                linestyle=styles[i % len(styles)],
                color=str(shades[i]),
                label=name,
            )
        n = data.n_samples
        if n:
            curves.axhline(k / n, color="0.7", linewidth=0.8, label="chance")
        curves.set_xlim(0, 1)
        curves.set_ylim(0, 1.02)
        curves.set_xlabel(f"recall (share of the {k} flagged samples found)")
        curves.set_ylabel("precision (share of picks that are flagged)")
        curves.set_title("Precision–recall, best scores", loc="left")
        curves.legend(frameon=False, fontsize=7, loc="upper right")
        table = fig.add_subplot(grid[0, 1])
        table.set_title(f"Every score (k = {k} picks)", loc="left", fontweight="bold")
        rows = [
            (
                r["score"],
                _num(r["average_precision"]),
                _num(r["precision_at_k"]),
                _num(r["recall_at_k"]),
            )
            for r in quality.iter_rows(named=True)
        ]
        draw_table(
            table,
            ("score", "avg. precision", "precision@k", "recall@k"),
            rows,
            col_widths=(0.4, 0.2, 0.2, 0.2),
            fontsize=8,
        )
        add_caption(
            fig,
            (
                f"The trace marks {k} of {n:,} samples as '{flag}'. Each score (oriented so that "
                "higher = more suspect; 'candidate score' is the mislabeled score of the "
                "candidates page) ranks the samples; flagging its top k gives the precision "
                "(how many picks are truly flagged) and recall (how many flagged samples are "
                "found). With k = the number flagged, precision and recall are equal. Average "
                "precision summarises the whole curve; chance is the flagged share."
            ),
        )
        yield fig


def _num(value: float | None) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:.3f}"


SECTION = Section("flags", "Scores against known flags (sample_info)", _pages, missing=_missing)
