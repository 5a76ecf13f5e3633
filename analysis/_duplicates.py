"""Visits that `DistributedSampler` padding repeated, found so per-sample scores skip them.

With ``drop_last=False`` a `DistributedSampler` pads the epoch's index list to a multiple of
the world size by repeating its first indices, so a few samples are visited twice in that
epoch. Each padded index is the **last** one of its rank's list: the last visit of the
rank's last step in the epoch. Accelerate's ``gather_for_metrics`` drops those repeats
from the end of the last batch; here they are flagged (the ``duplicate`` visit column) and
left out of every per-sample score.

A visit is flagged when all of these hold: the trace has more than one rank; it is the last
visit of its shard's last step in its epoch; its sample was visited earlier in the same
epoch (in step order, then rank order, on any rank); and not every rank's last visit is
such a repeat (padding repeats fewer than ``world_size`` indices, so that would be another
pattern, e.g. ``set_epoch`` never called). Repeats anywhere else (sampling with replacement,
oversampling) are real visits and count.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from samplescope.analysis._hdf5 import _ShardSteps

__all__ = ["padding_duplicates"]


def padding_duplicates(shards: list[_ShardSteps]) -> dict[Path, np.ndarray]:
    """Per shard (by path), the sorted /visits rows that are padding repeats."""
    found: dict[Path, list[int]] = {s.shard.path: [] for s in shards}
    if len(shards) < 2 or max(s.shard.world_size for s in shards) < 2:
        return {path: np.zeros(0, dtype=np.int64) for path in found}
    epochs = np.unique(np.concatenate([s.epoch[s.batch_size > 0] for s in shards]))
    for epoch in epochs.tolist():
        for path, row in _epoch_repeats(shards, int(epoch)):
            found[path].append(row)
    return {path: np.asarray(sorted(rows), dtype=np.int64) for path, rows in found.items()}


def _epoch_repeats(shards: list[_ShardSteps], epoch: int) -> list[tuple[Path, int]]:
    ids, keys, candidates = [], [], []
    for rank, steps in enumerate(shards):
        mask = (steps.epoch == epoch) & (steps.batch_size > 0)
        if not mask.any():
            continue
        last = int(np.flatnonzero(mask)[-1])
        candidates.append((rank, int(steps.visit_start[last] + steps.batch_size[last] - 1)))
        for start, stop, index in steps.ranges(mask):
            ids.append(np.asarray(steps.shard.read("visits", "sample_id", start, stop)))
            step = np.repeat(steps.step[index], steps.batch_size[index])
            rows = np.arange(start, stop)
            keys.append(np.stack([step, np.full(len(rows), rank), rows]))
    if len(candidates) < 2:
        return []
    sample = np.concatenate(ids)
    step, rank, row = np.concatenate(keys, axis=1)
    order = np.lexsort((row, rank, step))
    # First visit of each sample in (step, rank, row) order; any later one is a repeat.
    _, first = np.unique(sample[order], return_index=True)
    repeat = np.ones(len(sample), dtype=bool)
    repeat[order[first]] = False
    repeats = [(r, w) for r, w in candidates if repeat[(rank == r) & (row == w)].any()]
    if not repeats or len(repeats) == len(candidates):
        return []
    return [(shards[r].shard.path, w) for r, w in repeats]
