"""Hostile or odd inputs to the CLI: one `Error:` line and exit status 2, never a traceback;
outputs written atomically, never over an input or a user's files."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "analysis"))
from tracefiles import TINY_STEPS, TINY_VISITS, write_tiny_trace, write_trace

from samplescope.cli import main


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_trace(tmp_path_factory.mktemp("cli") / "tiny.h5")


def _run(*args: object) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def _error(*args: object) -> str:
    result = _run(*args)
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("Error: ")
    return lines[0]


def test_empty_sql(tiny: Path) -> None:
    assert "empty SQL query" in _error("sql", tiny, "")


@pytest.mark.parametrize("budget", ["nan", "inf", "-inf", "0"])
def test_flag_bad_budget(tiny: Path, budget: str) -> None:
    assert "--budget" in _error("flag", tiny, "--budget", budget)


def test_flag_without_logits_refuses(tmp_path: Path) -> None:
    # It used to flag samples 0, 1, 2 with a null score.
    path = write_tiny_trace(tmp_path / "t.h5", outputs=False)
    line = _error("flag", path)
    assert "'confidence' has no value for any sample" in line
    assert "importance" in line
    result = _run("flag", path, "--score", "importance", "--budget", "2", "--format", "json")
    assert result.exit_code == 0, result.output
    assert sum(r["flagged"] for r in json.loads(result.output)) == 2


def test_interval_result(tiny: Path) -> None:
    result = _run("sql", tiny, "SELECT to_seconds(90) AS d", "--format", "csv")
    assert result.exit_code == 0, result.output
    assert result.output == "d\n00:01:30\n"


NESTED = "SELECT {'a': 1} AS s, map([1], [2]) AS m, '\\x01'::BLOB AS b, [1, 2] AS l"


def test_nested_and_blob_columns_as_csv(tiny: Path) -> None:
    result = _run("sql", tiny, NESTED, "--format", "csv")
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == ["s,m,b,l", '"{""a"": 1}","{""1"": 2}","""01""","1,2"']


def test_nested_and_blob_columns_as_json(tiny: Path) -> None:
    result = _run("sql", tiny, NESTED, "--format", "json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == [{"s": {"a": 1}, "m": {"1": 2}, "b": "01", "l": [1, 2]}]


def test_output_equal_to_the_trace_is_refused(tiny: Path) -> None:
    before = tiny.read_bytes()
    assert "is also the trace" in _error("info", tiny, "-o", tiny)
    assert "is the trace it reads" in _error("report", tiny, "-o", tiny, "-q")
    assert tiny.read_bytes() == before


def test_train_out_equal_to_output_is_refused(tmp_path: Path) -> None:
    trace = tmp_path / "run.h5"
    assert "is also the trace" in _error("train", "--out", trace, "-o", trace)
    assert not trace.exists()


def test_output_written_atomically(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "info.csv"
    out.write_text("old\n")
    result = _run("sql", tiny, "SELECT count(*) AS n FROM visits", "--format", "csv", "-o", out)
    assert result.exit_code == 0, result.output
    assert out.read_text() == "n\n8\n"
    assert [p.name for p in tmp_path.iterdir()] == ["info.csv"]  # no temporary file left


def test_png_report_keeps_other_files(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "pages"
    out.mkdir()
    mine = out / "07-holiday.png"
    mine.write_bytes(b"user's own picture")
    result = _run("report", tiny, "-o", out, "-q", "--pages", "summary", "--format", "png")
    assert result.exit_code == 0, result.output
    assert result.output == f"Wrote 1 page images to {out}/\n"
    assert sorted(p.name for p in out.iterdir()) == ["01-summary.png", "07-holiday.png"]
    assert mine.read_bytes() == b"user's own picture"


def test_failed_report_leaves_no_partial_pdf(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from samplescope.reports import render

    def broken(data: object) -> object:
        msg = "a section failed half-way"
        raise RuntimeError(msg)

    sections = tuple(
        dataclasses.replace(s, pages=broken) if s.id == "curves" else s for s in render.SECTIONS
    )
    monkeypatch.setattr(render, "SECTIONS", sections)
    out = tmp_path / "r.pdf"
    out.write_bytes(b"an older report")
    result = _run("report", tiny, "-o", out, "-q", "--pages", "summary,curves")
    assert isinstance(result.exception, RuntimeError)
    assert out.read_bytes() == b"an older report"
    assert [p.name for p in tmp_path.iterdir()] == ["r.pdf"]


def test_dollars_in_names_are_text(tmp_path: Path) -> None:
    path = write_trace(
        tmp_path / "t.h5",
        layers=["a$b$c", "$\\frac{1}{$"],
        steps=TINY_STEPS,
        visits=TINY_VISITS,
        attrs={
            "config": json.dumps({"note": "$$\\sqrt{", "big": float("inf")}),
            "optimizer_hparams": "not json {",
            "model": "$M$",
        },
    )
    out = tmp_path / "r.pdf"
    result = _run("report", path, "-o", out, "-q", "--pages", "summary,deciles,heatmaps")
    assert result.exit_code == 0, result.output
    from pypdf import PdfReader

    text = "".join(page.extract_text() for page in PdfReader(out).pages)
    assert "a$b$c" in text
    assert "$M$" in text


def test_incomplete_trace_is_marked(tmp_path: Path) -> None:
    path = write_tiny_trace(tmp_path / "t.h5", closed=False)
    result = _run("info", path, "--format", "json")
    assert result.exit_code == 0, result.output
    assert "Warning: incomplete trace" in result.output
    result = _run("samples", path, "--top", "1")
    assert "Warning: incomplete trace" in result.output
