"""/sample_names (string sample ids): read when present, absent in older traces."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
from tracefiles import TINY_LAYERS, TINY_STEPS, TINY_VISITS, write_tiny_trace, write_trace

from samplescope.analysis import TraceFormatError, open_trace

NAMES = {0: "cat.jpg", 1: "dog.jpg", 2: "émeu.jpg", 3: "ox.jpg"}


def _add_names(path: Path, names: dict[int, str]) -> Path:
    with h5py.File(path, "a") as f:
        group = f.create_group("sample_names")
        group["sample_id"] = np.array(list(names), dtype=np.int64)
        group.create_dataset(
            "name", data=np.array(list(names.values()), dtype=object), dtype=h5py.string_dtype()
        )
    return path


def test_traces_without_sample_names_read_as_before(tmp_path):
    with open_trace(write_tiny_trace(tmp_path / "old.h5")) as trace:
        assert "sample_names" not in trace.table_names
        assert trace.samples().columns[:2] == ["sample_id", "target"]


def test_sample_names_become_a_column_and_a_table(tmp_path):
    path = _add_names(write_tiny_trace(tmp_path / "named.h5"), NAMES)
    with open_trace(path) as trace:
        samples = trace.samples().sort("sample_id")
        assert samples["sample_name"].to_list() == list(NAMES.values())
        # The scores themselves do not change.
        with open_trace(write_tiny_trace(tmp_path / "plain.h5")) as plain:
            want = plain.samples().sort("sample_id")
        np.testing.assert_array_equal(samples["importance"], want["importance"])
        got = trace.query("SELECT sample_name FROM sample_names ORDER BY sample_id")
        assert got["sample_name"].to_list() == list(NAMES.values())
        row = trace.query("SELECT sample_id FROM samples WHERE sample_name = ?", ["émeu.jpg"])
        assert row["sample_id"].to_list() == [2]


def _shard(path: Path, rank: int, names: dict[int, str]) -> Path:
    write_trace(
        path,
        layers=TINY_LAYERS,
        steps=TINY_STEPS,
        visits=TINY_VISITS,
        rank=rank,
        world_size=2,
        run_id="named",
    )
    return _add_names(path, names)


def test_shards_share_one_name_per_id(tmp_path):
    first = _shard(tmp_path / "r0.h5", 0, {0: "cat.jpg", 1: "dog.jpg"})
    second = _shard(tmp_path / "r1.h5", 1, {1: "dog.jpg", 2: "émeu.jpg", 3: "ox.jpg"})
    with open_trace([first, second]) as trace:
        names = trace.samples().sort("sample_id")["sample_name"].to_list()
    assert names == list(NAMES.values())


def test_one_id_with_two_names_is_a_corrupt_trace(tmp_path):
    first = _shard(tmp_path / "r0.h5", 0, {0: "cat.jpg"})
    second = _shard(tmp_path / "r1.h5", 1, {0: "lion.jpg"})
    with open_trace([first, second]) as trace, pytest.raises(TraceFormatError, match="two names"):
        trace.samples()
