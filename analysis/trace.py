"""`open_trace` and `Trace`: a recorded run as DuckDB views and Polars frames.

`Trace` is a small facade over separate parts, each owning one thing:

- `_hdf5.TraceData` — the files, validated, and the one reader of visits;
- `_tables` — the small tables read whole (layers, steps, evals, sample_info, checkpoints,
  sample_names);
- `_duckdb.Session` — the sandboxed DuckDB connection, its views, the columns loaded;
- `_polars` — `visits` and `importance` as lazy Polars frames over HDF5;
- `_derived.Derived` — samples, sample_epochs, correlations, groups, clusters, from the
  streaming engine, cached.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from functools import cached_property
from typing import Any

import duckdb
import numpy as np
import polars as pl

from samplescope.analysis import val_effect
from samplescope.analysis._derived import DEFAULT_K, DERIVED_TABLES, Derived
from samplescope.analysis._duckdb import Session
from samplescope.analysis._hdf5 import Shard, TraceData, resolve_paths
from samplescope.analysis._notebook import notebook_html
from samplescope.analysis._polars import importance_lazy, scan_visits
from samplescope.analysis._streaming import Streamed, sample_ids
from samplescope.analysis._tables import SMALL_TABLES, small_table
from samplescope.analysis.errors import QueryError, TraceError

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
    "sample_names",
    "val_effect",
)
_OPTIONAL_VISITS = (
    "target",
    "pred",
    "p_target",
    "margin",
    "el2n",
    "input_sq",
    "input_grad_sq",
    "alignment",
    "micro",
    "scale",
)


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


class Trace:
    """A recorded run, read lazily. A snapshot of what was flushed when it was opened."""

    def __init__(
        self,
        source: TraceSource,
        *,
        connection: duckdb.DuckDBPyConnection | None = None,
        schema: str | None = None,
    ) -> None:
        """Open `source` (see `open_trace`). `connection` and `schema` are for `open_runs`:
        the tables then live in `schema` of a connection shared by several runs."""
        _check_source(source)
        self.paths = resolve_paths(source)
        self._data = TraceData(self.paths)
        self._small: dict[str, pl.DataFrame] = {}
        self._derived = Derived(
            self._data, self.paths[0], self._small_table, lambda: self.table_names
        )
        frames = {name: (lambda name=name: self._small_table(name)) for name in SMALL_TABLES}
        frames.update(
            samples=self.samples,
            sample_epochs=self.sample_epochs,
            correlations=self.correlations,
            groups=self.groups,
            clusters=self.clusters,
            val_effect=self.val_effect,
        )
        self._session = Session(
            self._data,
            frames,
            lambda: self.table_names,
            self._derived.rollup,
            con=connection,
            schema=schema,
        )

    # -- lifecycle ------------------------------------------------------------------
    def close(self) -> None:
        """Close the HDF5 files and the DuckDB connection."""
        self._data.close()
        self._session.close()

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
        epochs = np.unique(np.concatenate([s.epoch for s in self._data.steps]))
        meta.update(
            paths=[str(p) for p in self.paths],
            n_shards=len(shards),
            ranks=[s.rank for s in shards],
            closed=all(_status(s, "closed") == 1 for s in shards),
            n_errors=sum(_status(s, "n_errors") for s in shards),
            n_steps=len(self.steps_index),
            n_visits=self._data.n_visits,
            n_samples=len(sample_ids(self._data)),
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
        return notebook_html(self)

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
            "sample_names": self._data.has_sample_names(),
            "val_effect": val_effect.has_val_dot(self._data),
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

    def _small_table(self, name: str) -> pl.DataFrame:
        if name not in self._small:
            self._small[name] = small_table(self._data, name)
        return self._small[name]

    def _frame(self, name: str) -> pl.DataFrame:
        if name in DERIVED_TABLES:
            return getattr(self, name)()
        return self._small_table(name)

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
            return scan_visits(self._data)
        if name == "importance":
            return importance_lazy(self._data, self.layers())
        return self._frame(name).lazy()

    # -- SQL (analysis/_duckdb.py) -------------------------------------------------------
    @property
    def _con(self) -> duckdb.DuckDBPyConnection:
        return self._session.con

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
        return self._session.sql(query, params)

    def query(
        self,
        query: str,
        params: Sequence[Any] | dict[str, Any] | None = None,
    ) -> pl.DataFrame:
        """Run SQL and return the whole result as a Polars frame (what `samplescope sql` does).

        Raises:
            QueryError: as `sql`, and errors raised while the query executes.
        """
        return self._session.query(query, params)

    # -- derived tables (analysis/_derived.py) -----------------------------------------
    def _streamed(self) -> Streamed:
        """The streaming engine's full pass (`findings` folds it into its arrays)."""
        return self._derived.streamed()

    def _rollup(self) -> pl.DataFrame:
        """Per (sample, epoch): sample_id, epoch, n_visits, loss (mean), importance_<l>,
        grad_sq_<l>; what `flag`, `compare` and the SQL `sample_epochs` view read."""
        return self._derived.rollup()

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
        frame = self._derived.samples(early_epochs)
        if sort is not None:
            if sort not in frame.columns:
                msg = f"no column {sort!r} in samples; columns are: {', '.join(frame.columns)}"
                raise QueryError(msg)
            frame = frame.sort(sort, descending=descending, nulls_last=True, maintain_order=True)
        return frame if top is None else frame.head(top)

    def sample_epochs(self) -> pl.DataFrame:
        """Long table: sample_id, epoch, layer, layer_index, importance, grad_sq,
        importance_rank and importance_z within (epoch, layer)."""
        return self._derived.sample_epochs()

    def correlations(self) -> pl.DataFrame:
        """Spearman(importance, final loss) per epoch and layer (NULL = all)."""
        return self._derived.correlations()

    def groups(self) -> pl.DataFrame:
        """The top10 / next10 / rest grouping and each group's share of every layer."""
        return self._derived.groups()

    def clusters(self, k: int = DEFAULT_K, seed: int = 0) -> pl.DataFrame:
        """Per class, k-means on each sample's epoch × layer importance profile; clusters
        labelled easy / medium / hard by how fast their training loss falls.

        Args:
            k: clusters per class (fewer when a class has fewer distinct profiles).
            seed: k-means random state.
        """
        return self._derived.clusters(k, seed)

    def val_effect(self) -> pl.DataFrame:
        """Long table: sample_id, epoch, layer, layer_index, val_effect (the first-order
        change of the reference loss, −η·s·⟨g(i,l), g_val(l)⟩ summed; negative = helped),
        val_effect_measured, n_measured; empty without ``/visits/val_dot``
        (see analysis/val_effect.py)."""
        return self._derived.val_effect()


def _status(shard: Shard, name: str) -> int:
    if not shard.has("status", name):
        return 0
    values = shard.read("status", name)
    return int(values[0]) if len(values) else 0


def _check_source(source: Any) -> None:
    if not isinstance(source, (str, os.PathLike, list, tuple)):
        msg = f"open_trace takes a path, a list of paths or a glob, not {type(source).__name__}"
        raise TraceError(msg)
