"""SQL over a trace is a query language, not a shell: no files, no network, no settings, and
the trace's views cannot be replaced or dropped."""

from __future__ import annotations

from pathlib import Path

import duckdb
import numpy as np
import pytest

from samplescope.analysis import QueryError, Trace


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("SELECT * FROM read_csv('/etc/passwd')", "file system operations are disabled"),
        ("SELECT * FROM read_text('/etc/hostname')", "file system operations are disabled"),
        ("SELECT * FROM glob('/root/**')", "file system operations are disabled"),
        ("SELECT * FROM 'x.parquet'", "file system operations are disabled"),
        ("COPY visits TO '{tmp}/out.csv'", "COPY statements are not allowed"),
        ("ATTACH '{tmp}/side.db'", "ATTACH statements are not allowed"),
        ("EXPORT DATABASE '{tmp}/dump'", "not allowed"),
        ("INSTALL httpfs", "not allowed"),
        ("LOAD httpfs", "not allowed"),
        ("SET enable_external_access = true", "SET statements are not allowed"),
        ("PRAGMA threads = 1", "SET statements are not allowed"),
        ("PRAGMA enable_profiling", "configuration has been locked"),
        ("DROP VIEW importance", "DROP statements are not allowed"),
        ("CREATE OR REPLACE TABLE layers AS SELECT 1 AS x", "CREATE statements are not allowed"),
        ("SELECT 1; DROP VIEW importance", "DROP statements are not allowed"),
        ("INSERT INTO layers VALUES (9, 'x', 'y', 1, 'z')", "INSERT statements are not allowed"),
        ("", "empty SQL query"),
        ("   ;  ", "empty SQL query"),
    ],
)
def test_refused(tiny: Trace, tmp_path: Path, query: str, expected: str) -> None:
    tiny.query("SELECT count(*) FROM importance")  # the views exist before the attempt
    side = tmp_path / "side"
    side.mkdir()
    with pytest.raises(QueryError) as excinfo:
        tiny.query(query.format(tmp=side))
    assert expected in str(excinfo.value)
    assert "\n" not in str(excinfo.value)
    assert list(side.iterdir()) == []  # nothing written
    # The session is intact: the views answer as before.
    assert tiny.query("SELECT count(*) AS n FROM importance")["n"][0] == 16
    assert tiny.query("SELECT count(*) AS n FROM layers")["n"][0] == 2


def test_configuration_is_locked_below_the_statement_check(tiny: Trace) -> None:
    # Even a statement that slipped past the check could not turn file access back on.
    with pytest.raises(duckdb.InvalidInputException, match="locked"):
        tiny._con.execute("SET enable_external_access = true")


def test_settings_stay_off(tiny: Trace) -> None:
    row = tiny.query(
        "SELECT current_setting('enable_external_access') AS ext, "
        "current_setting('lock_configuration') AS locked, "
        "current_setting('autoload_known_extensions') AS autoload"
    ).row(0)
    assert row == (False, True, False)


@pytest.mark.parametrize(
    "query",
    ["DESCRIBE importance", "SUMMARIZE layers", "PRAGMA table_info('layers')", "EXPLAIN SELECT 1"],
)
def test_reading_statements_still_run(tiny: Trace, query: str) -> None:
    assert tiny.query(query).height >= 1


def test_interval_results_are_text(tiny: Trace) -> None:
    frame = tiny.query(
        "SELECT to_timestamp(max(time)) - to_timestamp(min(time)) AS duration FROM steps"
    )
    assert frame["duration"].to_list() == ["00:00:03"]


def _wide_trace(path: Path) -> Path:
    """1M visits × 8 layers: an importance source of ~45 MB, past a 16 MB limit."""
    import numpy as np
    from tracefiles import write_trace

    rng = np.random.default_rng(0)
    n_steps, batch, n_layers = 5000, 200, 8
    step = np.arange(n_steps)
    return write_trace(
        path,
        layers=[f"l{i}" for i in range(n_layers)],
        steps={
            "step": step,
            "epoch": step // 500,
            "lr": np.full(n_steps, 0.1),
            "batch_size": np.full(n_steps, batch),
        },
        visits={
            "step": np.repeat(step, batch),
            "sample_id": np.tile(np.arange(batch * 500), 10),
            "loss": rng.random(n_steps * batch).astype(np.float32),
            "grad_sq": rng.random((n_steps * batch, n_layers)).astype(np.float32),
        },
    )


def test_duckdb_spills_past_its_memory_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from samplescope.analysis import open_trace

    path = _wide_trace(tmp_path / "wide.h5")
    query = (
        "SELECT layer, epoch, sum(importance) AS s, count(*) AS n FROM importance "
        "GROUP BY ALL ORDER BY ALL"
    )
    with open_trace(path) as trace:
        expected = trace.query(query)
    spill = tmp_path / "spill"
    spill.mkdir()
    monkeypatch.setenv("TMPDIR", str(spill))
    monkeypatch.setattr("tempfile.tempdir", None)  # re-read TMPDIR
    monkeypatch.setenv("SAMPLESCOPE_DUCKDB_MEMORY", "16MB")
    with open_trace(path) as trace:
        limit = trace.query("SELECT current_setting('memory_limit') AS m")["m"][0]
        assert limit.endswith("MiB")
        assert float(limit.split()[0]) < 17
        got = trace.query(query)
        # The same rows; sums to DuckDB's summation order (parallel, as without the limit).
        assert got.drop("s").equals(expected.drop("s"))
        assert np.allclose(got["s"].to_numpy(), expected["s"].to_numpy(), rtol=1e-12, atol=0)
        spilled = list(spill.glob("samplescope-duckdb-*/*"))
        assert spilled, "DuckDB kept the importance source in memory past its limit"
    assert not list(spill.iterdir()), "the spill folder outlived the connection"


def test_bad_memory_limit_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tracefiles import write_tiny_trace

    from samplescope.analysis import open_trace

    path = write_tiny_trace(tmp_path / "t.h5")
    monkeypatch.setenv("SAMPLESCOPE_DUCKDB_MEMORY", "plenty")
    with pytest.raises(QueryError, match="SAMPLESCOPE_DUCKDB_MEMORY='plenty'") as caught:
        open_trace(path).query("SELECT 1")
    assert "\n" not in str(caught.value)
