"""The write side of the fault matrix: kills at any moment, a full disk, a read-only place,
Ctrl-C twice. Every outcome is a readable, consistent trace or a one-line error.

Each case runs training in a child process, so a hang, a crash at exit or a traceback is
seen as the user would see it.
"""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

CHILD = Path(__file__).with_name("write_child.py")
_spec = importlib.util.spec_from_file_location("write_child", CHILD)
write_child = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(write_child)
N = write_child.N_SAMPLES


def _child(trace: Path, on_error: str, n_steps: int, batch: int = 64) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(CHILD), str(trace), on_error, str(n_steps), str(batch)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _check_trace(path: Path, batch: int = 64) -> tuple[list[int], list[int]]:
    """The trace opens, and every step holds exactly the visits it trained on."""
    from samplescope.analysis import open_trace

    with h5py.File(path, "r", swmr=True) as f:
        n = min(f[f"steps/{c}"].shape[0] for c in ("step", "visit_start", "batch_size"))
        steps = f["steps/step"][:n]
        starts = f["steps/visit_start"][:n]
        n_visits = min(f[f"visits/{c}"].shape[0] for c in ("step", "sample_id", "grad_sq"))
        ids = f["visits/sample_id"][:n_visits]
        visit_step = f["visits/step"][:n_visits]
        lost = f["status/lost_steps"][:].tolist()
        grad_sq = f["visits/grad_sq"][:n_visits]
    complete = [i for i in range(n) if starts[i] + batch <= n_visits]
    assert complete == list(range(len(complete)))  # only a crash tail may be incomplete
    for i in complete:
        rows = slice(starts[i], starts[i] + batch)
        expected = (np.arange(batch) + steps[i] * batch) % N
        assert (ids[rows] == expected).all()
        assert (visit_step[rows] == steps[i]).all()
        assert (grad_sq[rows] > 0).all()  # never rows that did not reach disk (zeros)
    assert not set(lost) & set(steps[complete].tolist())
    with open_trace(path) as trace:
        assert trace.meta["n_steps"] == len(complete)
    return steps[complete].tolist(), lost


def _leftovers(directory: Path, trace: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(f".{trace.name}"))


@contextlib.contextmanager
def _tmpfs(where: Path, options: str):
    where.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


# (what to wait for, longest random delay after it): before the first flush (right at
# `with`), amid flushes, and around the final close and compaction.
KILLS = [("entered", 0.0), ("flushed 10", 0.4), ("flushed 40", 0.3)]


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(len(KILLS)))
def test_a_kill_at_any_moment_leaves_a_trace_or_nothing_and_never_blocks_a_rerun(tmp_path, seed):
    wait_for, longest = KILLS[seed]
    trace = tmp_path / "t.h5"
    child = _child(trace, "raise", 40)
    seen = next((line for line in child.stdout if line.startswith(wait_for)), None)
    assert seen is not None, child.communicate(timeout=60)[1]
    time.sleep(random.Random(seed).uniform(0.0, longest))
    child.kill()
    child.communicate(timeout=60)
    assert trace.exists()  # complete from `with` on, so it exists at every kill point
    _check_trace(trace)
    with pytest.raises(write_child.TraceWriteError, match="already exists"):
        write_child.train(str(trace), "raise", 1, 64, say=lambda s: None)
    # The dead writer's lock died with it; what it left half-made is cleared by the rerun.
    assert write_child.train(str(trace) + ".2", "raise", 1, 64, say=lambda s: None) == 1
    Recorder = write_child.Recorder
    with Recorder(trace, write_child.nn.Linear(3, 2), overwrite=True):
        pass
    assert _leftovers(tmp_path, trace) == []


@pytest.mark.slow
def test_a_full_disk_stops_training_with_one_line_and_no_crash(tmp_path):
    with _tmpfs(tmp_path / "small", "size=5m") as small:
        trace = small / "t.h5"
        child = _child(trace, "raise", 400, batch=256)
        _, err = child.communicate(timeout=240)
        assert child.returncode == 2, err  # not a crash at exit (-11)
        assert err.strip().splitlines() == [err.strip()]
        assert err.startswith("Error: writing trace")
        assert "No space left on device" in err
        steps, lost = _check_trace(trace, batch=256)
        assert steps
        assert lost
        with h5py.File(trace, "r") as f:
            assert f["status/closed"][0] == 1
        assert _leftovers(small, trace) == []


@pytest.mark.slow
def test_a_full_disk_with_on_error_warn_keeps_every_step_or_lists_it(tmp_path):
    with _tmpfs(tmp_path / "small", "size=5m") as small:
        trace = small / "t.h5"
        with pytest.warns(UserWarning, match="No space left on device"):
            trained = write_child.train(str(trace), "warn", 150, 256, say=lambda s: None)
        assert trained == 150
        steps, lost = _check_trace(trace, batch=256)
        assert steps
        assert lost
        assert sorted(steps + lost) == list(range(150))
        assert _leftovers(small, trace) == []


def test_an_injected_enospc_mid_flush_loses_only_that_flush(tmp_path, monkeypatch):
    from samplescope.recorder import writer

    real, calls = writer._append, [0]

    def failing(dataset, start, values):
        calls[0] += 1
        if calls[0] == 25:  # in the second flush, after some of its columns grew
            raise OSError(errno.ENOSPC, "No space left on device")
        real(dataset, start, values)

    monkeypatch.setattr(writer, "_append", failing)
    trace = tmp_path / "t.h5"
    with pytest.warns(UserWarning, match=r"No space left on device; 10 step\(s\) lost"):
        # Flushes only every 10 steps (flush_seconds=60): the second one holds steps 10-19.
        write_child.train(str(trace), "warn", 60, 64, say=lambda s: None, flush_seconds=60)
    steps, lost = _check_trace(trace)
    assert lost == list(range(10, 20))
    assert sorted(steps + lost) == list(range(60))


def test_a_read_only_place_is_a_one_line_error(tmp_path):
    with _tmpfs(tmp_path / "ro", "ro,size=1m") as ro:
        with pytest.raises(write_child.TraceWriteError) as caught:
            write_child.train(str(ro / "t.h5"), "raise", 5, 64, say=lambda s: None)
        text = str(caught.value)
        assert text.splitlines() == [text]
        assert text.startswith("cannot create trace")
        assert "Read-only file system" in text
        assert list(ro.iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize("gap", [0.0, 0.2])
def test_ctrl_c_twice_ends_promptly_with_a_readable_trace(tmp_path, gap):
    trace = tmp_path / "t.h5"
    child = _child(trace, "raise", 10**6)
    seen = next((line for line in child.stdout if line.startswith("flushed")), None)
    assert seen is not None, child.communicate(timeout=60)[1]
    child.send_signal(signal.SIGINT)
    time.sleep(gap)
    with contextlib.suppress(ProcessLookupError):
        child.send_signal(signal.SIGINT)
    start = time.monotonic()
    try:
        _, err = child.communicate(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    assert time.monotonic() - start < 30
    # An uncaught KeyboardInterrupt: Python exits by SIGINT; not an abort or a crash.
    assert child.returncode == -signal.SIGINT, err
    assert "KeyboardInterrupt" in err
    _check_trace(trace)
    with h5py.File(trace, "r") as f:
        assert f["status/closed"][0] == 1
    assert not (tmp_path / "t.h5.lock").exists()
    assert _leftovers(tmp_path, trace) == []
