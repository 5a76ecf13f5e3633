"""Section 12, "val_effect": which training samples helped or hurt the held-out loss, where
in the network and when (``Recorder(reference=...)``). Only for traces that recorded it."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import polars as pl
from matplotlib.figure import Figure

from samplescope.reports._data import ReportData
from samplescope.reports._page import (
    CMAP_DIVERGING,
    add_caption,
    keep_inside,
    layer_label,
    new_page,
)
from samplescope.reports._section import Section
from samplescope.reports.candidates import draw_thumbnail

__all__ = ["SECTION", "helpful_and_harmful"]

TOP = 8


def _missing(data: ReportData) -> str | None:
    if "val_effect" in data.trace.table_names:
        return None
    return "needs validation attribution (Recorder(reference=...)), which this trace lacks"


def helpful_and_harmful(data: ReportData, top: int = TOP) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The `top` samples that lowered the reference loss most (most negative val_effect)
    and the `top` that raised it most."""
    scored = data.trace.samples().filter(pl.col("val_effect").is_not_null())
    helpful = scored.sort("val_effect").head(top)
    harmful = scored.filter(pl.col("val_effect") > 0).sort("val_effect", descending=True)
    return helpful, harmful.head(top)


def _pages(data: ReportData) -> Iterator[Figure]:
    helpful, harmful = helpful_and_harmful(data)
    yield _gallery(data, helpful, harmful)
    yield _where_and_when(data, helpful, harmful)


def _gallery(data: ReportData, helpful: pl.DataFrame, harmful: pl.DataFrame) -> Figure:
    ids = helpful["sample_id"].to_list() + harmful["sample_id"].to_list()
    images = data.thumbnails(ids) if data.has_thumbnails else {}
    fig = new_page("Validation attribution: most helpful and most harmful samples", caption_lines=3)
    outer = fig.add_gridspec(2, 1, hspace=0.4, top=0.86, bottom=0.16)
    for block, (frame, title) in enumerate(
        ((helpful, "Most helpful (lowered the held-out loss)"), (harmful, "Most harmful"))
    ):
        inner = outer[block].subgridspec(1, TOP, wspace=0.15)
        for i, r in enumerate(frame.iter_rows(named=True)):
            ax = fig.add_subplot(inner[0, i])
            ax.set_xticks([])
            ax.set_yticks([])
            draw_thumbnail(ax, images.get(int(r["sample_id"])) if images else None)
            label = data.class_name(r.get("target"))
            ax.set_title(f"#{r['sample_id']}  {label}\n{r['val_effect']:+.2e}", fontsize=7.5)
            if i == 0:
                ax.set_ylabel(title, fontsize=9, fontweight="bold", rotation=0, ha="left")
                ax.yaxis.set_label_coords(0, 1.5)
        if frame.height == 0:
            fig.text(0.1, 0.72 - 0.4 * block, f"{title}: none", fontsize=9)
    add_caption(
        fig,
        (
            "val_effect is the first-order change of the loss on the recorded held-out batch "
            "caused by the sample's part of each SGD step, −η·s·⟨g(i,l), g_val(l)⟩, summed "
            "over its measured steps and all layers (times reference_every). Negative: its "
            "updates lowered the held-out loss. A harmful sample is worth a look at its label."
        ),
    )
    return fig


def _where_and_when(data: ReportData, helpful: pl.DataFrame, harmful: pl.DataFrame) -> Figure:
    table = data.trace.val_effect()
    layers = data.layers
    epochs = sorted(table["epoch"].unique().to_list())
    fig = new_page("Validation attribution: where in the network and when", caption_lines=3)
    grid = fig.add_gridspec(1, 2, right=0.9, wspace=0.55)
    by_layer = fig.add_subplot(grid[0, 0])
    y = np.arange(layers.height)
    for frame, name, color in ((helpful, "most helpful", "C0"), (harmful, "most harmful", "C3")):
        part = table.filter(pl.col("sample_id").is_in(frame["sample_id"].implode()))
        sums = part.group_by("layer_index").agg(pl.col("val_effect").sum())
        values = dict(zip(sums["layer_index"].to_list(), sums["val_effect"].to_list(), strict=True))
        width = 0.4
        offset = -width / 2 if color == "C0" else width / 2
        by_layer.barh(y + offset, [values.get(i, 0.0) for i in y], width, label=name, color=color)
    by_layer.set_yticks(
        y,
        [
            layer_label(r["layer_index"], r["layer"], r["kind"])
            for r in layers.iter_rows(named=True)
        ],
        fontsize=7,
    )
    by_layer.axvline(0, color="0.5", lw=0.8)
    by_layer.set_xlabel("summed val_effect")
    by_layer.set_title("Per layer, top samples", loc="left")
    by_layer.legend(fontsize=7)
    grid_values = np.full((layers.height, max(len(epochs), 1)), np.nan)
    totals = table.group_by("layer_index", "epoch").agg(pl.col("val_effect").sum())
    for r in totals.iter_rows(named=True):
        if r["layer_index"] is not None:
            grid_values[r["layer_index"], epochs.index(r["epoch"])] = r["val_effect"]
    heat = fig.add_subplot(grid[0, 1])
    limit = float(np.nanmax(np.abs(grid_values))) if np.isfinite(grid_values).any() else 1.0
    image = heat.imshow(
        grid_values,
        aspect="auto",
        cmap=CMAP_DIVERGING,
        vmin=-limit,
        vmax=limit,
        interpolation="nearest",
    )
    heat.set_xticks(range(len(epochs)), [str(e + 1) for e in epochs])
    heat.set_xlabel("epoch (1 = first)")
    heat.set_yticks(y, [f"L{i}" for i in y])
    heat.set_title("All samples, per layer and epoch", loc="left")
    fig.colorbar(image, ax=heat, label="summed val_effect", fraction=0.05, pad=0.02)
    keep_inside(fig)
    add_caption(
        fig,
        (
            "Left: the val_effect of the most helpful and most harmful samples of the "
            "previous page, split by layer. Right: the whole training set's summed "
            "val_effect per layer and epoch (blue-red diverging: negative lowered the "
            "held-out loss). SGD's first-order term: with momentum or Adam it is indicative."
        ),
    )
    return fig


SECTION = Section(
    "val_effect", "Validation attribution: helpful and harmful samples", _pages, missing=_missing
)
