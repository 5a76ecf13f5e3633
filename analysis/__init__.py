"""Read samplescope traces: DuckDB views, Polars frames and per-sample statistics.

No torch here, ever: the HDF5 trace format (docs/trace-format.md) is the only contract with
the recorder.
"""

from __future__ import annotations

from samplescope.analysis.compare import compare_traces
from samplescope.analysis.errors import EmptyTraceError, QueryError, TraceError, TraceFormatError
from samplescope.analysis.runs import Runs, open_runs
from samplescope.analysis.trace import TABLES, Trace, open_trace

__all__ = [
    "TABLES",
    "EmptyTraceError",
    "QueryError",
    "Runs",
    "Trace",
    "TraceError",
    "TraceFormatError",
    "compare_traces",
    "open_runs",
    "open_trace",
]
