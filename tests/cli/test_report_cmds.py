"""`samplescope report` and `samplescope demo` through click's CliRunner: outputs, and one-line
errors with exit status 2 for user mistakes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from pypdf import PdfReader

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "analysis"))
from tracefiles import write_tiny_trace

from samplescope.cli import main


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_trace(tmp_path_factory.mktemp("cli") / "tiny.h5")


def _error_line(result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("Error: ")
    return lines[0]


def test_report_pdf_subset(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.pdf"
    result = CliRunner().invoke(
        main,
        ["report", str(tiny), "-o", str(out), "-q", "--pages", "summary,curves", "--title", "Tiny"],
    )
    assert result.exit_code == 0, result.output
    assert result.output == f"Wrote {out}\n"
    reader = PdfReader(out)
    assert len(reader.pages) == 2
    assert "Tiny" in reader.pages[0].extract_text()


def test_report_png(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "pages"
    result = CliRunner().invoke(
        main, ["report", str(tiny), "-o", str(out), "-q", "--pages", "summary", "--format", "png"]
    )
    assert result.exit_code == 0, result.output
    assert result.output == f"Wrote 1 page images to {out}/\n"
    assert [p.name for p in out.iterdir()] == ["01-summary.png"]


def test_report_not_a_trace(tmp_path: Path) -> None:
    bogus = tmp_path / "notes.h5"
    bogus.write_text("not hdf5")
    line = _error_line(
        CliRunner().invoke(main, ["report", str(bogus), "-o", str(tmp_path / "r.pdf")])
    )
    assert "not an HDF5 file" in line


def test_report_missing_file(tmp_path: Path) -> None:
    line = _error_line(
        CliRunner().invoke(
            main, ["report", str(tmp_path / "none.h5"), "-o", str(tmp_path / "r.pdf")]
        )
    )
    assert "no such trace file" in line


def test_report_unknown_section(tiny: Path, tmp_path: Path) -> None:
    line = _error_line(
        CliRunner().invoke(
            main, ["report", str(tiny), "-o", str(tmp_path / "r.pdf"), "--pages", "graphs"]
        )
    )
    assert line.startswith("Error: unknown report section 'graphs'; choose from summary,")


def test_report_unwritable_output(tiny: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    line = _error_line(
        CliRunner().invoke(main, ["report", str(tiny), "-o", str(blocker / "r.pdf")])
    )
    assert line.startswith(f"Error: cannot create {blocker}")


def test_demo_refuses_a_file_as_output_folder(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    line = _error_line(CliRunner().invoke(main, ["demo", "--out", str(blocker)]))
    assert "is a file; give a folder" in line
    line = _error_line(
        CliRunner().invoke(main, ["demo", "--out", str(tmp_path / "d"), "--epochs", "0"])
    )
    assert "--epochs must be at least 1" in line


@pytest.mark.parametrize("command", ["report", "demo"])
def test_help_has_an_example(command: str) -> None:
    result = CliRunner().invoke(main, [command, "--help"])
    assert result.exit_code == 0
    assert f"Example: samplescope {command}" in result.output


def test_report_format_follows_the_html_suffix(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.html"
    other = write_tiny_trace(tmp_path / "seed1.h5")
    args = ["report", str(tiny), "-o", str(out), "-q", "--pages", "summary,curves"]
    result = CliRunner().invoke(main, [*args, "--overlay", str(other)])
    assert result.exit_code == 0, result.output
    assert result.output == f"Wrote {out}\n"
    text = out.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    assert "Curves overlay 2 runs: tiny.h5, seed1.h5." in text


def test_overlay_needs_the_html_report(tiny: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main, ["report", str(tiny), "-o", str(tmp_path / "r.pdf"), "--overlay", str(tiny)]
    )
    assert "--overlay needs the HTML report" in _error_line(result)
    assert not (tmp_path / "r.pdf").exists()
