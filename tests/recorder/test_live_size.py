"""A live trace stays near its compact size however often it is flushed (issue 9)."""

from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from samplescope.analysis import open_trace
from samplescope.recorder import Recorder
from samplescope.recorder._tracefile import compact_live


@pytest.mark.slow
def test_frequent_flushes_keep_the_live_file_near_its_compact_size(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 10))
    path, live, reference = tmp_path / "t.h5", tmp_path / "live.h5", tmp_path / "ref.h5"
    steps, batch = 60, 32
    with Recorder(path, model, flush_seconds=3600) as rec:
        for step in range(steps):
            x, y = torch.randn(batch, 16), torch.randint(0, 10, (batch,))
            out = model(x)
            ids = torch.arange(step * batch, (step + 1) * batch)
            rec.backward(F.cross_entropy(out, y, reduction="none"), ids, out, y)
            model.zero_grad()
            rec.flush()  # a flush per step: the worst case for SWMR's leaked chunks
        assert rec._writer.n_live_compactions > 0
        shutil.copy(path, live)  # as a kill would leave it
    shutil.copy(live, reference)
    compact_live(reference)  # the same chunks, none leaked
    assert live.stat().st_size <= 1.3 * reference.stat().st_size
    with h5py.File(live, "r", swmr=True) as f:
        assert f["status/closed"][0] == 0
        assert (f["visits/sample_id"][:] == np.arange(steps * batch)).all()
        assert (f["steps/visit_start"][:] == np.arange(steps) * batch).all()
    with open_trace(live) as trace:
        assert trace.meta["n_steps"] == steps
