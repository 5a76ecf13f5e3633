"""Open a trace file so that a corrupt or crafted one fails fast, and refuse objects that
reach outside it.

Three defences, all before any data is read:

* **No endless retries.** In SWMR mode HDF5 retries a metadata read whose checksum fails,
  sleeping between tries with a back-off that doubles up to an hour (100 tries by default), so
  one flipped byte hangs the reader for ever. A closed trace is opened without SWMR (one try);
  a trace a writer holds (live, or killed) is opened in SWMR mode with a few tries only, set
  with ``H5Pset_metadata_read_attempts``, which h5py does not wrap (called through ctypes on
  the library h5py loaded).
* **Nothing outside the file.** External links, soft links, external raw-data storage and
  virtual datasets are refused: the recorder writes none, and each reads another file (a
  crafted trace printed ``/etc/shadow`` as layer names; one on a FIFO hung).
* **Bounded reads.** A dataset may not declare more data than it stores: contiguous data must
  fit in the file, a chunk may hold at most `MAX_CHUNK_BYTES` (the writer's are at most
  1 MiB), and a chunked dataset's rows must lie in allocated chunks (else HDF5 would return
  fill values, and a 63 KB file declaring 10⁹ rows was read into memory).
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import h5py

from samplescope.analysis.errors import TraceFormatError

__all__ = ["MAX_CHUNK_BYTES", "SWMR_READ_ATTEMPTS", "DatasetBounds", "check_objects", "open_swmr"]

logger = logging.getLogger(__name__)

# 24 tries back off 1 ns, 2 ns, ... 8 ms (17 ms in all): short for a corrupt file, yet a
# reader racing the writer's flush still re-reads a torn block for a while before giving up.
SWMR_READ_ATTEMPTS = 24
MAX_CHUNK_BYTES = 16 << 20
_MAX_ROW_BYTES = 1 << 20
_MAX_OBJECTS = 4096
_MAX_DEPTH = 3


def _hdf5_library() -> ctypes.CDLL | None:
    """The libhdf5 that h5py uses (found in this process's memory map), or None."""
    try:
        with open("/proc/self/maps", encoding="utf-8") as fh:
            paths = {
                line.split()[-1]
                for line in fh
                if "libhdf5" in line and "hdf5_hl" not in line and "/" in line
            }
    except OSError:
        return None
    for path in sorted(paths):
        try:
            return ctypes.CDLL(path)
        except OSError:
            continue
    return None


def _bounded_fapl() -> h5py.h5p.PropFAID:
    fapl = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
    fapl.set_fclose_degree(h5py.h5f.CLOSE_STRONG)
    fapl.set_file_locking(False, True)
    lib = _hdf5_library()
    setter = getattr(lib, "H5Pset_metadata_read_attempts", None) if lib else None
    if setter is None:
        logger.warning("cannot bound HDF5's SWMR read retries; a corrupt live trace may hang")
        return fapl
    setter.argtypes = [ctypes.c_int64, ctypes.c_uint]
    setter.restype = ctypes.c_int
    if setter(fapl.id, SWMR_READ_ATTEMPTS) < 0:
        logger.warning("H5Pset_metadata_read_attempts failed; SWMR retries are not bounded")
    return fapl


def open_swmr(path: Path) -> h5py.File:
    """Open `path` read-only in SWMR mode with few metadata read attempts. Raises OSError."""
    flags = h5py.h5f.ACC_RDONLY | h5py.h5f.ACC_SWMR_READ
    fid = h5py.h5f.open(os.fsencode(path), flags, fapl=_bounded_fapl())
    return h5py.File(fid)


@dataclass
class DatasetBounds:
    """What the object walk learnt: rows each chunked dataset declares and really stores."""

    declared_rows: dict[str, int] = field(default_factory=dict)
    stored_rows: dict[str, int] = field(default_factory=dict)

    def check_complete(self, path: Path) -> None:
        """For a closed trace: every declared row must be stored. Raises TraceFormatError."""
        for name, declared in self.declared_rows.items():
            stored = self.stored_rows[name]
            if stored < declared:
                msg = (
                    f"{path}: /{name} declares {declared:,} rows but stores data for "
                    f"{stored:,}; the trace is corrupt"
                )
                raise TraceFormatError(msg)


def check_objects(file: h5py.File, path: Path) -> DatasetBounds:
    """Walk every object of `file`; refuse links, storage or shapes that reach outside it.

    Args:
        file: the open trace.
        path: its path, for messages.

    Raises:
        TraceFormatError: naming the offending object.
    """
    bounds = DatasetBounds()
    size = path.stat().st_size
    count = 0

    def walk(group: h5py.Group, depth: int) -> None:
        nonlocal count
        for name in group:
            count += 1
            where = f"{group.name.rstrip('/')}/{name}"
            if count > _MAX_OBJECTS:
                msg = f"{path} holds more than {_MAX_OBJECTS} objects; it is not a trace"
                raise TraceFormatError(msg)
            link = group.get(name, getlink=True)
            if isinstance(link, h5py.ExternalLink):
                msg = f"{path}: {where} is an external link to {link.filename}; refused"
                raise TraceFormatError(msg)
            if not isinstance(link, h5py.HardLink):
                msg = f"{path}: {where} is a {type(link).__name__}; a trace has hard links only"
                raise TraceFormatError(msg)
            obj = group[name]
            if isinstance(obj, h5py.Group):
                if depth >= _MAX_DEPTH:
                    msg = f"{path}: {where} is nested too deep for a trace"
                    raise TraceFormatError(msg)
                walk(obj, depth + 1)
            elif isinstance(obj, h5py.Dataset):
                rows = _check_dataset(obj, where, path, size)
                if rows is not None:
                    key = where.lstrip("/")
                    bounds.declared_rows[key], bounds.stored_rows[key] = rows

    walk(file, 0)
    return bounds


def _check_dataset(
    dataset: h5py.Dataset, where: str, path: Path, file_size: int
) -> tuple[int, int] | None:
    """Refuse outside storage and impossible sizes; for a chunked dataset return the rows it
    declares and the rows its allocated chunks can hold."""
    plist = dataset.id.get_create_plist()
    layout = plist.get_layout()
    if layout == h5py.h5d.VIRTUAL:
        msg = f"{path}: {where} is a virtual dataset (it reads other files); refused"
        raise TraceFormatError(msg)
    if plist.get_external_count() > 0:
        target = plist.get_external(0)[0].decode("utf-8", "replace")
        msg = f"{path}: {where} keeps its data in an external file ({target}); refused"
        raise TraceFormatError(msg)
    shape = dataset.shape or ()
    itemsize = dataset.dtype.itemsize
    row_bytes = math.prod(shape[1:]) * itemsize
    if row_bytes > _MAX_ROW_BYTES:
        msg = f"{path}: {where} has rows of {row_bytes:,} bytes; a trace's are far smaller"
        raise TraceFormatError(msg)
    declared = math.prod(shape) * itemsize
    if layout != h5py.h5d.CHUNKED:
        if declared > file_size:
            msg = (
                f"{path}: {where} declares {declared:,} bytes of data in a file of "
                f"{file_size:,} bytes; it is corrupt"
            )
            raise TraceFormatError(msg)
        return None
    chunks = dataset.chunks or shape
    chunk_bytes = math.prod(chunks) * itemsize
    if chunk_bytes > max(MAX_CHUNK_BYTES, 64 * row_bytes):
        msg = (
            f"{path}: {where} has chunks of {chunk_bytes:,} bytes; samplescope writes at most "
            f"{MAX_CHUNK_BYTES:,}, so the file is corrupt or crafted"
        )
        raise TraceFormatError(msg)
    if not shape or shape[0] == 0:
        return (0, 0)
    per_row_block = math.prod(math.ceil(s / c) for s, c in zip(shape[1:], chunks[1:], strict=True))
    stored = dataset.id.get_num_chunks() // max(per_row_block, 1) * chunks[0]
    return (shape[0], min(stored, shape[0]))
