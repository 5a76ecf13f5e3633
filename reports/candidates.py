"""Section 7, candidates: samples most likely mislabeled, and the most redundant ones, as
ranked tables; and a gallery of their thumbnails when the trace stored them.

Scores (each in [0, 1], higher = stronger candidate; ranks are percentiles over samples):

- mislabeled: `samplescope.analysis.flags.flag(kind="mislabeled")`, the definition
  `samplescope flag` uses: 1 − label_quality, the percentile rank of low confidence in the
  label (the best single detector of flipped labels in docs/findings.md).
- redundant: among samples learned and never forgotten (correct at the end, no forgetting
  events), the percentile rank of low total importance — they moved the weights least.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import polars as pl
from matplotlib.figure import Figure

from samplescope.reports._data import ReportData
from samplescope.reports._page import add_caption, draw_table, new_page
from samplescope.reports._section import Section

__all__ = ["SECTION", "candidate_tables"]

TOP = 15
GALLERY = 16


def _pct_rank(column: str, *, descending: bool = False) -> pl.Expr:
    """Percentile rank in [0, 1] of a column, 1 = the largest (or smallest if descending)."""
    expr = -pl.col(column) if descending else pl.col(column)
    return (expr.rank("average") - 1) / pl.max_horizontal(pl.len() - 1, 1)


def candidate_tables(data: ReportData, top: int = TOP) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The `top` mislabeled and redundant candidates, best first, with their scores.

    Both frames hold sample_id, target, pred, score, aum, confidence, forgetting_events,
    importance and importance_pct (the sample's share of all importance, in %).
    """
    from samplescope.analysis.flags import flag

    total = float(data.samples["importance"].sum()) or 1.0
    frame = data.samples.join(data.final_pred, on="sample_id", how="left").with_columns(
        importance_pct=100 * pl.col("importance") / total
    )
    ranked = flag(data.trace, kind="mislabeled", budget=max(top, 1)).head(top)
    mislabeled = ranked.select("sample_id", (1.0 - pl.col("label_quality")).alias("score")).join(
        frame, on="sample_id", how="left", maintain_order="left"
    )
    redundant = (
        frame.filter(pl.col("final_correct") & (pl.col("forgetting_events") == 0))
        .with_columns(score=_pct_rank("importance", descending=True))
        .sort("score", "sample_id", descending=[True, False])
        .head(top)
    )
    return mislabeled, redundant


def _rows(frame: pl.DataFrame) -> list[tuple[str, ...]]:
    return [
        (
            str(i),
            str(r["sample_id"]),
            str(r["target"]),
            "–" if r["pred"] is None else str(r["pred"]),
            f"{r['score']:.3f}",
            f"{r['aum']:.2f}",
            f"{r['confidence']:.2f}",
            str(r["forgetting_events"]),
            f"{r['importance_pct']:.3f}",
        )
        for i, r in enumerate(frame.iter_rows(named=True), 1)
    ]


_HEADER = ("#", "sample", "label", "pred", "score", "AUM", "conf.", "forgets", "imp. %")
_WIDTHS = (0.06, 0.12, 0.09, 0.09, 0.12, 0.12, 0.11, 0.12, 0.13)


def _pages(data: ReportData) -> Iterator[Figure]:
    mislabeled, redundant = candidate_tables(data)
    fig = new_page("Candidates: likely mislabeled and redundant samples", caption_lines=5)
    left = fig.add_axes((0.04, 0.22, 0.44, 0.62))
    left.set_title("Most likely mislabeled", loc="left", fontweight="bold")
    draw_table(left, _HEADER, _rows(mislabeled), col_widths=_WIDTHS)
    right = fig.add_axes((0.53, 0.22, 0.44, 0.62))
    right.set_title("Most redundant (learned, never forgotten)", loc="left", fontweight="bold")
    draw_table(right, _HEADER, _rows(redundant), col_widths=_WIDTHS)
    add_caption(
        fig,
        (
            "Mislabeled score: as `samplescope flag --kind mislabeled` ranks them, the "
            "percentile rank of low confidence (mean probability of the label over epochs). AUM "
            "is the area under the margin: mean of label logit minus the largest other logit; "
            "negative = the model kept preferring another class. Redundant score: percentile "
            "rank of low total importance among samples predicted right at the end that were "
            "never forgotten. 'pred' is the "
            "prediction at the sample's last visit; 'imp. %' its share of all importance. "
            "Candidates are for inspection, not automatic removal: rare but correct samples "
            "also score as 'mislabeled'."
        ),
    )
    yield fig
    if data.has_thumbnails:
        yield _gallery(data, mislabeled.head(GALLERY), redundant.head(GALLERY))


def _gallery(data: ReportData, mislabeled: pl.DataFrame, redundant: pl.DataFrame) -> Figure:
    ids = mislabeled["sample_id"].to_list() + redundant["sample_id"].to_list()
    images = data.thumbnails(ids)
    fig = new_page("Candidates: thumbnails of the inputs", caption_lines=2)
    per_row = 8
    outer = fig.add_gridspec(2, 1, hspace=0.35, top=0.86, bottom=0.14)
    for block, (frame, title) in enumerate(
        ((mislabeled, "Most likely mislabeled"), (redundant, "Most redundant"))
    ):
        rows = max(1, -(-frame.height // per_row))
        inner = outer[block].subgridspec(rows, per_row, hspace=0.5, wspace=0.15)
        for i, r in enumerate(frame.iter_rows(named=True)):
            ax = fig.add_subplot(inner[i // per_row, i % per_row])
            ax.set_xticks([])
            ax.set_yticks([])
            image = images.get(int(r["sample_id"]))
            if image is not None:
                ax.imshow(np.asarray(image), cmap="gray_r", interpolation="nearest")
            else:
                ax.text(0.5, 0.5, "no image", ha="center", va="center", fontsize=7)
            pred = "–" if r["pred"] is None else r["pred"]
            ax.set_title(f"#{r['sample_id']}  label {r['target']}\npred {pred}", fontsize=7.5)
            if i == 0:
                ax.set_ylabel(
                    title,
                    fontsize=9,
                    fontweight="bold",
                    rotation=0,
                    ha="left",
                    va="bottom",
                    labelpad=0,
                )
                ax.yaxis.set_label_coords(0, 1.45)
    add_caption(
        fig,
        (
            "The stored thumbnail of each candidate above (min–max scaled, dark = high input "
            "value), ranked left to right, top to bottom. Check whether the label under each "
            "image is what you see: a wrong label confirms a mislabeled candidate."
        ),
    )
    return fig


SECTION = Section(
    "candidates", "Candidates: likely mislabeled and redundant samples", _pages, needs_outputs=True
)
