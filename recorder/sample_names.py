"""String sample ids (Hugging Face dataset keys, file names): stored as integers plus a table.

A sample named by a string gets the integer id `sample_id_of(name)`, a 63-bit hash of its
UTF-8 bytes, and the pair goes to the trace's `/sample_names` table the first time the name
is seen. A hash rather than a counter makes the id the same on every rank and in every run
without any communication, so shards of a run and runs compared with each other join on
`sample_id` as they do for integer ids.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from samplescope.recorder.errors import RecorderError

__all__ = ["SampleNames", "is_names", "map_info_ids", "sample_id_of"]


def sample_id_of(name: str) -> int:
    """The integer id the trace stores for a sample named ``name``.

    The first 8 bytes of BLAKE2b of the name's UTF-8 bytes, little-endian, shifted right by
    one bit so the id is a non-negative int64. Equal on every rank, run and machine.
    """
    digest = hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def is_names(sample_ids: Any) -> bool:
    """Whether ``sample_ids`` are strings (a list/tuple of str, or a numpy str array)."""
    if isinstance(sample_ids, np.ndarray):
        if sample_ids.dtype.kind in "US":
            return True
        return sample_ids.dtype == object and sample_ids.size > 0 and _is_str(sample_ids.flat[0])
    if isinstance(sample_ids, (list, tuple)) and sample_ids:
        return _is_str(sample_ids[0])
    return False


def _is_str(value: object) -> bool:
    return isinstance(value, (str, bytes, np.str_, np.bytes_))


class SampleNames:
    """Names seen so far, their ids, and the rows `/sample_names` does not have yet."""

    def __init__(self) -> None:
        self._names: dict[int, str] = {}
        self._new: list[tuple[int, str]] = []
        self._kind: str | None = None  # "names" or "integers", the first batch's

    def check_kind(self, names: bool) -> None:
        """One kind of id per run: a hash could equal someone's integer id."""
        kind = "names" if names else "integers"
        if self._kind is None:
            self._kind = kind
        elif kind != self._kind:
            msg = (
                f"sample ids were {self._kind} earlier in this run and are {kind} now; "
                "use one kind of sample id for the whole run"
            )
            raise RecorderError(msg)

    def ids(self, names: Sequence[Any] | np.ndarray) -> np.ndarray:
        """The int64 ids of ``names``, registering new ones for `/sample_names`."""
        texts = [_text(v) for v in np.asarray(names, dtype=object).reshape(-1).tolist()]
        ids = np.empty(len(texts), dtype=np.int64)
        for i, text in enumerate(texts):
            sid = sample_id_of(text)
            known = self._names.get(sid)
            if known is None:
                self._names[sid] = text
                self._new.append((sid, text))
            elif known != text:
                msg = f"sample names {known!r} and {text!r} have the same id {sid}; rename one"
                raise RecorderError(msg)
            ids[i] = sid
        return ids

    def name(self, sample_id: int) -> str | None:
        return self._names.get(int(sample_id))

    def take_new(self) -> dict[str, np.ndarray] | None:
        """The `/sample_names` rows of names registered since the last call, if any."""
        if not self._new:
            return None
        rows, self._new = self._new, []
        return {
            "sample_id": np.array([sid for sid, _ in rows], dtype=np.int64),
            "name": np.array([name for _, name in rows], dtype=object),
        }


def _text(value: object) -> str:
    if isinstance(value, (bytes, np.bytes_)):
        return bytes(value).decode("utf-8")
    if not isinstance(value, str):
        msg = f"sample ids mix strings with {type(value).__name__}; pass all strings or no strings"
        raise RecorderError(msg)
    return str(value)


def map_info_ids(
    info: dict[str, np.ndarray] | None, names: SampleNames
) -> dict[str, np.ndarray] | None:
    """`/sample_info` with string sample ids replaced by their integer ids (registered)."""
    if info is None:
        return None
    named = is_names(info["sample_id"])
    names.check_kind(named)
    if not named:
        return info
    return {**info, "sample_id": names.ids(info["sample_id"])}
