"""Exceptions raised by `samplescope.analysis` for problems with the user's input."""

from __future__ import annotations

from samplescope.errors import SamplescopeError

__all__ = ["EmptyTraceError", "QueryError", "TraceError", "TraceFormatError"]


class TraceError(SamplescopeError):
    """A trace cannot be opened: a missing file, a bad glob, shards that do not belong together."""


class TraceFormatError(TraceError):
    """A file is not a readable samplescope trace: not HDF5, another format, a newer version,
    truncated or corrupt."""


class EmptyTraceError(TraceError):
    """A statistic needs recorded visits and the trace has none (yet)."""


class QueryError(SamplescopeError):
    """A SQL query failed, or a table or column name is unknown."""
