from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from tracefiles import write_tiny_trace

from samplescope.analysis import Trace, open_trace


@pytest.fixture
def tiny_path(tmp_path: Path) -> Path:
    return write_tiny_trace(
        tmp_path / "tiny.h5",
        sample_info={
            "sample_id": [0, 1, 2, 3],
            "flipped": [False, True, False, False],
            "target": [0, 1, 0, 1],
        },
    )


@pytest.fixture
def tiny(tiny_path: Path) -> Iterator[Trace]:
    with open_trace(tiny_path) as trace:
        yield trace
