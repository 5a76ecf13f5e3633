"""Reports: a multi-page PDF of a trace, read only through `samplescope.analysis`.

from samplescope.reports import render_report
render_report("run.h5", "report.pdf")
"""

from __future__ import annotations

from samplescope.reports.errors import ReportError, ReportOutputError, UnknownSectionError
from samplescope.reports.render import FORMATS, SECTIONS, render_report

__all__ = [
    "FORMATS",
    "SECTIONS",
    "ReportError",
    "ReportOutputError",
    "UnknownSectionError",
    "render_report",
]
