"""Bad input gives a specific exception with a one-line message, never a stray traceback."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
from tracefiles import write_tiny_trace, write_trace

from samplescope.analysis import (
    EmptyTraceError,
    QueryError,
    Trace,
    TraceError,
    TraceFormatError,
    open_trace,
)
from samplescope.errors import SamplescopeError


def _message(excinfo: pytest.ExceptionInfo[BaseException]) -> str:
    text = str(excinfo.value)
    assert "\n" not in text
    assert isinstance(excinfo.value, SamplescopeError)
    return text


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(TraceError) as excinfo:
        open_trace(tmp_path / "nope.h5")
    assert "no such trace file" in _message(excinfo)


def test_glob_without_match(tmp_path: Path) -> None:
    with pytest.raises(TraceError) as excinfo:
        open_trace(str(tmp_path / "run.rank*.h5"))
    assert "no trace files match" in _message(excinfo)


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="is a directory"):
        open_trace(tmp_path)


def test_not_hdf5(tmp_path: Path) -> None:
    path = tmp_path / "notes.h5"
    path.write_text("step,loss\n0,1.0\n")
    with pytest.raises(TraceFormatError) as excinfo:
        open_trace(path)
    assert "not an HDF5 file" in _message(excinfo)


def test_hdf5_but_not_a_trace(tmp_path: Path) -> None:
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as f:
        f["x"] = np.arange(3)
    with pytest.raises(TraceFormatError) as excinfo:
        open_trace(path)
    assert "not a samplescope trace" in _message(excinfo)


def test_newer_format_version(tmp_path: Path) -> None:
    path = write_tiny_trace(tmp_path / "v9.h5", attrs={"format_version": 9})
    with pytest.raises(TraceFormatError) as excinfo:
        open_trace(path)
    message = _message(excinfo)
    assert "version 9" in message
    assert "up to 2" in message


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.9])
def test_truncated_file(tmp_path: Path, keep: float) -> None:
    path = write_tiny_trace(tmp_path / "t.h5")
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(TraceFormatError) as excinfo, open_trace(path) as trace:
        trace.samples()
    assert "truncated or corrupt" in _message(excinfo) or "corrupt" in _message(excinfo)


def test_missing_required_dataset(tmp_path: Path) -> None:
    path = write_tiny_trace(tmp_path / "t.h5")
    with h5py.File(path, "a") as f:
        del f["visits/grad_sq"]
    with pytest.raises(TraceFormatError, match=r"/visits/grad_sq is missing"):
        open_trace(path)


def test_shards_of_different_runs(tmp_path: Path) -> None:
    a = write_tiny_trace(tmp_path / "a.h5", run_id="aaaa")
    b = write_tiny_trace(tmp_path / "b.h5", run_id="bbbb", rank=1, world_size=2)
    with pytest.raises(TraceError, match="different runs"):
        open_trace([a, b])


def test_wrong_source_type() -> None:
    with pytest.raises(TraceError, match="not int"):
        open_trace(3)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("SELEC 1", "syntax error"),
        ("SELECT * FROM nonsense", "nonsense"),
        ("SELECT no_such_column FROM visits", "no_such_column"),
    ],
)
def test_sql_errors(tiny: Trace, query: str, expected: str) -> None:
    with pytest.raises(QueryError) as excinfo:
        tiny.query(query)
    assert expected in _message(excinfo)


def test_execution_error_in_query(tiny: Trace) -> None:
    with pytest.raises(QueryError, match="SQL error"):
        tiny.query("SELECT CAST(layer AS INTEGER) FROM layers")


def test_unknown_table(tiny: Trace) -> None:
    with pytest.raises(QueryError, match="unknown table 'nope'"):
        tiny.table("nope")


def test_sort_by_unknown_column(tiny: Trace) -> None:
    with pytest.raises(QueryError, match="no column 'nope'"):
        tiny.samples(sort="nope")


def _empty(path: Path) -> Path:
    return write_trace(
        path,
        layers=["a"],
        steps={"step": [], "epoch": [], "lr": [], "batch_size": []},
        visits={"step": [], "sample_id": [], "loss": [], "grad_sq": np.zeros((0, 1))},
        closed=False,
    )


def test_empty_trace_opens_but_has_no_statistics(tmp_path: Path) -> None:
    with open_trace(_empty(tmp_path / "empty.h5")) as trace:
        assert trace.meta["n_visits"] == 0
        assert trace.meta["closed"] is False
        assert trace.query("SELECT count(*) AS n FROM importance")["n"].item() == 0
        with pytest.raises(EmptyTraceError, match="no recorded visits"):
            trace.samples()
