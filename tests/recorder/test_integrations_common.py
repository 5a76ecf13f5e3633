"""What the framework adapters share: one trace per rank, the accumulation check."""

from __future__ import annotations

import pytest

from samplescope.recorder.integrations import IntegrationError
from samplescope.recorder.integrations._common import rank_path


def test_each_rank_gets_its_own_trace():
    assert rank_path("runs/exp-{rank}.h5", 3, 4) == "runs/exp-3.h5"
    assert rank_path("runs/exp.h5", 0, 1) == "runs/exp.h5"


def test_several_ranks_without_a_rank_in_the_path_are_refused():
    with pytest.raises(IntegrationError, match=r"put \{rank\} in the trace path"):
        rank_path("runs/exp.h5", 1, 2)
