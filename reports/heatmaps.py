"""Section 4, the paper's figure: importance by sample difficulty and epoch, for each layer.

Top row: samples sorted by final loss (binned into at most 200 rows) × epochs, log colour.
Bottom row: difficulty deciles × epochs, each epoch's column normalised to the share of that
epoch's importance in the layer, so the drift from easy to hard samples over training shows
even though gradients shrink by orders of magnitude.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure

from samplescope.reports._data import ReportData
from samplescope.reports._page import (
    CMAP,
    add_caption,
    epoch_axis,
    keep_inside,
    layer_label,
    new_page,
)
from samplescope.reports._section import Section

__all__ = ["SECTION"]

LAYERS_PER_PAGE = 4


def _pages(data: ReportData) -> Iterator[Figure]:
    ranks, n_bins = data.rank_epoch
    deciles = data.decile_epoch()
    rows = list(data.layers.iter_rows(named=True))
    raw = {r["layer_index"]: data.grid(ranks, r["layer_index"], n_bins) for r in rows}
    share = {
        r["layer_index"]: _column_share(data.grid(deciles, r["layer_index"], 10)) for r in rows
    }
    # Finite values only: an infinite lr (a damaged or diverged run) made the range invalid.
    positive = np.concatenate([g[(g > 0) & np.isfinite(g)] for g in raw.values()] or [np.ones(1)])
    if positive.size == 0:
        positive = np.ones(1)
    # Clip the colour range to the 1st–99.9th percentiles so a few outliers do not wash out.
    raw_norm = LogNorm(*np.percentile(positive, [1, 99.9]))
    share_max = max(float(np.nanmax(s)) for s in share.values()) if share else 1.0
    share_norm = Normalize(0, max(share_max, 10.0))
    epochs = data.epochs
    pages = [rows[i : i + LAYERS_PER_PAGE] for i in range(0, len(rows), LAYERS_PER_PAGE)]
    for number, page_rows in enumerate(pages, 1):
        suffix = f" ({number}/{len(pages)})" if len(pages) > 1 else ""
        fig = new_page(
            f"Importance by sample difficulty and epoch, per layer{suffix}", caption_lines=4
        )
        grid = fig.add_gridspec(2, LAYERS_PER_PAGE, left=0.07, right=0.9)
        for col, row in enumerate(page_rows):
            index = row["layer_index"]
            top = fig.add_subplot(grid[0, col])
            image_top = _heatmap(top, raw[index], epochs, raw_norm, n_bins)
            top.set_title(layer_label(index, row["layer"], row["kind"]), fontsize=9)
            top.set_ylabel("samples by final loss\n(rank %, 0 = easiest)" if col == 0 else "")
            top.set_xlabel("")
            bottom = fig.add_subplot(grid[1, col])
            image_bottom = _heatmap(bottom, share[index], epochs, share_norm, 10)
            bottom.set_yticks(range(10))
            bottom.set_ylabel("difficulty decile\n(0 = easiest)" if col == 0 else "")
        top_pos, bottom_pos = grid[0, -1].get_position(fig), grid[1, -1].get_position(fig)
        fig.colorbar(
            image_top,
            cax=fig.add_axes((0.92, top_pos.y0, 0.012, top_pos.height)),
            label="mean importance per sample",
        )
        fig.colorbar(
            image_bottom,
            cax=fig.add_axes((0.92, bottom_pos.y0, 0.012, bottom_pos.height)),
            label="share of the epoch's importance (%)",
        )
        keep_inside(fig)
        add_caption(
            fig,
            (
                "Columns are layers from the input (left) to the output (right). Top: every "
                "sample, sorted by its final training loss (easiest at the bottom), its importance "
                "in each epoch on a log colour scale; training usually makes everything darker to "
                "the right. Bottom: the same per difficulty decile, each epoch's column "
                "normalised to 100%, so a uniform layer reads 10% everywhere. The paper's pattern "
                "is bright bottom-left near the output (easy samples early) and bright top-right "
                "near the input (hard samples late); its absence is a finding too."
            ),
        )
        yield fig


def _column_share(grid: np.ndarray) -> np.ndarray:
    totals = grid.sum(axis=0, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, 100 * grid / totals, np.nan)


def _heatmap(ax, values: np.ndarray, epochs: list[int], norm, n_rows: int):
    masked = (
        np.ma.masked_where(~np.isfinite(values) | (values <= 0), values)
        if isinstance(norm, LogNorm)
        else np.ma.masked_invalid(values)
    )
    extent = (epochs[0] - 0.5, epochs[-1] + 0.5, -0.5, n_rows - 0.5) if epochs else None
    image = ax.imshow(
        masked,
        aspect="auto",
        origin="lower",
        cmap=CMAP,
        norm=norm,
        interpolation="nearest",
        extent=extent,
    )
    epoch_axis(ax, epochs)
    if n_rows > 10:
        ticks = np.linspace(-0.5, n_rows - 0.5, 5)
        ax.set_yticks(ticks, [f"{p:.0f}" for p in np.linspace(0, 100, 5)])
    return image


SECTION = Section("heatmaps", "Importance by difficulty and epoch (the paper's figure)", _pages)
