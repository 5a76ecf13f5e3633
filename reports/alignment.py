"""Section 11, "alignment": how well each sample's gradient agreed with its batch's, per layer
and epoch (``Recorder(alignment=True)``). Only for traces that recorded it."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import polars as pl
from matplotlib.figure import Figure

from samplescope.reports._data import ReportData
from samplescope.reports._page import (
    CMAP_DIVERGING,
    add_caption,
    epoch_axis,
    keep_inside,
    layer_colors,
    layer_label,
    new_page,
)
from samplescope.reports._section import Section

__all__ = ["SECTION"]


def _missing(data: ReportData) -> str | None:
    if data.has_alignment:
        return None
    return "needs per-layer alignment (Recorder(alignment=True)), which this trace lacks"


def _pages(data: ReportData) -> Iterator[Figure]:
    frame = data.alignment_epoch
    fig = new_page("Alignment of each sample's gradient with its batch", caption_lines=4)
    grid = fig.add_gridspec(1, 2, right=0.9, wspace=0.5)
    per_epoch = fig.add_subplot(grid[0, 0])
    for row, color in zip(
        data.layers.iter_rows(named=True), layer_colors(data.layers.height), strict=True
    ):
        part = (
            frame.filter(pl.col("layer_index") == row["layer_index"])
            .group_by("epoch")
            .agg(pl.col("alignment").mean())
            .sort("epoch")
        )
        per_epoch.plot(
            part["epoch"],
            part["alignment"],
            marker=".",
            color=color,
            label=layer_label(row["layer_index"], row["layer"], row["kind"]),
        )
    per_epoch.axhline(0, color="0.6", linewidth=0.8)
    per_epoch.set_ylim(-1, 1)
    epoch_axis(per_epoch, data.epochs)
    per_epoch.set_ylabel("mean alignment (cosine)")
    per_epoch.set_title("Mean alignment per epoch and layer", loc="left")
    per_epoch.legend(frameon=False, fontsize=7, loc="lower left")
    by_decile = fig.add_subplot(grid[0, 1])
    n_layers = data.layers.height
    grid_values = np.full((n_layers, 10), np.nan)
    means = frame.group_by("layer_index", "decile").agg(pl.col("alignment").mean())
    for r in means.iter_rows(named=True):
        if r["decile"] is not None:
            grid_values[r["layer_index"], int(r["decile"])] = r["alignment"]
    image = by_decile.imshow(grid_values, aspect="auto", cmap=CMAP_DIVERGING, vmin=-1, vmax=1)
    by_decile.set_xticks(range(10))
    by_decile.set_yticks(
        range(n_layers),
        [
            layer_label(r["layer_index"], r["layer"], r["kind"])
            for r in data.layers.iter_rows(named=True)
        ],
    )
    by_decile.set_xlabel("difficulty decile (0 = easiest)")
    by_decile.set_title("Mean alignment by difficulty decile", loc="left")
    fig.colorbar(image, ax=by_decile, label="mean alignment (cosine)", fraction=0.05, pad=0.02)
    keep_inside(fig)
    add_caption(
        fig,
        (
            "Alignment is the cosine between a sample's gradient and its batch's gradient in a "
            "layer (recorded with Recorder(alignment=True)): +1 the sample pulls the way the "
            "batch goes, 0 sideways, −1 against it. Left: the mean over each epoch's visits. "
            "Right: the mean over the run per difficulty decile. A sample that keeps pulling "
            "against its batch (low or negative alignment) is one the rest of the data "
            "disagrees with, often a hard or mislabeled one."
        ),
    )
    yield fig


SECTION = Section(
    "alignment", "Alignment of sample gradients with the batch", _pages, missing=_missing
)
