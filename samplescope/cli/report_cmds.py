"""`samplescope report`: a thin skin over `samplescope.reports`."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from samplescope.cli.help import ListedOption
from samplescope.cli.output import warn_about

__all__ = ["register"]


def register(group: click.Group) -> None:
    """Add the report command to `group` (the root `samplescope` group)."""
    group.add_command(report)


def _section_ids() -> list[str]:
    from samplescope.reports import SECTIONS

    return [s.id for s in SECTIONS]


@click.command()
@click.argument("trace", nargs=-1, required=True)
@click.option(
    "-o",
    "--output",
    "out",
    required=True,
    type=click.Path(path_type=Path),
    help="File to write: .pdf, or .html for the interactive report (a folder for --format png).",
)
@click.option(
    "--pages",
    cls=ListedOption,
    names=_section_ids,
    default=None,
    help="Comma-separated sections to include (default: all): {names}.",
)
@click.option("--title", default=None, help="Title on the first page.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["pdf", "png", "html"]),
    default=None,
    help="pdf, png (one image per page in a folder) or html; default: from the output's "
    "suffix (.html is html, anything else pdf).",
)
@click.option(
    "--overlay",
    "overlay",
    multiple=True,
    type=click.Path(path_type=Path),
    help="Another run's trace whose curves the HTML report overlays (e.g. another seed); "
    "repeatable.",
)
@click.option(
    "--quiet",
    "-q",
    is_flag=True,
    help="No progress bar (there is none when stderr is not a terminal).",
)
def report(
    trace: tuple[str, ...],
    out: Path,
    pages: str | None,
    title: str | None,
    fmt: str | None,
    overlay: tuple[Path, ...],
    quiet: bool,
) -> None:
    """Render a trace's report: run summary, training curves, importance by difficulty and
    epoch per layer, deciles, correlation with final loss, data map, mislabeled and
    redundant candidates, per-class breakdown.

    TRACE is one .h5 file, several shard files of one run, or a quoted glob.

    \b
    Example: samplescope report run.h5 -o report.pdf --pages summary,heatmaps
             samplescope report seed0.h5 -o report.html --overlay seed1.h5
    """
    from samplescope.analysis import open_trace
    from samplescope.cli.output import CommandError
    from samplescope.reports import render_report
    from samplescope.reports.render import select_sections

    select_sections(pages)  # an unknown section fails before the trace is read
    fmt = fmt or ("html" if out.suffix.lower() in (".html", ".htm") else "pdf")
    if overlay and fmt != "html":
        msg = "--overlay needs the HTML report (-o report.html or --format html)"
        raise CommandError(msg)
    source = trace[0] if len(trace) == 1 else list(trace)
    before = _pages(out) if fmt == "png" else {}
    with open_trace(source) as opened:
        warn_about(opened)
        path = render_report(
            opened,
            out,
            pages=pages,
            title=title,
            fmt=fmt,
            progress=not quiet and sys.stderr.isatty(),
            overlay=overlay,
        )
    if fmt == "png":
        # Other files (an earlier, longer report's pages) may remain: count this run's only,
        # the names whose file was replaced (a new inode) or created.
        count = sum(1 for name, key in _pages(path).items() if before.get(name) != key)
        click.echo(f"Wrote {count} page images to {path}/")
    else:
        click.echo(f"Wrote {path}")


def _pages(folder: Path) -> dict[str, tuple[int, int]]:
    if not folder.is_dir():
        return {}
    return {
        p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.glob("[0-9][0-9]-*.png")
    }
