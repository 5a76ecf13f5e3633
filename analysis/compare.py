"""Seed stability: rank correlation of per-sample importance between runs on the same data."""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence

import polars as pl

from samplescope.analysis.errors import TraceError

__all__ = ["compare_traces"]

PathLike = str | os.PathLike[str]


def _importance(source: PathLike | Sequence[PathLike]) -> pl.DataFrame:
    from samplescope.analysis.trace import open_trace

    with open_trace(source) as trace:
        rollup = trace._rollup()
        layers = [c for c in rollup.columns if c.startswith("importance_")]
        per_epoch = rollup.select(
            "sample_id", "epoch", pl.sum_horizontal(layers).alias("importance")
        )
        total = (
            trace.samples()
            .select("sample_id", "importance")
            .with_columns(pl.lit(None, dtype=pl.Int64).alias("epoch"))
        )
    return pl.concat([per_epoch, total.select(per_epoch.columns)])


def compare_traces(paths: Sequence[PathLike | Sequence[PathLike]]) -> pl.DataFrame:
    """Spearman correlation of per-sample importance between every pair of runs.

    Args:
        paths: two or more traces (each a path, a glob, or a list of one run's shards).

    Returns:
        One row per pair of runs and epoch: run_a, run_b (0-based positions in `paths`),
        trace_a, trace_b, epoch (NULL = total importance over all epochs), n_samples
        (samples visited in that epoch by both runs), spearman.

    Raises:
        TraceError: fewer than two traces, or any trace cannot be opened.
    """
    if len(paths) < 2:
        msg = f"compare needs at least two traces, got {len(paths)}"
        raise TraceError(msg)
    tables = [_importance(p) for p in paths]
    names = [p if isinstance(p, (str, os.PathLike)) else ",".join(map(str, p)) for p in paths]
    rows = []
    for a, b in itertools.combinations(range(len(paths)), 2):
        joined = tables[a].join(tables[b], on=["sample_id", "epoch"], nulls_equal=True, suffix="_b")
        stats = joined.group_by("epoch").agg(
            pl.len().cast(pl.Int64).alias("n_samples"),
            pl.corr("importance", "importance_b", method="spearman").alias("spearman"),
        )
        rows.append(
            stats.with_columns(
                pl.lit(a, dtype=pl.Int64).alias("run_a"),
                pl.lit(b, dtype=pl.Int64).alias("run_b"),
                pl.lit(str(names[a])).alias("trace_a"),
                pl.lit(str(names[b])).alias("trace_b"),
            )
        )
    return (
        pl.concat(rows)
        .select("run_a", "run_b", "trace_a", "trace_b", "epoch", "n_samples", "spearman")
        .sort("run_a", "run_b", "epoch", nulls_last=True)
    )
