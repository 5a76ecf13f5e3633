"""What a report section is: an id for `--pages`, a title, and a function making its pages."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from matplotlib.figure import Figure

from samplescope.reports._data import ReportData

__all__ = ["Section"]


@dataclass(frozen=True)
class Section:
    """One section of the report.

    Attributes:
        id: the name used by ``--pages`` (e.g. ``"heatmaps"``).
        title: a short human title, listed on the summary page.
        pages: draws the section's pages from the report data, one figure per page.
        needs_outputs: the section needs recorded logits/targets and is left out of a
            report of a trace without them.
        missing: for sections that need optional data (sample_info flags, alignment):
            returns why this trace cannot support the section, or None when it can.
    """

    id: str
    title: str
    pages: Callable[[ReportData], Iterable[Figure]]
    needs_outputs: bool = False
    missing: Callable[[ReportData], str | None] | None = None

    def left_out_because(self, data: ReportData) -> str | None:
        """Why this section is left out of `data`'s report, or None if it is drawn."""
        if self.needs_outputs and not data.has_outputs:
            return "needs logits/targets, which this trace did not record"
        return None if self.missing is None else self.missing(data)
