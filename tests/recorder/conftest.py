"""Fixtures for the recorder tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture
def float64_default() -> Iterator[None]:
    """Run a test in float64 (the layer tests compare to 1e-5) on one intra-op thread.

    The layer tests run thousands of tiny ops; on a shared two-core machine a second
    intra-op thread only adds contention, and made them several times slower.
    """
    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    yield
    torch.set_default_dtype(dtype)
    torch.set_num_threads(threads)
