"""DistributedSampler padding visits a sample twice per epoch: flagged, left out of scores.

Two Recorder instances with rank 0 and 1 of world size 2 and one run_id stand in for two
DDP processes (the trace is what matters here: each rank's own file, its own samples).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from samplescope import with_sample_ids
from samplescope.analysis import open_trace
from samplescope.recorder import Recorder

N, EPOCHS = 11, 2  # 11 samples on 2 ranks: the sampler pads one index per epoch


def _record_rank(tmp_path, rank: int, *, shuffle: bool = True, set_epoch: bool = True):
    g = torch.Generator().manual_seed(0)
    data = with_sample_ids(TensorDataset(torch.randn(N, 4, generator=g), torch.arange(N) % 3))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sampler = DistributedSampler(data, num_replicas=2, rank=rank, shuffle=shuffle, seed=1)
    path = tmp_path / f"run.rank{rank}.h5"
    with Recorder(path, model, opt, rank=rank, world_size=2, run_id="ddp") as rec:
        for epoch in range(EPOCHS):
            sampler.set_epoch(epoch)
            if set_epoch:
                rec.set_epoch(epoch)
            for x, y, ids in DataLoader(data, batch_size=2, sampler=sampler):
                logits = model(x)
                rec.backward(F.cross_entropy(logits, y, reduction="none"), ids, logits, y)
                opt.step()
                opt.zero_grad()
    return path


def _padded(epoch: int, shuffle: bool = True) -> int:
    """The index DistributedSampler repeats in ``epoch`` (the first of its list)."""
    if not shuffle:
        return 0
    g = torch.Generator().manual_seed(1 + epoch)
    return int(torch.randperm(N, generator=g)[0])


@pytest.mark.parametrize("shuffle", [True, False])
def test_padding_repeats_are_flagged_and_left_out_of_scores(tmp_path, shuffle):
    paths = [_record_rank(tmp_path, r, shuffle=shuffle) for r in (0, 1)]
    with open_trace(paths) as t:
        visits = t.table("visits").collect()
        assert visits.height == EPOCHS * 12  # 12 visits per epoch for 11 samples
        flagged = visits.filter("duplicate").sort("epoch")
        # One per epoch: the padded index, the last visit of rank 1 (position 11 of 12).
        assert flagged["sample_id"].to_list() == [_padded(e, shuffle) for e in range(EPOCHS)]
        assert flagged["rank"].to_list() == [1] * EPOCHS
        samples = t.samples().sort("sample_id")
        assert samples["n_visits"].to_list() == [EPOCHS] * N  # once per epoch each
        # The repeat adds nothing: importance is the sum over the other visits only.
        kept = t.query(
            "SELECT sample_id, sum(importance) AS i FROM importance WHERE NOT duplicate "
            "GROUP BY 1 ORDER BY 1"
        )
        np.testing.assert_allclose(samples["importance"], kept["i"], rtol=1e-9)
        every = t.query("SELECT sum(importance) AS i FROM importance")["i"].item()
        assert every > samples["importance"].sum()
        # The in-memory per-visit path (sample_epochs) leaves them out too.
        per_epoch = t.sample_epochs()["importance"].sum()
        assert per_epoch == pytest.approx(samples["importance"].sum(), rel=1e-9)


def test_without_set_epoch_no_visit_is_called_a_duplicate(tmp_path):
    """All epochs read as epoch 0: every rank's last visit repeats, which is not padding."""
    paths = [_record_rank(tmp_path, r, set_epoch=False) for r in (0, 1)]
    with open_trace(paths) as t:
        assert t.query("SELECT count(*) AS n FROM visits WHERE duplicate")["n"].item() == 0
        assert t.samples()["n_visits"].sum() == EPOCHS * 12


def test_one_rank_has_no_duplicates_and_opening_one_shard_warns(tmp_path):
    path = _record_rank(tmp_path, 0)
    with open_trace(path) as t:
        assert any("partial run" in w and "rank(s) 1" in w for w in t.warnings)
        assert t.meta["warnings"] == t.warnings
        assert t.query("SELECT count(*) AS n FROM visits WHERE duplicate")["n"].item() == 0
