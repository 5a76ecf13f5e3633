"""Section 8, candidates: samples most likely mislabeled, and the most redundant ones, as
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
from matplotlib.lines import Line2D

from samplescope.reports._data import ReportData, pct_rank
from samplescope.reports._page import (
    add_caption,
    draw_table,
    epoch_axis,
    layer_colors,
    layer_label,
    new_page,
)
from samplescope.reports._section import Section

__all__ = ["SECTION", "candidate_tables", "draw_thumbnail"]

TOP = 15
GALLERY = 16
TRAJECTORIES = 5


def draw_thumbnail(ax, image: np.ndarray | None) -> None:
    """One stored thumbnail in `ax`: an image, or a line plot for a 1-D input (the
    recorder stores a signal of length L as a 1 × L image)."""
    ax.set_xticks([])
    ax.set_yticks([])
    if image is None:
        ax.text(0.5, 0.5, "no image", ha="center", va="center", fontsize=7)
        return
    image = np.asarray(image)
    if image.ndim == 1 or min(image.shape) <= 2:
        signal = image.reshape(-1, image.shape[-1]).mean(axis=0) if image.ndim > 1 else image
        ax.plot(np.arange(signal.size), signal.astype(float), color="0.15", linewidth=1)
        ax.set_ylim(-10, 265)
        return
    ax.imshow(image, cmap="gray_r", interpolation="nearest")


def candidate_tables(data: ReportData, top: int = TOP) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The `top` mislabeled and redundant candidates, best first, with their scores.

    Both frames hold sample_id, target, pred, score, aum, confidence, forgetting_events,
    importance and importance_pct (the sample's share of all importance, in %).
    """
    total = float(data.samples["importance"].sum()) or 1.0
    frame = data.samples.join(data.final_pred, on="sample_id", how="left").with_columns(
        importance_pct=100 * pl.col("importance") / total
    )
    ranked = data.mislabeled_ranking(top)
    mislabeled = ranked.select("sample_id", (1.0 - pl.col("label_quality")).alias("score")).join(
        frame, on="sample_id", how="left", maintain_order="left"
    )
    redundant = (
        frame.filter(pl.col("final_correct") & (pl.col("forgetting_events") == 0))
        .with_columns(score=pct_rank("importance", descending=True))
        .sort("score", "sample_id", descending=[True, False])
        .head(top)
    )
    return mislabeled, redundant


def _rows(data: ReportData, frame: pl.DataFrame) -> list[tuple[str, ...]]:
    return [
        (
            str(i),
            str(r["sample_id"]),
            data.class_name(r["target"]),
            data.class_name(r["pred"]),
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
    draw_table(left, _HEADER, _rows(data, mislabeled), col_widths=_WIDTHS)
    right = fig.add_axes((0.53, 0.22, 0.44, 0.62))
    right.set_title("Most redundant (learned, never forgotten)", loc="left", fontweight="bold")
    draw_table(right, _HEADER, _rows(data, redundant), col_widths=_WIDTHS)
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
    yield _trajectories(data, mislabeled.head(TRAJECTORIES), redundant.head(TRAJECTORIES))


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
            draw_thumbnail(ax, images.get(int(r["sample_id"])))
            ax.set_title(
                f"#{r['sample_id']}  label {data.class_name(r['target'])}\n"
                f"pred {data.class_name(r['pred'])}",
                fontsize=7.5,
            )
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
            "value; a 1-D input is drawn as a line), ranked left to right, top to bottom. "
            "Check whether the label under each "
            "image is what you see: a wrong label confirms a mislabeled candidate."
        ),
    )
    return fig


SECTION = Section(
    "candidates", "Candidates: likely mislabeled and redundant samples", _pages, needs_outputs=True
)


def _trajectories(data: ReportData, mislabeled: pl.DataFrame, redundant: pl.DataFrame) -> Figure:
    """Per-sample loss and importance per layer over epochs, for the top candidates."""
    fig = new_page("Candidates: trajectories over training", caption_lines=3)
    grid = fig.add_gridspec(2, 2, right=0.84, wspace=0.3)
    colors = layer_colors(data.layers.height)
    for col, (frame, title) in enumerate(
        ((mislabeled, "most likely mislabeled"), (redundant, "most redundant"))
    ):
        ids = frame["sample_id"].to_list()
        traj = data.trajectories(ids)
        loss_ax = fig.add_subplot(grid[0, col])
        imp_ax = fig.add_subplot(grid[1, col])
        styles = ("-", "--", ":", "-.", (0, (1, 3)))
        for number, sample_id in enumerate(ids):
            part = traj.filter(pl.col("sample_id") == sample_id)
            style = styles[number % len(styles)]
            per_epoch = part.group_by("epoch").agg(pl.col("loss").first()).sort("epoch")
            loss_ax.plot(
                per_epoch["epoch"],
                per_epoch["loss"],
                linestyle=style,
                marker=".",
                color="0.15",
                label=f"#{sample_id} ({data.class_name(frame['target'][number])})",
            )
            for row, color in zip(data.layers.iter_rows(named=True), colors, strict=True):
                layer = part.filter(pl.col("layer_index") == row["layer_index"])
                values = layer["importance"].to_numpy()
                imp_ax.plot(
                    layer["epoch"],
                    np.where(values > 0, values, np.nan),
                    linestyle=style,
                    color=color,
                    linewidth=1,
                )
        loss_ax.set_title(f"Training loss of the {len(ids)} {title}", loc="left")
        loss_ax.set_ylabel("mean loss over the epoch's visits")
        epoch_axis(loss_ax, data.epochs)
        if ids:
            loss_ax.legend(frameon=False, fontsize=7)
        imp_ax.set_title(f"Their importance per layer ({title})", loc="left")
        imp_ax.set_ylabel("importance in the epoch")
        if traj.height and (traj["importance"] > 0).any():
            imp_ax.set_yscale("log")
        epoch_axis(imp_ax, data.epochs)
    handles = [
        Line2D([], [], color=c, label=layer_label(r["layer_index"], r["layer"], r["kind"]))
        for r, c in zip(data.layers.iter_rows(named=True), colors, strict=True)
    ]
    fig.legend(handles=handles, loc="lower left", bbox_to_anchor=(0.85, 0.2), frameon=False)
    add_caption(
        fig,
        (
            "The top candidates of the previous page, one line style per sample (same style "
            "top and bottom). Top: the sample's mean training loss in each epoch. Bottom: its "
            "importance in each epoch, one colour per layer (log scale). A mislabeled sample "
            "typically keeps a high loss and a high importance; a redundant one is fitted early "
            "and then barely moves the weights."
        ),
    )
    return fig
