"""`samplescope info | sql | samples | compare` through click's CliRunner."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
import polars as pl
import pytest
from click.testing import CliRunner, Result

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "analysis"))
from tracefiles import write_tiny_trace

from samplescope.cli.trace_cmds import register


@click.group()
def cli() -> None:
    """A stand-in for the root `samplescope` group."""


register(cli)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_trace(tmp_path_factory.mktemp("cli") / "tiny.h5")


def _run(*args: str) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args])


def _ok(*args: str) -> str:
    result = _run(*args)
    assert result.exit_code == 0, result.output
    return result.output


def _error_line(*args: str) -> str:
    result = _run(*args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.strip().splitlines() if line]
    assert lines[-1].startswith("Error: ")
    return lines[-1]


def test_sql_csv_exact(tiny: Path) -> None:
    out = _ok(
        "sql",
        tiny,
        "SELECT epoch, sum(importance) AS imp FROM importance GROUP BY 1 ORDER BY 1",
        "--format",
        "csv",
    )
    assert out == "epoch,imp\n0,1.1875\n1,0.5\n"


def test_sql_table_exact(tiny: Path) -> None:
    out = _ok("sql", tiny, "SELECT layer_index, layer, n_params FROM layers ORDER BY 1")
    assert out == (
        "layer_index  layer  n_params\n"
        "-----------  -----  --------\n"
        "          0  enc           4\n"
        "          1  head          2\n"
    )


def test_sql_json_with_param(tiny: Path) -> None:
    out = _ok(
        "sql",
        tiny,
        "SELECT sample_id, final_loss FROM samples WHERE final_loss > ? ORDER BY 1",
        "--param",
        "1",
        "--format",
        "json",
    )
    assert json.loads(out) == [
        {"sample_id": 0, "final_loss": 1.5},
        {"sample_id": 3, "final_loss": 2.5},
    ]


def test_sql_csv_flattens_arrays(tiny: Path) -> None:
    out = _ok(
        "sql",
        tiny,
        "SELECT grad_sq FROM visits WHERE step = 0 ORDER BY sample_id",
        "--format",
        "csv",
    )
    assert out == 'grad_sq\n"4.0,0.0"\n"1.0,1.0"\n'


def test_samples_sort_top(tiny: Path) -> None:
    out = _ok("samples", tiny, "--sort", "importance", "--top", "2", "--format", "csv")
    frame = pl.read_csv(out.encode())
    assert frame["sample_id"].to_list() == [3, 2]
    assert frame["importance"].to_list() == [0.6875, 0.5]


def test_samples_parquet_output(tiny: Path, tmp_path: Path) -> None:
    target = tmp_path / "s.parquet"
    assert _ok("samples", tiny, "--format", "parquet", "--output", target) == ""
    frame = pl.read_parquet(target)
    assert frame.height == 4
    assert "tracin_self" in frame.columns


def test_info(tiny: Path) -> None:
    out = _ok("info", tiny, "--format", "json")
    info = json.loads(out)
    # One object; numbers and JSON attributes as values, not JSON text inside JSON.
    assert info["n_visits"] == 8
    assert info["layer 0"].startswith("enc (")
    assert info["layer 1"].startswith("head (")
    assert info["format_version"] == 1
    assert info["config"] == {"seed": 0}
    assert isinstance(info["options"], dict)
    (line,) = _ok("info", tiny, "--format", "ndjson").splitlines()
    assert json.loads(line) == info
    table = _ok("info", tiny)
    assert 'config           {"seed": 0}' in table or '{"seed": 0}' in table


def test_ndjson_is_one_object_per_row(tiny: Path) -> None:
    lines = _ok("samples", tiny, "--format", "ndjson").splitlines()
    assert len(lines) == 4
    rows = [json.loads(line) for line in lines]
    assert sorted(r["sample_id"] for r in rows) == [0, 1, 2, 3]


def test_tables_and_schema(tiny: Path) -> None:
    frame = pl.read_csv(_ok("tables", tiny, "--format", "csv").encode())
    assert {"layers", "steps", "visits", "importance", "samples"} <= set(frame["table"])
    assert "sample_info" not in set(frame["table"])  # this trace has none
    assert (frame["columns"] > 0).all()
    schema = pl.read_csv(_ok("schema", tiny, "--table", "samples", "--format", "csv").encode())
    assert set(schema["table"]) == {"samples"}
    assert {"sample_id", "importance", "aum"} <= set(schema["column"])
    assert _error_line("schema", tiny, "--table", "nope").startswith(
        "Error: unknown table 'nope'; choose from layers"
    )


def test_samples_name_classes_when_the_trace_has_them(tmp_path: Path) -> None:
    config = json.dumps({"seed": 0, "class_names": ["T-shirt/top", "Trouser"]})
    named = write_tiny_trace(tmp_path / "named.h5", attrs={"config": config})
    frame = pl.read_csv(_ok("samples", named, "--format", "csv").encode())
    assert frame.columns[:3] == ["sample_id", "target", "class"]
    pairs = set(zip(frame["target"], frame["class"], strict=True))
    assert pairs == {(0, "T-shirt/top"), (1, "Trouser")}
    plain = pl.read_csv(
        _ok("samples", write_tiny_trace(tmp_path / "p.h5"), "--format", "csv").encode()
    )
    assert "class" not in plain.columns


def test_compare_refuses_runs_on_different_data(tiny: Path, tmp_path: Path) -> None:
    # Same ids, other labels: what two demo seeds with different splits looked like.
    from tracefiles import TINY_VISITS

    visits = dict(TINY_VISITS, target=[1 - t for t in TINY_VISITS["target"]])
    other = write_tiny_trace(tmp_path / "other.h5")
    swapped = tmp_path / "swapped.h5"
    from tracefiles import TINY_LAYERS, TINY_STEPS, write_trace

    write_trace(swapped, layers=TINY_LAYERS, steps=TINY_STEPS, visits=visits)
    assert _ok("compare", tiny, other, "--format", "csv")
    line = _error_line("compare", tiny, swapped)
    assert "do not share their data: only 0 of 4 samples" in line


def test_compare(tiny: Path) -> None:
    out = _ok("compare", tiny, tiny, "--format", "csv")
    frame = pl.read_csv(out.encode())
    assert frame["spearman"].to_list() == [1.0, 1.0, 1.0]


def test_output_file_for_text_formats(tiny: Path, tmp_path: Path) -> None:
    target = tmp_path / "out.csv"
    assert _ok("sql", tiny, "SELECT 1 AS x", "--format", "csv", "-o", target) == ""
    assert target.read_text() == "x\n1\n"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["info", "{missing}"], "no such trace file"),
        (["info", "{text}"], "not an HDF5 file"),
        (["sql", "{tiny}", "SELEC 1"], "SQL syntax error"),
        (["sql", "{tiny}", "SELECT * FROM nope"], "nope"),
        (["sql", "{tiny}", "SELECT CAST(layer AS INTEGER) FROM layers"], "SQL error"),
        (["samples", "{tiny}", "--sort", "nope"], "no column 'nope'"),
        (["samples", "{newer}"], "version 3"),
        (["compare", "{tiny}"], "at least two"),
        (["sql", "{tiny}", "SELECT 1", "--format", "parquet"], "needs --output"),
    ],
)
def test_bad_input_is_one_line_exit_2(
    tiny: Path, tmp_path: Path, args: list[str], expected: str
) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    newer = write_tiny_trace(tmp_path / "newer.h5", attrs={"format_version": 3})
    paths = {"missing": tmp_path / "missing.h5", "text": text, "tiny": tiny, "newer": newer}
    line = _error_line(*[a.format(**paths) for a in args])
    assert expected in line


def test_help_has_example() -> None:
    for command in ("info", "sql", "samples", "compare"):
        assert "Example: samplescope" in _ok(command, "--help")
