"""Crafted and inconsistent traces: refused before anything outside the file is read, or
anything impossible is allocated; the documented invariants are checked on open."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
from tracefiles import TINY_STEPS, TINY_VISITS, write_tiny_trace, write_trace

from samplescope.analysis import TraceFormatError, open_trace
from samplescope.analysis._hdf5 import _open_h5
from samplescope.analysis._integrity import SWMR_READ_ATTEMPTS, _bounded_fapl, _hdf5_library

SECRET = "root:$6$do-not-print-me:19000:0:99999:7:::"


def _refused(path: Path, *words: str) -> str:
    with pytest.raises(TraceFormatError) as excinfo:
        open_trace(path)
    text = str(excinfo.value)
    assert "\n" not in text
    for word in words:
        assert word in text
    return text


def test_closed_trace_is_opened_without_swmr(tmp_path: Path) -> None:
    # SWMR reads retry a failed checksum with a back-off up to an hour: never for closed files.
    path = write_tiny_trace(tmp_path / "t.h5")
    file = _open_h5(path)
    try:
        assert not file.swmr_mode
    finally:
        file.close()


def test_swmr_read_attempts_are_bounded() -> None:
    lib = _hdf5_library()
    assert lib is not None
    getter = lib.H5Pget_metadata_read_attempts
    getter.argtypes = [ctypes.c_int64, ctypes.POINTER(ctypes.c_uint)]
    value = ctypes.c_uint()
    assert getter(_bounded_fapl().id, ctypes.byref(value)) >= 0
    assert value.value == SWMR_READ_ATTEMPTS < 100


def test_external_storage_is_refused(tmp_path: Path) -> None:
    secret = tmp_path / "shadow"
    secret.write_text(SECRET)
    path = write_tiny_trace(tmp_path / "t.h5")
    with h5py.File(path, "a") as f:
        del f["layers/n_params"]
        f["layers"].create_dataset(
            "n_params", shape=(2,), dtype="int64", external=[(str(secret), 0, 16)]
        )
    text = _refused(path, "/layers/n_params", "external file")
    assert "do-not-print" not in text


@pytest.mark.parametrize("kind", ["external", "soft"])
def test_links_are_refused(tmp_path: Path, kind: str) -> None:
    other = write_tiny_trace(tmp_path / "other.h5")
    path = write_tiny_trace(tmp_path / "t.h5")
    with h5py.File(path, "a") as f:
        del f["evals"]
        f["evals"] = (
            h5py.ExternalLink(str(other), "/evals")
            if kind == "external"
            else h5py.SoftLink("/steps")
        )
    _refused(path, "/evals", "link" if kind == "external" else "SoftLink")


def test_virtual_dataset_is_refused(tmp_path: Path) -> None:
    other = write_tiny_trace(tmp_path / "other.h5")
    path = write_tiny_trace(tmp_path / "t.h5")
    with h5py.File(path, "a") as f:
        del f["visits/loss"]
        layout = h5py.VirtualLayout(shape=(8,), dtype="float32")
        layout[:] = h5py.VirtualSource(str(other), "visits/loss", shape=(8,))
        f["visits"].create_virtual_dataset("loss", layout)
    _refused(path, "/visits/loss", "virtual dataset")


def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "t.h5"
    os.mkfifo(fifo)
    _refused(fifo, "not a regular file")


def _huge_rows(path: Path, *, closed: bool) -> Path:
    write_tiny_trace(path, closed=closed)
    with h5py.File(path, "a") as f:
        loss = f["visits/loss"][:]
        del f["visits/loss"]
        dataset = f["visits"].create_dataset(
            "loss", shape=(10**9,), maxshape=(None,), chunks=(1024,), dtype="float32"
        )
        dataset[: len(loss)] = loss  # one chunk stored, a billion rows declared
    return path


def test_declared_rows_beyond_stored_chunks_are_refused(tmp_path: Path) -> None:
    path = _huge_rows(tmp_path / "t.h5", closed=True)
    assert path.stat().st_size < 100_000
    _refused(path, "/visits/loss", "1,000,000,000 rows", "stores data for 1,024")


def test_declared_rows_of_an_open_trace_are_cut_to_what_is_stored(tmp_path: Path) -> None:
    path = _huge_rows(tmp_path / "t.h5", closed=False)
    with open_trace(path) as trace:
        assert trace.meta["n_visits"] == 8
        assert trace.query("SELECT count(*) AS n FROM visits")["n"][0] == 8


def test_huge_chunk_is_refused(tmp_path: Path) -> None:
    path = write_tiny_trace(tmp_path / "t.h5")
    with h5py.File(path, "a") as f:
        del f["visits/margin"]
        f["visits"].create_dataset(
            "margin", shape=(8,), maxshape=(None,), chunks=(1 << 29,), dtype="float32"
        )
    _refused(path, "/visits/margin", "chunks of 2,147,483,648 bytes")


def test_contiguous_data_larger_than_the_file_is_refused(tmp_path: Path) -> None:
    path = write_tiny_trace(tmp_path / "t.h5")
    with h5py.File(path, "a") as f:
        del f["layers/n_params"]
        f["layers"].create_dataset("n_params", shape=(10**9,), dtype="int64")
    _refused(path, "/layers/n_params", "declares 8,000,000,000 bytes")


# -- documented invariants ------------------------------------------------------------
def test_layer_columns_of_unequal_length(tmp_path: Path) -> None:
    path = write_tiny_trace(tmp_path / "t.h5")
    with h5py.File(path, "a") as f:
        del f["layers/kind"]
        f["layers"].create_dataset(
            "kind", data=np.array(["Linear"], dtype=object), dtype=h5py.string_dtype()
        )
    _refused(path, "/layers", "differ in length", "kind=1", "name=2")


def test_duplicate_sample_info_ids(tmp_path: Path) -> None:
    path = write_tiny_trace(
        tmp_path / "t.h5", sample_info={"sample_id": [0, 1, 1, 3], "flipped": [0, 1, 0, 0]}
    )
    _refused(path, "/sample_info/sample_id", "twice")


def test_corrupt_batch_size_of_a_closed_trace(tmp_path: Path) -> None:
    # The reader used to cut the trace silently at the step whose visits ran past /visits.
    path = write_tiny_trace(tmp_path / "t.h5")
    with h5py.File(path, "a") as f:
        f["steps/batch_size"][1] = 4000
    _refused(path, "steps 1 and 2 claim the same /visits rows")
    with h5py.File(path, "a") as f:
        f["steps/batch_size"][1] = 2
        f["steps/batch_size"][3] = 4000
    _refused(path, "/visits holds 8 rows", "closed")


def test_steps_that_do_not_count_up(tmp_path: Path) -> None:
    steps = dict(TINY_STEPS, step=[0, 1, 1, 3])
    path = write_trace(tmp_path / "t.h5", layers=["a", "b"], steps=steps, visits=TINY_VISITS)
    _refused(path, "/steps/step does not count up")


def test_grad_sq_width_differs_from_the_layers(tmp_path: Path) -> None:
    path = write_trace(
        tmp_path / "t.h5", layers=["a", "b", "c"], steps=TINY_STEPS, visits=TINY_VISITS
    )
    _refused(path, "/visits/grad_sq", "(rows, 3)")


def test_duplicate_layer_names(tmp_path: Path) -> None:
    path = write_trace(tmp_path / "t.h5", layers=["a", "a"], steps=TINY_STEPS, visits=TINY_VISITS)
    _refused(path, "/layers/name", "'a' twice")


def test_unequal_visit_columns_of_a_closed_trace(tmp_path: Path) -> None:
    path = write_tiny_trace(tmp_path / "t.h5")
    with h5py.File(path, "a") as f:
        f["visits/loss"].resize((6,))
    _refused(path, "/visits", "differ in length", "loss=6")


# -- warnings ---------------------------------------------------------------------------
def test_partial_shards_and_incomplete_traces_warn(tmp_path: Path) -> None:
    one = write_tiny_trace(tmp_path / "r1.h5", rank=1, world_size=3, closed=False)
    with open_trace(one) as trace:
        warnings = trace.warnings
        assert trace.meta["warnings"] == warnings
    assert len(warnings) == 2
    assert "rank(s) 0, 2 are missing" in warnings[0]
    assert "incomplete trace" in warnings[1]
    assert "r1.h5 was not closed" in warnings[1]
    whole = write_tiny_trace(tmp_path / "whole.h5")
    with open_trace(whole) as trace:
        assert trace.warnings == []
