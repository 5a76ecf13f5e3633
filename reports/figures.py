"""Each report section as matplotlib figures, for notebooks and scripts.

from samplescope.analysis import open_trace
from samplescope.reports.figures import section_figure

trace = open_trace("run.h5")
fig = section_figure(trace, "heatmaps")   # a matplotlib Figure; Jupyter shows it
fig.savefig("heatmaps.png")
"""

from __future__ import annotations

from matplotlib.figure import Figure

from samplescope.reports._data import TraceOrPath
from samplescope.reports.render import open_report_data, plan_report, select_sections

__all__ = ["section_figure", "section_figures"]


def section_figures(trace_or_path: TraceOrPath, section: str) -> list[Figure]:
    """Every page of one report section (an id of `SECTIONS`, e.g. ``"candidates"``).

    Args:
        trace_or_path: an open `Trace`, or what `open_trace` accepts.
        section: the section id.

    Returns:
        The section's pages as matplotlib figures (empty when the trace cannot support
        the section, e.g. ``"datamap"`` without logits/targets).

    Raises:
        UnknownSectionError: `section` is not a section id.
    """
    (chosen,) = select_sections([section])
    data, owned = open_report_data(trace_or_path)
    try:
        sections, plan = plan_report(data, [chosen], None)
        data = data.with_plan(plan)
        return [fig for s in sections for fig in s.pages(data)]
    finally:
        if owned:
            data.trace.close()


def section_figure(trace_or_path: TraceOrPath, section: str, page: int = 0) -> Figure:
    """One page (the first by default) of a report section as a matplotlib figure.

    Raises:
        UnknownSectionError: `section` is not a section id.
        IndexError: the section has no such page for this trace.
    """
    figures = section_figures(trace_or_path, section)
    if page >= len(figures):
        msg = f"section {section!r} has {len(figures)} page(s) for this trace, not {page + 1}"
        raise IndexError(msg)
    return figures[page]
