"""The root of samplescope's exceptions, so the CLI can tell user mistakes from bugs."""

from __future__ import annotations

__all__ = ["SamplescopeError"]


class SamplescopeError(Exception):
    """A problem with the user's input or environment, reported in one line.

    The CLI turns these into a one-line message and exit status 2; anything else is a bug.
    """
