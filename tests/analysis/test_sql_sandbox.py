"""SQL over a trace is a query language, not a shell: no files, no network, no settings, and
the trace's views cannot be replaced or dropped."""

from __future__ import annotations

from pathlib import Path

import duckdb
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
