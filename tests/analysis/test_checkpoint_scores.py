"""Checkpoint scores (Data Diet's EL2N and GraNd) from an h5py-written /checkpoints group."""

from __future__ import annotations

import math
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from tracefiles import write_tiny_trace

from samplescope.analysis import open_trace
from samplescope.analysis.errors import QueryError, TraceFormatError
from samplescope.analysis.flags import flag, score_names
from samplescope.cli import main

# Two checkpoints of samples 0-3 (sample 3 only in the first); two layers (enc, head).
CKPT = {
    "checkpoint": [0, 0, 0, 0, 1, 1, 1],
    "step": [2, 2, 2, 2, 4, 4, 4],
    "epoch": [0, 0, 0, 0, 1, 1, 1],
    "sample_id": [0, 1, 2, 3, 0, 1, 2],
    "loss": [0.5, 2.0, 0.1, 1.0, 0.4, 1.5, 0.2],
    "grad_sq": [[1, 3], [9, 7], [0, 4], [2, 2], [3, 1], [16, 0], [5, 4]],
    # Sample 2 has no outputs at checkpoint 1 (target -1): its el2n there is missing.
    "target": [0, 1, 0, 1, 0, 1, -1],
    "pred": [0, 0, 0, 1, 0, 0, -1],
    "p_target": [0.9, 0.2, 0.8, 0.6, 0.85, 0.3, np.nan],
    "margin": [1.0, -1.0, 0.5, 0.2, 1.2, -0.8, np.nan],
    "el2n": [0.1, 1.1, 0.3, 0.5, 0.2, 0.9, np.nan],
}
_FLOATS = ("loss", "grad_sq", "p_target", "margin", "el2n")


def _with_checkpoints(path: Path) -> Path:
    write_tiny_trace(path)
    with h5py.File(path, "a") as f:
        group = f.create_group("checkpoints")
        for name, values in CKPT.items():
            dtype = np.float32 if name in _FLOATS else np.int64
            group.create_dataset(name, data=np.asarray(values, dtype=dtype))
    return path


def test_checkpoint_table_and_sample_scores(tmp_path: Path) -> None:
    with open_trace(_with_checkpoints(tmp_path / "t.h5")) as trace:
        assert "checkpoints" in trace.table_names
        table = trace.checkpoints()
        assert table.height == 7
        assert table["grand"].to_list() == pytest.approx(
            [math.sqrt(sum(g)) for g in CKPT["grad_sq"]]
        )
        assert table["el2n"].null_count() == 1
        assert table["target"][6] is None
        assert trace.query("SELECT count(*) AS n FROM checkpoints WHERE checkpoint = 1")[
            "n"
        ].to_list() == [3]
        samples = trace.samples().sort("sample_id")
        grand = samples["grand_ckpt"].to_list()
        assert grand[0] == pytest.approx((math.sqrt(4) + math.sqrt(4)) / 2)
        assert grand[1] == pytest.approx((math.sqrt(16) + math.sqrt(16)) / 2)
        assert grand[3] == pytest.approx(math.sqrt(4))
        el2n = samples["el2n_ckpt"].to_list()
        assert el2n[0] == pytest.approx(0.15)
        assert el2n[2] == pytest.approx(0.3)  # the missing value at checkpoint 1 is left out
        assert samples["n_checkpoints"].to_list() == [2, 2, 2, 1]
        assert {"el2n_ckpt", "grand_ckpt"} <= set(score_names(trace))
        ranked = flag(trace, kind="redundant", score="grand_ckpt", budget=1)
        assert ranked["sample_id"][0] == 0  # the smallest GraNd is the most redundant


def test_cli_flag_by_checkpoint_el2n(tmp_path: Path) -> None:
    path = _with_checkpoints(tmp_path / "t.h5")
    result = CliRunner().invoke(
        main, ["flag", str(path), "--score", "el2n_ckpt", "--kind", "mislabeled", "--format", "csv"]
    )
    assert result.exit_code == 0, result.output
    first = result.output.splitlines()[1].split(",")
    assert first[0] == "1"  # sample 1 has the largest mean EL2N (1.0)


def test_trace_without_checkpoints(tmp_path: Path) -> None:
    with open_trace(write_tiny_trace(tmp_path / "t.h5")) as trace:
        assert "checkpoints" not in trace.table_names
        assert "el2n_ckpt" not in trace.samples().columns
        assert "el2n_ckpt" not in score_names(trace)
        with pytest.raises(QueryError, match="checkpoints=True"):
            trace.checkpoints()
    result = CliRunner().invoke(main, ["flag", str(tmp_path / "t.h5"), "--score", "el2n_ckpt"])
    assert result.exit_code == 2
    assert "unknown score 'el2n_ckpt'" in result.output


def test_a_checkpoints_group_without_grad_sq_is_corrupt(tmp_path: Path) -> None:
    path = _with_checkpoints(tmp_path / "t.h5")
    with h5py.File(path, "a") as f:
        del f["checkpoints/grad_sq"]
    with open_trace(path) as trace, pytest.raises(TraceFormatError, match="grad_sq"):
        trace.checkpoints()
