"""The HDF5 side of the bridge: open shard files, validate them, read column slices.

Nothing here builds a whole table. `TraceData` reads one column at a time, over the row
ranges of the steps asked for, so a query that touches one epoch or one column reads only
those chunks. A trace is a snapshot: row counts are fixed when it is opened, cut at the last
step whose visits are all flushed, so every column agrees even while a writer is appending.
"""

from __future__ import annotations

import glob
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pyarrow as pa

from samplescope.analysis._duplicates import padding_duplicates
from samplescope.analysis._integrity import DatasetBounds, check_objects, open_swmr
from samplescope.analysis.errors import TraceError, TraceFormatError

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "VISIT_COLUMNS",
    "Shard",
    "TraceData",
    "resolve_paths",
    "visit_type",
]

logger = logging.getLogger(__name__)

FORMAT = "samplescope-trace"
FORMAT_VERSION = 2
# Format v2: a row whose target is negative had no logits; these columns are missing there.
_OUTPUTS = ("target", "pred", "p_target", "margin", "correct")
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_REQUIRED = {
    "layers": ("name",),
    "steps": ("step", "epoch", "lr", "batch_size", "visit_start"),
    "visits": ("step", "sample_id", "loss", "grad_sq"),
}
_JSON_ATTRS = ("config", "optimizer_hparams", "options")


def resolve_paths(source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Turn a path, a glob string or a list of paths into an existing, sorted list of files."""
    items = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    if not items:
        msg = "no trace files given; pass a path, a list of shard paths or a glob"
        raise TraceError(msg)
    paths: list[Path] = []
    for item in items:
        text = os.fspath(item)
        if any(ch in text for ch in "*?[") and not Path(text).exists():
            matched = sorted(glob.glob(text))
            if not matched:
                msg = f"no trace files match {text!r}"
                raise TraceError(msg)
            paths.extend(Path(m) for m in matched)
        else:
            paths.append(Path(text))
    for path in paths:
        if not path.exists():
            msg = f"no such trace file: {path}"
            raise TraceError(msg)
        if path.is_dir():
            msg = f"{path} is a directory; pass the trace's .h5 file(s) or a glob"
            raise TraceError(msg)
        if not path.is_file():
            # A FIFO or a device would block or never end; a trace is a regular file.
            msg = f"{path} is not a regular file, so not a samplescope trace"
            raise TraceFormatError(msg)
    return paths


def _decode(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return [_decode(v) for v in value.tolist()]
    return value


def _open_h5(path: Path) -> h5py.File:
    """Open for reading: plainly when no writer holds the file, else in SWMR mode.

    A plain read-only open checks the file's stored end against its size and reads each
    metadata block once, so a truncated or corrupt closed trace fails at once. It fails on a
    file a writer holds (its consistency flags are set, live or killed), which is then opened
    in SWMR mode as the spec says, with HDF5's metadata retries bounded (`open_swmr`): HDF5
    skips its truncation check there, hence `_shorter_than_stored_eof`.
    """
    try:
        return h5py.File(path, "r", locking=False)
    except (OSError, RuntimeError) as exc:
        text = str(exc)
        if not h5py.is_hdf5(path):
            with path.open("rb") as fh:
                head = fh.read(8)
            if head != _HDF5_SIGNATURE:
                msg = f"{path} is not an HDF5 file, so not a samplescope trace"
                raise TraceFormatError(msg) from None
        # A writer holds the file: consistency flags set, or lock flags differ. ("sblock"
        # in HDF5's truncation message contains "lock", hence the longer phrases.)
        held = any(
            p in text
            for p in ("already open", "h5clear", "file locking", "unable to lock", "lock file")
        )
        if "truncated file" in text or not held or _shorter_than_stored_eof(path):
            msg = f"{path} is a truncated or corrupt HDF5 file ({_first_line(text)})"
            raise TraceFormatError(msg) from None
    try:
        return open_swmr(path)
    except (OSError, RuntimeError) as exc:
        msg = f"{path} is a truncated or corrupt HDF5 file ({_first_line(str(exc))})"
        raise TraceFormatError(msg) from None


def _shorter_than_stored_eof(path: Path) -> bool:
    """HDF5's own truncation check, for files the probe could not open (SWMR skips it).

    Superblock versions 2 and 3 (libver="latest") hold the end-of-file address after the
    signature, version, two size bytes, flags, base address and extension address.
    """
    with path.open("rb") as fh:
        head = fh.read(48)
    if head[:8] != _HDF5_SIGNATURE or len(head) < 12 or head[8] not in (2, 3):
        return False
    size = head[9]
    offset = 12 + 2 * size
    if size not in (4, 8) or len(head) < offset + size:
        return False
    stored_eof = int.from_bytes(head[offset : offset + size], "little")
    return path.stat().st_size < stored_eof


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else "unreadable"


@dataclass
class Shard:
    """One open trace file: its attributes, and its snapshot of usable steps and visits."""

    path: Path
    file: h5py.File
    attrs: dict[str, Any]
    bounds: DatasetBounds
    closed: bool = False

    @classmethod
    def open(cls, path: Path) -> Shard:
        file = _open_h5(path)
        try:
            # Before any data is read: nothing may point outside the file or declare more
            # than it stores.
            bounds = check_objects(file, path)
            attrs = {key: _decode(file.attrs[key]) for key in file.attrs}
            shard = cls(path=path, file=file, attrs=attrs, bounds=bounds)
            shard._validate()
            shard._check_invariants()
        except TraceError:
            file.close()
            raise
        except (OSError, KeyError, ValueError, RuntimeError, TypeError) as exc:
            file.close()
            msg = f"{path} is a truncated or corrupt trace ({_first_line(str(exc))})"
            raise TraceFormatError(msg) from None
        return shard

    def _validate(self) -> None:
        fmt = self.attrs.get("format")
        if fmt != FORMAT:
            msg = f"{self.path} is an HDF5 file but not a samplescope trace (format={fmt!r})"
            raise TraceFormatError(msg)
        version = self.attrs.get("format_version")
        if not isinstance(version, int):
            msg = f"{self.path} has no integer format_version attribute; it is corrupt"
            raise TraceFormatError(msg)
        if version > FORMAT_VERSION:
            msg = (
                f"{self.path} is trace format version {version}, but this samplescope reads "
                f"versions up to {FORMAT_VERSION}; upgrade samplescope"
            )
            raise TraceFormatError(msg)
        for group, columns in _REQUIRED.items():
            for column in columns:
                if f"{group}/{column}" not in self.file:
                    msg = f"{self.path} is truncated or corrupt: /{group}/{column} is missing"
                    raise TraceFormatError(msg)
        for key in _JSON_ATTRS:
            raw = self.attrs.get(key)
            if isinstance(raw, str):
                try:
                    self.attrs[key] = json.loads(raw) if raw else {}
                except json.JSONDecodeError:
                    logger.warning(
                        "%s: attribute %s is not valid JSON; kept as text", self.path, key
                    )

    def _check_invariants(self) -> None:
        """The documented invariants (docs/trace-format.md) that do not need the visits read."""
        closed = self.read("status", "closed", 0, 1) if self.has("status", "closed") else []
        self.closed = len(closed) == 1 and int(closed[0]) == 1
        if self.closed:
            self.bounds.check_complete(self.path)
        for group in ("layers", "sample_info"):  # written once: always of equal length
            self._equal_lengths(group)
        if self.closed:
            for group in ("steps", "visits", "evals", "thumbnails", "checkpoints", "sample_names"):
                self._equal_lengths(group)
        names = [str(x) for x in self.read("layers", "name")]
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            msg = f"{self.path}: /layers/name lists {dup[0]!r} twice; the trace is corrupt"
            raise TraceFormatError(msg)
        for column in (
            "visits/grad_sq",
            "visits/alignment",
            "steps/grad_sq",
            "checkpoints/grad_sq",
        ):
            if column in self.file:
                shape = self.file[column].shape
                if len(shape) != 2 or shape[1] != len(names):
                    msg = (
                        f"{self.path}: /{column} has shape {shape}, not (rows, {len(names)}) "
                        "for the trace's layers; the trace is corrupt"
                    )
                    raise TraceFormatError(msg)
        if self.has("sample_info", "sample_id"):
            ids = np.asarray(self.read("sample_info", "sample_id"))
            if len(np.unique(ids)) != len(ids):
                msg = f"{self.path}: /sample_info/sample_id lists an id twice; it is corrupt"
                raise TraceFormatError(msg)

    def _equal_lengths(self, group: str) -> None:
        lengths = {name: self._declared(group, name) for name in self.columns(group)}
        if len(set(lengths.values())) > 1:
            detail = ", ".join(f"{k}={v}" for k, v in sorted(lengths.items()))
            msg = f"{self.path}: the columns of /{group} differ in length ({detail}); it is corrupt"
            raise TraceFormatError(msg)

    def _declared(self, group: str, name: str) -> int:
        shape = self.file[f"{group}/{name}"].shape
        return shape[0] if shape else 1

    @property
    def rank(self) -> int:
        return int(self.attrs.get("rank", 0))

    @property
    def world_size(self) -> int:
        return int(self.attrs.get("world_size", 1))

    def has(self, group: str, column: str | None = None) -> bool:
        return (group if column is None else f"{group}/{column}") in self.file

    def columns(self, group: str) -> list[str]:
        if group not in self.file:
            return []
        return [name for name, obj in self.file[group].items() if isinstance(obj, h5py.Dataset)]

    def rows(self, group: str) -> int:
        """Row count of a group: the minimum length of its columns (the last flush may differ)."""
        lengths = [
            min(
                self._declared(group, name), self.bounds.stored_rows.get(f"{group}/{name}", 1 << 62)
            )
            for name in self.columns(group)
        ]
        return min(lengths) if lengths else 0

    def read(self, group: str, column: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Read rows `start:stop` of one dataset; strings come back as Python str."""
        dataset = self.file[f"{group}/{column}"]
        try:
            if h5py.check_string_dtype(dataset.dtype) is not None:
                return np.asarray(dataset.asstr()[start:stop], dtype=object)
            return dataset[start:stop]
        except (OSError, ValueError, RuntimeError) as exc:
            msg = f"{self.path}: cannot read /{group}/{column} ({exc}); the file is corrupt"
            raise TraceFormatError(msg) from None

    def close(self) -> None:
        self.file.close()


@dataclass
class _ShardSteps:
    """The usable steps of one shard, and where their visits lie in its /visits."""

    shard: Shard
    step: np.ndarray
    epoch: np.ndarray
    lr: np.ndarray
    batch_size: np.ndarray
    visit_start: np.ndarray
    n_visits: int

    @property
    def lr_scale(self) -> np.ndarray:
        """lr · s per step: s = 1/(batch_size · world_size) for 'mean', 1 for 'sum'."""
        if self.shard.attrs.get("reduction", "mean") == "sum":
            return self.lr.astype(np.float64)
        size = np.maximum(self.batch_size, 1) * self.shard.world_size
        return self.lr.astype(np.float64) / size

    def visit_lr_scale(self, index: np.ndarray, start: int, stop: int) -> np.ndarray:
        """lr · s per visit of the steps ``index`` (visit rows ``start:stop``).

        Under gradient accumulation the trace stores each visit's own weight
        (`/visits/scale`, e.g. 1/(K·B) for a mean): micro-batches of one optimizer step may
        differ in size, so s is not 1/batch_size there. (The world size still divides it
        for 'mean', as in `lr_scale`.)
        """
        if not self.shard.has("visits", "scale"):
            return np.repeat(self.lr_scale[index], self.batch_size[index])
        lr = np.repeat(self.lr[index].astype(np.float64), self.batch_size[index])
        weight = np.asarray(self.shard.read("visits", "scale", start, stop), dtype=np.float64)
        if self.shard.attrs.get("reduction", "mean") != "sum":
            weight = weight / self.shard.world_size
        return lr * weight

    def ranges(self, mask: np.ndarray | None) -> list[tuple[int, int, np.ndarray]]:
        """Contiguous visit row ranges of the selected steps, with each range's step indices."""
        index = np.arange(len(self.step)) if mask is None else np.flatnonzero(mask)
        if len(index) == 0:
            return []
        starts = self.visit_start[index]
        stops = starts + self.batch_size[index]
        breaks = np.flatnonzero(starts[1:] != stops[:-1]) + 1
        out = []
        for chunk in np.split(np.arange(len(index)), breaks):
            out.append((int(starts[chunk[0]]), int(stops[chunk[-1]]), index[chunk]))
        return out


def _combine_shard_steps(
    merged: dict[str, np.ndarray], where: np.ndarray, order: np.ndarray
) -> dict[str, np.ndarray]:
    """The global batch_size (sum over shards), loss_mean (weighted by batch size) and
    n_nonfinite (sum) of every step, in the order of ``order`` (first appearance)."""
    n = int(where.max()) + 1 if where.size else 0
    out: dict[str, np.ndarray] = {}
    if "batch_size" in merged:
        size = np.bincount(where, weights=merged["batch_size"], minlength=n)
        out["batch_size"] = size[order].astype(np.int64)
        if "loss_mean" in merged:
            loss = np.bincount(
                where, weights=merged["loss_mean"] * merged["batch_size"], minlength=n
            )
            with np.errstate(invalid="ignore", divide="ignore"):
                out["loss_mean"] = (loss / size)[order]
    if "n_nonfinite" in merged:
        counts = np.bincount(where, weights=merged["n_nonfinite"], minlength=n)
        out["n_nonfinite"] = counts[order].astype(np.int64)
    return out


def _read_steps(shard: Shard) -> _ShardSteps:
    n = shard.rows("steps")
    cols = {
        c: shard.read("steps", c, 0, n)
        for c in ("step", "epoch", "lr", "batch_size", "visit_start")
    }
    n_visit_rows = shard.rows("visits")
    _check_steps(shard, cols, n_visit_rows)
    ends = cols["visit_start"] + cols["batch_size"]
    # Keep the steps whose visits are all flushed: a coherent snapshot of a live trace.
    keep = int(np.searchsorted(np.maximum.accumulate(ends) > n_visit_rows, True))
    cols = {k: np.asarray(v[:keep]) for k, v in cols.items()}
    n_visits = int(cols["visit_start"][-1] + cols["batch_size"][-1]) if keep else 0
    return _ShardSteps(shard=shard, n_visits=n_visits, **cols)


def _check_steps(shard: Shard, cols: dict[str, np.ndarray], n_visit_rows: int) -> None:
    """Steps count up, and each step's visits are its own rows of /visits, in order."""
    step, start, size = cols["step"], cols["visit_start"], cols["batch_size"]
    problem = ""
    if len(step) and (np.any(step < 0) or np.any(np.diff(step) <= 0)):
        problem = "/steps/step does not count up"
    elif np.any(size < 0) or np.any(start < 0):
        problem = "/steps has a negative batch_size or visit_start"
    elif len(step) > 1 and np.any(start[1:] < start[:-1] + size[:-1]):
        row = int(np.flatnonzero(start[1:] < start[:-1] + size[:-1])[0])
        problem = f"steps {int(step[row])} and {int(step[row + 1])} claim the same /visits rows"
    elif shard.closed and len(step) and int(start[-1] + size[-1]) > n_visit_rows:
        problem = (
            f"/steps places {int(start[-1] + size[-1]):,} visits but /visits holds "
            f"{n_visit_rows:,} rows, and the trace says it was closed"
        )
    if problem:
        msg = f"{shard.path}: {problem}; the trace is corrupt"
        raise TraceFormatError(msg)


class TraceData:
    """All shards of one run, read column by column as Arrow arrays or chunk by chunk."""

    def __init__(self, paths: list[Path]) -> None:
        self.shards: list[Shard] = []
        try:
            for path in paths:
                self.shards.append(Shard.open(path))
            self._check_shards()
            self.shards.sort(key=lambda s: s.rank)
            self.steps = [_read_steps(s) for s in self.shards]
            self.warnings = self._warnings()
            self.layer_names = [str(x) for x in self.shards[0].read("layers", "name")]
        except BaseException:
            self.close()
            raise
        self._duplicates: dict[Path, np.ndarray] | None = None

    def _check_shards(self) -> None:
        first = self.shards[0]
        for shard in self.shards[1:]:
            if shard.attrs.get("run_id") != first.attrs.get("run_id"):
                msg = (
                    f"{shard.path} and {first.path} are from different runs (run_id "
                    f"{shard.attrs.get('run_id')!r} vs {first.attrs.get('run_id')!r}); "
                    "open shards of one run together and compare runs with compare_traces"
                )
                raise TraceError(msg)
        ranks = [s.rank for s in self.shards]
        if len(set(ranks)) != len(ranks):
            msg = f"two files with the same rank among {[str(s.path) for s in self.shards]}"
            raise TraceError(msg)

    def _warnings(self) -> list[str]:
        """What a reader must know before trusting totals: partial runs, unfinished files."""
        out = []
        world = max(s.world_size for s in self.shards)
        missing = sorted(set(range(world)) - {s.rank for s in self.shards})
        if missing:
            out.append(
                f"partial run: world_size is {world} but rank(s) "
                f"{', '.join(map(str, missing))} are missing; totals cover the given shards only"
            )
        for shard, steps in zip(self.shards, self.steps, strict=True):
            if not shard.closed:
                out.append(
                    f"incomplete trace: {shard.path} was not closed (still being written, or "
                    f"the writer stopped); read up to its last flush, {len(steps.step)} steps"
                )
        return out

    @property
    def n_layers(self) -> int:
        return len(self.layer_names)

    @property
    def n_visits(self) -> int:
        return sum(s.n_visits for s in self.steps)

    def has_visit_column(self, column: str) -> bool:
        return all(s.has("visits", column) for s in self.shards)

    def close(self) -> None:
        for shard in self.shards:
            shard.close()
        self.shards = []

    # -- small tables, read whole --------------------------------------------------------
    def group_table(self, group: str, shard: Shard | None = None) -> dict[str, np.ndarray]:
        """Every column of a small group (layers, evals, sample_info) of one shard."""
        shard = shard or self.shards[0]
        n = shard.rows(group)
        return {c: shard.read(group, c, 0, n) for c in shard.columns(group)}

    def checkpoint_arrays(self) -> dict[str, np.ndarray] | None:
        """Every /checkpoints column, the shards' rows concatenated; None without the group.

        Optional (Recorder ``checkpoints=True``): traces without it read as before.
        """
        shards = [s for s in self.shards if s.has("checkpoints")]
        if not shards:
            return None
        parts = [self.group_table("checkpoints", s) for s in shards]
        for shard, part in zip(shards, parts, strict=True):
            missing = [c for c in _CHECKPOINT_REQUIRED if c not in part]
            if missing:
                msg = (
                    f"{shard.path}: /checkpoints has no {missing[0]!r} column; the trace is corrupt"
                )
                raise TraceFormatError(msg)
        names = [c for c in parts[0] if all(c in p for p in parts)]
        return {c: np.concatenate([np.asarray(p[c]) for p in parts]) for c in names}

    def duplicates(self, steps: _ShardSteps, start: int, stop: int) -> np.ndarray:
        """Which of the shard's visit rows ``start:stop`` repeat a sample that
        DistributedSampler padding visited twice in an epoch (`_duplicates.py`)."""
        if self._duplicates is None:
            self._duplicates = padding_duplicates(self.steps)
        rows = self._duplicates[steps.shard.path]
        flags = np.zeros(stop - start, dtype=bool)
        inside = rows[(rows >= start) & (rows < stop)]
        flags[inside - start] = True
        return flags

    def has_sample_names(self) -> bool:
        """Whether some shard has a non-empty /sample_names (string sample ids)."""
        return any(
            s.has("sample_names", "sample_id")
            and s.has("sample_names", "name")
            and s.rows("sample_names") > 0
            for s in self.shards
        )

    def sample_names(self) -> dict[str, np.ndarray] | None:
        """``sample_id`` -> ``name`` of string sample ids, every shard's rows, each id once.

        Optional (`/sample_names`, empty or absent when the ids were integers): None then.
        The ids are hashes of the names, equal on every rank, so the shards' tables agree.

        Raises:
            TraceFormatError: two rows give one id different names.
        """
        ids, names = [], []
        for shard in self.shards:
            if shard.has("sample_names", "sample_id") and shard.has("sample_names", "name"):
                n = shard.rows("sample_names")
                ids.append(np.asarray(shard.read("sample_names", "sample_id", 0, n), np.int64))
                names.append(np.asarray(shard.read("sample_names", "name", 0, n), dtype=object))
        if not ids or not sum(len(i) for i in ids):
            return None
        all_ids, all_names = np.concatenate(ids), np.concatenate(names)
        unique, first = np.unique(all_ids, return_index=True)
        chosen = all_names[first]
        lookup = dict(zip(unique.tolist(), chosen.tolist(), strict=True))
        clash = next(
            (
                i
                for i, (sid, name) in enumerate(
                    zip(all_ids.tolist(), all_names.tolist(), strict=True)
                )
                if lookup[sid] != name
            ),
            None,
        )
        if clash is not None:
            sid = int(all_ids[clash])
            msg = (
                f"/sample_names gives sample {sid} two names ({lookup[sid]!r} and "
                f"{all_names[clash]!r}); the trace is corrupt"
            )
            raise TraceFormatError(msg)
        return {"sample_id": unique, "name": chosen}

    def step_frame_arrays(self) -> dict[str, np.ndarray]:
        """Every /steps column, one copy of each step (lowest rank first)."""
        parts = []
        for steps in self.steps:
            n = len(steps.step)
            cols = {
                c: np.asarray(steps.shard.read("steps", c, 0, n))
                for c in steps.shard.columns("steps")
            }
            parts.append(cols)
        names = [c for c in parts[0] if all(c in p for p in parts)]
        merged = {c: np.concatenate([p[c] for p in parts]) for c in names}
        _, first, where = np.unique(merged["step"], return_index=True, return_inverse=True)
        order = np.argsort(first)
        out = {c: v[first[order]] for c, v in merged.items()}
        if len(parts) > 1:
            # Each shard holds its rank's batch; the run's step is all of them (grad_sq,
            # the reduced batch gradient, is the same in every shard: one copy stays).
            out.update(_combine_shard_steps(merged, where.reshape(-1), order))
        return out

    # -- visits: one reader, `_read_part`, behind both the Arrow and the numpy forms ------
    def visit_column(self, column: str, masks: list[np.ndarray] | None = None) -> pa.Array:
        """One visits column over the selected steps (per-shard boolean masks, None = all),
        as Arrow with NULLs where a value was not recorded. Nothing is cached here: the one
        holder of loaded columns is the DuckDB session (`_duckdb.Session`)."""
        arrow_type = _VISIT_TYPES[column](self.n_layers)
        arrays = []
        for i, steps in enumerate(self.steps):
            mask = None if masks is None else masks[i]
            for start, stop, index in steps.ranges(mask):
                values, valid = self._read_part(steps, column, start, stop, index)
                arrays.append(_to_arrow(values, valid, arrow_type, self.n_layers))
        if not arrays:
            array = pa.array([], type=arrow_type)
        else:
            array = arrays[0] if len(arrays) == 1 else pa.concat_arrays(arrays)
        return array

    def importance_batches(
        self,
        columns: Sequence[str],
        max_rows: int,
    ) -> Iterator[pa.RecordBatch]:
        """The importance source in row blocks: step, epoch, sample_id, scale_sq = (lr·s)²
        (float64) and one float32 column per layer for grad_sq / alignment (`grad_sq_<l>`).

        Blocks follow /visits row order, shard by shard, so memory stays at one block.
        """
        for steps in self.steps:
            scale = steps.lr_scale
            for start, stop, index in steps.ranges(None):
                sizes = steps.batch_size[index]
                per_step = {
                    "step": steps.step[index],
                    "epoch": steps.epoch[index],
                    "scale_sq": scale[index] * scale[index],
                }
                # Row offset of each step within the range: per-step values are repeated for
                # one block at a time, never for the whole range (3 × 24 MB at 3M visits).
                offsets = np.concatenate([[0], np.cumsum(sizes)])
                if steps.shard.has("visits", "scale"):  # per visit (accumulation)
                    per_step.pop("scale_sq")
                for lo in range(start, stop, max_rows):
                    hi = min(lo + max_rows, stop)
                    first = int(np.searchsorted(offsets, lo - start, side="right")) - 1
                    last = int(np.searchsorted(offsets, hi - start, side="left"))
                    skip = lo - start - int(offsets[first])
                    arrays: dict[str, pa.Array] = {}
                    for column in columns:
                        if column in per_step:
                            values = np.repeat(per_step[column][first:last], sizes[first:last])
                            arrays[column] = pa.array(values[skip : skip + hi - lo])
                        elif column == "scale_sq":
                            rows = index[first:last]
                            lo_row = int(steps.visit_start[rows[0]])
                            hi_row = int(steps.visit_start[rows[-1]] + steps.batch_size[rows[-1]])
                            values = steps.visit_lr_scale(rows, lo_row, hi_row)
                            values = values[lo - lo_row : hi - lo_row]
                            arrays[column] = pa.array(values * values)
                        elif column in ("grad_sq", "alignment"):
                            arrays.update(self._layer_block(steps.shard, column, lo, hi))
                        elif column == "duplicate":
                            arrays[column] = pa.array(self.duplicates(steps, lo, hi))
                        else:
                            arrays[column] = pa.array(steps.shard.read("visits", column, lo, hi))
                    yield pa.RecordBatch.from_pydict(arrays)

    def _layer_block(
        self,
        shard: Shard,
        column: str,
        start: int,
        stop: int,
    ) -> dict[str, pa.Array]:
        if not shard.has("visits", column):
            return {
                f"{column}_{i}": pa.nulls(stop - start, type=pa.float32())
                for i in range(self.n_layers)
            }
        block = np.asarray(shard.read("visits", column, start, stop), dtype=np.float32)
        return {
            f"{column}_{i}": pa.array(np.ascontiguousarray(block[:, i]))
            for i in range(self.n_layers)
        }

    def chunks(self, max_rows: int) -> list[list[np.ndarray]]:
        """Split the trace into chunks of whole steps, in step order: per-shard step masks,
        each chunk at most `max_rows` visits unless one step alone is larger. A chunk ends
        where the (lowest rank's) epoch changes, so most chunks hold one epoch."""
        steps = np.concatenate([s.step for s in self.steps])
        if len(steps) == 0:
            return []
        epochs = np.concatenate([s.epoch for s in self.steps])
        rows = np.concatenate([s.batch_size for s in self.steps])
        unique, first, inverse = np.unique(steps, return_index=True, return_inverse=True)
        epoch = epochs[first]
        step_rows = np.bincount(inverse, weights=rows, minlength=len(unique))
        out: list[list[np.ndarray]] = []
        bounds = np.flatnonzero(np.diff(epoch)) + 1
        for segment in np.split(np.arange(len(unique)), bounds):
            bucket = np.cumsum(step_rows[segment]) // max(max_rows, 1)
            bucket = np.maximum.accumulate(np.r_[0, bucket[:-1]])  # a chunk ends after max_rows
            for part in np.split(segment, np.flatnonzero(np.diff(bucket)) + 1):
                lo, hi = unique[part[0]], unique[part[-1]]
                out.append([(s.step >= lo) & (s.step <= hi) for s in self.steps])
        return out

    def epochs_in_step_order(self) -> bool:
        """Whether every step's epoch agrees across shards and never decreases in step
        order (then each epoch's visits are contiguous in time)."""
        steps = np.concatenate([s.step for s in self.steps])
        epochs = np.concatenate([s.epoch for s in self.steps])
        _, first, inverse = np.unique(steps, return_index=True, return_inverse=True)
        epoch = epochs[first]
        return not (np.any(epochs != epoch[inverse]) or np.any(np.diff(epoch) < 0))

    def read_chunk(
        self,
        masks: list[np.ndarray],
        columns: Sequence[str],
    ) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
        """Numpy columns of the visits of the masked steps, in step order (rank order within a
        step, as `visit_column` sorted by step), typed as `visit_column`'s.

        Each column comes as (values, valid): valid is None when every row holds a value,
        else a boolean mask (a shard without that optional column contributes invalid rows).
        """
        parts: dict[str, list[tuple[np.ndarray, np.ndarray | None]]] = {c: [] for c in columns}
        step_parts: list[np.ndarray] = []
        for i, steps in enumerate(self.steps):
            for start, stop, index in steps.ranges(masks[i]):
                step_parts.append(np.repeat(steps.step[index], steps.batch_size[index]))
                for column in columns:
                    parts[column].append(self._read_part(steps, column, start, stop, index))
        order = None
        if len(step_parts) > 1:
            step = np.concatenate(step_parts)
            if np.any(np.diff(step) < 0):
                order = np.argsort(step, kind="stable")
        out: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
        for column, pieces in parts.items():
            values = (
                np.concatenate([p for p, _ in pieces])
                if pieces
                else np.zeros(0, dtype=_NUMPY_TYPES[column])
            )
            valid = (
                None
                if all(ok is None for _, ok in pieces)
                else np.concatenate(
                    [np.ones(len(p), dtype=bool) if ok is None else ok for p, ok in pieces]
                )
            )
            if order is not None:
                values = values[order]
                valid = None if valid is None else valid[order]
            out[column] = (values, valid)
        return out

    def _read_part(
        self, steps: _ShardSteps, column: str, start: int, stop: int, index: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Rows `start:stop` of one visits column of one shard: (values, valid or None).

        The one place that knows how a column is stored: per-step columns (epoch, lr_scale)
        repeated over the step's rows, `correct` from pred and target, an optional column
        the shard lacks as all-invalid, and format v2's missing outputs (target < 0)."""
        shard = steps.shard
        n = stop - start
        dtype = _NUMPY_TYPES[column]
        valid: np.ndarray | None = None
        if column == "epoch":
            values = np.repeat(steps.epoch[index], steps.batch_size[index])
        elif column == "lr_scale":  # per visit under gradient accumulation (`/visits/scale`)
            values = steps.visit_lr_scale(index, start, stop)
        elif column == "duplicate":  # computed: DistributedSampler padding repeats
            values = self.duplicates(steps, start, stop)
        elif column == "rank":
            values = np.full(n, shard.rank, dtype=np.int64)
        elif column == "correct":
            if shard.has("visits", "pred") and shard.has("visits", "target"):
                values = shard.read("visits", "pred", start, stop) == shard.read(
                    "visits", "target", start, stop
                )
            else:
                values, valid = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
        elif shard.has("visits", column):
            values = shard.read("visits", column, start, stop)
        else:
            shape = (n, self.n_layers) if column in ("grad_sq", "alignment") else (n,)
            values, valid = np.zeros(shape, dtype=dtype), np.zeros(n, dtype=bool)
        values = np.asarray(values, dtype=dtype)
        missing = _missing_outputs(shard, column, start, stop)
        if missing is not None:
            valid = ~missing if valid is None else valid & ~missing
        return values, valid


def _to_arrow(
    values: np.ndarray, valid: np.ndarray | None, arrow_type: pa.DataType, n_layers: int
) -> pa.Array:
    mask = None if valid is None else ~valid
    if values.ndim == 2:
        flat = pa.array(np.ascontiguousarray(values, dtype=np.float32).reshape(-1))
        array = pa.FixedSizeListArray.from_arrays(flat, n_layers)
        if mask is None:
            return array
        # A list column missing in this shard: NULL rows (`from_arrays` takes no mask).
        return pa.FixedSizeListArray.from_arrays(flat, n_layers, mask=pa.array(mask))
    return pa.array(values, mask=mask, type=arrow_type)


def _missing_outputs(shard: Shard, column: str, start: int, stop: int) -> np.ndarray | None:
    """Rows of an output column that hold the v2 missing value, or None when none do."""
    if column not in _OUTPUTS or not shard.has("visits", "target"):
        return None
    missing = shard.read("visits", "target", start, stop) < 0
    return missing if missing.any() else None


def _scalar(arrow_type: pa.DataType):
    return lambda n_layers: arrow_type


_VISIT_TYPES = {
    "step": _scalar(pa.int64()),
    "sample_id": _scalar(pa.int64()),
    "epoch": _scalar(pa.int64()),
    "rank": _scalar(pa.int64()),
    "loss": _scalar(pa.float32()),
    "target": _scalar(pa.int64()),
    "pred": _scalar(pa.int64()),
    "correct": _scalar(pa.bool_()),
    "p_target": _scalar(pa.float32()),
    "margin": _scalar(pa.float32()),
    "el2n": _scalar(pa.float32()),
    "input_sq": _scalar(pa.float32()),
    "input_grad_sq": _scalar(pa.float32()),
    "lr_scale": _scalar(pa.float64()),
    "duplicate": _scalar(pa.bool_()),  # computed: a DistributedSampler padding repeat
    "micro": _scalar(pa.int64()),  # optional: gradient accumulation
    "scale": _scalar(pa.float64()),  # optional: gradient accumulation
    "grad_sq": lambda n: pa.list_(pa.float32(), n),
    "alignment": lambda n: pa.list_(pa.float32(), n),
}
VISIT_COLUMNS = list(_VISIT_TYPES)


def visit_type(column: str, n_layers: int) -> pa.DataType:
    """The Arrow type of one visits column (per-layer columns are fixed-size lists)."""
    return _VISIT_TYPES[column](n_layers)


# What `_read_part` returns each column as (the Arrow types' numpy equivalents).
_NUMPY_TYPES = {
    **dict.fromkeys(("step", "sample_id", "epoch", "rank", "target", "pred"), np.int64),
    **dict.fromkeys(
        ("loss", "p_target", "margin", "el2n", "input_sq", "input_grad_sq"), np.float32
    ),
    "correct": np.bool_,
    "lr_scale": np.float64,
    "duplicate": np.bool_,
    "micro": np.int64,
    "scale": np.float64,
    "grad_sq": np.float32,
    "alignment": np.float32,
}
_CHECKPOINT_REQUIRED = ("checkpoint", "step", "epoch", "sample_id", "loss", "grad_sq")
