"""Exceptions raised by `samplescope.reports` for problems with the user's input."""

from __future__ import annotations

from samplescope.errors import SamplescopeError

__all__ = ["ReportError", "ReportOutputError", "UnknownSectionError"]


class ReportError(SamplescopeError):
    """A report cannot be made from what the user gave."""


class UnknownSectionError(ReportError):
    """`pages` names a section the report does not have."""


class ReportOutputError(ReportError):
    """The report's output path cannot be written."""
