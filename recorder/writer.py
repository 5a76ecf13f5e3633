"""Append-only, crash-safe HDF5 writing, off the training thread.

The training thread hands over ready numpy rows; a writer thread buffers them and
appends to the file every `flush_seconds` in HDF5's single-writer/multiple-reader mode,
so a reader can open the trace while training runs and a killed process leaves every
flushed row readable with no repair tool. Layout: docs/trace-format.md.

The writer is the only owner of row offsets: `/steps/visit_start` is assigned here, from
the rows actually written. A flush that fails is rolled back (every column cut back to its
last committed length), so it loses only its own steps, whose numbers go to
`/status/lost_steps`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import queue
import re
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from samplescope import __version__
from samplescope.recorder._tracefile import (
    LIBVER,
    TraceLock,
    TraceWriteError,
    compact,
    compact_live,
    growable,
    publish,
    remove_stale_temps,
    temp_path,
)

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "TraceWriteError", "TraceWriter", "encode_attrs"]

logger = logging.getLogger(__name__)

FORMAT_NAME = "samplescope-trace"
FORMAT_VERSION = 2

_STR = h5py.string_dtype("utf-8")
# Rows per chunk while writing. HDF5 in SWMR mode leaks the old copy of every chunk it
# rewrites, and a flush rewrites the last, partial chunk of each column, so the waste per
# flush is about one chunk: small chunks keep the live file near its compact size
# (bench/trace_size.py). At close the file is rewritten with _COMPACT_ROWS-row chunks.
_LIVE_ROWS = 256
_COMPACT_ROWS = 8192
# The leaked copies are reclaimed while training runs too: when the live file exceeds this
# factor of its estimated compact size (and by at least _LIVE_SLACK_MIN bytes), the writer
# closes it, copies its chunks into a fresh file (`compact_live`), renames that into place
# and reopens it. Each copy moves the whole file, but it is due only once the waste reaches
# a fixed fraction of the data, so its cost per flush stays proportional to the waste of a
# flush (a few chunks), whatever the run's length.
_LIVE_SLACK = 1.2
_LIVE_SLACK_MIN = 64 << 10
_THUMB_SIDE = 28
# Free space a flush leaves untouched. HDF5 cannot recover from a write that fails for lack
# of space (a later close crashes the process in H5F__dest), so the writer refuses a flush
# that could fill the disk: this room stays for the close (status, metadata).
SPACE_MARGIN = 4 << 20
# Bytes of queued rows (host copies of a step's tensors) past which the training thread
# waits for the writer instead of queueing more: a writer that falls behind (a slow disk, a
# huge model) then slows training down rather than letting memory grow without limit.
# Rows being written count no more, so the recorder holds at most about twice this.
MAX_PENDING_BYTES = 256 << 20

# Column dtypes per table; a [rows, layers] column is marked by a trailing "*".
_STEP_COLUMNS = {
    "step": np.int64,
    "epoch": np.int64,
    "lr": np.float64,
    "batch_size": np.int64,
    "loss_mean": np.float64,
    "time": np.float64,
    "visit_start": np.int64,
    "n_nonfinite": np.int64,
    "grad_sq*": np.float32,
}
_VISIT_COLUMNS = {
    "step": np.int64,
    "sample_id": np.int64,
    "loss": np.float32,
    "grad_sq*": np.float32,
    "input_sq": np.float32,
}
OUTPUT_COLUMNS = {
    "target": np.int64,
    "pred": np.int64,
    "p_target": np.float32,
    "margin": np.float32,
    "el2n": np.float32,  # written since format 2; older traces lack it (readers: el2n_proxy)
}
# Optional (with `accumulation_steps` > 1): each visit's micro-batch within its optimizer
# step, and the weight of its loss in the back-propagated loss (1/(K·B) for a mean).
ACCUMULATION_COLUMNS = {"micro": np.int64, "scale": np.float64}
_EVAL_COLUMNS = {
    "step": np.int64,
    "epoch": np.int64,
    "split": _STR,
    "loss": np.float64,
    "accuracy": np.float64,
}
# Optional (with `checkpoints=True`): one row per (checkpoint, sample), see
# Recorder.score_checkpoint; the output columns are always there (missing values if none).
_CHECKPOINT_COLUMNS = {
    "checkpoint": np.int64,
    "step": np.int64,
    "epoch": np.int64,
    "sample_id": np.int64,
    "loss": np.float32,
    "grad_sq*": np.float32,
    **OUTPUT_COLUMNS,
}
# Always present, empty unless sample ids are strings: each name's integer id (a hash,
# recorder/sample_names.py), appended the first time the name is seen.
_SAMPLE_NAME_COLUMNS = {"sample_id": np.int64, "name": _STR}
# Tables in the order a flush appends them: /steps last, so a reader that sees a step also
# sees its visits (and the names of its samples).
_TABLE_ORDER = ("sample_names", "thumbnails", "evals", "checkpoints", "visits", "steps")


def encode_attrs(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """Root attributes as HDF5 can store them (JSON text where not scalars or strings).

    Raises:
        TraceWriteError: a value is not JSON-serialisable (checked before any file exists).
    """
    encoded = {}
    for key, value in attrs.items():
        try:
            encoded[key] = _attr_value(value)
        except (TypeError, ValueError) as error:
            msg = f"{key} must be JSON-serialisable: {_reason(error)}"
            raise TraceWriteError(msg) from None
    return encoded


class TraceWriter:
    """Owns one trace file: complete and readable from `open` on, appended by a thread.

    Args:
        path: the file to create.
        attrs: root attributes (JSON-encoded where not scalars or strings).
        sample_info: optional per-sample columns, including ``sample_id``.
        flush_seconds: the longest time rows may wait in memory.
        overwrite: replace an existing file (never one that a live writer holds).
        derive: ``(table, columns) -> columns`` run on the writer thread over many steps'
            rows at once, to compute columns from queued raw ones (vectorised, off the
            training thread).
        drop_unused_outputs: at close, leave out the output columns if no row filled them.
    """

    def __init__(
        self,
        path: str | Path,
        attrs: Mapping[str, Any],
        *,
        sample_info: Mapping[str, np.ndarray] | None = None,
        flush_seconds: float = 2.0,
        overwrite: bool = False,
        derive: Callable[[str, dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None,
        drop_unused_outputs: bool = False,
    ) -> None:
        self.path = Path(path)
        self._derive = derive
        self.flush_seconds = flush_seconds
        self._attrs = encode_attrs(attrs)
        self._layout: dict[str, Any] = {}
        self._sample_info = sample_info
        self._overwrite = overwrite
        self._drop_unused_outputs = drop_unused_outputs
        self._file: h5py.File | None = None
        self._lock_file = TraceLock(self.path)
        self._queue: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._tables: dict[str, dict[str, h5py.Dataset]] = {}
        self._rows: dict[str, int] = {}
        self._n_errors = 0
        self._n_errors_written = 0
        self._lost: list[int] = []  # lost step numbers not yet in /status/lost_steps
        self._n_lost = 0
        self._outputs_seen = False
        self._forward_order: np.ndarray | None = None
        self._pending: list[tuple[str, Any]] = []
        self._lock = threading.Lock()
        # Live compaction: the file's size when empty, and bytes per row of the last copy.
        self._empty_size = 0
        self._bytes_per_row: float | None = None
        self.n_live_compactions = 0
        self._closing = False
        # Backpressure: bytes queued in _pending, and where the training thread waits.
        self.max_pending_bytes = MAX_PENDING_BYTES
        self._pending_bytes = 0
        self._room = threading.Condition(self._lock)
        self._drain_requested = False
        self.wait_seconds = 0.0  # time the training thread spent waiting for the writer
        self.max_pending_seen = 0  # the most bytes ever queued at once (for tests, benches)
        self._abort = threading.Event()

    # -- training-thread side -------------------------------------------------------------

    def open(self, layout: Mapping[str, Any]) -> None:
        """Create the complete, empty trace and start the writer thread.

        Args:
            layout: ``layers`` (dict of name/kind/n_params/method lists), ``outputs``,
                ``alignment``, ``reference``, ``input_grad``, ``thumbnails``,
                ``checkpoints``, ``accumulation`` (bools):
                every table and column is created here, so the layout never depends on the
                first step.

        Raises:
            TraceWriteError: the path exists (without overwrite), is a directory, is held by
                a live writer, or cannot be written. Nothing is left behind.
        """
        self._layout = dict(layout)
        if self.path.is_dir():
            msg = f"trace path {self.path} is a directory"
            raise TraceWriteError(msg)
        if self.path.exists() and not self._overwrite:
            msg = f"trace {self.path} already exists; choose another path or pass overwrite=True"
            raise TraceWriteError(msg)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            msg = f"cannot create trace {self.path}: {_reason(error)}"
            raise TraceWriteError(msg) from error
        self._lock_file.acquire(self.path)
        try:
            _check_space(self.path, 0)
        except OSError as error:
            self._lock_file.release()
            msg = f"cannot create trace {self.path}: {_reason(error)}"
            raise TraceWriteError(msg) from error
        remove_stale_temps(self.path)
        temp = temp_path(self.path, "new")
        try:
            self._file = h5py.File(temp, "w", libver=LIBVER)
            self._create(self._file)
            self._file.swmr_mode = True  # also flushes: the file is complete on disk
            publish(temp, self.path, overwrite=self._overwrite)
            self._empty_size = self.path.stat().st_size
        except BaseException as error:
            if self._file is not None:
                with contextlib.suppress(Exception):
                    self._file.close()
                self._file = None
            temp.unlink(missing_ok=True)
            self._lock_file.release()
            if isinstance(error, TraceWriteError):
                raise
            if not isinstance(error, Exception):
                raise
            msg = f"cannot create trace {self.path}: {_reason(error)}"
            raise TraceWriteError(msg) from error
        self._thread = threading.Thread(target=self._run, name="samplescope-writer", daemon=True)
        self._thread.start()

    def append_step(
        self,
        step: Mapping[str, np.ndarray],
        visits: Mapping[str, np.ndarray],
        *,
        nbytes: int = 0,
    ) -> None:
        """Queue one step's /steps row and its /visits rows (written together or not at all).

        The writer thread collects them on its own schedule: waking it at every step would
        make it compete with training for the interpreter lock. If the rows already queued
        hold ``max_pending_bytes`` or more (``nbytes`` is this step's share), this waits
        until the writer has taken them: the queue stays bounded and no row is dropped.
        """
        with self._lock:
            if self._pending_bytes and self._pending_bytes + nbytes > self.max_pending_bytes:
                self._wait_for_room(nbytes)
            self._pending.append(("step", (step, visits)))
            self._pending_bytes += nbytes
            self.max_pending_seen = max(self.max_pending_seen, self._pending_bytes)

    def _wait_for_room(self, nbytes: int) -> None:
        # Called with self._lock held (the Condition's lock).
        start = time.monotonic()
        if not self._drain_requested:
            # Wake the writer now rather than at its next flush time.
            self._drain_requested = True
            self._queue.put(("drain", None))
        while self._pending_bytes and self._pending_bytes + nbytes > self.max_pending_bytes:
            if self._thread is None or not self._thread.is_alive():
                break  # nobody will drain the queue (closing): never hang training
            self._room.wait(0.1)
        self.wait_seconds += time.monotonic() - start

    def append(self, table: str, rows: Mapping[str, np.ndarray]) -> None:
        """Queue rows for "evals", "thumbnails", "checkpoints" or "sample_names"."""
        with self._lock:
            self._pending.append((table, rows))

    def set_forward_order(self, order: list[int]) -> None:
        """Record, per layer, its position in the first recorded forward pass (-1: never ran)."""
        self._queue.put(("order", np.asarray(order, dtype=np.int64)))

    def flush(self) -> None:
        """Block until everything queued so far is on disk."""
        done = threading.Event()
        self._queue.put(("flush", done))
        while not done.wait(0.1):
            if self._thread is None or not self._thread.is_alive():
                break
        self.raise_error()

    def count_error(self) -> None:
        """Count a recorder failure that was warned about rather than raised."""
        self._n_errors += 1

    def raise_error(self) -> None:
        """Re-raise, once, a failure of the writer thread."""
        if self._error is not None:
            error, self._error = self._error, None
            if isinstance(error, TraceWriteError):
                raise error
            msg = f"writing trace {self.path} failed: {_reason(error)}"
            raise TraceWriteError(msg) from error

    def abort(self) -> None:
        """Give up the compaction at close (an interrupt): the live file stays, complete."""
        self._abort.set()

    def close(self) -> None:
        """Write what is left, mark the trace closed, close and compact the file.

        Interrupt-safe: a KeyboardInterrupt (one or more) while closing skips compaction,
        still waits for the last rows and the `closed` mark (a bounded write), then re-raises.
        """
        if self._file is None:
            return
        interrupted: BaseException | None = None
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(("close", None))
            while self._thread.is_alive():
                try:
                    self._thread.join(0.1)
                except KeyboardInterrupt as error:
                    interrupted = error
                    self._abort.set()
        self._file = None
        self._lock_file.release()
        if interrupted is not None:
            raise interrupted
        self.raise_error()

    # -- the file's structure -------------------------------------------------------------

    def _create(self, f: h5py.File) -> None:
        root = f.attrs
        root["format"] = FORMAT_NAME
        root["format_version"] = FORMAT_VERSION
        root["created"] = datetime.now(UTC).isoformat(timespec="seconds")
        root["samplescope_version"] = __version__
        root["run_id"] = uuid.uuid4().hex
        for key, value in self._attrs.items():
            root[key] = value
        if self._sample_info is not None:
            group = f.create_group("sample_info")
            for name, column in self._sample_info.items():
                array = np.asarray(column)
                group.create_dataset(
                    name, data=array.astype(np.int8) if array.dtype == bool else array
                )
        layout = self._layout
        layers = layout["layers"]
        n_layers = len(layers["name"])
        group = f.create_group("layers")
        for name in ("name", "kind", "method"):
            group.create_dataset(name, data=np.array(layers[name], dtype=object), dtype=_STR)
        group.create_dataset("n_params", data=np.asarray(layers["n_params"], dtype=np.int64))
        group.create_dataset("forward_order", data=np.full(n_layers, -1, dtype=np.int64))

        visit_columns = dict(_VISIT_COLUMNS)
        if layout.get("outputs"):
            visit_columns.update(OUTPUT_COLUMNS)
        if layout.get("input_grad"):
            visit_columns["input_grad_sq"] = np.float32
        if layout.get("alignment"):
            visit_columns["alignment*"] = np.float32
        if layout.get("accumulation"):  # optional: gradient accumulation (accumulation.py)
            visit_columns.update(ACCUMULATION_COLUMNS)
        if layout.get("reference"):
            visit_columns["val_dot*"] = np.float32
        self._tables = {
            "steps": _make_columns(f.create_group("steps"), _STEP_COLUMNS, n_layers),
            "visits": _make_columns(f.create_group("visits"), visit_columns, n_layers),
            "evals": _make_columns(f.create_group("evals"), _EVAL_COLUMNS, n_layers),
            "sample_names": _make_columns(
                f.create_group("sample_names"), _SAMPLE_NAME_COLUMNS, n_layers
            ),
        }
        if layout.get("checkpoints"):
            self._tables["checkpoints"] = _make_columns(
                f.create_group("checkpoints"), _CHECKPOINT_COLUMNS, n_layers
            )
        if layout.get("thumbnails"):
            thumbs = f.create_group("thumbnails")
            side = (_THUMB_SIDE, _THUMB_SIDE)
            self._tables["thumbnails"] = {
                "sample_id": growable(thumbs, "sample_id", np.int64, (), _LIVE_ROWS),
                # H and W are set by the first image (at most 28×28).
                "image": growable(thumbs, "image", np.uint8, (0, 0), 64, side),
            }
        self._rows = dict.fromkeys(self._tables, 0)
        status = f.create_group("status")
        status.create_dataset("closed", data=np.zeros(1, dtype=np.int8))
        status.create_dataset("n_errors", data=np.zeros(1, dtype=np.int64))
        growable(status, "lost_steps", np.int64, (), 1024, compress=False)

    # -- writer-thread side ---------------------------------------------------------------

    def _run(self) -> None:
        last_flush = time.monotonic()
        while True:
            timeout = max(0.0, self.flush_seconds - (time.monotonic() - last_flush))
            try:
                kind, payload = self._queue.get(timeout=timeout)
            except queue.Empty:
                kind, payload = "tick", None
            if kind == "order":
                self._guard(self._write_order, payload)
            if (
                kind in ("flush", "close", "drain")
                or time.monotonic() - last_flush >= self.flush_seconds
            ):
                self._guard(self._write_pending)
                last_flush = time.monotonic()
            if kind == "flush":
                payload.set()
            elif kind == "close":
                self._finish()
                return

    def _guard(self, work: Callable[..., None], *args: Any) -> None:
        try:
            work(*args)
        except Exception as error:
            logger.debug("trace write failed", exc_info=True)
            if self._error is None:
                self._error = error

    def _write_order(self, order: np.ndarray) -> None:
        if self._file is None:
            return
        self._file["layers/forward_order"][:] = order
        self._forward_order = order
        self._file.flush()

    def _write_pending(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
            self._pending_bytes = 0
            self._drain_requested = False
            self._room.notify_all()
        if not pending and not self._lost and self._n_errors == self._n_errors_written:
            return
        steps = [rows for kind, rows in pending if kind == "step"]
        numbers = [int(s["step"][0]) for s, _ in steps]
        try:
            batch = self._merge(pending)
        except Exception:
            self._lost.extend(numbers)
            raise
        try:
            self._commit(batch)
        except Exception as error:
            self._rollback()
            self._lost.extend(numbers)
            lost = f"; {len(numbers)} step(s) lost, listed in /status/lost_steps" if numbers else ""
            msg = f"writing trace {self.path} failed: {_reason(error)}{lost}"
            raise TraceWriteError(msg) from error
        self._maybe_compact_live()

    def _maybe_compact_live(self) -> None:
        """Reclaim the space SWMR leaked, once it is a good part of the file (see _LIVE_SLACK)."""
        if self._abort.is_set() or self._closing:
            return
        try:
            size = self.path.stat().st_size
        except OSError:
            return
        rows = sum(self._rows.values())
        if self._bytes_per_row is None:  # never copied yet: wait for some data first
            expected = self._empty_size
            due = size - expected > 4 * _LIVE_SLACK_MIN
        else:
            expected = self._empty_size + self._bytes_per_row * rows
            due = size > _LIVE_SLACK * expected and size - expected > _LIVE_SLACK_MIN
        if not due or not rows:
            return
        try:
            _check_space(self.path, size)
        except OSError:
            return  # no room for a copy: the live file is complete, keep writing it
        assert self._file is not None
        self._file.close()
        try:
            compact_live(self.path)
        except (OSError, RuntimeError, ValueError, KeyError) as error:
            logger.debug("live compaction of %s failed: %s", self.path, error)
        finally:
            self._reopen()
        self.n_live_compactions += 1
        size = self.path.stat().st_size
        self._bytes_per_row = max(0.0, size - self._empty_size) / rows

    def _reopen(self) -> None:
        try:
            self._file = h5py.File(self.path, "a", libver=LIBVER)
            self._file.swmr_mode = True
        except Exception as error:
            self._file = None
            msg = f"cannot reopen trace {self.path} after compacting it: {_reason(error)}"
            raise TraceWriteError(msg) from error
        f = self._file
        self._tables = {
            table: {name: f[f"{table}/{name}"] for name in datasets}
            for table, datasets in self._tables.items()
        }

    def _merge(self, pending: list[tuple[str, Any]]) -> dict[str, dict[str, np.ndarray]]:
        parts: dict[str, dict[str, list[np.ndarray]]] = {}
        for kind, rows in pending:
            items = [("steps", rows[0]), ("visits", rows[1])] if kind == "step" else [(kind, rows)]
            for table, columns in items:
                bucket = parts.setdefault(table, {})
                for name, value in columns.items():
                    bucket.setdefault(name, []).append(value)
        batch = {}
        for table, columns in parts.items():
            if table not in self._tables:
                continue
            merged = {name: _concat(values) for name, values in columns.items()}
            if self._derive is not None:
                merged = self._derive(table, merged)
            batch[table] = merged
        if "steps" in batch:
            sizes = batch["steps"]["batch_size"]
            batch["steps"]["visit_start"] = self._rows["visits"] + np.concatenate(
                [[0], np.cumsum(sizes)[:-1]]
            ).astype(np.int64)
        return batch

    def _commit(self, batch: dict[str, dict[str, np.ndarray]]) -> None:
        if self._file is None:
            msg = f"trace {self.path} is no longer open (a live compaction could not reopen it)"
            raise TraceWriteError(msg)
        _check_space(self.path, sum(v.nbytes for c in batch.values() for v in c.values()))
        for table in _TABLE_ORDER:
            columns = batch.get(table)
            if not columns:
                continue
            datasets = self._tables[table]
            missing = set(datasets) - set(columns)
            if missing:
                msg = f"internal error: no values for /{table}/{', '.join(sorted(missing))}"
                raise TraceWriteError(msg)
            start = self._rows[table]
            for name, dataset in datasets.items():
                _append(dataset, start, columns[name])
        status = self._file["status"]
        lost = status["lost_steps"]
        if self._lost:
            _append(lost, self._n_lost, np.asarray(self._lost, dtype=np.int64))
        status["n_errors"][0] = self._n_errors
        self._n_errors_written = self._n_errors
        self._file.flush()
        for table, columns in batch.items():
            self._rows[table] += len(next(iter(columns.values())))
        if "visits" in batch and "target" in batch["visits"]:
            self._outputs_seen = self._outputs_seen or bool(np.any(batch["visits"]["target"] >= 0))
        self._n_lost += len(self._lost)
        self._lost = []

    def _commit_lost(self) -> None:
        try:
            self._commit({})
        except Exception:
            self._rollback()
            raise

    def _rollback(self) -> None:
        # Cut every column back to its committed length, so the next flush appends right
        # after the last good rows and no reader ever sees rows that did not reach disk.
        for table, datasets in self._tables.items():
            for dataset in datasets.values():
                with contextlib.suppress(Exception):
                    if dataset.shape[0] != self._rows[table]:
                        dataset.resize(self._rows[table], axis=0)
        with contextlib.suppress(Exception):
            lost = self._file["status/lost_steps"]
            if lost.shape[0] != self._n_lost:
                lost.resize(self._n_lost, axis=0)

    def _finish(self) -> None:
        closed = False
        self._closing = True  # the close compacts anyway: no live compaction now
        self._guard(self._write_pending)
        f = self._file
        if f is None:  # a live compaction could not reopen the file (error already kept)
            return
        try:
            if self._lost:  # steps lost in the last flush: try once more to list them
                self._guard(self._commit_lost)
            _check_space(self.path, 0)
            f["status/closed"][0] = 1
            f.flush()
            closed = True
        except Exception as error:  # noqa: BLE001 - reported on the training thread
            if self._error is None:
                self._error = error
        finally:
            try:
                f.close()
            except Exception as error:  # noqa: BLE001 - reported on the training thread
                closed = False
                if self._error is None:
                    self._error = error
        if closed and not self._abort.is_set():
            unused = self._drop_unused_outputs and not self._outputs_seen
            compact(
                self.path,
                drop={"visits": tuple(OUTPUT_COLUMNS)} if unused else {},
                chunk_rows=_COMPACT_ROWS,
                abort=self._abort,
                layer_order=_layer_order(self._forward_order),
            )


def _layer_order(forward: np.ndarray | None) -> np.ndarray | None:
    """Layers that ran, in forward order, then the others in registration order (v1's
    order, known only after the first step), or None when that is the order already."""
    if forward is None:
        return None
    n = len(forward)
    key = np.where(forward >= 0, forward, n + np.arange(n))
    order = np.argsort(key, kind="stable")
    return None if (order == np.arange(n)).all() else order


def _make_columns(
    group: h5py.Group, columns: Mapping[str, Any], n_layers: int
) -> dict[str, h5py.Dataset]:
    datasets = {}
    for key, dtype in columns.items():
        name = key.rstrip("*")
        tail = (n_layers,) if key.endswith("*") else ()
        datasets[name] = growable(group, name, dtype, tail, _LIVE_ROWS)
    return datasets


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    widths = {p.shape[1:] for p in parts}
    if len(widths) > 1 and all(p.ndim == 2 for p in parts):
        # Raw logits of steps with different class counts (or none): pad with -inf, which
        # changes neither the softmax nor the arg-max.
        width = max(p.shape[1] for p in parts)
        parts = [
            np.pad(p, ((0, 0), (0, width - p.shape[1])), constant_values=-np.inf) for p in parts
        ]
    return np.concatenate(parts)


def _append(dataset: h5py.Dataset, start: int, values: np.ndarray) -> None:
    """Write ``values`` at row ``start`` (the one place rows reach the file)."""
    shape = (start + values.shape[0], *values.shape[1:])
    if dataset.shape != shape:
        dataset.resize(shape)
    dataset[start:] = values


def _attr_value(value: Any) -> Any:
    # Plain Python types only: h5py cannot store str subclasses such as TorchVersion.
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, (int, float)):
        return value
    return json.dumps(value)


def _check_space(path: Path, nbytes: int) -> None:
    """Refuse, before HDF5 sees it, a write that could leave less than SPACE_MARGIN free."""
    try:
        stats = os.statvfs(path.parent)
    except OSError:
        return
    free = stats.f_bavail * stats.f_frsize
    need = 2 * nbytes + SPACE_MARGIN
    if free < need:
        raise OSError(errno.ENOSPC, f"No space left on device ({free >> 10} KiB free)")


def _reason(error: BaseException) -> str:
    """One line: HDF5's messages carry the errno amid a page of detail."""
    text = " ".join(str(error).split())
    found = re.search(r"errno = (\d+)", text)
    if found:
        return f"{os.strerror(int(found.group(1)))} (errno {found.group(1)})"
    return text or type(error).__name__
