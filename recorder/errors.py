"""The recorder's exceptions."""

from __future__ import annotations

from samplescope.errors import SamplescopeError

__all__ = ["RecorderError"]


class RecorderError(SamplescopeError):
    """A recording failure: bad arguments to `backward`, a failing layer, a failed write."""
