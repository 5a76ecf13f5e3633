"""Small per-epoch summaries of a trace, the shape that experiment loggers take.

`epoch_summaries` reduces a trace to a few small frames — per (epoch, layer) importance,
per (epoch, layer, difficulty decile) share of it, and top-k tables per score — for
pushing to TensorBoard, W&B or MLflow (`samplescope.push`). They are sums and rankings over
the existing views (`importance`, `sample_epochs`, `samples`), so every number here is one
the `sql`/`samples` commands give too; nothing per visit or per sample stream leaves it
except the k rows of each top-k table.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from samplescope.analysis.errors import QueryError
from samplescope.analysis.trace import Trace

__all__ = ["DEFAULT_TOP_K", "TOP_SCORES", "EpochSummaries", "epoch_summaries"]

DEFAULT_TOP_K = 10

# (score column of `samples`, whether larger is "more"): the scores a top-k table ranks.
# AUM ranks ascending: a low margin is the mislabel signal (Pleiss et al.).
TOP_SCORES: tuple[tuple[str, bool], ...] = (
    ("importance", True),
    ("tracin_self", True),
    ("grand", True),
    ("el2n", True),
    ("forgetting_events", True),
    ("aum", False),
)


@dataclass(frozen=True)
class EpochSummaries:
    """What a pusher sends; every frame is small (epochs × layers × 10 rows at most).

    Attributes:
        importance: epoch, layer_index, layer, importance (Σ over the epoch's visits),
            importance_mean (mean over them), n_visits.
        decile_share: epoch, layer_index, layer, decile, share — the fraction of the
            layer's importance in that epoch carried by the samples of one difficulty
            decile (0 = easiest); rows only where the layer's epoch total is positive.
        top: score, rank (0 = first), sample_id, target, value — the top `k` samples of
            each score in `TOP_SCORES` that the trace has (a score that is NULL for every
            sample is left out).
    """

    importance: pl.DataFrame
    decile_share: pl.DataFrame
    top: pl.DataFrame


def epoch_summaries(trace: Trace, *, top_k: int = DEFAULT_TOP_K) -> EpochSummaries:
    """Per-epoch, per-layer summaries of `trace` (see `EpochSummaries`).

    Args:
        trace: an open trace.
        top_k: rows of each top-k table (at least 1).

    Returns:
        The summaries; epochs are the trace's own (0-based as recorded).

    Raises:
        QueryError: `top_k` is below 1.
        EmptyTraceError: the trace has no visits.
    """
    if top_k < 1:
        msg = f"top_k must be at least 1, got {top_k}"
        raise QueryError(msg)
    return EpochSummaries(
        importance=_importance(trace),
        decile_share=_decile_share(trace),
        top=_top(trace, top_k),
    )


def _importance(trace: Trace) -> pl.DataFrame:
    return trace.query(
        "SELECT epoch, layer_index, layer, sum(importance) AS importance, "
        "avg(importance) AS importance_mean, count(*) AS n_visits "
        "FROM importance GROUP BY epoch, layer_index, layer ORDER BY epoch, layer_index"
    )


def _decile_share(trace: Trace) -> pl.DataFrame:
    # Deciles by final loss (the `samples` definition), fixed over the run, so a decile's
    # share can be followed from epoch to epoch.
    return trace.query(
        "WITH d AS (SELECT sample_id, difficulty_decile AS decile FROM samples), "
        "cell AS (SELECT e.epoch, e.layer_index, e.layer, d.decile, "
        "sum(e.importance) AS importance "
        "FROM sample_epochs e JOIN d USING (sample_id) GROUP BY ALL), "
        "total AS (SELECT epoch, layer_index, sum(importance) AS total FROM cell GROUP BY ALL) "
        "SELECT c.epoch, c.layer_index, c.layer, c.decile, c.importance / t.total AS share "
        "FROM cell c JOIN total t USING (epoch, layer_index) WHERE t.total > 0 "
        "ORDER BY c.epoch, c.layer_index, c.decile"
    )


def _top(trace: Trace, top_k: int) -> pl.DataFrame:
    samples = trace.samples()
    frames = []
    for score, descending in TOP_SCORES:
        if score not in samples.columns or samples[score].null_count() == len(samples):
            continue
        ranked = (
            samples.filter(pl.col(score).is_not_null())
            .sort([score, "sample_id"], descending=[descending, False])
            .head(top_k)
        )
        frames.append(
            ranked.select(
                pl.lit(score).alias("score"),
                pl.int_range(pl.len(), dtype=pl.Int64).alias("rank"),
                pl.col("sample_id"),
                pl.col("target").cast(pl.Int64),
                pl.col(score).cast(pl.Float64).alias("value"),
            )
        )
    schema = {
        "score": pl.String,
        "rank": pl.Int64,
        "sample_id": pl.Int64,
        "target": pl.Int64,
        "value": pl.Float64,
    }
    return pl.concat(frames) if frames else pl.DataFrame(schema=schema)
