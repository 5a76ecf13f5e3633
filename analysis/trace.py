"""`open_trace` and `Trace`: a recorded run as DuckDB views and Polars frames.

One DuckDB connection per trace. Raw tables (`visits`, `steps`, ...) are registered as Arrow
tables holding only the columns queries have needed so far; each query first loads the
columns it names (see `_sql.py`), read column by column from HDF5 and cached. `importance`
is a DuckDB view over `visits` × `layers`, so its 12-million-row form is never materialised.
Per-sample tables (`samples`, ...) are computed with Polars on first use and cached.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import cached_property
from typing import Any

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
from polars.io.plugins import register_io_source

from samplescope.analysis import scores
from samplescope.analysis._findings_data import PERIOD_FRACTION
from samplescope.analysis._hdf5 import VISIT_COLUMNS, TraceData, resolve_paths
from samplescope.analysis._sql import check_statements, query_names, sandboxed_connection
from samplescope.analysis._streaming import Streamed, stream
from samplescope.analysis.errors import EmptyTraceError, QueryError, TraceError

__all__ = ["TABLES", "Trace", "open_trace"]

logger = logging.getLogger(__name__)

TraceSource = str | os.PathLike[str] | Sequence[str | os.PathLike[str]]

TABLES = (
    "layers",
    "steps",
    "visits",
    "importance",
    "samples",
    "sample_epochs",
    "correlations",
    "groups",
    "clusters",
    "evals",
    "sample_info",
    "checkpoints",
)
_DERIVED = ("samples", "sample_epochs", "correlations", "groups", "clusters")
_OPTIONAL_VISITS = (
    "target",
    "pred",
    "p_target",
    "margin",
    "el2n",
    "input_sq",
    "input_grad_sq",
    "alignment",
)
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
}
_IMPORTANCE_SOURCE = "_samplescope_visit_layers"
_NEW_SOURCE = "_samplescope_visit_layers_new"
_JOINED_SOURCE = "_samplescope_visit_layers_joined"
_PER_LAYER = ("grad_sq", "alignment")
_IMPORTANCE_COLUMNS = ("step", "epoch", "sample_id", "scale_sq", "grad_sq", "alignment")
_BLOCK_ROWS = 1 << 18
_DEFAULT_K = 20


def open_trace(source: TraceSource) -> Trace:
    """Open a trace: one .h5 file, a list of shard files of one run, or a glob string.

    Args:
        source: path, list of paths, or glob (e.g. ``"runs/exp1.rank*.h5"``).

    Returns:
        A `Trace`; use it as a context manager or call `close()`.

    Raises:
        TraceError: missing file, no glob match, shards from different runs.
        TraceFormatError: not HDF5, not a samplescope trace, newer format, truncated/corrupt.
    """
    return Trace(source)


def _one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


class Trace:
    """A recorded run, read lazily. A snapshot of what was flushed when it was opened."""

    def __init__(self, source: TraceSource) -> None:
        _check_source(source)
        self.paths = resolve_paths(source)
        self._data = TraceData(self.paths)
        self._con = sandboxed_connection()
        self._loaded: dict[str, dict[str, pa.Array]] = {}
        self._frames: dict[Any, pl.DataFrame] = {}
        self._streams: dict[Any, Streamed] = {}
        self._registered: set[str] = set()
        self._importance_select = ""

    # -- lifecycle ------------------------------------------------------------------
    def close(self) -> None:
        """Close the HDF5 files and the DuckDB connection."""
        self._data.close()
        self._con.close()

    def __enter__(self) -> Trace:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Trace({', '.join(str(p) for p in self.paths)}: {len(self.steps_index)} steps, "
            f"{self._data.n_visits} visits, {self._data.n_layers} layers)"
        )

    # -- metadata -------------------------------------------------------------------
    @property
    def warnings(self) -> list[str]:
        """Facts that qualify every number from this trace: a shard not closed (live or
        crashed), ranks of a multi-rank run that were not given. Empty for a whole run."""
        return list(self._data.warnings)

    @property
    def steps_index(self) -> np.ndarray:
        """The recorded global step numbers (one copy per step)."""
        return np.unique(np.concatenate([s.step for s in self._data.steps]))

    @cached_property
    def meta(self) -> dict[str, Any]:
        """Root attributes (JSON ones parsed) plus counts and what the trace recorded."""
        shards = self._data.shards
        meta: dict[str, Any] = dict(shards[0].attrs)
        meta.pop("rank", None)
        sample_ids = self._column("visits", "sample_id")
        epochs = np.unique(np.concatenate([s.epoch for s in self._data.steps]))
        meta.update(
            paths=[str(p) for p in self.paths],
            n_shards=len(shards),
            ranks=[s.rank for s in shards],
            closed=all(_status(s, "closed") == 1 for s in shards),
            n_errors=sum(_status(s, "n_errors") for s in shards),
            n_steps=len(self.steps_index),
            n_visits=self._data.n_visits,
            n_samples=len(pc.unique(sample_ids)) if len(sample_ids) else 0,
            n_epochs=len(epochs),
            epochs=[int(e) for e in epochs],
            layers=list(self._data.layer_names),
            has_outputs=self._data.has_visit_column("p_target"),
            optional_columns=[c for c in _OPTIONAL_VISITS if self._data.has_visit_column(c)],
            has_evals=shards[0].has("evals"),
            has_sample_info=shards[0].has("sample_info"),
            warnings=list(self.warnings),
        )
        return meta

    def summary(self) -> pl.DataFrame:
        """`meta` as a two-column frame (key, value as text), for `samplescope info`."""

        def text(value: Any) -> str:
            return value if isinstance(value, str) else json.dumps(value)

        rows = [(k, text(v)) for k, v in self.meta.items() if k != "layers"]
        # One row per layer, input first, so `info` answers "what was recorded where".
        rows += [
            (
                f"layer {r['layer_index']}",
                f"{r['layer']} ({r['kind']}, {r['n_params']:,} params, {r['method']})",
            )
            for r in self.layers().iter_rows(named=True)
        ]
        return pl.DataFrame(
            {"key": [k for k, _ in rows], "value": [v for _, v in rows]},
            schema={"key": pl.String, "value": pl.String},
        )

    @property
    def has_thumbnails(self) -> bool:
        """Whether the recorder stored a thumbnail per sample (``thumbnails=True``)."""
        return any(s.has("thumbnails", "image") for s in self._data.shards)

    def thumbnails(self, sample_ids: Iterable[int]) -> dict[int, np.ndarray]:
        """``{sample_id: uint8 [H, W] image}`` for those of ``sample_ids`` that have one.

        Reads only the wanted rows: a 60k-sample trace holds 60k images.
        """
        wanted = {int(i) for i in sample_ids}
        found: dict[int, np.ndarray] = {}
        for shard in self._data.shards:
            if not shard.has("thumbnails", "image") or not wanted - found.keys():
                continue
            ids = np.asarray(shard.read("thumbnails", "sample_id"))
            for row in np.flatnonzero(np.isin(ids, list(wanted - found.keys()))):
                image = shard.read("thumbnails", "image", int(row), int(row) + 1)[0]
                found.setdefault(int(ids[row]), image)
        return found

    def _repr_html_(self) -> str:
        """Jupyter's view of a trace: the run's key facts and a small layer × epoch heatmap
        of each layer's share of the epoch's importance (no plotting library needed)."""
        return _notebook_html(self)

    @property
    def class_names(self) -> list[str] | None:
        """The dataset's class names by label (``config["class_names"]``), or None when
        the trace does not store them."""
        config = self.meta.get("config")
        names = config.get("class_names") if isinstance(config, dict) else None
        if not isinstance(names, list) or not names:
            return None
        return [str(n) for n in names]

    @property
    def table_names(self) -> list[str]:
        """Names of the tables this trace offers (sample_info only when recorded)."""
        has = {
            "sample_info": self._data.shards[0].has("sample_info"),
            "checkpoints": any(s.has("checkpoints") for s in self._data.shards),
        }
        return [t for t in TABLES if has.get(t, True)]

    # -- raw tables -----------------------------------------------------------------
    def layers(self) -> pl.DataFrame:
        """One row per layer: layer_index (0 = nearest the input), layer, kind, n_params,
        method."""
        return self._frame("layers")

    def evals(self) -> pl.DataFrame:
        """The /evals table: step, epoch, split, loss, accuracy (empty if none logged)."""
        return self._frame("evals")

    def checkpoints(self) -> pl.DataFrame:
        """The /checkpoints table (`Recorder.score_checkpoint`): one row per checkpoint and
        sample: checkpoint, step, epoch, sample_id, loss, target, pred, p_target, margin,
        el2n, grad_sq (a list, one value per layer, layer_index order) and grand
        (‖∇ℓ_i‖₂, the square root of the summed grad_sq). Missing outputs are null.

        Raises:
            QueryError: the trace was recorded without ``checkpoints=True``.
        """
        return self._frame("checkpoints")

    def _checkpoint_table(self) -> pl.DataFrame:
        cols = self._data.checkpoint_arrays()
        if cols is None:
            msg = "this trace has no /checkpoints (pass checkpoints=True to the Recorder)"
            raise QueryError(msg)
        grad_sq = np.asarray(cols["grad_sq"], dtype=np.float32).reshape(len(cols["sample_id"]), -1)
        frame = pl.DataFrame(
            {
                k: _series(k, v)
                for k, v in cols.items()
                if k not in ("grad_sq", "target", "pred", "p_target", "margin", "el2n")
            }
        )
        target = np.asarray(cols.get("target", np.full(frame.height, -1)), dtype=np.int64)
        missing = target < 0
        outputs = {}
        for name in ("target", "pred"):
            values = np.asarray(cols.get(name, np.full(frame.height, -1)), dtype=np.int64)
            outputs[name] = pl.Series(name, values, dtype=pl.Int64).scatter(
                np.flatnonzero(missing), None
            )
        for name in ("p_target", "margin", "el2n"):
            values = np.asarray(cols.get(name, np.full(frame.height, np.nan)), dtype=np.float32)
            outputs[name] = pl.Series(name, np.where(missing, np.nan, values)).fill_nan(None)
        return frame.with_columns(
            *outputs.values(),
            pl.Series("grad_sq", grad_sq.tolist(), dtype=pl.List(pl.Float32)),
            pl.Series("grand", np.sqrt(grad_sq.astype(np.float64).sum(1))),
        ).select(
            "checkpoint",
            "step",
            "epoch",
            "sample_id",
            "loss",
            "target",
            "pred",
            "p_target",
            "margin",
            "el2n",
            "grad_sq",
            "grand",
        )

    def _small_table(self, name: str) -> pl.DataFrame:
        data = self._data
        if name == "checkpoints":
            return self._checkpoint_table()
        if name == "layers":
            cols = data.group_table("layers")
            n = len(cols["name"])
            return pl.DataFrame(
                {
                    "layer_index": np.arange(n, dtype=np.int64),
                    "layer": cols["name"].astype(str).tolist(),
                    "kind": _strings(cols, "kind", n),
                    "n_params": _ints(cols, "n_params", n),
                    "method": _strings(cols, "method", n),
                },
                schema={
                    "layer_index": pl.Int64,
                    "layer": pl.String,
                    "kind": pl.String,
                    "n_params": pl.Int64,
                    "method": pl.String,
                },
            )
        if name == "steps":
            cols = data.step_frame_arrays()
            return pl.DataFrame({k: _series(k, v) for k, v in cols.items()})
        if name == "evals":
            schema = {
                "step": pl.Int64,
                "epoch": pl.Int64,
                "split": pl.String,
                "loss": pl.Float64,
                "accuracy": pl.Float64,
            }
            cols = data.group_table("evals") if data.shards[0].has("evals") else {}
            frame = pl.DataFrame({k: _series(k, v) for k, v in cols.items()})
            for key, dtype in schema.items():
                if key not in frame.columns:
                    frame = frame.with_columns(pl.lit(None, dtype=dtype).alias(key))
            return frame.select(*schema, *[c for c in frame.columns if c not in schema])
        if name == "sample_info":
            if not data.shards[0].has("sample_info"):
                msg = "this trace has no /sample_info (pass sample_info= to the Recorder)"
                raise QueryError(msg)
            cols = data.group_table("sample_info")
            return pl.DataFrame({k: _series(k, v) for k, v in cols.items()})
        msg = f"unknown table {name!r}"
        raise QueryError(msg)

    def _frame(self, name: str) -> pl.DataFrame:
        if name not in self._frames:
            builders: dict[str, Callable[[], pl.DataFrame]] = {
                "samples": self.samples,
                "sample_epochs": self.sample_epochs,
                "correlations": self.correlations,
                "groups": self.groups,
                "clusters": lambda: self.clusters(k=_DEFAULT_K),
            }
            if name in builders:
                return builders[name]()
            self._frames[name] = self._small_table(name)
        return self._frames[name]

    # -- visits, column by column ----------------------------------------------------
    def _column(self, table: str, column: str) -> pa.Array:
        if table != "visits":
            return self._frame(table).get_column(column).to_arrow()
        return self._data.visit_column(column)

    def _visits_frame(
        self, columns: Sequence[str], masks: list[np.ndarray] | None = None
    ) -> pl.DataFrame:
        arrays = {c: self._data.visit_column(c, masks) for c in columns}
        return pl.from_arrow(pa.table(arrays))  # type: ignore[return-value]

    def _visits_schema(self) -> dict[str, pl.DataType]:
        n = self._data.n_layers
        empty = pa.table({c: pa.array([], type=_arrow_type(c, n)) for c in VISIT_COLUMNS})
        return dict(pl.from_arrow(empty).schema)  # type: ignore[union-attr]

    def _scan_visits(self) -> pl.LazyFrame:
        schema = self._visits_schema()
        step_frames = [pl.DataFrame({"step": s.step, "epoch": s.epoch}) for s in self._data.steps]

        def source(
            with_columns: list[str] | None,
            predicate: pl.Expr | None,
            n_rows: int | None,
            batch_size: int | None,
        ) -> Iterator[pl.DataFrame]:
            del batch_size
            columns = list(with_columns or schema)
            needed = set(columns)
            masks = None
            if predicate is not None:
                roots = set(predicate.meta.root_names())
                needed |= roots
                if roots <= {"step", "epoch"}:
                    # Slice /visits by the steps the predicate keeps: read only their rows.
                    masks = [
                        f.select(predicate.fill_null(False)).to_series().to_numpy()
                        for f in step_frames
                    ]
            frame = self._visits_frame([c for c in schema if c in needed], masks)
            if predicate is not None:
                frame = frame.filter(predicate)
            frame = frame.select(columns)
            yield frame if n_rows is None else frame.head(n_rows)

        return register_io_source(source, schema=schema, explain_name="samplescope visits")

    def table(self, name: str) -> pl.LazyFrame:
        """A Polars LazyFrame of one table (see `table_names`; docs/analysis.md).

        `visits` and `importance` are read lazily: filters on step or epoch read only those
        steps' rows of /visits, and only the selected columns are read.

        Raises:
            QueryError: unknown table name.
        """
        if name not in self.table_names:
            msg = f"unknown table {name!r}; tables are: {', '.join(self.table_names)}"
            raise QueryError(msg)
        if name == "visits":
            return self._scan_visits()
        if name == "importance":
            return self._importance_lazy()
        return self._frame(name).lazy()

    def _importance_lazy(self) -> pl.LazyFrame:
        visits = self._scan_visits()
        layers = self.layers()
        parts = []
        for row in layers.iter_rows(named=True):
            index = row["layer_index"]
            grad = pl.col("grad_sq").arr.get(index).cast(pl.Float64)
            scale_sq = pl.col("lr_scale") * pl.col("lr_scale")
            parts.append(
                visits.select(
                    "step",
                    "epoch",
                    "sample_id",
                    pl.lit(row["layer"], dtype=pl.String).alias("layer"),
                    pl.lit(index, dtype=pl.Int64).alias("layer_index"),
                    grad.alias("grad_sq"),
                    (scale_sq * grad).alias("importance"),
                    (scale_sq * grad / row["n_params"]).alias("importance_per_param"),
                    pl.col("alignment").arr.get(index).cast(pl.Float64).alias("alignment"),
                )
            )
        if not parts:
            msg = "this trace has no layers"
            raise EmptyTraceError(msg)
        return pl.concat(parts)

    # -- SQL ----------------------------------------------------------------------
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
        check_statements(query, self._con)
        self._prepare(query)
        try:
            relation = self._con.sql(query, params=params)
        except duckdb.Error as exc:
            raise QueryError(f"SQL error: {_one_line(exc)}") from None
        if relation is None:
            msg = "the statement returned no result; give a query such as SELECT ..."
            raise QueryError(msg)
        return relation

    def query(
        self,
        query: str,
        params: Sequence[Any] | dict[str, Any] | None = None,
    ) -> pl.DataFrame:
        """Run SQL and return the whole result as a Polars frame (what `samplescope sql` does).

        Raises:
            QueryError: as `sql`, and errors raised while the query executes.
        """
        relation = self.sql(query, params)
        try:
            return _to_polars(relation)
        except (duckdb.Error, pl.exceptions.PolarsError) as exc:
            raise QueryError(f"SQL error: {_one_line(exc)}") from None

    def _prepare(self, query: str) -> None:
        names = query_names(query, set(self.table_names), self._con)
        for table in sorted(names.tables):
            if table == "importance":
                wanted = (
                    set(_IMPORTANCE_DEPS) if names.star else names.columns & set(_IMPORTANCE_DEPS)
                )
                self._load_importance({d for c in wanted for d in _IMPORTANCE_DEPS[c]})
            elif table == "visits":
                wanted = set(VISIT_COLUMNS) if names.star else names.columns
                self._load_visits(wanted)
            elif table in _DERIVED or table in (
                "layers",
                "steps",
                "evals",
                "sample_info",
                "checkpoints",
            ):
                self._register_small(table)

    def _load_visits(self, wanted: set[str]) -> None:
        loaded = self._loaded.setdefault("visits", {})
        columns = [c for c in VISIT_COLUMNS if c in wanted or c in loaded or c == "step"]
        if set(columns) == set(loaded) and "visits" in self._registered:
            return
        for column in columns:
            if column not in loaded:
                loaded[column] = self._data.visit_column(column)
        self._con.register("visits", pa.table({c: loaded[c] for c in columns}))
        self._registered.add("visits")

    def _register_small(self, table: str) -> None:
        if table not in self._registered:
            # Copied into a DuckDB table (small: one row per sample at most) so joins with
            # importance get min/max statistics, as the importance source has.
            self._con.register("_samplescope_small", self._frame(table).to_arrow())
            self._con.execute(
                f"CREATE OR REPLACE TABLE {table} AS SELECT * FROM _samplescope_small"
            ).fetchall()
            self._con.unregister("_samplescope_small")
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
            self._create_source(_IMPORTANCE_SOURCE, columns)
            return
        # A copy inside DuckDB (~0.1 s for 3M rows) is far cheaper than re-reading gzip HDF5;
        # ALTER TABLE ... ADD COLUMN + UPDATE by rowid is slower still and needs ~4× the memory,
        # and a view over a POSITIONAL JOIN loses the perfect-hash join (0.6 s vs 0.09 s).
        self._create_source(_NEW_SOURCE, columns)
        self._con.execute(
            f"CREATE TABLE {_JOINED_SOURCE} AS SELECT * FROM {_IMPORTANCE_SOURCE} "
            f"POSITIONAL JOIN {_NEW_SOURCE}"
        ).fetchall()
        self._con.execute(f"DROP TABLE {_IMPORTANCE_SOURCE}").fetchall()
        self._con.execute(f"DROP TABLE {_NEW_SOURCE}").fetchall()
        self._con.execute(f"ALTER TABLE {_JOINED_SOURCE} RENAME TO {_IMPORTANCE_SOURCE}").fetchall()

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
            self._con.execute(f"DROP TABLE IF EXISTS {table}").fetchall()
            if first is None:  # no visits: an empty table of the right columns
                defs = ", ".join(f"{c} {t}" for c, t in types.items())
                self._con.execute(f"CREATE TABLE {table} ({defs})").fetchall()
                return
            reader = pa.RecordBatchReader.from_batches(
                first.schema, itertools.chain([first], batches)
            )
            select = ", ".join(f"CAST({c} AS {types[c]}) AS {c}" for c in first.schema.names)
            self._con.register("_samplescope_blocks", reader)
            try:
                self._con.execute(
                    f"CREATE TABLE {table} AS SELECT {select} FROM _samplescope_blocks"
                ).fetchall()
                return
            except (duckdb.ConversionException, duckdb.OutOfRangeException):
                if wide or "sample_id" not in types:
                    raise
            finally:
                self._con.unregister("_samplescope_blocks")

    def _source_types(self, columns: list[str]) -> dict[str, str]:
        types: dict[str, str] = {}
        for column in columns:
            if column in _PER_LAYER:
                types.update({f"{column}_{i}": "FLOAT" for i in range(self._data.n_layers)})
            elif column in ("step", "epoch"):
                types[column] = _int_type([getattr(s, column) for s in self._data.steps])
            else:
                types[column] = "DOUBLE" if column == "scale_sq" else "INTEGER"
        return types

    def _register_importance(self, loaded: set[str]) -> None:
        columns = [c for c, deps in _IMPORTANCE_DEPS.items() if all(d in loaded for d in deps)]
        layers = self.layers()
        parts = [
            _importance_select(columns, row["layer_index"], row["layer"], row["n_params"])
            for row in layers.iter_rows(named=True)
        ]
        if not parts:
            parts = [_importance_select(columns, None, None, None) + " WHERE false"]
        sql = " UNION ALL ".join(parts)
        if sql == self._importance_select:
            return
        self._importance_select = sql
        self._con.execute(f"CREATE OR REPLACE VIEW importance AS {sql}").fetchall()

    # -- per-sample statistics ---------------------------------------------------------
    def _streamed(self, early_epochs: int = 1) -> Streamed:
        """One pass of the streaming engine (cached; the rollup and periods of any pass
        are the same, so later tables take early_epochs=1's)."""
        key = ("streamed", early_epochs)
        if key not in self._streams:
            if self._data.n_visits == 0 or self._data.n_layers == 0:
                msg = (
                    f"{self.paths[0]} has no recorded visits yet"
                    if self._data.n_layers
                    else f"{self.paths[0]} has no layers"
                )
                raise EmptyTraceError(msg)
            self._streams[key] = stream(self._data, early_epochs, PERIOD_FRACTION)
        return self._streams[key]

    def _rollup(self) -> pl.DataFrame:
        """Per (sample, epoch): sample_id, epoch, n_visits, loss (mean), importance_<l>,
        grad_sq_<l>; sorted by epoch then sample_id."""
        return self._streamed().rollup

    def samples(
        self,
        *,
        early_epochs: int = 1,
        sort: str | None = None,
        descending: bool = True,
        top: int | None = None,
    ) -> pl.DataFrame:
        """One row per sample with every score (docs/analysis.md, table `samples`).

        Args:
            early_epochs: the first recorded epochs that `grand` and `el2n_proxy` use.
            sort: a column to sort by (default: by sample_id).
            descending: sort from largest to smallest (nulls last either way).
            top: keep only the first `top` rows after sorting.

        Raises:
            EmptyTraceError: the trace has no visits.
            QueryError: `sort` is not a column of the table.
        """
        key = ("samples", early_epochs)
        if key not in self._frames:
            info = self._frame("sample_info") if "sample_info" in self.table_names else None
            frame = self._sample_scores(early_epochs, info)
            if "checkpoints" in self.table_names and self.checkpoints().height:
                # Data Diet's scores at fixed checkpoints, where the trace has some.
                frame = frame.join(
                    scores.checkpoint_scores(self.checkpoints()), on="sample_id", how="left"
                )
            self._frames[key] = frame
            if early_epochs == 1:
                self._frames["samples"] = self._frames[key]
        frame = self._frames[key]
        if sort is not None:
            if sort not in frame.columns:
                msg = f"no column {sort!r} in samples; columns are: {', '.join(frame.columns)}"
                raise QueryError(msg)
            frame = frame.sort(sort, descending=descending, nulls_last=True, maintain_order=True)
        return frame if top is None else frame.head(top)

    def _sample_scores(self, early_epochs: int, info: pl.DataFrame | None) -> pl.DataFrame:
        per_sample = self._streamed(early_epochs).per_sample
        if early_epochs != 1:  # only early_epochs=1's pass is kept for the rollup
            self._streams.pop(("streamed", early_epochs))
        return scores.finish_sample_scores(per_sample, self._data.n_layers, info)

    def sample_epochs(self) -> pl.DataFrame:
        """Long table: sample_id, epoch, layer, layer_index, importance, grad_sq,
        importance_rank and importance_z within (epoch, layer)."""
        if "sample_epochs" not in self._frames:
            self._frames["sample_epochs"] = scores.sample_epochs(self._rollup(), self.layers())
        return self._frames["sample_epochs"]

    def correlations(self) -> pl.DataFrame:
        """Spearman(importance, final loss) per epoch and layer (NULL = all)."""
        if "correlations" not in self._frames:
            self._frames["correlations"] = scores.correlations(
                self._rollup(), self.samples(), self.layers()
            )
        return self._frames["correlations"]

    def groups(self) -> pl.DataFrame:
        """The top10 / next10 / rest grouping and each group's share of every layer."""
        if "groups" not in self._frames:
            self._frames["groups"] = scores.groups(self.samples(), self.layers())
        return self._frames["groups"]

    def clusters(self, k: int = _DEFAULT_K, seed: int = 0) -> pl.DataFrame:
        """Per class, k-means on each sample's epoch × layer importance profile; clusters
        labelled easy / medium / hard by how fast their training loss falls.

        Args:
            k: clusters per class (fewer when a class has fewer distinct profiles).
            seed: k-means random state.
        """
        from samplescope.analysis.clusters import cluster_samples

        key = ("clusters", k, seed)
        if key not in self._frames:
            if k < 1:
                msg = f"k must be at least 1, got {k}"
                raise QueryError(msg)
            self._frames[key] = cluster_samples(self._rollup(), self.samples(), k=k, seed=seed)
            if k == _DEFAULT_K and seed == 0:
                self._frames["clusters"] = self._frames[key]
        return self._frames[key]


def _to_polars(relation: duckdb.DuckDBPyRelation) -> pl.DataFrame:
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
    columns: list[str], index: int | None, name: str | None, n_params: int | None
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
            "importance": f"scale_sq * {grad}",
            "importance_per_param": f"scale_sq * {grad} / CAST({n_params} AS BIGINT)",
            "alignment": f"CAST(alignment_{index} AS DOUBLE)",
        }
    # The source stores integers narrow (see `Trace._create_source`); the view shows BIGINT.
    exprs.update({c: f"CAST({c} AS BIGINT)" for c in ("step", "epoch", "sample_id")})
    select = ", ".join(f"{exprs.get(c, c)} AS {c}" for c in columns)
    return f"SELECT {select} FROM {_IMPORTANCE_SOURCE}"


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


def _status(shard: Any, name: str) -> int:
    if not shard.has("status", name):
        return 0
    values = shard.read("status", name)
    return int(values[0]) if len(values) else 0


def _strings(cols: dict[str, np.ndarray], key: str, n: int) -> list[str]:
    return cols[key].astype(str).tolist() if key in cols else [""] * n


def _ints(cols: dict[str, np.ndarray], key: str, n: int) -> list[int]:
    return cols[key].astype(np.int64).tolist() if key in cols else [0] * n


def _series(name: str, values: np.ndarray) -> pl.Series:
    if values.ndim == 2:
        return pl.Series(name, values, dtype=pl.Array(pl.Float32, values.shape[1]))
    if values.dtype == object:
        return pl.Series(name, values.tolist(), dtype=pl.String)
    return pl.Series(name, values)


def _arrow_type(column: str, n_layers: int) -> pa.DataType:
    from samplescope.analysis._hdf5 import _VISIT_TYPES

    return _VISIT_TYPES[column](n_layers)


def _check_source(source: Any) -> None:
    if not isinstance(source, (str, os.PathLike, list, tuple)):
        msg = f"open_trace takes a path, a list of paths or a glob, not {type(source).__name__}"
        raise TraceError(msg)


# Facts the notebook view shows first, when the trace has them.
_NOTEBOOK_KEYS = (
    "model",
    "optimizer",
    "reduction",
    "n_samples",
    "n_epochs",
    "n_steps",
    "n_visits",
    "has_outputs",
    "created",
)


def _notebook_html(trace: Trace) -> str:
    import html

    meta = trace.meta
    facts = "".join(
        f"<tr><th style='text-align:left'>{html.escape(k)}</th>"
        f"<td style='text-align:left'>{html.escape(str(meta[k]))}</td></tr>"
        for k in _NOTEBOOK_KEYS
        if k in meta
    )
    paths = ", ".join(html.escape(str(p)) for p in meta.get("paths", []))
    share = trace.sql(
        "SELECT layer_index, epoch, sum(importance) AS imp FROM importance GROUP BY ALL"
    ).pl()
    share = share.with_columns(
        (pl.col("imp") / pl.col("imp").sum().over("epoch")).fill_nan(0.0).alias("share")
    )
    epochs = sorted(share["epoch"].unique().to_list())
    cell = {(r["layer_index"], r["epoch"]): r["share"] for r in share.iter_rows(named=True)}
    names = trace.layers()["layer"].to_list()
    head = "".join(f"<th>{e + 1}</th>" for e in epochs)
    rows = ""
    for index, name in enumerate(names):
        cells = ""
        for epoch in epochs:
            value = float(cell.get((index, epoch), 0.0) or 0.0)
            # Darker = larger share; white text on the dark half.
            level = round(255 * (1 - value))
            colour = "white" if value > 0.5 else "black"
            cells += (
                f"<td title='{100 * value:.1f}%' style='background:rgb({level},{level},255);"
                f"color:{colour};width:2em;text-align:center'>{100 * value:.0f}</td>"
            )
        rows += (
            f"<tr><th style='text-align:left'>L{index} {html.escape(str(name))}</th>{cells}</tr>"
        )
    return (
        f"<div><b>samplescope trace</b> {paths}"
        f"<table>{facts}</table>"
        "<p style='margin:0.5em 0 0.2em'>Each layer's share of the epoch's importance (%), "
        "epochs from 1:</p>"
        f"<table><tr><th></th>{head}</tr>{rows}</table></div>"
    )
