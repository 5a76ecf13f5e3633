"""Data parallelism: each rank records its own shard; the analysis layer reads them as one run."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from samplescope import Recorder
from samplescope.analysis import open_trace


def test_two_rank_shards_read_as_one_trace(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    for rank in (0, 1):
        replica = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
        replica.load_state_dict(model.state_dict())
        opt = torch.optim.SGD(replica.parameters(), lr=0.1)
        path = tmp_path / f"run.rank{rank}.h5"
        with Recorder(path, replica, opt, rank=rank, world_size=2, run_id="run-1") as rec:
            for step in range(2):
                ids = torch.arange(8) + 8 * rank + 16 * step  # each rank its half of the data
                logits = replica(x[ids])
                rec.backward(F.cross_entropy(logits, y[ids], reduction="none"), ids, logits, y[ids])
                opt.step()
                opt.zero_grad()
    with open_trace(str(tmp_path / "run.rank*.h5")) as t:
        assert t.meta["n_shards"] == 2
        assert t.meta["n_steps"] == 2
        assert t.meta["n_samples"] == 32
        [(low, high)] = t.sql(
            "SELECT min(importance / grad_sq), max(importance / grad_sq) FROM importance"
        ).fetchall()
    # Mean over the global batch of 2 ranks × 8: importance = (lr / 16)² · grad_sq.
    np.testing.assert_allclose([low, high], [(0.1 / 16) ** 2] * 2, rtol=1e-5)
