"""The DuckDB side of a trace: one sandboxed connection, its views and what they hold.

Raw tables are loaded column by column as queries name them (`_sql.query_names`): `visits`
is an Arrow table of the columns loaded so far (registered, not copied), `importance` a
view over a DuckDB table of per-layer float32 columns and (lr·s)² filled block by block
from HDF5 (`_load_importance`), never materialised in its 12-million-row form. Small and
derived tables are registered from the frames the trace computes.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa

from samplescope.analysis._hdf5 import VISIT_COLUMNS, TraceData
from samplescope.analysis._importance import sql_expr
from samplescope.analysis._sql import check_statements, query_names, sandboxed_connection
from samplescope.analysis.errors import QueryError

__all__ = ["Session", "collect", "one_line", "run_query", "to_polars"]

# importance column -> the per-visit source columns it is computed from. The source is an
# internal Arrow table (`_IMPORTANCE_SOURCE`) with one float32 column per layer (grad_sq_<l>,
# alignment_<l>) and the per-visit factor scale_sq = (lr · s)², so each layer's slice of the
# view scans contiguous columns instead of indexing a list column row by row.
_IMPORTANCE_DEPS = {
    "step": ("step",),
    "epoch": ("epoch",),
    "sample_id": ("sample_id",),
    "layer": (),
    "layer_index": (),
    "grad_sq": ("grad_sq",),
    "importance": ("scale_sq", "grad_sq"),
    "importance_per_param": ("scale_sq", "grad_sq"),
    "alignment": ("alignment",),
    "duplicate": ("duplicate",),
}
_IMPORTANCE_SOURCE = "_samplescope_visit_layers"
_NEW_SOURCE = "_samplescope_visit_layers_new"
_JOINED_SOURCE = "_samplescope_visit_layers_joined"
_PER_LAYER = ("grad_sq", "alignment")
_IMPORTANCE_COLUMNS = (
    "step",
    "epoch",
    "sample_id",
    "scale_sq",
    "grad_sq",
    "alignment",
    "duplicate",
)
_BLOCK_ROWS = 1 << 18
_ROLLUP = "_samplescope_sample_epoch_rollup"
_BLOCK_ROWS = 1 << 18


def one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


class Session:
    """One trace's DuckDB connection and the tables registered on it.

    Args:
        data: the trace's HDF5 side.
        frames: table name -> a function computing that table as a Polars frame (small and
            derived tables, registered on first use).
        table_names: the names of the tables the trace offers.
        rollup: the per-(sample, epoch) rollup the `sample_epochs` view reads.
        con: a connection shared with other traces (`runs.open_runs`); a new sandboxed
            one when None.
        schema: the schema this trace's tables live in on a shared connection (None: the
            connection's default, as a single trace has).
    """

    def __init__(
        self,
        data: TraceData,
        frames: dict[str, Callable[[], pl.DataFrame]],
        table_names: Callable[[], list[str]],
        rollup: Callable[[], pl.DataFrame] | None = None,
        *,
        con: duckdb.DuckDBPyConnection | None = None,
        schema: str | None = None,
    ) -> None:
        self._data = data
        self._rollup = rollup
        self._own_con = con is None
        self._schema = schema
        self._frames_by_name = frames
        self._table_names = table_names
        self.con = sandboxed_connection() if con is None else con
        if schema is not None:
            self.con.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}").fetchall()
        self._loaded: dict[str, dict[str, pa.Array]] = {}
        self._registered: set[str] = set()
        self._importance_select = ""

    def close(self) -> None:
        if self._own_con:
            self.con.close()

    def name(self, table: str) -> str:
        """A table's name on the connection (qualified by the schema, if any)."""
        return table if self._schema is None else f"{self._schema}.{table}"

    def _arrow_name(self, table: str) -> str:
        # Registered Arrow objects live outside schemas: a prefix keeps traces apart.
        return table if self._schema is None else f"_{self._schema}_{table}"

    def _register_arrow(self, table: str, arrow: pa.Table) -> None:
        self.con.register(self._arrow_name(table), arrow)
        if self._schema is not None:
            self.con.execute(
                f"CREATE OR REPLACE VIEW {self.name(table)} AS "
                f"SELECT * FROM {self._arrow_name(table)}"
            ).fetchall()

    def sql(
        self,
        query: str,
        params: Sequence[Any] | dict[str, Any] | None = None,
    ) -> duckdb.DuckDBPyRelation:
        """Run SQL over the trace's tables; returns a DuckDB relation (.pl(), .df(), ...).

        Args:
            query: a DuckDB SQL statement over the tables in `table_names`.
            params: values for `?` or `$name` placeholders.

        Only reading statements run (SELECT, EXPLAIN, DESCRIBE, ...): the connection sees the
        trace's tables only, no files, no extensions, no setting changes (docs/analysis.md).

        Raises:
            QueryError: syntax error, unknown table or column, a statement that would change
                the session or reach outside it, or other SQL error.
        """
        check_statements(query, self.con)
        self.prepare(query)
        return run_query(self.con, query, params)

    def query(
        self,
        query: str,
        params: Sequence[Any] | dict[str, Any] | None = None,
    ) -> pl.DataFrame:
        """Run SQL and return the whole result as a Polars frame (what `samplescope sql` does).

        Raises:
            QueryError: as `sql`, and errors raised while the query executes.
        """
        return collect(self.sql(query, params))

    def prepare(self, query: str) -> None:
        names = query_names(query, set(self._table_names()), self.con)
        for table in sorted(names.tables):
            if table == "importance":
                wanted = (
                    set(_IMPORTANCE_DEPS) if names.star else names.columns & set(_IMPORTANCE_DEPS)
                )
                self._load_importance({d for c in wanted for d in _IMPORTANCE_DEPS[c]})
            elif table == "visits":
                wanted = set(VISIT_COLUMNS) if names.star else names.columns
                self._load_visits(wanted)
            elif table == "sample_epochs" and self._rollup is not None:
                self._register_sample_epochs()
            elif table in self._frames_by_name:
                self._register_small(table)

    def _load_visits(self, wanted: set[str]) -> None:
        loaded = self._loaded.setdefault("visits", {})
        columns = [c for c in VISIT_COLUMNS if c in wanted or c in loaded or c == "step"]
        if set(columns) == set(loaded) and "visits" in self._registered:
            return
        for column in columns:
            if column not in loaded:
                loaded[column] = self._data.visit_column(column)
        self._register_arrow("visits", pa.table({c: loaded[c] for c in columns}))
        self._registered.add("visits")

    def _register_sample_epochs(self) -> None:
        """`sample_epochs` as a view over the engine's per-(sample, epoch) rollup.

        The rollup (one row per sample and epoch, a column per layer) is registered as
        Arrow, shared with the frame the trace caches, not copied; the long form (a row per
        layer too) and its ranks and z-scores are computed by each query that reads them,
        so a report's GROUP BYs over it never hold the long table.
        """
        if "sample_epochs" in self._registered:
            return
        assert self._rollup is not None
        rollup = self._arrow_name(_ROLLUP)
        self.con.register(rollup, self._rollup().to_arrow())
        layers = self._frames_by_name["layers"]()
        parts = []
        for row in layers.iter_rows(named=True):
            index, name = row["layer_index"], str(row["layer"]).replace("'", "''")
            parts.append(
                f"SELECT sample_id, epoch, CAST('{name}' AS VARCHAR) AS layer, "
                f"CAST({index} AS BIGINT) AS layer_index, importance_{index} AS importance, "
                f"grad_sq_{index} AS grad_sq FROM {rollup}"
            )
        if not parts:
            parts = [
                "SELECT CAST(NULL AS BIGINT) AS sample_id, CAST(NULL AS BIGINT) AS epoch, "
                "CAST(NULL AS VARCHAR) AS layer, CAST(NULL AS BIGINT) AS layer_index, "
                "CAST(NULL AS DOUBLE) AS importance, CAST(NULL AS DOUBLE) AS grad_sq WHERE false"
            ]
        window = "(PARTITION BY epoch, layer_index)"
        # Rank 0 = most important, ties by sample_id; z with the population std, NULL at 0.
        self.con.execute(
            f"CREATE OR REPLACE VIEW {self.name('sample_epochs')} AS "
            "SELECT sample_id, epoch, layer, "
            "layer_index, importance, grad_sq, "
            "CAST(row_number() OVER (PARTITION BY epoch, layer_index "
            "ORDER BY importance DESC, sample_id) - 1 AS BIGINT) AS importance_rank, "
            f"CASE WHEN stddev_pop(importance) OVER {window} > 0 THEN "
            f"(importance - avg(importance) OVER {window}) / "
            f"stddev_pop(importance) OVER {window} END AS importance_z "
            f"FROM ({' UNION ALL '.join(parts)})"
        ).fetchall()
        self._registered.add("sample_epochs")

    def _register_small(self, table: str) -> None:
        if table not in self._registered:
            # Copied into a DuckDB table (small: one row per sample at most) so joins with
            # importance get min/max statistics, as the importance source has.
            self.con.register("_samplescope_small", self._frames_by_name[table]().to_arrow())
            self.con.execute(
                f"CREATE OR REPLACE TABLE {self.name(table)} AS SELECT * FROM _samplescope_small"
            ).fetchall()
            self.con.unregister("_samplescope_small")
            self._registered.add(table)

    def _load_importance(self, deps: set[str]) -> None:
        """Give the importance source the columns `deps` needs, reading only the new ones.

        A DuckDB table, not a registered Arrow table: DuckDB keeps min/max statistics of its
        own tables, which let it use perfect-hash joins and group-bys on sample_id and epoch
        (a 2-3× gain on the 12M-row queries), and it is filled block by block from HDF5, so
        the visits are never held twice. Columns a later query needs are read into a table
        of their own and pasted beside the loaded ones (`_add_source_columns`): a column
        already loaded is never read from HDF5 again.
        """
        loaded = self._loaded.setdefault(_IMPORTANCE_SOURCE, {})
        # A query naming no column (count(*)) still needs the row count: take `step`.
        new = [c for c in _IMPORTANCE_COLUMNS if c in (deps or {"step"}) and c not in loaded]
        if new:
            self._add_source_columns(new, has_source=bool(loaded))
            loaded.update(dict.fromkeys(new))
            self._registered.add(_IMPORTANCE_SOURCE)
        self._register_importance(set(loaded))

    def _add_source_columns(self, columns: list[str], *, has_source: bool) -> None:
        if not has_source:
            self._create_source(self.name(_IMPORTANCE_SOURCE), columns)
            return
        # A copy inside DuckDB (~0.1 s for 3M rows) is far cheaper than re-reading gzip HDF5;
        # ALTER TABLE ... ADD COLUMN + UPDATE by rowid is slower still and needs ~4× the memory,
        # and a view over a POSITIONAL JOIN loses the perfect-hash join (0.6 s vs 0.09 s).
        source, new, joined = (
            self.name(t) for t in (_IMPORTANCE_SOURCE, _NEW_SOURCE, _JOINED_SOURCE)
        )
        self._create_source(new, columns)
        self.con.execute(
            f"CREATE TABLE {joined} AS SELECT * FROM {source} POSITIONAL JOIN {new}"
        ).fetchall()
        self.con.execute(f"DROP TABLE {source}").fetchall()
        self.con.execute(f"DROP TABLE {new}").fetchall()
        self.con.execute(f"ALTER TABLE {joined} RENAME TO {_IMPORTANCE_SOURCE}").fetchall()

    def _create_source(self, table: str, columns: list[str]) -> None:
        """A DuckDB table of `columns` of the importance source, filled from HDF5.

        Integer columns are stored in the narrowest type that holds them (the view casts
        them back to BIGINT): step and epoch ranges are known from /steps; sample_id is
        tried as INTEGER and read again as BIGINT only when a value does not fit.
        """
        types = self._source_types(columns)
        for wide in (False, True):
            if wide:
                types["sample_id"] = "BIGINT"
            batches = self._data.importance_batches(columns, _BLOCK_ROWS)
            first = next(batches, None)
            self.con.execute(f"DROP TABLE IF EXISTS {table}").fetchall()
            if first is None:  # no visits: an empty table of the right columns
                defs = ", ".join(f"{c} {t}" for c, t in types.items())
                self.con.execute(f"CREATE TABLE {table} ({defs})").fetchall()
                return
            reader = pa.RecordBatchReader.from_batches(
                first.schema, itertools.chain([first], batches)
            )
            select = ", ".join(f"CAST({c} AS {types[c]}) AS {c}" for c in first.schema.names)
            self.con.register("_samplescope_blocks", reader)
            try:
                self.con.execute(
                    f"CREATE TABLE {table} AS SELECT {select} FROM _samplescope_blocks"
                ).fetchall()
                return
            except (duckdb.ConversionException, duckdb.OutOfRangeException):
                if wide or "sample_id" not in types:
                    raise
            finally:
                self.con.unregister("_samplescope_blocks")

    def _source_types(self, columns: list[str]) -> dict[str, str]:
        types: dict[str, str] = {}
        for column in columns:
            if column in _PER_LAYER:
                types.update({f"{column}_{i}": "FLOAT" for i in range(self._data.n_layers)})
            elif column in ("step", "epoch"):
                types[column] = _int_type([getattr(s, column) for s in self._data.steps])
            else:
                types[column] = {"scale_sq": "DOUBLE", "duplicate": "BOOLEAN"}.get(
                    column, "INTEGER"
                )
        return types

    def _register_importance(self, loaded: set[str]) -> None:
        columns = [c for c, deps in _IMPORTANCE_DEPS.items() if all(d in loaded for d in deps)]
        layers = self._frames_by_name["layers"]()
        source = self.name(_IMPORTANCE_SOURCE)
        parts = [
            _importance_select(columns, row["layer_index"], row["layer"], row["n_params"], source)
            for row in layers.iter_rows(named=True)
        ]
        if not parts:
            parts = [_importance_select(columns, None, None, None, source) + " WHERE false"]
        sql = " UNION ALL ".join(parts)
        if sql == self._importance_select:
            return
        self._importance_select = sql
        self.con.execute(f"CREATE OR REPLACE VIEW {self.name('importance')} AS {sql}").fetchall()


def to_polars(relation: duckdb.DuckDBPyRelation) -> pl.DataFrame:
    """The relation as a Polars frame; INTERVAL columns (which Polars cannot import) as text,
    e.g. the run's duration ``max(time) - min(time)`` of timestamps."""
    types = [str(t) for t in relation.types]
    if any("INTERVAL" in t for t in types):
        exprs = []
        for name, kind in zip(relation.columns, types, strict=True):
            quoted = '"' + name.replace('"', '""') + '"'
            exprs.append(f"CAST({quoted} AS VARCHAR) AS {quoted}" if "INTERVAL" in kind else quoted)
        relation = relation.project(", ".join(exprs))
    return relation.pl()


def _importance_select(
    columns: list[str],
    index: int | None,
    name: str | None,
    n_params: int | None,
    source: str,
) -> str:
    """One layer's slice of the importance view (all NULL layer columns when index is None)."""
    if index is None:
        exprs = {
            "layer": "CAST(NULL AS VARCHAR)",
            "layer_index": "CAST(NULL AS BIGINT)",
            "grad_sq": "CAST(NULL AS DOUBLE)",
            "importance": "CAST(NULL AS DOUBLE)",
            "importance_per_param": "CAST(NULL AS DOUBLE)",
            "alignment": "CAST(NULL AS DOUBLE)",
        }
    else:
        quoted = str(name).replace("'", "''")
        grad = f"grad_sq_{index}"
        # (lr·s)² · grad_sq, multiplied in the same order as before: DOUBLE × FLOAT.
        exprs = {
            "layer": f"CAST('{quoted}' AS VARCHAR)",
            "layer_index": f"CAST({index} AS BIGINT)",
            "grad_sq": f"CAST({grad} AS DOUBLE)",
            "importance": sql_expr("scale_sq", grad),
            "importance_per_param": f"{sql_expr('scale_sq', grad)} / CAST({n_params} AS BIGINT)",
            "alignment": f"CAST(alignment_{index} AS DOUBLE)",
        }
    # The source stores integers narrow (see `Session._create_source`); the view shows BIGINT.
    exprs.update({c: f"CAST({c} AS BIGINT)" for c in ("step", "epoch", "sample_id")})
    select = ", ".join(f"{exprs.get(c, c)} AS {c}" for c in columns)
    return f"SELECT {select} FROM {source}"


def _int_type(parts: list[np.ndarray]) -> str:
    """The narrowest DuckDB integer type holding every value of `parts`."""
    values = [p for p in parts if len(p)]
    if not values:
        return "SMALLINT"
    lo, hi = min(int(p.min()) for p in values), max(int(p.max()) for p in values)
    for name, dtype in (("SMALLINT", np.int16), ("INTEGER", np.int32)):
        if np.iinfo(dtype).min <= lo and hi <= np.iinfo(dtype).max:
            return name
    return "BIGINT"


def run_query(
    con: duckdb.DuckDBPyConnection,
    query: str,
    params: Sequence[Any] | dict[str, Any] | None = None,
) -> duckdb.DuckDBPyRelation:
    """``con.sql(query)`` with DuckDB's errors as one-line `QueryError`s; a statement
    without a result (the sandbox lets none through, but say so) is refused."""
    try:
        relation = con.sql(query, params=params)
    except duckdb.Error as exc:
        raise QueryError(f"SQL error: {one_line(exc)}") from None
    if relation is None:
        msg = "the statement returned no result; give a query such as SELECT ..."
        raise QueryError(msg)
    return relation


def collect(relation: duckdb.DuckDBPyRelation) -> pl.DataFrame:
    """The whole result as a Polars frame, errors raised while it executes as `QueryError`."""
    try:
        return to_polars(relation)
    except (duckdb.Error, pl.exceptions.PolarsError) as exc:
        raise QueryError(f"SQL error: {one_line(exc)}") from None
