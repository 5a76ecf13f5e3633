"""`export_trace`: a trace's tables as Hive-partitioned Parquet, for engines beyond this one.

The visits are streamed from HDF5 one bounded block of steps at a time (`TraceData.read_chunk`)
into one Parquet file per (epoch, rank) partition, so memory stays at one block whatever the
trace's size. The small tables (steps, layers, evals, sample_info, checkpoints) are written
whole. A per-(sample, epoch) rollup is computed by DuckDB over the Parquet just written, one
epoch at a time, with a memory limit (it spills to disk rather than grow). The trace's views
(importance first) are written as portable SQL text: the same text runs on DuckDB and Spark
over tables registered from the folders. The folder layout is documented in
docs/trace-format.md ("The columnar form").

The output is atomic: everything is written into a hidden temporary folder beside the target
and renamed into place at the end; a failure or an interrupt removes the temporary folder.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from samplescope.analysis._hdf5 import _VISIT_TYPES, TraceData
from samplescope.analysis.trace import Trace, TraceSource, open_trace
from samplescope.errors import SamplescopeError

__all__ = [
    "EXPORT_FORMAT",
    "EXPORT_VERSION",
    "ExportError",
    "ExportResult",
    "export_trace",
    "importance_sql",
    "open_export",
    "rollup_sql",
]

logger = logging.getLogger(__name__)

EXPORT_FORMAT = "samplescope-export"
EXPORT_VERSION = 1
MANIFEST = "manifest.json"
ROLLUP = "sample_epoch_totals"
_BLOCK_ROWS = 1 << 18
_FILE_ROWS = 1 << 22
# Scalar visit columns in the order the Parquet files hold them (those the trace recorded).
_SCALARS = (
    "step",
    "sample_id",
    "lr_scale",
    "loss",
    "target",
    "pred",
    "correct",
    "p_target",
    "margin",
    "el2n",
    "input_sq",
    "input_grad_sq",
)
_OPTIONAL = ("target", "pred", "p_target", "margin", "el2n", "input_sq", "input_grad_sq")
_PER_LAYER = ("grad_sq", "alignment")


class ExportError(SamplescopeError):
    """The export cannot be written: the output folder exists, or cannot be created."""


@dataclass
class ExportResult:
    """What `export_trace` wrote: the folder and its manifest (also in manifest.json)."""

    path: Path
    manifest: dict[str, Any] = field(default_factory=dict)


def export_trace(
    source: TraceSource,
    out_dir: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    block_rows: int = _BLOCK_ROWS,
    file_rows: int = _FILE_ROWS,
    memory_limit: str = "512MB",
    threads: int = 1,
) -> ExportResult:
    """Write a trace's tables as Hive-partitioned Parquet plus its views as SQL text.

    Args:
        source: the trace (one .h5 file, a list of shard files of one run, or a glob).
        out_dir: the folder to create. It must not exist, or be empty.
        overwrite: replace an existing export (a folder holding a samplescope manifest.json).
        block_rows: visits read from HDF5 and written per Parquet row group (memory bound).
        file_rows: visits per Parquet file before a partition starts its next part file.
        memory_limit: DuckDB's memory limit for the rollup (it spills to disk beyond it).
        threads: DuckDB threads for the rollup.

    Returns:
        The folder and the manifest written into it.

    Raises:
        ExportError: the output folder exists and is not empty (and is not an export to
            overwrite), is a file, or cannot be created.
        TraceError: the trace cannot be opened (as `open_trace`).
    """
    if block_rows < 1 or file_rows < 1:
        msg = f"block_rows and file_rows must be positive, got {block_rows} and {file_rows}"
        raise ExportError(msg)
    target = Path(out_dir)
    replace = _check_target(target, overwrite=overwrite)
    with open_trace(source) as trace:
        temp = _temp_folder(target)
        try:
            manifest = _write_all(trace, temp, block_rows, file_rows, memory_limit, threads)
            _move_into_place(temp, target, replace=replace)
        except BaseException:
            shutil.rmtree(temp, ignore_errors=True)
            raise
    return ExportResult(path=target, manifest=manifest)


def open_export(
    folder: str | os.PathLike[str], *, threads: int | None = None
) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with an export's tables and views (what views.sql creates).

    It runs the folder's views.sql, so open only exports you trust, as any SQL script.

    Args:
        folder: a folder written by `export_trace`.
        threads: DuckDB threads (its default when None).

    Raises:
        ExportError: the folder holds no samplescope export.
    """
    folder = Path(folder)
    _read_manifest(folder)
    con = duckdb.connect()
    if threads is not None:
        con.execute(f"SET threads = {int(threads)}")
    # views.sql names files relative to the export; file_search_path resolves them there.
    con.execute("SET file_search_path = ?", [str(folder.resolve())])
    con.execute((folder / "views.sql").read_text(encoding="utf-8"))
    return con


# -- the output folder -----------------------------------------------------------------------
def _check_target(target: Path, *, overwrite: bool) -> bool:
    """Whether an existing export will be replaced; refuse anything else that exists."""
    if not target.exists():
        if not target.parent.exists():
            msg = f"cannot create {target}: its folder {target.parent} does not exist"
            raise ExportError(msg)
        return False
    if not target.is_dir():
        msg = f"{target} exists and is not a folder; give a new folder to export into"
        raise ExportError(msg)
    if not any(target.iterdir()):
        return False
    if not overwrite:
        msg = f"{target} exists and is not empty; pass --overwrite to replace an export"
        raise ExportError(msg)
    try:
        _read_manifest(target)
    except ExportError:
        # --overwrite replaces what export wrote, never an unrelated folder.
        msg = f"{target} is not a samplescope export (no {MANIFEST}); remove it or pick another"
        raise ExportError(msg) from None
    return True


def _temp_folder(target: Path) -> Path:
    try:
        return Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    except OSError as exc:
        msg = f"cannot write into {target.parent}: {exc.strerror or exc}"
        raise ExportError(msg) from None


def _move_into_place(temp: Path, target: Path, *, replace: bool) -> None:
    os.chmod(temp, 0o777 & ~_umask())
    if not replace:
        if target.exists():
            target.rmdir()  # empty, checked before
        os.replace(temp, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
    os.replace(target, old / target.name)
    try:
        os.replace(temp, target)
    except BaseException:
        os.replace(old / target.name, target)
        old.rmdir()
        raise
    shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        msg = f"{folder} holds no samplescope export (no readable {MANIFEST})"
        raise ExportError(msg) from None
    if not isinstance(manifest, dict) or manifest.get("format") != EXPORT_FORMAT:
        msg = f"{path} is not a samplescope export manifest"
        raise ExportError(msg)
    return manifest


# -- writing -------------------------------------------------------------------------------
def _write_all(
    trace: Trace,
    folder: Path,
    block_rows: int,
    file_rows: int,
    memory_limit: str,
    threads: int,
) -> dict[str, Any]:
    # The trace's own reader: one snapshot, so the visits and the small tables agree (a live
    # trace's later flushes are in neither).
    data = trace._data
    layers = trace.layers()
    tables: dict[str, Any] = {}
    columns = _visit_columns(data)
    tables["visits"] = _write_visits(data, columns, folder / "visits", block_rows, file_rows)
    small = ["layers", "steps", "evals"] + [
        t for t in ("sample_info", "checkpoints") if t in trace.table_names
    ]
    for name in small:
        frame = _flat_layers(trace.table(name).collect(), data.n_layers)
        frame.write_parquet(folder / f"{name}.parquet", compression="zstd")
        tables[name] = {"path": f"{name}.parquet", "rows": frame.height}
    views = _write_views(folder, layers, columns, small)
    tables[ROLLUP] = _write_rollup(folder, data, columns, memory_limit, threads)
    manifest = _manifest(trace, data, layers, tables, views)
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def _visit_columns(data: TraceData) -> list[str]:
    """The visit columns to export: the required ones, and each optional one any shard has
    (a shard without it contributes NULLs)."""
    has = {c: any(s.has("visits", c) for s in data.shards) for c in (*_OPTIONAL, "alignment")}
    has["correct"] = has["target"] and has["pred"]
    columns = [c for c in _SCALARS if has.get(c, True)]
    return [*columns, "grad_sq", *(["alignment"] if has["alignment"] else [])]


def _visit_schema(columns: Sequence[str], n_layers: int) -> pa.Schema:
    fields = []
    for column in columns:
        if column in _PER_LAYER:
            fields += [pa.field(f"{column}_{i}", pa.float32()) for i in range(n_layers)]
        else:
            fields.append(pa.field(column, _VISIT_TYPES[column](n_layers)))
    return pa.schema(fields)


def _blocks(batch_size: np.ndarray, selected: np.ndarray, block_rows: int) -> Iterator[np.ndarray]:
    """Masks of consecutive whole steps among `selected`, each holding at most `block_rows`
    visits (or one step, when a step alone is larger)."""
    index = np.flatnonzero(selected)
    start, rows = 0, 0
    for k, size in enumerate(batch_size[index].tolist()):
        if rows and rows + size > block_rows:
            yield _mask(len(selected), index[start:k])
            start, rows = k, 0
        rows += size
    if len(index):
        yield _mask(len(selected), index[start:])


def _mask(n: int, index: np.ndarray) -> np.ndarray:
    mask = np.zeros(n, dtype=bool)
    mask[index] = True
    return mask


def _write_visits(
    data: TraceData, columns: list[str], root: Path, block_rows: int, file_rows: int
) -> dict[str, Any]:
    schema = _visit_schema(columns, data.n_layers)
    rows = files = 0
    partitions = []
    for i, steps in enumerate(data.steps):
        rank = steps.shard.rank
        for epoch in np.unique(steps.epoch).tolist():
            writer = _PartitionWriter(root / f"epoch={epoch}" / f"rank={rank}", schema, file_rows)
            for mask in _blocks(steps.batch_size, steps.epoch == epoch, block_rows):
                masks = [
                    mask if j == i else np.zeros(len(s.step), dtype=bool)
                    for j, s in enumerate(data.steps)
                ]
                block = data.read_chunk(masks, columns)
                writer.write(_arrow_block(block, columns, schema, data.n_layers))
            rows += writer.close()
            files += writer.files
            partitions.append({"epoch": epoch, "rank": rank})
    if files == 0:
        # No visits yet: one empty file keeps the glob readable and the schema known.
        rank = data.shards[0].rank
        writer = _PartitionWriter(root / "epoch=0" / f"rank={rank}", schema, file_rows)
        writer.write(schema.empty_table())
        writer.close()
        files = 1
    return {
        "path": "visits",
        "glob": "visits/*/*/*.parquet",
        "partitioning": ["epoch", "rank"],
        "rows": rows,
        "files": files,
        "partitions": partitions,
        "columns": schema.names,
    }


class _PartitionWriter:
    """Part files of one partition folder, a new part after `file_rows` rows."""

    def __init__(self, folder: Path, schema: pa.Schema, file_rows: int) -> None:
        self.folder = folder
        self.schema = schema
        self.file_rows = file_rows
        self.files = 0
        self.rows = 0
        self._writer: pq.ParquetWriter | None = None
        self._in_file = 0

    def write(self, table: pa.Table) -> None:
        if self._writer is None or self._in_file >= self.file_rows:
            self._close_file()
            self.folder.mkdir(parents=True, exist_ok=True)
            path = self.folder / f"part-{self.files:05d}.parquet"
            self._writer = pq.ParquetWriter(path, self.schema, compression="zstd")
            self.files += 1
        self._writer.write_table(table, row_group_size=max(table.num_rows, 1))
        self._in_file += table.num_rows
        self.rows += table.num_rows

    def _close_file(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            self._in_file = 0

    def close(self) -> int:
        self._close_file()
        return self.rows


def _arrow_block(
    block: dict[str, tuple[np.ndarray, np.ndarray | None]],
    columns: list[str],
    schema: pa.Schema,
    n_layers: int,
) -> pa.Table:
    arrays: list[pa.Array] = []
    for column in columns:
        values, valid = block[column]
        mask = None if valid is None else ~valid
        if column in _PER_LAYER:
            values = np.asarray(values, dtype=np.float32).reshape(len(values), n_layers)
            arrays += [
                pa.array(np.ascontiguousarray(values[:, i]), type=pa.float32(), mask=mask)
                for i in range(n_layers)
            ]
        elif column == "correct":
            # read_chunk's int8 -1 is "no outputs recorded": a NULL, as in the visits view.
            missing = values < 0 if mask is None else mask | (values < 0)
            arrays.append(pa.array(values == 1, type=pa.bool_(), mask=missing))
        else:
            arrow_type = schema.field(column).type
            values = np.asarray(values).astype(arrow_type.to_pandas_dtype(), copy=False)
            arrays.append(pa.array(values, type=arrow_type, mask=mask))
    return pa.Table.from_arrays(arrays, schema=schema)


def _flat_layers(frame: pl.DataFrame, n_layers: int) -> pl.DataFrame:
    """List/array columns of one value per layer (steps and checkpoints grad_sq) as one
    float column per layer, `grad_sq_<l>`, as the visits have them."""
    out = []
    for name, dtype in frame.schema.items():
        if isinstance(dtype, (pl.Array, pl.List)) and name in _PER_LAYER:
            column = frame.get_column(name)
            getter = column.arr.get if isinstance(dtype, pl.Array) else column.list.get
            out += [getter(i, null_on_oob=True).alias(f"{name}_{i}") for i in range(n_layers)]
        else:
            out.append(frame.get_column(name))
    return pl.DataFrame(out) if out else frame


# -- the views, as portable SQL ---------------------------------------------------------------
def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _importance_expr(index: int) -> str:
    """One layer's importance per visit, (lr·s)² · ‖g‖² (docs/trace-format.md), in DOUBLE.

    The one definition every exported query uses: the importance view and the rollup.
    """
    return f"lr_scale * lr_scale * CAST(grad_sq_{index} AS DOUBLE)"


def importance_sql(layers: pl.DataFrame, *, has_alignment: bool, source: str = "visits") -> str:
    """The trace's `importance` view as a portable SELECT over the exported `visits` table.

    One UNION ALL branch per layer, with the columns and types of `Trace.sql`'s importance
    view; plain SQL that DuckDB and Spark both run.

    Args:
        layers: `Trace.layers()` (layer_index, layer, n_params).
        has_alignment: whether the visits have `alignment_<l>` columns (else NULL).
        source: the visits table's name.
    """
    parts = []
    for row in layers.iter_rows(named=True):
        index = row["layer_index"]
        importance = _importance_expr(index)
        alignment = (
            f"CAST(alignment_{index} AS DOUBLE)" if has_alignment else "CAST(NULL AS DOUBLE)"
        )
        parts.append(
            "SELECT CAST(step AS BIGINT) AS step, CAST(epoch AS BIGINT) AS epoch, "
            "CAST(sample_id AS BIGINT) AS sample_id, "
            f"{_quote(str(row['layer']))} AS layer, CAST({index} AS BIGINT) AS layer_index, "
            f"CAST(grad_sq_{index} AS DOUBLE) AS grad_sq, {importance} AS importance, "
            f"{importance} / CAST({int(row['n_params'])} AS BIGINT) AS importance_per_param, "
            f"{alignment} AS alignment FROM {source}"
        )
    if not parts:
        parts = [
            "SELECT CAST(step AS BIGINT) AS step, CAST(epoch AS BIGINT) AS epoch, "
            "CAST(sample_id AS BIGINT) AS sample_id, CAST(NULL AS STRING) AS layer, "
            "CAST(NULL AS BIGINT) AS layer_index, CAST(NULL AS DOUBLE) AS grad_sq, "
            "CAST(NULL AS DOUBLE) AS importance, CAST(NULL AS DOUBLE) AS importance_per_param, "
            f"CAST(NULL AS DOUBLE) AS alignment FROM {source} WHERE 1 = 0"
        ]
    return "\nUNION ALL\n".join(parts) + "\n"


def rollup_sql(n_layers: int, *, source: str = "visits") -> str:
    """The per-(sample, epoch) rollup as a portable SELECT over `visits`: n_visits,
    loss_mean, importance (all layers) and importance_<l>, grad_sq_<l> per layer."""
    per_layer = [f"sum({_importance_expr(i)}) AS importance_{i}" for i in range(n_layers)]
    per_layer += [f"sum(CAST(grad_sq_{i} AS DOUBLE)) AS grad_sq_{i}" for i in range(n_layers)]
    total = " + ".join(f"importance_{i}" for i in range(n_layers)) or "CAST(NULL AS DOUBLE)"
    inner = ", ".join(
        [
            "CAST(sample_id AS BIGINT) AS sample_id",
            "CAST(epoch AS BIGINT) AS epoch",
            "count(*) AS n_visits",
            "avg(CAST(loss AS DOUBLE)) AS loss_mean",
            *per_layer,
        ]
    )
    layer_cols = [f"importance_{i}" for i in range(n_layers)]
    layer_cols += [f"grad_sq_{i}" for i in range(n_layers)]
    outer = ", ".join(["sample_id", "epoch", "n_visits", "loss_mean", f"{total} AS importance"])
    outer += "".join(f", {c}" for c in layer_cols)
    return (
        f"SELECT {outer}\nFROM (SELECT {inner}\n      FROM {source}\n"
        "      GROUP BY CAST(sample_id AS BIGINT), CAST(epoch AS BIGINT)) AS per_epoch\n"
    )


def _write_views(
    folder: Path, layers: pl.DataFrame, columns: list[str], small: list[str]
) -> dict[str, str]:
    views = folder / "views"
    views.mkdir()
    has_alignment = "alignment" in columns
    texts = {
        "importance": importance_sql(layers, has_alignment=has_alignment),
        ROLLUP: rollup_sql(layers.height),
    }
    for name, text in texts.items():
        (views / f"{name}.sql").write_text(text, encoding="utf-8")
    lines = [
        "-- The samplescope export's tables and views, for DuckDB. Paths are relative to this",
        "-- folder: run `duckdb -init views.sql` here, or SET file_search_path to the folder.",
        "CREATE OR REPLACE VIEW visits AS SELECT * FROM read_parquet("
        "'visits/*/*/*.parquet', hive_partitioning = true);",
        *(
            f"CREATE OR REPLACE VIEW {name} AS SELECT * FROM read_parquet('{name}.parquet');"
            for name in small
        ),
        f"CREATE OR REPLACE VIEW {ROLLUP} AS SELECT * FROM read_parquet("
        f"'{ROLLUP}/*/*.parquet', hive_partitioning = true);",
        "CREATE OR REPLACE VIEW importance AS",
        texts["importance"].rstrip() + ";",
        "",
    ]
    (folder / "views.sql").write_text("\n".join(lines), encoding="utf-8")
    return {name: f"views/{name}.sql" for name in texts}


def _write_rollup(
    folder: Path, data: TraceData, columns: list[str], memory_limit: str, threads: int
) -> dict[str, Any]:
    """sample_epoch_totals/epoch=E/part-00000.parquet, one DuckDB query per epoch: its hash
    table holds one epoch's samples, and DuckDB spills past `memory_limit`."""
    spill = folder / ".spill"
    con = duckdb.connect(
        config={
            "memory_limit": memory_limit,
            "threads": str(max(int(threads), 1)),
            "temp_directory": str(spill),
        }
    )
    rows = 0
    try:
        epochs = sorted({int(e) for s in data.steps for e in np.unique(s.epoch)})
        body = rollup_sql(data.n_layers, source="v")
        for epoch in epochs or [0]:
            out = folder / ROLLUP / f"epoch={epoch}"
            out.mkdir(parents=True)
            if epochs:
                glob = folder / "visits" / f"epoch={epoch}" / "*" / "*.parquet"
                source = f"read_parquet({_quote(str(glob))})"
            else:  # no visits: an empty rollup of the right columns
                con.register("_empty", _visit_schema(columns, data.n_layers).empty_table())
                source = "_empty"
            file = out / "part-00000.parquet"
            # The epoch comes from the folder name; the files hold the other columns.
            con.execute(
                f"COPY (WITH v AS (SELECT *, CAST({epoch} AS BIGINT) AS epoch FROM {source}) "
                f"SELECT * EXCLUDE (epoch) FROM ({body}) ORDER BY sample_id) "
                f"TO {_quote(str(file))} (FORMAT parquet, COMPRESSION zstd)"
            )
            rows += pq.ParquetFile(file).metadata.num_rows
    finally:
        con.close()
        shutil.rmtree(spill, ignore_errors=True)
    return {
        "path": ROLLUP,
        "glob": f"{ROLLUP}/*/*.parquet",
        "partitioning": ["epoch"],
        "rows": int(rows),
        "sql": f"views/{ROLLUP}.sql",
    }


def _manifest(
    trace: Trace,
    data: TraceData,
    layers: pl.DataFrame,
    tables: dict[str, Any],
    views: dict[str, str],
) -> dict[str, Any]:
    from samplescope import __version__

    attrs = dict(data.shards[0].attrs)
    attrs.pop("rank", None)
    return {
        "format": EXPORT_FORMAT,
        "export_version": EXPORT_VERSION,
        "trace_format_version": int(attrs.get("format_version", 0)),
        "samplescope_version": __version__,
        "source": [str(p) for p in trace.paths],
        "run_id": attrs.get("run_id"),
        "world_size": int(attrs.get("world_size", 1)),
        "ranks": [s.rank for s in data.shards],
        "closed": all(s.closed for s in data.shards),
        "warnings": list(trace.warnings),
        "layers": layers["layer"].to_list(),
        "n_visits": int(tables["visits"]["rows"]),
        "tables": tables,
        "views": views,
        "attrs": attrs,
    }
