"""Several runs as one analysis: one SQL over every run, with a `run` column."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal
from tracefiles import write_tiny_trace

from samplescope.analysis import QueryError, open_runs, open_trace


def _runs(tmp_path: Path) -> list[Path]:
    a = write_tiny_trace(tmp_path / "seed0.h5", run_id="aaaa")
    b = write_tiny_trace(tmp_path / "seed1.h5", outputs=False, run_id="bbbb")
    return [a, b]


def test_one_query_spans_runs_and_matches_each_run(tmp_path: Path) -> None:
    paths = _runs(tmp_path)
    query = (
        "SELECT {run}epoch, layer, sum(importance) AS importance, count(*) AS n "
        "FROM importance GROUP BY ALL ORDER BY ALL"
    )
    with open_runs(paths) as runs:
        both = runs.query(query.format(run="run, "))
        assert runs.names == ["seed0", "seed1"]
        assert both.columns[0] == "run"
        for name, path in zip(runs.names, paths, strict=True):
            with open_trace(path) as trace:
                own = trace.query(query.format(run=""))
            part = both.filter(pl.col("run") == name).drop("run")
            assert_frame_equal(part, own)


def test_per_sample_tables_and_visits_span_runs(tmp_path: Path) -> None:
    with open_runs({"a": _runs(tmp_path)[0], "b": _runs(tmp_path)[1]}) as runs:
        counts = runs.query("SELECT run, count(*) AS n FROM visits GROUP BY run ORDER BY run")
        assert counts.rows() == [("a", 8), ("b", 8)]
        samples = runs.query("SELECT run, sample_id, importance FROM samples ORDER BY ALL")
        with open_trace(tmp_path / "seed0.h5") as trace:
            own = trace.samples().select("sample_id", "importance")
        assert_frame_equal(samples.filter(pl.col("run") == "a").drop("run"), own)
        # A table one run has a column the other lacks (target without outputs: NULL).
        joined = runs.query(
            "SELECT run, count(*) AS n, count(importance_rank) AS ranked "
            "FROM sample_epochs GROUP BY run ORDER BY run"
        )
        assert joined.rows() == [("a", 16, 16), ("b", 16, 16)]


def test_runs_refuse_writes_and_report_sql_errors(tmp_path: Path) -> None:
    with open_runs(_runs(tmp_path)) as runs:
        with pytest.raises(QueryError, match="not allowed"):
            runs.sql("DROP VIEW importance")
        with pytest.raises(QueryError, match="SQL error"):
            runs.query("SELECT no_such_column FROM samples")
