"""Trace.thumbnails reads the stored images of the samples asked for, and only those."""

from __future__ import annotations

import h5py
import numpy as np
from tracefiles import write_tiny_trace

from samplescope.analysis import open_trace


def test_thumbnails_by_sample_id(tmp_path):
    path = write_tiny_trace(tmp_path / "t.h5")
    images = np.arange(3 * 4 * 4, dtype=np.uint8).reshape(3, 4, 4)
    with h5py.File(path, "a") as f:
        group = f.create_group("thumbnails")
        group.create_dataset("sample_id", data=np.array([5, 1, 2]))
        group.create_dataset("image", data=images)
    with open_trace(path) as t:
        assert t.has_thumbnails
        got = t.thumbnails([1, 5, 99])
    assert sorted(got) == [1, 5]
    np.testing.assert_array_equal(got[5], images[0])
    np.testing.assert_array_equal(got[1], images[1])


def test_no_thumbnails(tmp_path):
    with open_trace(write_tiny_trace(tmp_path / "t.h5")) as t:
        assert not t.has_thumbnails
        assert t.thumbnails([0, 1]) == {}
