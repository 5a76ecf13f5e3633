"""`render_report`: turn a trace into a multi-page PDF (or one PNG per page)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, TypeGuard

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.backends.backend_pdf import PdfPages
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from samplescope._paths import atomic_output, ensure_writable_dir, same_file
from samplescope.analysis import Trace, open_trace
from samplescope.reports import (
    alignment,
    candidates,
    classes,
    correlation,
    curves,
    datamap,
    deciles,
    findings,
    heatmaps,
    labelflags,
    summary,
    valeffect,
)
from samplescope.reports._data import ReportData, ReportPlan, TraceOrPath
from samplescope.reports._section import Section
from samplescope.reports._text import escape_math
from samplescope.reports.errors import ReportError, ReportOutputError, UnknownSectionError

__all__ = ["FORMATS", "SECTIONS", "render_report"]

# The report's sections in page order; `--pages` names them by id.
SECTIONS: tuple[Section, ...] = (
    summary.SECTION,
    findings.SECTION,
    curves.SECTION,
    heatmaps.SECTION,
    deciles.SECTION,
    correlation.SECTION,
    datamap.SECTION,
    candidates.SECTION,
    labelflags.SECTION,
    classes.SECTION,
    alignment.SECTION,
    valeffect.SECTION,
)
FORMATS = ("pdf", "png", "html")


def select_sections(pages: str | Sequence[str] | None) -> list[Section]:
    """The sections named in `pages` (ids, a list or a comma-separated string), in report
    order; all of them for None.

    Raises:
        UnknownSectionError: a name is not a section id.
    """
    if pages is None:
        return list(SECTIONS)
    names = [p.strip() for p in (pages.split(",") if isinstance(pages, str) else pages)]
    names = [n for n in names if n]
    known = {s.id for s in SECTIONS}
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        msg = (
            f"unknown report section {', '.join(map(repr, unknown))}; "
            if unknown
            else "no report section given; "
        )
        msg += f"choose from {', '.join(s.id for s in SECTIONS)}"
        raise UnknownSectionError(msg)
    return [s for s in SECTIONS if s.id in names]


def render_report(
    trace_or_path: TraceOrPath,
    out: str | os.PathLike[str],
    *,
    pages: str | Sequence[str] | None = None,
    title: str | None = None,
    fmt: str = "pdf",
    progress: bool = True,
    overlay: Sequence[Any] = (),
) -> Path:
    """Render the report of a trace.

    Args:
        trace_or_path: an open `samplescope.analysis.Trace`, or what `open_trace` accepts
            (a path, a list of shard paths, a glob).
        out: the PDF to write for ``fmt="pdf"``; for ``fmt="png"`` a directory that gets
            one ``NN-section.png`` per page.
        pages: section ids to include (see `SECTIONS`), a list or "a,b,c"; all by default.
        title: the report's title (default: the trace's file name).
        fmt: ``"pdf"``, ``"png"`` or ``"html"`` (one self-contained interactive file;
            needs plotly, ``pip install 'samplescope[html]'``).
        progress: show a progress bar over the sections.
        overlay: other runs (traces or paths) whose training curves the HTML report
            overlays on this one's, e.g. other seeds.

    Returns:
        The PDF file or the PNG directory.

    Raises:
        UnknownSectionError: `pages` names a section that does not exist.
        ReportOutputError: `out` cannot be written.
        samplescope.analysis.errors.TraceError: the input is not a readable trace.
    """
    if fmt not in FORMATS:
        msg = f"unknown report format {fmt!r}; choose pdf, png or html"
        raise ReportError(msg)
    sections = select_sections(pages)
    out = _check_output(Path(out), fmt)
    owned = not _is_trace(trace_or_path)
    data = _open(trace_or_path)
    try:
        for path in getattr(data.trace, "paths", []):
            if same_file(out, path):
                msg = f"the report's output {out} is the trace it reads; choose another file"
                raise ReportOutputError(msg)
        if fmt == "html":
            return _render_html(data, sections, out, title, overlay)
        return _render(data, sections, out, title, fmt, progress)
    finally:
        if owned:
            data.trace.close()


def _render_html(
    data: ReportData,
    sections: Sequence[Section],
    out: Path,
    title: str | None,
    overlay: Sequence[Any],
) -> Path:
    from samplescope.reports.html import write_html

    chosen, plan = plan_report(data, sections, title)
    data = data.with_plan(plan)
    others = [_open(o) for o in overlay]
    try:
        runs = [(_run_label(data), data)] + [(_run_label(o), o) for o in others]
        return write_html(out, runs, [s.id for s in chosen])
    finally:
        for other, source in zip(others, overlay, strict=True):
            if not _is_trace(source):
                other.trace.close()


def _run_label(data: ReportData) -> str:
    return data.path.name if data.path is not None else "run"


def _render(
    data: ReportData,
    sections: Sequence[Section],
    out: Path,
    title: str | None,
    fmt: str,
    progress: bool,
) -> Path:
    chosen, plan = plan_report(data, sections, title)
    data = data.with_plan(plan)
    figures = _figures(chosen, data, progress)
    if fmt == "pdf":
        return _write_pdf(out, figures, data)
    return _write_png(out, figures)


def plan_report(
    data: ReportData, sections: Sequence[Section], title: str | None
) -> tuple[list[Section], ReportPlan]:
    """The sections this trace supports among `sections`, and the report's plan."""
    reasons = {s.id: s.left_out_because(data) for s in sections}
    chosen = [s for s in sections if reasons[s.id] is None]
    plan = ReportPlan(
        title=title
        or (f"samplescope report: {data.path.name}" if data.path else "samplescope report"),
        included=tuple((s.id, s.title) for s in chosen),
        omitted=tuple((s.id, s.title, reasons[s.id]) for s in sections if s not in chosen),
    )
    return chosen, plan


def open_report_data(trace_or_path: TraceOrPath) -> tuple[ReportData, bool]:
    """`ReportData` of a trace or a path, and whether the caller must close its trace."""
    return _open(trace_or_path), not _is_trace(trace_or_path)


def _is_trace(value: object) -> TypeGuard[Trace]:
    return hasattr(value, "samples") and hasattr(value, "sql")


def _open(trace_or_path: TraceOrPath) -> ReportData:
    if _is_trace(trace_or_path):
        paths = trace_or_path.meta.get("paths") or [None]
        return ReportData(trace_or_path, paths[0])
    trace = open_trace(trace_or_path)
    paths = trace.meta.get("paths") or [None]
    return ReportData(trace, paths[0])


def _check_output(out: Path, fmt: str) -> Path:
    target_dir = out if fmt == "png" else out.parent
    if fmt in ("pdf", "html") and out.is_dir():
        msg = (
            f"{out} is a directory; give the {fmt.upper()} file to write, "
            f"e.g. {out / ('report.' + fmt)}"
        )
        raise ReportOutputError(msg)
    if fmt == "png" and out.exists() and not out.is_dir():
        msg = f"{out} is a file; with --format png give a directory for the page images"
        raise ReportOutputError(msg)
    ensure_writable_dir(target_dir, ReportOutputError)
    return out


def _figures(
    sections: Sequence[Section], data: ReportData, progress: bool
) -> Iterable[tuple[str, Figure]]:
    bar = tqdm(sections, desc="report", unit="section", disable=not progress, leave=False)
    for section in bar:
        bar.set_postfix_str(section.id)
        for figure in section.pages(data):
            yield section.id, figure


def _footer(fig: Figure, title: str, number: int) -> None:
    fig.text(
        0.97,
        0.012,
        f"{title} · page {number}",
        ha="right",
        va="bottom",
        fontsize=7,
        color="0.5",
    )


def _write_pdf(out: Path, figures: Iterable[tuple[str, Figure]], data: ReportData) -> Path:
    meta = {"Title": data.report_title, "Creator": "samplescope"}
    try:
        # Into a temporary file, renamed at the end: a failed or interrupted report leaves
        # no partial PDF, and an older report at `out` stays until the new one is whole.
        with atomic_output(out) as temp, PdfPages(temp, metadata=meta) as pdf:
            for number, (_sid, fig) in enumerate(figures, 1):
                _footer(fig, data.report_title or "", number)
                pdf.savefig(escape_math(fig))
    except PermissionError as exc:
        msg = f"cannot write {out}: {exc.strerror or exc}"
        raise ReportOutputError(msg) from None
    return out


def _write_png(out: Path, figures: Iterable[tuple[str, Figure]], dpi: int = 100) -> Path:
    """One PNG per page. Pages are rendered to temporary files and renamed only once all
    rendered, so a failure leaves the folder as it was; no other file in it is touched."""
    pages: list[tuple[Path, Path]] = []
    try:
        for number, (sid, fig) in enumerate(figures, 1):
            FigureCanvasAgg(fig)
            fd, name = tempfile.mkstemp(prefix=f".{number:02d}-", suffix=".png.part", dir=out)
            os.close(fd)
            pages.append((Path(name), out / f"{number:02d}-{sid}.png"))
            escape_math(fig).savefig(name, dpi=dpi, format="png")
        for temp, target in pages:
            os.chmod(temp, 0o644)
            os.replace(temp, target)
    finally:
        for temp, _ in pages:
            temp.unlink(missing_ok=True)
    return out
