"""Output folders: create them, or say in one line why not."""

from __future__ import annotations

import os
from pathlib import Path

from samplescope.errors import SamplescopeError

__all__ = ["ensure_writable_dir"]


def ensure_writable_dir(folder: Path, error: type[SamplescopeError]) -> None:
    """Create ``folder`` (with parents) and check it is writable.

    Raises:
        error: with a one-line message naming the folder and the reason.
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        msg = f"cannot create {folder}: {exc.strerror or exc}"
        raise error(msg) from None
    if not os.access(folder, os.W_OK):
        msg = f"cannot write to {folder}: permission denied"
        raise error(msg)
