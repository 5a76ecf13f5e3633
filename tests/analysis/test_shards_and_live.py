"""Several shards act as one trace; a trace still being written reads what is flushed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from tracefiles import write_tiny_trace, write_trace

from samplescope.analysis import TraceFormatError, open_trace


def _shard(path: Path, rank: int, sample_ids: list[int], grad: list[list[float]]) -> Path:
    return write_trace(
        path,
        layers=["a", "b"],
        rank=rank,
        world_size=2,
        run_id="run1",
        steps={"step": [0, 1], "epoch": [0, 1], "lr": [0.4, 0.4], "batch_size": [2, 2]},
        visits={
            "step": [0, 0, 1, 1],
            "sample_id": sample_ids,
            "loss": [1.0, 2.0, 0.5, 1.5],
            "grad_sq": grad,
        },
    )


def test_shards_concatenate_visits_and_keep_one_copy_of_each_step(tmp_path: Path) -> None:
    r0 = _shard(tmp_path / "run.rank0.h5", 0, [0, 1, 0, 1], [[1, 0]] * 4)
    r1 = _shard(tmp_path / "run.rank1.h5", 1, [2, 3, 2, 3], [[0, 2]] * 4)
    for source in ([r1, r0], str(tmp_path / "run.rank*.h5")):
        with open_trace(source) as trace:
            assert trace.meta["n_shards"] == 2
            assert trace.meta["n_steps"] == 2
            assert trace.meta["n_visits"] == 8
            assert trace.meta["n_samples"] == 4
            assert trace.query("SELECT count(*) AS n FROM steps")["n"].item() == 2
            # s = 1 / (batch_size · world_size) = 1/4, lr·s = 0.1
            samples = trace.samples().sort("sample_id")
            np.testing.assert_allclose(samples["importance"].to_list(), [0.02, 0.02, 0.04, 0.04])
            ranks = trace.query("SELECT DISTINCT rank FROM visits ORDER BY 1")["rank"]
            assert ranks.to_list() == [0, 1]


def test_shards_steps_table_holds_the_global_batch(tmp_path: Path) -> None:
    """Each shard's /steps has its rank's batch; the run's step is the sum of them."""
    paths = []
    for rank, (sizes, losses, bad) in enumerate(
        [([2, 1], [1.0, 3.0], [0, 1]), ([2, 3], [2.0, 1.0], [2, 0])]
    ):
        paths.append(
            write_trace(
                tmp_path / f"run.rank{rank}.h5",
                layers=["a"],
                rank=rank,
                world_size=2,
                run_id="run1",
                steps={
                    "step": [0, 1],
                    "epoch": [0, 0],
                    "lr": [0.1, 0.1],
                    "batch_size": sizes,
                    "loss_mean": losses,
                    "n_nonfinite": bad,
                },
                visits={
                    "step": [0] * sizes[0] + [1] * sizes[1],
                    "sample_id": list(range(10 * rank, 10 * rank + sum(sizes))),
                    "loss": [0.0] * sum(sizes),
                    "grad_sq": [[1.0]] * sum(sizes),
                },
            )
        )
    with open_trace(paths) as trace:
        steps = trace.table("steps").collect().sort("step")
    assert steps["batch_size"].to_list() == [4, 4]
    assert steps["n_nonfinite"].to_list() == [2, 1]
    np.testing.assert_allclose(steps["loss_mean"].to_list(), [1.5, (3.0 + 3 * 1.0) / 4])


def test_sum_reduction_uses_scale_one(tmp_path: Path) -> None:
    with open_trace(write_tiny_trace(tmp_path / "t.h5", reduction="sum")) as trace:
        imp = trace.samples().sort("sample_id")["importance_0"].to_list()
    # s0 enc: lr² · grad_sq = 0.25·4 + 0.0625·0
    assert imp[0] == pytest.approx(1.0)


def test_live_trace_reads_the_steps_whose_visits_are_flushed(tmp_path: Path) -> None:
    path = write_tiny_trace(tmp_path / "live.h5", closed=False)
    with h5py.File(path, "a", libver="latest") as f:
        # The writer flushed the step row of step 3 but only one of its two visits, and
        # one more loss value than grad_sq rows: the row count is the minimum.
        for name in f["visits"]:
            dataset = f[f"visits/{name}"]
            dataset.resize(7, axis=0)
        f["visits/loss"].resize(8, axis=0)
    with open_trace(path) as trace:
        assert trace.meta["closed"] is False
        assert trace.meta["n_steps"] == 3
        assert trace.meta["n_visits"] == 6
        assert trace.query("SELECT count(*) AS n FROM visits")["n"].item() == 6
        assert trace.samples()["n_visits"].sum() == 6


_WRITER = """
import sys, h5py, numpy as np
f = h5py.File(sys.argv[1], "a", libver="latest")
f.swmr_mode = True
for name in f["visits"]:
    f[f"visits/{name}"].resize(6, axis=0)
f.flush()
print("ready", flush=True)
sys.stdin.readline()
f.close()
"""


def test_reading_while_another_process_writes(tmp_path: Path) -> None:
    path = write_tiny_trace(tmp_path / "swmr.h5", closed=False)
    writer = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert writer.stdout is not None
        assert writer.stdout.readline().strip() == "ready"
        with open_trace(path) as trace:
            assert trace.meta["closed"] is False
            assert trace.meta["n_visits"] == 6
            assert trace.samples().height == 4
    finally:
        writer.communicate("done\n", timeout=30)


_CRASH = """
import os, sys, h5py
f = h5py.File(sys.argv[1], "a", libver="latest")
f.swmr_mode = True
f.flush()
os._exit(0)  # like SIGKILL: the file keeps its "open for writing" flags
"""


@pytest.mark.parametrize("truncate", [False, True])
def test_trace_of_a_killed_writer(tmp_path: Path, truncate: bool) -> None:
    path = write_tiny_trace(tmp_path / "killed.h5", closed=False)
    subprocess.run([sys.executable, "-c", _CRASH, str(path)], check=True, timeout=60)
    if not truncate:
        with open_trace(path) as trace:
            assert trace.samples().height == 4
        return
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(TraceFormatError, match="truncated or corrupt"):
        open_trace(path)
