"""Everything the report plots, read once from a trace through `samplescope.analysis`.

This is the only module that knows the analysis layer's table and column names; sections
ask `ReportData` for small aggregated frames. Each piece is computed on first use, so a
report of a few sections reads only what those sections need, and heavy per-sample tables
are aggregated in DuckDB before they reach Python.

`ReportData` is read-only: the renderer decides the report's title and which sections it
holds before making it (`ReportPlan`), and sections only read from it.

Epochs: the trace numbers epochs from 0; every ``epoch`` column here is 1-based (the first
epoch is 1), as a person reads them and as the findings' sentences state them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from samplescope.analysis import Trace

__all__ = [
    "EPOCH_BASE",
    "ReportData",
    "ReportPlan",
    "TraceOrPath",
    "average_precision",
    "pct_rank",
    "precision_recall",
]

# Rows of the sorted-samples heatmap: samples are binned by difficulty rank into at most
# this many rows, so 60,000 samples plot as fast as 600.
MAX_HEATMAP_ROWS = 200
# Added to the trace's 0-based epoch numbers in everything a person reads.
EPOCH_BASE = 1
# An open trace, or what `open_trace` takes.
TraceOrPath = Trace | str | os.PathLike[str] | Sequence[str | os.PathLike[str]]


@dataclass(frozen=True)
class ReportPlan:
    """What a report holds, decided by the renderer before any section draws.

    Attributes:
        title: the report's title.
        included: (section id, title) of each section drawn, in page order.
        omitted: (section id, title, why) of each section left out.
    """

    title: str = "samplescope report"
    included: tuple[tuple[str, str], ...] = ()
    omitted: tuple[tuple[str, str, str], ...] = ()


class ReportData:
    """The aggregates of one trace that the report's sections draw.

    Args:
        trace: an open `samplescope.analysis.Trace`.
        path: where the trace came from, for the summary page.
        plan: the report's title and sections (the summary page lists them).
    """

    def __init__(
        self, trace: Trace, path: str | Path | None = None, plan: ReportPlan | None = None
    ) -> None:
        self._trace = trace
        self._path = None if path is None else Path(path)
        self._plan = plan or ReportPlan()

    @property
    def trace(self) -> Trace:
        """The open trace (sections that call the analysis layer directly, e.g. findings)."""
        return self._trace

    @property
    def path(self) -> Path | None:
        return self._path

    @property
    def report_title(self) -> str:
        return self._plan.title

    @property
    def included(self) -> Sequence[tuple[str, str]]:
        return self._plan.included

    @property
    def omitted(self) -> Sequence[tuple[str, str, str]]:
        return self._plan.omitted

    def with_plan(self, plan: ReportPlan) -> ReportData:
        """A copy of this data (same trace, nothing computed yet) holding `plan`."""
        return ReportData(self._trace, self._path, plan)

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
            f"SELECT epoch + {EPOCH_BASE} AS epoch, avg(loss) AS loss, {accuracy} AS accuracy, "
            "count(*) AS visits "
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
        return evals.select(pl.col("epoch") + EPOCH_BASE, "split", "loss", "accuracy")

    @cached_property
    def layer_epoch(self) -> pl.DataFrame:
        """epoch, layer_index, importance, grad_sq: totals over all samples of the epoch."""
        return self.trace.sql(
            f"SELECT epoch + {EPOCH_BASE} AS epoch, layer_index, sum(importance) AS importance, "
            "sum(grad_sq) AS grad_sq FROM importance GROUP BY ALL ORDER BY epoch, layer_index"
        ).pl()

    @cached_property
    def correlations(self) -> pl.DataFrame:
        """epoch, layer_index, spearman (importance in the epoch vs final loss)."""
        # The analysis table also holds whole-run rows (epoch NULL) and all-layer rows.
        return (
            self.trace.correlations()
            .filter(pl.col("epoch").is_not_null() & pl.col("layer_index").is_not_null())
            .select(pl.col("epoch") + EPOCH_BASE, "layer_index", "spearman")
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
            f"SELECT e.layer_index, s.bin, e.epoch + {EPOCH_BASE} AS epoch, "
            "sum(e.importance) AS importance "
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

    @cached_property
    def findings(self) -> tuple[list[Any], list[str]]:
        """(findings, headline sentences) of `samplescope.analysis.findings` on this run.

        Raises:
            SamplescopeError: the run cannot be checked (e.g. no epochs); not cached.
        """
        from samplescope.analysis.findings import findings, headlines

        results = findings(self.trace)
        return results, headlines(self.trace, results)

    def mislabeled_ranking(self, top: int) -> pl.DataFrame:
        """The ``top`` likeliest mislabeled samples as `samplescope flag --kind mislabeled`
        ranks them: sample_id, label_quality (low first) and the flag's other columns."""
        from samplescope.analysis.flags import flag

        return flag(self.trace, kind="mislabeled", budget=max(top, 1)).head(top)

    # -- optional data -------------------------------------------------------------------
    @cached_property
    def class_names(self) -> list[str] | None:
        """The dataset's class names by label (``config["class_names"]``), if recorded."""
        return class_names_of(self.meta)

    def class_name(self, target: Any) -> str:
        """How a label is written: its class name when known, else the number."""
        names = self.class_names
        if target is None:
            return "–"
        if names is not None and 0 <= int(target) < len(names):
            return names[int(target)]
        return str(target)

    @cached_property
    def scale_varies(self) -> bool:
        """Whether the learning rate or the batch size changed during training (a smaller
        last batch of an epoch does not count). When neither did, importance is ‖g‖² times
        nearly one number, a log plot of one is the other shifted, and one panel is enough."""
        lrs, sizes = self.trace.sql(
            "WITH s AS (SELECT lr, batch_size, step = max(step) OVER (PARTITION BY epoch) "
            "AS last FROM steps) "
            "SELECT count(DISTINCT lr), count(DISTINCT batch_size) FILTER (WHERE NOT last) FROM s"
        ).fetchall()[0]
        return lrs > 1 or sizes > 1

    @cached_property
    def has_alignment(self) -> bool:
        """Whether the recorder stored per-layer alignment (``Recorder(alignment=True)``)."""
        options = self.meta.get("options") or {}
        return bool(options.get("alignment"))

    @cached_property
    def alignment_epoch(self) -> pl.DataFrame:
        """epoch, layer_index, alignment (mean over the epoch's visits), from the decile
        of samples by difficulty as ``decile``; empty without alignment."""
        if not self.has_alignment:
            return pl.DataFrame(
                schema={
                    "epoch": pl.Int64,
                    "layer_index": pl.Int64,
                    "decile": pl.Int64,
                    "alignment": pl.Float64,
                }
            )
        return self.trace.sql(
            f"SELECT i.epoch + {EPOCH_BASE} AS epoch, i.layer_index, s.difficulty_decile AS "
            "decile, avg(i.alignment) AS alignment FROM importance i JOIN samples s "
            "USING (sample_id) WHERE i.alignment IS NOT NULL GROUP BY ALL ORDER BY 1, 2, 3"
        ).pl()

    @cached_property
    def flag_columns(self) -> list[str]:
        """The boolean /sample_info columns (e.g. ``flipped``), which mark known bad samples."""
        if "sample_info" not in self.trace.table_names:
            return []
        schema = self.trace.table("sample_info").collect_schema()
        return [
            name
            for name, dtype in schema.items()
            if name != "sample_id" and (dtype == pl.Boolean or dtype in (pl.Int8, pl.UInt8))
        ]

    def flags(self) -> pl.DataFrame:
        """sample_id and each flag column as booleans (empty frame without flags)."""
        if not self.flag_columns:
            return pl.DataFrame(schema={"sample_id": pl.Int64})
        return (
            self.trace.table("sample_info")
            .select("sample_id", *[pl.col(c).cast(pl.Boolean) for c in self.flag_columns])
            .collect()
        )

    @cached_property
    def scores(self) -> pl.DataFrame:
        """sample_id, target and every per-sample score, oriented higher = more suspect
        (`samplescope.analysis.flags.score_table`: the definitions `flag` ranks by)."""
        from samplescope.analysis.flags import score_table

        return score_table(self.trace).select(pl.exclude("^info_.*$"))

    def flag_quality(self, flag: str) -> pl.DataFrame:
        """For one /sample_info flag: per score, its average precision and its precision
        and recall when flagging as many samples as are truly flagged (k = #flagged)."""
        truth_frame = self.flags().select("sample_id", pl.col(flag).fill_null(False))
        table = self.scores.join(truth_frame, on="sample_id", how="inner")
        truth = table[flag].to_numpy().astype(bool)
        k = int(truth.sum())
        rows = []
        for name in table.columns:
            if name in ("sample_id", "target", flag):
                continue
            score = table[name].cast(pl.Float64).to_numpy()
            precision, recall = precision_recall(score, truth)
            rows.append(
                {
                    "score": name,
                    "average_precision": average_precision(score, truth),
                    "precision_at_k": float(precision[k - 1]) if k else float("nan"),
                    "recall_at_k": float(recall[k - 1]) if k else float("nan"),
                    "k": k,
                }
            )
        return pl.DataFrame(rows).sort("average_precision", descending=True, nulls_last=True)

    def flag_curve(self, flag: str, score: str) -> tuple[np.ndarray, np.ndarray]:
        """(precision, recall) of `score` against `flag` at every k."""
        truth_frame = self.flags().select("sample_id", pl.col(flag).fill_null(False))
        table = self.scores.join(truth_frame, on="sample_id", how="inner")
        return precision_recall(
            table[score].cast(pl.Float64).to_numpy(), table[flag].to_numpy().astype(bool)
        )

    def trajectories(self, sample_ids: Sequence[int]) -> pl.DataFrame:
        """sample_id, epoch, layer_index, importance, loss: each sample's importance per
        layer and mean training loss per epoch (loss repeats over the layers)."""
        ids = [int(i) for i in sample_ids]
        if not ids:
            return pl.DataFrame(
                schema={
                    "sample_id": pl.Int64,
                    "epoch": pl.Int64,
                    "layer_index": pl.Int64,
                    "importance": pl.Float64,
                    "loss": pl.Float64,
                }
            )
        return self.trace.sql(
            f"WITH l AS (SELECT sample_id, epoch, avg(loss) AS loss FROM visits "
            "WHERE list_contains($ids, sample_id) GROUP BY ALL) "
            f"SELECT e.sample_id, e.epoch + {EPOCH_BASE} AS epoch, e.layer_index, "
            "sum(e.importance)::DOUBLE AS importance, any_value(l.loss)::DOUBLE AS loss "
            "FROM sample_epochs e JOIN l USING (sample_id, epoch) "
            "WHERE list_contains($ids, e.sample_id) GROUP BY ALL ORDER BY 1, 2, 3",
            {"ids": ids},
        ).pl()


def class_names_of(meta: dict[str, Any]) -> list[str] | None:
    """``config["class_names"]`` of a trace's attributes as a list of strings, or None."""
    config = meta.get("config") or {}
    if isinstance(config, str):
        try:
            config = json.loads(config or "{}")
        except json.JSONDecodeError:
            return None
    names = config.get("class_names") if isinstance(config, dict) else None
    if isinstance(names, str):
        try:
            names = json.loads(names)
        except json.JSONDecodeError:
            return None
    if not isinstance(names, list) or not names:
        return None
    return [str(n) for n in names]


def precision_recall(score: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall after flagging the k highest-scoring samples, k = 1..n.

    Ties keep input order; NaN scores rank last.
    """
    order = np.argsort(-np.nan_to_num(score, nan=-np.inf), kind="stable")
    hits = np.cumsum(truth[order].astype(np.int64))
    k = np.arange(1, len(score) + 1)
    return hits / k, hits / max(int(truth.sum()), 1)


def average_precision(score: np.ndarray, truth: np.ndarray) -> float:
    """Mean of the precision at the rank of each truly flagged sample (NaN without any)."""
    if not truth.any():
        return float("nan")
    precision, _recall = precision_recall(score, truth)
    order = np.argsort(-np.nan_to_num(score, nan=-np.inf), kind="stable")
    return float(precision[truth[order].astype(bool)].mean())


def pct_rank(column: str, *, descending: bool = False) -> pl.Expr:
    """Percentile rank in [0, 1] of a column, 1 = the largest (or smallest if descending)."""
    expr = -pl.col(column) if descending else pl.col(column)
    return (expr.rank("average") - 1) / pl.max_horizontal(pl.len() - 1, 1)
