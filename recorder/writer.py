"""Append-only, crash-safe HDF5 writing, off the training thread.

The training thread hands over ready numpy rows; a writer thread buffers them and
appends to the file every `flush_seconds` in HDF5's single-writer/multiple-reader mode,
so a reader can open the trace while training runs and a killed process leaves every
flushed row readable with no repair tool. Layout: docs/trace-format.md.
"""

from __future__ import annotations

import json
import logging
import queue
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
from samplescope.errors import SamplescopeError

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "TraceWriteError", "TraceWriter"]

logger = logging.getLogger(__name__)

FORMAT_NAME = "samplescope-trace"
FORMAT_VERSION = 1

_STR = h5py.string_dtype("utf-8")
_CHUNK_ROWS = 8192
_COMPRESSION = {"compression": "gzip", "compression_opts": 1, "shuffle": True}

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
_OUTPUT_COLUMNS = {
    "target": np.int64,
    "pred": np.int64,
    "p_target": np.float32,
    "margin": np.float32,
    "el2n": np.float32,  # optional since format 1: readers treat its absence as not recorded
}
_EVAL_COLUMNS = {
    "step": np.int64,
    "epoch": np.int64,
    "split": _STR,
    "loss": np.float64,
    "accuracy": np.float64,
}


class TraceWriteError(SamplescopeError):
    """The trace file cannot be created or written."""


class TraceWriter:
    """Owns one trace file: root metadata at open, tables created at the first step.

    Args:
        path: the file to create.
        attrs: root attributes (JSON-encoded where not scalars or strings).
        sample_info: optional per-sample columns, including ``sample_id``.
        flush_seconds: the longest time rows may wait in memory.
        overwrite: replace an existing file instead of refusing.
        derive: ``(table, columns) -> columns`` run on the writer thread over many steps'
            rows at once, to compute columns from queued raw ones (vectorised, off the
            training thread).
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
    ) -> None:
        self.path = Path(path)
        self._derive = derive
        self.flush_seconds = flush_seconds
        self._attrs = dict(attrs)
        self._sample_info = sample_info
        self._overwrite = overwrite
        self._file: h5py.File | None = None
        self._queue: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._buffers: dict[str, dict[str, list[np.ndarray]]] = {}
        self._layout: dict[str, Any] | None = None
        self._n_errors = 0
        self._pending: list[tuple[str, Mapping[str, np.ndarray]]] = []
        self._lock = threading.Lock()

    # -- training-thread side -------------------------------------------------------------

    def open(self) -> None:
        """Create the file and write root metadata. Raises TraceWriteError."""
        if self.path.exists() and not self._overwrite:
            msg = f"trace {self.path} already exists; choose another path or pass overwrite=True"
            raise TraceWriteError(msg)
        if self.path.is_dir():
            msg = f"trace path {self.path} is a directory"
            raise TraceWriteError(msg)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = h5py.File(self.path, "w", libver="latest")
        except OSError as error:
            msg = f"cannot create trace {self.path}: {_reason(error)}"
            raise TraceWriteError(msg) from error
        root = self._file.attrs
        root["format"] = FORMAT_NAME
        root["format_version"] = FORMAT_VERSION
        root["created"] = datetime.now(UTC).isoformat(timespec="seconds")
        root["samplescope_version"] = __version__
        root.setdefault("run_id", uuid.uuid4().hex)
        for key, value in self._attrs.items():
            root[key] = _attr_value(value)
        if self._sample_info is not None:
            group = self._file.create_group("sample_info")
            for name, column in self._sample_info.items():
                array = np.asarray(column)
                group.create_dataset(
                    name, data=array.astype(np.int8) if array.dtype == bool else array
                )
        self._thread = threading.Thread(target=self._run, name="samplescope-writer", daemon=True)
        self._thread.start()

    def start(self, layout: Mapping[str, Any]) -> None:
        """Create every table (HDF5 forbids new objects once SWMR writing starts).

        layout keys: ``layers`` (dict of name/kind/n_params/method lists), ``outputs``
        (bool), ``alignment`` (bool), ``input_grad`` (bool), ``thumbnail_shape`` (tuple or None).
        """
        self._queue.put(("start", dict(layout)))

    def append(self, table: str, rows: Mapping[str, np.ndarray]) -> None:
        """Queue rows for a table ("steps", "visits", "evals", "thumbnails").

        The writer thread collects them on its own schedule: waking it at every step would
        make it compete with training for the interpreter lock.
        """
        with self._lock:
            self._pending.append((table, rows))

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
            msg = f"writing trace {self.path} failed: {_reason(error)}"
            raise TraceWriteError(msg) from error

    def close(self) -> None:
        """Write what is left, mark the trace closed and close the file."""
        if self._file is None:
            return
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(("close", None))
            self._thread.join()
        self._file = None
        self.raise_error()

    # -- writer-thread side ---------------------------------------------------------------

    def _run(self) -> None:
        last_flush = time.monotonic()
        while True:
            timeout = max(0.0, self.flush_seconds - (time.monotonic() - last_flush))
            try:
                kind, payload = self._queue.get(timeout=timeout)
            except queue.Empty:
                kind, payload = "tick", None
            try:
                if kind == "start":
                    self._create_tables(payload)
                if (
                    kind in ("flush", "close")
                    or time.monotonic() - last_flush >= self.flush_seconds
                ):
                    self._collect()
                    self._write_buffers()
                    last_flush = time.monotonic()
            except BaseException as error:  # noqa: BLE001 - reported on the training thread
                if self._error is None:
                    self._error = error
                self._buffers.clear()
            if kind == "flush":
                payload.set()
            elif kind == "close":
                self._finish()
                return

    def _collect(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for table, rows in pending:
            columns = self._buffers.setdefault(table, {})
            for name, value in rows.items():
                columns.setdefault(name, []).append(value)

    def _create_tables(self, layout: Mapping[str, Any]) -> None:
        f = self._file
        assert f is not None
        layers = layout["layers"]
        n_layers = len(layers["name"])
        group = f.create_group("layers")
        group.create_dataset("name", data=np.array(layers["name"], dtype=object), dtype=_STR)
        group.create_dataset("kind", data=np.array(layers["kind"], dtype=object), dtype=_STR)
        group.create_dataset("n_params", data=np.asarray(layers["n_params"], dtype=np.int64))
        group.create_dataset("method", data=np.array(layers["method"], dtype=object), dtype=_STR)

        visit_columns = dict(_VISIT_COLUMNS)
        if layout.get("outputs"):
            visit_columns.update(_OUTPUT_COLUMNS)
        if layout.get("input_grad"):
            visit_columns["input_grad_sq"] = np.float32
        if layout.get("alignment"):
            visit_columns["alignment*"] = np.float32
        self._layout = {
            "steps": _make_columns(f.create_group("steps"), _STEP_COLUMNS, n_layers),
            "visits": _make_columns(f.create_group("visits"), visit_columns, n_layers),
            "evals": _make_columns(f.create_group("evals"), _EVAL_COLUMNS, n_layers),
        }
        shape = layout.get("thumbnail_shape")
        if shape is not None:
            thumbs = f.create_group("thumbnails")
            self._layout["thumbnails"] = {
                "sample_id": _growable(thumbs, "sample_id", np.int64, ()),
                "image": _growable(thumbs, "image", np.uint8, tuple(shape)),
            }
        status = f.create_group("status")
        status.create_dataset("closed", data=np.zeros(1, dtype=np.int8))
        status.create_dataset("n_errors", data=np.zeros(1, dtype=np.int64))
        f.swmr_mode = True

    def _write_buffers(self) -> None:
        if self._layout is None or self._file is None:
            return
        for table, columns in self._buffers.items():
            datasets = self._layout.get(table)
            if datasets is None:
                continue
            merged = {name: np.concatenate(parts) for name, parts in columns.items() if parts}
            if self._derive is not None:
                merged = self._derive(table, merged)
            for name, values in merged.items():
                _append(datasets[name], values)
        self._buffers.clear()
        self._file["status/n_errors"][0] = self._n_errors
        self._file.flush()

    def _finish(self) -> None:
        f = self._file
        assert f is not None
        try:
            if self._layout is not None:
                self._collect()
                self._write_buffers()
                f["status/closed"][0] = 1
                f.flush()
        except BaseException as error:  # noqa: BLE001 - reported on the training thread
            if self._error is None:
                self._error = error
        finally:
            f.close()


def _make_columns(
    group: h5py.Group, columns: Mapping[str, Any], n_layers: int
) -> dict[str, h5py.Dataset]:
    datasets = {}
    for key, dtype in columns.items():
        name = key.rstrip("*")
        tail = (n_layers,) if key.endswith("*") else ()
        datasets[name] = _growable(group, name, dtype, tail)
    return datasets


def _growable(group: h5py.Group, name: str, dtype: Any, tail: tuple[int, ...]) -> h5py.Dataset:
    row_bytes = max(1, int(np.prod(tail, dtype=np.int64))) * 8
    rows = max(64, min(_CHUNK_ROWS, (1 << 20) // row_bytes))
    return group.create_dataset(
        name,
        shape=(0, *tail),
        maxshape=(None, *tail),
        chunks=(rows, *tail),
        dtype=dtype,
        **_COMPRESSION,
    )


def _append(dataset: h5py.Dataset, values: np.ndarray) -> None:
    start = dataset.shape[0]
    dataset.resize(start + values.shape[0], axis=0)
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


def _reason(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text or type(error).__name__
