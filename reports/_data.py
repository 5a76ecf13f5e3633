"""Everything the report plots, read once from a trace through `samplescope.analysis`.

This is the only module that knows the analysis layer's table and column names; sections
ask `ReportData` for small aggregated frames. Each piece is computed on first use, so a
report of a few sections reads only what those sections need, and heavy per-sample tables
are aggregated in DuckDB before they reach Python.
"""

from __future__ import annotations

import logging
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

__all__ = ["ReportData"]

logger = logging.getLogger(__name__)

# Rows of the sorted-samples heatmap: samples are binned by difficulty rank into at most
# this many rows, so 60,000 samples plot as fast as 600.
MAX_HEATMAP_ROWS = 200


class ReportData:
    """The aggregates of one trace that the report's sections draw.

    Args:
        trace: an open `samplescope.analysis.Trace`.
        path: where the trace came from, for the summary page.
    """

    def __init__(self, trace: Any, path: str | Path | None = None) -> None:
        self.trace = trace
        self.path = None if path is None else Path(path)
        # Set by the renderer: the report's title and which sections it holds or left out.
        self.report_title: str | None = None
        self.included: list[tuple[str, str]] = []
        self.omitted: list[tuple[str, str, str]] = []

    # -- run facts -----------------------------------------------------------------------
    @cached_property
    def meta(self) -> dict[str, Any]:
        return dict(self.trace.meta)

    @property
    def has_outputs(self) -> bool:
        """Whether logits/targets were recorded (predictions, confidences, margins)."""
        return bool(self.meta.get("has_outputs"))

    @cached_property
    def has_thumbnails(self) -> bool:
        return self.trace.has_thumbnails

    def thumbnails(self, sample_ids: list[int]) -> dict[int, np.ndarray]:
        """The stored thumbnail image of each of `sample_ids` that has one."""
        return self.trace.thumbnails(sample_ids)

    @cached_property
    def trace_bytes(self) -> int | None:
        """Size of the trace's file(s) on disk."""
        paths = [Path(p) for p in self.meta.get("paths", [])]
        if not paths and self.path is not None:
            paths = [self.path]
        sizes = [p.stat().st_size for p in paths if p.exists()]
        return sum(sizes) if sizes else None

    @cached_property
    def layers(self) -> pl.DataFrame:
        """layer_index, layer, kind, n_params; row 0 nearest the input."""
        return (
            self.trace.layers()
            .select("layer_index", "layer", "kind", "n_params")
            .sort("layer_index")
        )

    @cached_property
    def layer_names(self) -> list[str]:
        return self.layers["layer"].to_list()

    @cached_property
    def n_samples(self) -> int:
        return self.samples.height

    @cached_property
    def epochs(self) -> list[int]:
        return self.layer_epoch["epoch"].unique().sort().to_list()

    # -- per epoch -----------------------------------------------------------------------
    @cached_property
    def train_epochs(self) -> pl.DataFrame:
        """epoch, loss (mean per-sample training loss), accuracy (null without outputs)."""
        accuracy = "avg(correct::DOUBLE)" if self.has_outputs else "NULL::DOUBLE"
        return self.trace.sql(
            f"SELECT epoch, avg(loss) AS loss, {accuracy} AS accuracy, count(*) AS visits "
            "FROM visits GROUP BY epoch ORDER BY epoch"
        ).pl()

    @cached_property
    def evals(self) -> pl.DataFrame:
        """epoch, split, loss, accuracy of every logged evaluation (may be empty)."""
        evals = self.trace.evals()
        if evals is None or evals.height == 0:
            return pl.DataFrame(
                schema={
                    "epoch": pl.Int64,
                    "split": pl.String,
                    "loss": pl.Float64,
                    "accuracy": pl.Float64,
                }
            )
        return evals.select("epoch", "split", "loss", "accuracy")

    @cached_property
    def layer_epoch(self) -> pl.DataFrame:
        """epoch, layer_index, importance, grad_sq: totals over all samples of the epoch."""
        return self.trace.sql(
            "SELECT epoch, layer_index, sum(importance) AS importance, sum(grad_sq) AS grad_sq "
            "FROM importance GROUP BY epoch, layer_index ORDER BY epoch, layer_index"
        ).pl()

    @cached_property
    def correlations(self) -> pl.DataFrame:
        """epoch, layer_index, spearman (importance in the epoch vs final loss)."""
        # The analysis table also holds whole-run rows (epoch NULL) and all-layer rows.
        return (
            self.trace.correlations()
            .filter(pl.col("epoch").is_not_null() & pl.col("layer_index").is_not_null())
            .select("epoch", "layer_index", "spearman")
            .sort("epoch", "layer_index")
        )

    # -- per sample ----------------------------------------------------------------------
    @cached_property
    def samples(self) -> pl.DataFrame:
        """One row per sample: the analysis layer's scores (see docs/analysis.md)."""
        return self.trace.samples()

    @cached_property
    def final_pred(self) -> pl.DataFrame:
        """sample_id, pred: the prediction at each sample's last visit (outputs only)."""
        return self.trace.sql(
            "SELECT sample_id, arg_max(pred, step) AS pred FROM visits GROUP BY sample_id"
        ).pl()

    @cached_property
    def importance_groups(self) -> pl.DataFrame:
        """layer_index, group (0 = top 10% of samples by total importance, 1 = next 10%,
        2 = the rest), share of the layer's importance in [0, 1]."""
        order = {"top10": 0, "next10": 1, "rest": 2}
        return (
            self.trace.groups()
            .filter(pl.col("layer_index").is_not_null())
            .with_columns(pl.col("group").replace_strict(order, return_dtype=pl.Int64))
            .select("layer_index", "group", "share")
        )

    @cached_property
    def class_layer(self) -> pl.DataFrame:
        """target, layer_index, importance: each class's summed importance per layer."""
        return self.trace.sql(
            "SELECT s.target, e.layer_index, sum(e.importance) AS importance "
            "FROM sample_epochs e JOIN samples s USING (sample_id) GROUP BY ALL "
            "ORDER BY 1, 2"
        ).pl()

    def decile_epoch(self) -> pl.DataFrame:
        """layer_index, decile, epoch, importance: summed over the samples of each decile."""
        return self._binned_epoch("difficulty_decile")

    @cached_property
    def rank_epoch(self) -> tuple[pl.DataFrame, int]:
        """(layer_index, bin, epoch, importance mean) with samples binned by difficulty rank,
        and the number of bins (0 = easiest)."""
        n_bins = min(MAX_HEATMAP_ROWS, max(self.n_samples, 1))
        return self._binned_epoch(
            f"(difficulty_rank * {n_bins}) // {max(self.n_samples, 1)}", mean=True
        ), n_bins

    def _binned_epoch(self, key: str, *, mean: bool = False) -> pl.DataFrame:
        frame = self.trace.sql(
            f"WITH s AS (SELECT sample_id, {key} AS bin FROM samples) "
            "SELECT e.layer_index, s.bin, e.epoch, sum(e.importance) AS importance "
            "FROM sample_epochs e JOIN s USING (sample_id) GROUP BY ALL"
        ).pl()
        if mean:
            # Divide by the bin's size, not its visit count: a sample not visited in an
            # epoch contributed zero importance to it.
            sizes = self.trace.sql(
                f"SELECT {key} AS bin, count(*) AS n FROM samples GROUP BY 1"
            ).pl()
            frame = (
                frame.join(sizes, on="bin")
                .with_columns(importance=pl.col("importance") / pl.col("n"))
                .drop("n")
            )
        return frame.with_columns(pl.col("bin").cast(pl.Int64)).sort("layer_index", "bin", "epoch")

    def grid(self, frame: pl.DataFrame, layer_index: int, n_bins: int) -> np.ndarray:
        """[bins, epochs] array of `frame`'s importance for one layer (zeros where absent)."""
        epochs = self.epochs
        column = {e: i for i, e in enumerate(epochs)}
        out = np.zeros((n_bins, len(epochs)))
        part = frame.filter(pl.col("layer_index") == layer_index)
        cols = np.array([column[e] for e in part["epoch"].to_list()], dtype=np.int64)
        out[part["bin"].to_numpy(), cols] = part["importance"].to_numpy()
        return out
