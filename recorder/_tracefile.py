"""The trace file's life outside the writer thread: lock, atomic creation, compaction.

A trace appears at its path only once it is a complete, readable file (attributes, layers,
every table, empty): it is built under a temporary name and renamed into place. A lock file
beside it keeps a second writer (even with ``overwrite=True``) from destroying a live run.
At close the file is rewritten compactly, because HDF5 in SWMR mode never reuses the space
of a chunk it rewrote (see docs/trace-format.md, "File size").
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from samplescope.errors import SamplescopeError

__all__ = [
    "LIBVER",
    "TraceLock",
    "TraceWriteError",
    "compact",
    "compact_live",
    "growable",
    "publish",
    "remove_stale_temps",
    "temp_path",
]

# v110 rather than "latest": SWMR needs 1.10 structures, and HDF5 1.10 tools (h5dump,
# h5repack from Debian's hdf5-tools) can read them; "latest" under HDF5 2.x they cannot.
LIBVER = ("v110", "v110")
_COMPRESSION = {"compression": "gzip", "compression_opts": 1, "shuffle": True}
_COPY_ROWS = 1 << 16


class TraceWriteError(SamplescopeError):
    """The trace file cannot be created or written."""


def lock_path(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


def temp_path(path: Path, purpose: str) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{purpose}")


def remove_stale_temps(path: Path) -> None:
    """Remove what a killed writer of this path left half-made (call with the lock held)."""
    for purpose in ("new", "compact"):
        for stale in path.parent.glob(f".{glob_escape(path.name)}.*.{purpose}"):
            with contextlib.suppress(OSError):
                stale.unlink()


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


class TraceLock:
    """An exclusive ``fcntl.flock`` on ``<trace>.lock``, held while a writer owns the trace.

    The lock dies with its process (SIGKILL included), so a crashed run never blocks the
    next one; the file is removed on release. The inode check after locking closes the race
    with a writer that removes the file between our open and our lock.
    """

    def __init__(self, path: Path) -> None:
        self.path = lock_path(path)
        self._fd: int | None = None

    def acquire(self, trace: Path) -> None:
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as error:
                msg = f"cannot create trace {trace}: {_reason(error)}"
                raise TraceWriteError(msg) from error
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                os.close(fd)
                msg = (
                    f"trace {trace} is being written by another process (pid {owner}); "
                    "wait for it to finish or choose another path"
                )
                raise TraceWriteError(msg) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()
        os.close(self._fd)
        self._fd = None


def publish(temp: Path, path: Path, *, overwrite: bool) -> None:
    """Move a complete trace to its path; without overwrite, never replace a file."""
    if overwrite:
        os.replace(temp, path)
        return
    try:
        os.link(temp, path)
    except FileExistsError:
        msg = f"trace {path} already exists; choose another path or pass overwrite=True"
        raise TraceWriteError(msg) from None
    except OSError:  # a filesystem without hard links: check, then rename
        if path.exists():
            msg = f"trace {path} already exists; choose another path or pass overwrite=True"
            raise TraceWriteError(msg) from None
        os.replace(temp, path)
        return
    temp.unlink()


def growable(
    group: h5py.Group,
    name: str,
    dtype: Any,
    tail: tuple[int, ...],
    chunk_rows: int,
    maxtail: tuple[int, ...] | None = None,
    *,
    compress: bool = True,
) -> h5py.Dataset:
    """An empty dataset growing along axis 0 (``maxtail`` lets later axes grow too)."""
    maxtail = tail if maxtail is None else maxtail
    return group.create_dataset(
        name,
        shape=(0, *tail),
        maxshape=(None, *maxtail),
        chunks=(chunk_rows, *[max(1, n) for n in maxtail]),
        dtype=dtype,
        **(_COMPRESSION if compress else {}),
    )


# Groups whose 2-D columns have a layer axis, permuted with /layers at compaction.
_LAYER_TABLES = ("steps", "visits", "checkpoints")


def compact(
    path: Path,
    *,
    drop: Mapping[str, tuple[str, ...]],
    chunk_rows: int,
    abort: threading.Event,
    layer_order: np.ndarray | None = None,
) -> bool:
    """Rewrite a closed trace with whole chunks only, then rename it into place.

    Args:
        path: the closed trace.
        drop: per group, datasets to leave out (optional columns never filled).
        chunk_rows: rows per chunk of the rewritten growable datasets.
        abort: set to give up (an interrupt during close); the original stays.
        layer_order: a permutation of the layers: /layers rows and the layer axis of
            every [rows, layers] column are rewritten in this order.

    Returns:
        True when the compact copy replaced the original. Any failure (a full disk
        included) keeps the original, which is complete, and removes the copy.
    """
    temp = temp_path(path, "compact")
    try:
        stats = os.statvfs(path.parent)
        if stats.f_bavail * stats.f_frsize < 2 * path.stat().st_size + (8 << 20):
            return False  # no room for a copy: the original is complete, keep it
        with h5py.File(path, "r") as src, h5py.File(temp, "w", libver=LIBVER) as dst:
            for key, value in src.attrs.items():
                dst.attrs[key] = value
            for name, group in src.items():
                out = dst.create_group(name)
                for column, dataset in group.items():
                    if column in drop.get(name, ()):
                        continue
                    perm = None
                    if layer_order is not None and (
                        name == "layers" or (name in _LAYER_TABLES and dataset.ndim == 2)
                    ):
                        perm = layer_order
                    _copy_dataset(dataset, out, column, chunk_rows, abort, perm)
        if abort.is_set():
            temp.unlink(missing_ok=True)
            return False
        os.replace(temp, path)
    except (OSError, RuntimeError, ValueError, KeyError):
        temp.unlink(missing_ok=True)
        return False
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return True


def compact_live(path: Path) -> None:
    """Rewrite a live trace (closed by its writer for the moment) without the space it leaked.

    Every object is copied with HDF5's object copy, which moves the stored chunks as they
    are (no decompression, same chunk shapes, filters and growable shapes), so the writer
    reopens the copy and appends as before. The copy replaces the original by a rename: a
    kill at any moment leaves one complete trace at ``path`` (a stale temporary copy is
    removed by the next writer of the path).

    Raises:
        OSError, RuntimeError, ValueError, KeyError: the copy failed; the original is
            untouched and the temporary copy removed.
    """
    temp = temp_path(path, "compact")
    try:
        # swmr=True also reads a copy of a file still open for writing (as a kill leaves it).
        with (
            h5py.File(path, "r", swmr=True) as src,
            h5py.File(temp, "w", libver=LIBVER) as dst,
        ):
            for key, value in src.attrs.items():
                dst.attrs[key] = value
            for name in src:
                src.copy(src[name], dst, name=name)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def _copy_dataset(
    dataset: h5py.Dataset,
    out: h5py.Group,
    name: str,
    chunk_rows: int,
    abort: threading.Event,
    perm: np.ndarray | None,
) -> None:
    if dataset.chunks is None or dataset.maxshape[0] is not None:
        data = dataset[()]
        out.create_dataset(name, data=data if perm is None else data[perm], dtype=dataset.dtype)
        return
    rows = dataset.shape[0]
    tail = dataset.shape[1:]
    filters = _COMPRESSION if dataset.compression else {}
    if rows == 0 or not all(tail):
        out.create_dataset(
            name,
            shape=dataset.shape,
            maxshape=dataset.maxshape,
            chunks=dataset.chunks,
            dtype=dataset.dtype,
            **filters,
        )
        return
    row_bytes = max(1, int(np.prod(tail, dtype=np.int64))) * dataset.dtype.itemsize
    chunk = max(1, min(chunk_rows, rows, (1 << 20) // row_bytes))
    copy = out.create_dataset(
        name,
        shape=dataset.shape,
        maxshape=(None, *tail),
        chunks=(chunk, *tail),
        dtype=dataset.dtype,
        **filters,
    )
    for start in range(0, rows, _COPY_ROWS):
        if abort.is_set():
            msg = "compaction interrupted"
            raise RuntimeError(msg)
        block = dataset[start : start + _COPY_ROWS]
        copy[start : start + _COPY_ROWS] = block if perm is None else block[:, perm]


def _reason(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text or type(error).__name__
