"""Backpressure: a writer that falls behind makes training wait; nothing is lost."""

from __future__ import annotations

import time

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from samplescope.recorder import Recorder
from samplescope.recorder import writer as writer_module


def _train(rec: Recorder, model: nn.Module, steps: int, batch: int) -> None:
    g = torch.Generator().manual_seed(0)
    for step in range(steps):
        x = torch.randn(batch, 8, generator=g)
        y = torch.randint(0, 3, (batch,), generator=g)
        out = model(x)
        ids = torch.arange(step * batch, (step + 1) * batch)
        rec.backward(F.cross_entropy(out, y, reduction="none"), ids, out, y)
        model.zero_grad()


def test_a_slow_writer_bounds_the_queue_and_loses_no_rows(tmp_path, monkeypatch):
    real = writer_module._append
    held = {"done": False}
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    path = tmp_path / "t.h5"
    steps, batch = 20, 32

    with Recorder(path, model, flush_seconds=0.01) as rec:
        writer = rec._writer

        def stuck(dataset, start, values):
            # The first flush is a disk that stalls: it returns only once training has
            # found the queue full and waited (whatever the machine's load), plus 0.2 s.
            if not held["done"] and dataset.name == "/visits/sample_id":
                held["done"] = True
                deadline = time.monotonic() + 30
                while not writer._drain_requested and time.monotonic() < deadline:
                    time.sleep(0.01)
                time.sleep(0.2)
            real(dataset, start, values)

        monkeypatch.setattr(writer_module, "_append", stuck)
        # One step's tensors are about 1.2 KB: allow two steps in the queue.
        one_step = batch * (4 + 4 * 2 + 4 + 4 * 3 + 8) + 64
        writer.max_pending_bytes = 2 * one_step
        _train(rec, model, steps, batch)
        assert writer.wait_seconds >= 0.2  # training waited for the writer
        assert writer.max_pending_seen <= writer.max_pending_bytes
    with h5py.File(path, "r") as f:
        assert f["steps/step"][:].tolist() == list(range(steps))
        assert (f["visits/sample_id"][:] == np.arange(steps * batch)).all()
        starts = f["steps/visit_start"][:]
        assert (starts == np.arange(steps) * batch).all()
        assert f["status/lost_steps"].shape == (0,)


def test_without_a_slow_writer_training_never_waits(tmp_path):
    model = nn.Linear(8, 3)
    with Recorder(tmp_path / "t.h5", model, flush_seconds=60) as rec:
        _train(rec, model, 20, 16)
        assert rec._writer.wait_seconds == 0.0
        assert rec._writer.max_pending_seen > 0
