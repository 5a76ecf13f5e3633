"""A training process killed with SIGKILL leaves a readable trace with every flushed step."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import h5py
import pytest

CHILD = textwrap.dedent(
    """
    import sys, torch, torch.nn.functional as F
    from torch import nn
    from samplescope import Recorder
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    with Recorder(sys.argv[1], model, opt, flush_seconds=0.05) as rec:
        step = 0
        while True:
            ids = torch.randperm(64)[:16]
            logits = model(x[ids])
            rec.backward(F.cross_entropy(logits, y[ids], reduction="none"), ids, logits, y[ids])
            opt.step(); opt.zero_grad(); step += 1
            if step % 5 == 0:
                rec.flush()
                print("flushed", step, flush=True)
    """
)


def _train_then_kill(path, until, on_flush):
    """Run CHILD, call on_flush(step) after each flush, SIGKILL it once `until` is flushed.

    Returns the last flushed step and the child's exit status.
    """
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path)], stdout=subprocess.PIPE, text=True
    )
    flushed = 0
    try:
        for line in child.stdout:
            flushed = int(line.split()[1])
            on_flush(flushed)
            if flushed >= until:
                break
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    return flushed, child.returncode


@pytest.mark.slow
def test_sigkill_leaves_a_trace_that_opens_and_holds_every_flushed_step(tmp_path):
    path = tmp_path / "killed.h5"
    live_checked = []

    def read_live(flushed):
        if flushed >= 20 and not live_checked:
            # A reader opens the trace while training is still writing it.
            with h5py.File(path, "r", swmr=True) as f:
                assert f["steps/step"].shape[0] >= 20
                assert f["status/closed"][0] == 0
            live_checked.append(flushed)

    flushed, status = _train_then_kill(path, 60, read_live)
    assert live_checked
    assert status == -signal.SIGKILL
    with h5py.File(path, "r", swmr=True) as f:  # no repair tool needed
        n_steps = min(f[f"steps/{c}"].shape[0] for c in ("step", "visit_start", "grad_sq"))
        assert n_steps >= flushed
        assert f["steps/step"][:flushed].tolist() == list(range(flushed))
        assert f["visits/sample_id"].shape[0] >= 16 * flushed
        assert f["visits/grad_sq"][: 16 * flushed].shape == (16 * flushed, 2)
        assert f["status/closed"][0] == 0


@pytest.mark.slow
def test_a_killed_trace_opens_in_the_analysis_layer(tmp_path):
    from samplescope.analysis import open_trace

    path = tmp_path / "killed.h5"
    live_checked = []

    def read_live(flushed):
        if flushed == 10:
            with open_trace(path) as live:  # while the writer still holds the file
                assert live.meta["n_steps"] >= 10
                assert not live.meta["closed"]
            live_checked.append(flushed)

    _train_then_kill(path, 20, read_live)
    assert live_checked
    with open_trace(path) as t:
        assert t.meta["n_steps"] >= 20
        samples = t.samples()
        assert samples.height == 64
        assert samples["importance"].is_not_null().all()
