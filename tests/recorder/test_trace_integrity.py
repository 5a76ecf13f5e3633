"""What the writer promises about the trace's rows: one owner of offsets, a fixed layout,
a valid file from the first moment, one writer per path, and inputs checked up front."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from samplescope.analysis import open_trace
from samplescope.recorder import Recorder, RecorderError, TraceWriteError
from samplescope.recorder import writer as writer_module


def _step(rec, model, ids, *, logits=True):
    x = torch.randn(len(ids), 3, generator=torch.Generator().manual_seed(int(ids[0])))
    y = torch.tensor([i % 2 for i in ids])
    out = model(x)
    losses = F.cross_entropy(out, y, reduction="none")
    if logits:
        rec.backward(losses, sample_ids=ids, logits=out, targets=y)
    else:
        rec.backward(losses, sample_ids=ids)
    model.zero_grad()


def _assert_consistent(path):
    """Every /steps row points at exactly its own visits."""
    with h5py.File(path, "r", swmr=True) as f:
        steps = f["steps/step"][:]
        starts = f["steps/visit_start"][:]
        sizes = f["steps/batch_size"][:]
        visit_step = f["visits/step"][:]
        for step, start, size in zip(steps, starts, sizes, strict=True):
            assert (visit_step[start : start + size] == step).all()
        return steps.tolist(), f["status/lost_steps"][:].tolist()


def test_a_failed_flush_loses_only_its_own_steps(tmp_path, monkeypatch):
    real = writer_module._append
    calls = {"flush": 0}

    def flaky(dataset, start, values):
        if calls["flush"] == 2 and dataset.name == "/visits/grad_sq":
            raise OSError(28, "No space left on device")
        real(dataset, start, values)

    model = nn.Linear(3, 2)
    path = tmp_path / "t.h5"
    monkeypatch.setattr(writer_module, "_append", flaky)
    with Recorder(path, model, on_error="warn", flush_seconds=60) as rec:
        for step in range(6):
            _step(rec, model, [10 * step + i for i in range(4)])
            calls["flush"] = step
            if step == 2:
                with pytest.warns(UserWarning, match="1 step.*lost"):
                    rec.flush()
            else:
                rec.flush()
    steps, lost = _assert_consistent(path)
    assert steps == [0, 1, 3, 4, 5]
    assert lost == [2]
    with h5py.File(path, "r") as f:
        ids = f["visits/sample_id"][:]
        starts = f["steps/visit_start"][:]
        assert ids[starts[2] : starts[2] + 4].tolist() == [30, 31, 32, 33]
    with open_trace(path) as trace:
        assert trace.meta["n_steps"] == 5


@pytest.mark.parametrize("first_with_logits", [True, False])
def test_logits_on_some_steps_only_keep_every_visit(tmp_path, first_with_logits):
    model = nn.Linear(3, 2)
    path = tmp_path / "t.h5"
    with Recorder(path, model) as rec:
        for step in range(4):
            with_logits = (step == 0) == first_with_logits
            _step(rec, model, [4 * step + i for i in range(4)], logits=with_logits)
    _assert_consistent(path)
    with h5py.File(path, "r") as f:
        n = f["visits/sample_id"].shape[0]
        assert n == 16
        target = f["visits/target"][:]
        has = (target >= 0).reshape(4, 4).all(1).tolist()
        assert has == [(s == 0) == first_with_logits for s in range(4)]
        assert f["visits/pred"].shape == (16,)
        assert np.isnan(f["visits/p_target"][:][target < 0]).all()
        assert (f["visits/pred"][:][target < 0] == -1).all()
    with open_trace(path) as trace:
        samples = trace.table("visits").select("sample_id", "p_target", "correct").collect()
        assert samples.height == 16
        missing = 12 if first_with_logits else 4
        assert samples["p_target"].null_count() == missing
        assert samples["correct"].null_count() == missing


def test_without_logits_the_closed_trace_has_no_output_columns(tmp_path):
    model = nn.Linear(3, 2)
    with Recorder(tmp_path / "t.h5", model) as rec:
        _step(rec, model, [0, 1], logits=False)
    with h5py.File(tmp_path / "t.h5", "r") as f:
        assert "target" not in f["visits"]
        assert f["visits/sample_id"].shape == (2,)


def test_outputs_option_fixes_the_layout_and_refuses_a_mismatch(tmp_path):
    model = nn.Linear(3, 2)
    with Recorder(tmp_path / "a.h5", model, outputs=True) as rec:
        with pytest.raises(RecorderError, match="outputs=True"):
            _step(rec, model, [0, 1], logits=False)
        assert model.weight.grad is None
    with (
        Recorder(tmp_path / "b.h5", model, outputs=False) as rec,
        pytest.raises(RecorderError, match="outputs=False"),
    ):
        _step(rec, model, [0, 1])
    with pytest.raises(RecorderError, match="outputs must be"):
        Recorder(tmp_path / "c.h5", model, outputs="yes")


def test_the_trace_is_valid_from_enter_on(tmp_path):
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    path = tmp_path / "t.h5"
    read = textwrap.dedent(
        """
        import sys
        from samplescope.analysis import open_trace
        with open_trace(sys.argv[1]) as trace:
            print(trace.meta["n_steps"], trace.meta["closed"], trace.layers().height)
        """
    )
    with Recorder(path, model, config={"a": 1}):
        # Another process reads it before the first step (a writer's own process cannot
        # open its file a second time: HDF5's locks differ).
        out = subprocess.run(
            [sys.executable, "-c", read, str(path)], capture_output=True, text=True, check=True
        )
        assert out.stdout.split() == ["0", "False", "2"]
    assert not (tmp_path / "t.h5.lock").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.h5"]


def test_a_live_writer_is_never_overwritten(tmp_path):
    model = nn.Linear(3, 2)
    path = tmp_path / "t.h5"
    with Recorder(path, model) as rec:
        _step(rec, model, [0, 1])
        rec.flush()
        with pytest.raises(TraceWriteError, match="being written by another process"):
            Recorder(path, nn.Linear(3, 2), overwrite=True).__enter__()
        _step(rec, model, [2, 3])
    steps, _ = _assert_consistent(path)
    assert steps == [0, 1]
    with Recorder(path, model, overwrite=True) as rec:  # once closed, overwrite works
        _step(rec, model, [5, 6])


def test_a_live_writer_in_another_process_is_never_overwritten(tmp_path):
    path = tmp_path / "t.h5"
    child = textwrap.dedent(
        f"""
        import sys, time, torch
        from samplescope import Recorder
        with Recorder({str(path)!r}, torch.nn.Linear(3, 2)):
            print("ready", flush=True)
            sys.stdin.readline()
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", child], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        with pytest.raises(TraceWriteError, match=rf"another process \(pid {proc.pid}\)"):
            Recorder(path, nn.Linear(3, 2), overwrite=True).__enter__()
    finally:
        proc.communicate("\n", timeout=60)
    assert proc.returncode == 0
    with h5py.File(path, "r") as f:
        assert f["status/closed"][0] == 1


@pytest.mark.parametrize(
    ("ids", "message"),
    [
        (torch.tensor([True, False]), "bool"),
        (np.array([True, False]), "bool"),
        (np.array([1, 2**63 + 5], dtype=np.uint64), "does not fit in int64"),
        ([-1, 2], "non-negative"),
    ],
)
def test_ids_that_would_change_meaning_are_refused(tmp_path, ids, message):
    model = nn.Linear(3, 2)
    with Recorder(tmp_path / "t.h5", model) as rec:
        losses = model(torch.randn(2, 3)).sum(1)
        with pytest.raises(RecorderError, match=message):
            rec.backward(losses, sample_ids=ids)
        assert model.weight.grad is None


@pytest.mark.parametrize("bad", [-1, 2])
def test_targets_outside_the_classes_are_refused(tmp_path, bad):
    model = nn.Linear(3, 2)
    with Recorder(tmp_path / "t.h5", model) as rec:
        out = model(torch.randn(2, 3))
        losses = out.sum(1)
        with pytest.raises(RecorderError, match=f"target {bad} is not a class index"):
            rec.backward(losses, sample_ids=[0, 1], logits=out, targets=torch.tensor([0, bad]))
        assert model.weight.grad is None


def test_an_empty_batch_is_refused(tmp_path):
    model = nn.Linear(3, 2)
    with Recorder(tmp_path / "t.h5", model) as rec:
        losses = model(torch.randn(0, 3)).sum(1)
        with pytest.raises(RecorderError, match="empty batch"):
            rec.backward(losses, sample_ids=[])


def test_a_config_that_is_not_json_is_refused_before_any_file(tmp_path):
    with pytest.raises(RecorderError, match="config must be JSON-serialisable"):
        Recorder(tmp_path / "t.h5", nn.Linear(3, 2), config={"f": object()})
    with pytest.raises(RecorderError, match="config must be a mapping"):
        Recorder(tmp_path / "t.h5", nn.Linear(3, 2), config=[1, 2])
    assert list(tmp_path.iterdir()) == []
    with Recorder(tmp_path / "t.h5", nn.Linear(3, 2), config={"nan": math.nan}):
        pass
