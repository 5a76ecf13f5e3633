"""render_report on a real (short) demo run and on a trace without outputs."""

from __future__ import annotations

from pathlib import Path

import pytest
from pdfcheck import page_texts, pixel_std, rasterise
from pypdf import PdfReader
from reporttraces import write_no_outputs_trace

from samplescope.analysis import open_trace
from samplescope.experiments.demo import DemoResult
from samplescope.reports import (
    SECTIONS,
    ReportOutputError,
    UnknownSectionError,
    render_report,
)

# One worker runs every test here, so the session's short demo trains once under xdist.
pytestmark = pytest.mark.xdist_group("reports-demo")

# Page titles by section, in report order; candidates has a table page, a gallery and
# the top candidates' trajectories.
DEMO_PAGES = [
    ("summary", "samplescope demo"),
    ("findings", "Findings: the paper's claims on this run"),
    ("curves", "Training curves"),
    ("heatmaps", "Importance by sample difficulty and epoch, per layer"),
    ("deciles", "Where and when importance lives, by difficulty decile"),
    ("correlation", "Correlation with final loss"),
    ("datamap", "Data map: confidence and variability across epochs"),
    ("candidates", "Candidates: likely mislabeled and redundant samples"),
    ("candidates", "Candidates: thumbnails of the inputs"),
    ("candidates", "Candidates: trajectories over training"),
    ("classes", "Per-class breakdown of importance and difficulty"),
]


def test_demo_report_has_every_section_with_titles_and_captions(demo: DemoResult) -> None:
    texts = page_texts(demo.report)
    assert len(texts) == len(DEMO_PAGES)
    for text, (_section, title) in zip(texts, DEMO_PAGES, strict=True):
        assert title in text
    summary = texts[0]
    for fact in (
        "Sequential",
        "SGD",
        "lr=0.1",
        "1,437",
        "final test accuracy",
        "trace size",
        "L0",
        "Linear",
        "33,280",
        "In this report",
    ):
        assert fact in summary
    # Only the sections needing optional data the demo does not record are left out.
    left_out = [line for line in summary.split("–") if "left out" in line]
    assert len(left_out) == 3
    assert "[flags]" in summary
    assert "[alignment]" in summary
    assert "[val_effect]" in summary
    assert "SUPPORTED" in texts[1] or "INCONCLUSIVE" in texts[1] or "NOT SUPPORTED" in texts[1]
    assert "Most likely mislabeled" in texts[7]
    assert "difficulty decile" in texts[4]
    # Every page but the summary carries a caption saying what to read from it.
    assert all(len(text) > 300 for text in texts)


def test_demo_report_pages_are_not_blank(demo: DemoResult, tmp_path: Path) -> None:
    pngs = rasterise(demo.report, tmp_path)
    assert len(pngs) == len(DEMO_PAGES)
    for png in pngs:
        assert pixel_std(png) > 0.05, png.name


def test_pages_subset_in_report_order(demo: DemoResult, tmp_path: Path) -> None:
    out = render_report(demo.trace, tmp_path / "two.pdf", pages="heatmaps, summary", progress=False)
    texts = page_texts(out)
    assert len(texts) == 2
    assert "In this report" in texts[0]
    assert "Importance by sample difficulty" in texts[1]


def test_png_format_writes_one_image_per_page(demo: DemoResult, tmp_path: Path) -> None:
    with open_trace(demo.trace) as trace:
        out = render_report(
            trace, tmp_path / "pages", pages=["curves", "candidates"], fmt="png", progress=False
        )
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "01-curves.png",
        "02-candidates.png",
        "03-candidates.png",
        "04-candidates.png",
    ]
    assert all(pixel_std(out / name) > 0.05 for name in names)


def test_trace_without_outputs_omits_sections_and_says_so(
    no_outputs_trace: Path, tmp_path: Path
) -> None:
    out = render_report(no_outputs_trace, tmp_path / "plain.pdf", title="Plain run", progress=False)
    texts = page_texts(out)
    needing = [s for s in SECTIONS if s.needs_outputs or s.missing is not None]
    assert len(texts) == len(SECTIONS) - len(needing)
    summary = texts[0]
    assert "Plain run" in summary
    assert "no logits/targets" in summary
    for section in needing:
        assert f"left out: {section.title} [{section.id}]" in summary
    assert not any("Data map" in text for text in texts[1:])


def test_tiny_trace_with_few_samples_renders(tmp_path: Path) -> None:
    path = write_no_outputs_trace(tmp_path / "small.h5", n_samples=8, epochs=1, batch=4)
    out = render_report(path, tmp_path / "small.pdf", progress=False)
    assert len(PdfReader(out).pages) >= 5


def test_unknown_section_is_refused_before_reading(tmp_path: Path) -> None:
    with pytest.raises(UnknownSectionError, match=r"'nope'.*choose from summary"):
        render_report(tmp_path / "missing.h5", tmp_path / "r.pdf", pages="summary,nope")


def test_output_under_a_file_is_refused(demo: DemoResult, tmp_path: Path) -> None:
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    with pytest.raises(ReportOutputError, match="cannot create"):
        render_report(demo.trace, blocker / "r.pdf", progress=False)
    with pytest.raises(ReportOutputError, match="is a directory"):
        render_report(demo.trace, tmp_path, progress=False)
