"""Several runs (seeds, ablations) as one analysis: every table gains a `run` column.

    with open_runs({"seed0": "runs/s0.h5", "seed1": "runs/s1.h5"}) as runs:
        runs.query("SELECT run, layer, sum(importance) FROM importance GROUP BY ALL")

Each run is an ordinary `Trace` whose DuckDB tables live in a schema of its own (`r0`,
`r1`, ...) on one sandboxed connection; before a query runs, each run loads the columns the
query names (as `Trace.sql` does) and every table the query mentions is a view
``SELECT '<run>' AS run, * FROM r<i>.<table> UNION ALL BY NAME ...`` over them. Nothing is
copied between runs: a GROUP BY over all of them streams through each run's own tables.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import duckdb
import polars as pl

from samplescope.analysis._duckdb import collect, run_query
from samplescope.analysis._sql import check_statements, query_names, sandboxed_connection
from samplescope.analysis.errors import TraceError
from samplescope.analysis.trace import Trace, TraceSource

__all__ = ["Runs", "open_runs"]


def _names(sources: Sequence[TraceSource]) -> list[str]:
    """A run's name: its file's stem (without a `.rank<N>` suffix), made unique."""
    names: list[str] = []
    for source in sources:
        first = source if isinstance(source, (str, os.PathLike)) else next(iter(source), "")
        stem = Path(os.fspath(first)).name.split(".")[0] or "run"
        name, n = stem, 1
        while name in names:
            n += 1
            name = f"{stem}_{n}"
        names.append(name)
    return names


def open_runs(sources: Sequence[TraceSource] | Mapping[str, TraceSource]) -> Runs:
    """Open several runs as one analysis.

    Args:
        sources: traces (each a path, a glob or a list of one run's shards), or a mapping
            from run name to trace. Without names, a run is named by its file's stem.

    Returns:
        A `Runs`; use it as a context manager or call `close()`.

    Raises:
        TraceError: fewer than one trace, a name given twice, or a trace cannot be opened.
        TraceFormatError: as `open_trace`.
    """
    return Runs(sources)


class Runs:
    """Several open traces sharing one DuckDB connection; SQL spans them with a `run`
    column (the run's name) first in every table."""

    def __init__(self, sources: Sequence[TraceSource] | Mapping[str, TraceSource]) -> None:
        if isinstance(sources, Mapping):
            names, paths = [str(k) for k in sources], list(sources.values())
        elif isinstance(sources, (str, os.PathLike)):
            names, paths = _names([sources]), [sources]
        else:
            paths = list(sources)
            names = _names(paths)
        if not paths:
            msg = "open_runs needs at least one trace"
            raise TraceError(msg)
        self.names = names
        self._con = sandboxed_connection()
        self.traces: list[Trace] = []
        try:
            for index, source in enumerate(paths):
                self.traces.append(Trace(source, connection=self._con, schema=f"r{index}"))
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Close every run's files and the shared connection."""
        for trace in self.traces:
            trace.close()
        self._con.close()

    def __enter__(self) -> Runs:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Runs({', '.join(self.names)})"

    @property
    def table_names(self) -> list[str]:
        """The tables every run offers."""
        names = [set(t.table_names) for t in self.traces]
        return [n for n in self.traces[0].table_names if all(n in s for s in names)]

    def sql(
        self,
        query: str,
        params: Sequence[Any] | dict[str, Any] | None = None,
    ) -> duckdb.DuckDBPyRelation:
        """Run SQL over every run's tables (each with a leading `run` column).

        Raises:
            QueryError: as `Trace.sql`.
        """
        check_statements(query, self._con)
        tables = query_names(query, set(self.table_names), self._con).tables
        for trace in self.traces:
            trace._session.prepare(query)
        for table in sorted(tables):
            parts = [
                f"SELECT '{name.replace(chr(39), chr(39) * 2)}' AS run, * "
                f"FROM {trace._session.name(table)}"
                for name, trace in zip(self.names, self.traces, strict=True)
            ]
            self._con.execute(
                f"CREATE OR REPLACE VIEW {table} AS {' UNION ALL BY NAME '.join(parts)}"
            ).fetchall()
        return run_query(self._con, query, params)

    def query(
        self,
        query: str,
        params: Sequence[Any] | dict[str, Any] | None = None,
    ) -> pl.DataFrame:
        """Run SQL over every run and return the result as a Polars frame.

        Raises:
            QueryError: as `Trace.query`.
        """
        return collect(self.sql(query, params))
