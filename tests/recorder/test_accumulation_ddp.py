"""Gradient accumulation under DDP (2 gloo ranks on loopback): `no_sync` micro-batches.

The trace's accumulated step gradient is read from `.grad` after the step's last
micro-batch, when DDP has all-reduced it: it must equal the one-process gradient of all
K·B·W samples, and importance must use s = 1/(K·B·W).
"""

from __future__ import annotations

import contextlib
import socket
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from samplescope.analysis import open_trace
from samplescope.recorder import Recorder

K, B, W, STEPS = 2, 4, 2, 2


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    n = K * B * W * STEPS
    return torch.randn(n, 5, dtype=torch.float64, generator=g), torch.randint(
        0, 3, (n,), generator=g
    )


def _model() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def _rows(step: int, rank: int, micro: int) -> torch.Tensor:
    """The samples of one micro-batch: step-major, then rank, then micro-batch."""
    first = ((step * W + rank) * K + micro) * B
    return torch.arange(first, first + B)


def _worker(rank: int, port: int, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=W)
    try:
        x, y = _data()
        model = DistributedDataParallel(_model())
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        path = Path(folder) / f"run.rank{rank}.h5"
        with Recorder(
            path, model, opt, rank=rank, world_size=W, run_id="acc", accumulation_steps=K
        ) as rec:
            for step in range(STEPS):
                for micro in range(K):
                    ids = _rows(step, rank, micro)
                    sync = contextlib.nullcontext() if micro == K - 1 else model.no_sync()
                    with sync:
                        logits = model(x[ids])
                        rec.backward(F.cross_entropy(logits, y[ids], reduction="none"), ids)
                opt.step()
                opt.zero_grad()
        torch.save(model.module.state_dict(), Path(folder) / f"params{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_accumulation_matches_one_process_over_every_sample(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=W, join=True)
    # One process, each optimizer step one batch of all K·B·W samples of that step.
    x, y = _data()
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    big = tmp_path / "big.h5"
    with Recorder(big, model, opt) as rec:
        for step in range(STEPS):
            ids = torch.cat([_rows(step, r, m) for r in range(W) for m in range(K)])
            rec.backward(F.cross_entropy(model(x[ids]), y[ids], reduction="none"), ids)
            opt.step()
            opt.zero_grad()
    ddp = torch.load(tmp_path / "params0.pt")
    for name, value in model.state_dict().items():
        torch.testing.assert_close(ddp[name], value, rtol=1e-12, atol=1e-14)
    with h5py.File(tmp_path / "run.rank0.h5", "r") as f, h5py.File(big, "r") as g:
        assert f["steps/batch_size"][:].tolist() == [K * B] * STEPS
        # The all-reduced, accumulated step gradient, not rank 0's local one.
        np.testing.assert_allclose(f["steps/grad_sq"][:], g["steps/grad_sq"][:], rtol=1e-5)
    with open_trace(str(tmp_path / "run.rank*.h5")) as t, open_trace(big) as b:
        assert t.meta["n_steps"] == STEPS
        got, want = t.samples().sort("sample_id"), b.samples().sort("sample_id")
        for column in ("importance", "tracin_self", "grand", "final_loss"):
            np.testing.assert_allclose(got[column], want[column], rtol=1e-5, err_msg=column)
