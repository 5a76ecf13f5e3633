"""Read the trace's optional /thumbnails group for the candidates gallery.

The analysis API has no public accessor for thumbnails yet, so this reads them through the
analysis layer's own shard objects (`Trace._data.shards`, each with `has` and `read`) rather
than opening the HDF5 file a second time, so reports still open no file of their own.
Replace with a public `Trace.thumbnails()` when analysis grows one.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import numpy as np

__all__ = ["has_thumbnails", "read_thumbnails"]

logger = logging.getLogger(__name__)


def _shards(trace: Any) -> list[Any]:
    data = getattr(trace, "_data", None)
    shards = getattr(data, "shards", None)
    if shards is None:
        logger.debug("this Trace exposes no shards; thumbnails unavailable")
        return []
    return [s for s in shards if hasattr(s, "has") and hasattr(s, "read")]


def has_thumbnails(trace: Any) -> bool:
    """Whether any shard of `trace` stored thumbnails."""
    if hasattr(trace, "thumbnails"):
        return True
    return any(s.has("thumbnails", "image") for s in _shards(trace))


def read_thumbnails(trace: Any, sample_ids: Iterable[int]) -> dict[int, np.ndarray]:
    """{sample_id: uint8 [H, W] image} for each of `sample_ids` stored in the trace."""
    wanted = {int(i) for i in sample_ids}
    if hasattr(trace, "thumbnails"):
        return {int(k): np.asarray(v) for k, v in trace.thumbnails(sorted(wanted)).items()}
    found: dict[int, np.ndarray] = {}
    for shard in _shards(trace):
        if not shard.has("thumbnails", "image") or not wanted - found.keys():
            continue
        ids = np.asarray(shard.read("thumbnails", "sample_id"))
        # Read only the rows wanted: a 60k-sample trace holds 60k images.
        rows = np.flatnonzero(np.isin(ids, list(wanted - found.keys())))
        for row in rows:
            found.setdefault(int(ids[row]), shard.read("thumbnails", "image", row, row + 1)[0])
    return found
